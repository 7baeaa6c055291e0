"""
The segment log: group commit under each fsync policy, crash recovery from
torn and corrupt segments, segment roll and retention, full disks.  Sans-IO
on FakeStorage (whose crash() forgets what was not synced), plus round
trips on real files.
"""

import os
import random
import shutil
import struct
import subprocess

import pytest
from zope.interface.verify import verifyObject

from fit_broker.interfaces import ISegmentLog
from fit_broker.storage import (
    HEADER_SIZE,
    FakeStorage,
    FileStorage,
    SegmentLog,
    StorageError,
    segment_name,
)
from fit_broker.storage.records import READ_CHUNK, encode


def payload(i):
    """A payload of a size that varies with i, so records do not all align."""
    return (b"%d:" % i) + bytes([i % 251]) * (i * 7 % 23)


def record_size(i):
    return HEADER_SIZE + len(payload(i))


def copy_of(store, cut=None):
    """A FakeStorage holding, synced, the current bytes of every file (the last cut to cut)."""
    other = FakeStorage()
    names = store.files()
    for name in names:
        data = store.read(name, 0, store.size(name))
        if cut is not None and name == names[-1]:
            data = data[:cut]
        other.append(name, data)
        other.sync(name)
    return other


def contents(log):
    return [(index, data) for index, _, data in log.read_from(0)]


def test_provides_isegmentlog():
    """SegmentLog provides ISegmentLog."""
    assert verifyObject(ISegmentLog, SegmentLog.open(FakeStorage()))


def test_append_read_and_reopen():
    """Appends get consecutive indexes, read back in order from any index, and a reopen recovers them all."""
    store = FakeStorage()
    log = SegmentLog.open(store, segment_bytes=100)
    assert log.first_index == log.next_index == 0 and log.recovery.clean
    indexes = [log.append(payload(i), now=1.0, timestamp=100.0 + i) for i in range(20)]
    assert indexes == list(range(20)) and log.next_index == 20
    assert contents(log) == [(i, payload(i)) for i in range(20)]
    assert [i for i, _, _ in log.read_from(7, end=11)] == [7, 8, 9, 10]
    assert [t for _, t, _ in log.read_from(18)] == [118.0, 119.0]
    assert list(log.read_from(20)) == [] and list(log.read_from(99)) == []
    log.close(now=2.0)
    again = SegmentLog.open(store, segment_bytes=100)
    assert again.recovery.clean and again.recovery.records == 20
    assert (again.first_index, again.next_index, again.size_bytes) == (0, 20, log.size_bytes)
    assert contents(again) == contents(log)
    assert again.append(b"more", now=3.0) == 20


def test_start_index_for_an_empty_log():
    """A log with no segment starts at start_index; its first segment is named by it."""
    log = SegmentLog.open(FakeStorage(), start_index=1000)
    assert log.append(b"x", now=0.0) == 1000
    assert log.segments == [segment_name(1000)] == ["00000000000000001000.seg"]


def test_segment_roll():
    """Segments roll before passing segment_bytes, are named by their first index, and roll syncs the old one."""
    store = FakeStorage()
    log = SegmentLog.open(store, segment_bytes=120, fsync="never")
    for i in range(30):
        log.append(payload(i), now=0.0)
    log.append(b"y" * 500, now=0.0)  # larger than a segment: alone in its own
    log.append(b"z", now=0.0)
    names = log.segments
    firsts = [int(name.split(".")[0]) for name in names]
    assert firsts[0] == 0 and firsts == sorted(firsts) and len(names) > 5
    assert names == [segment_name(first) for first in firsts]
    for name in names[:-2]:
        assert store.size(name) <= 120
        assert store.durable(name) == store.read(name, 0, 10_000)
    assert store.size(names[-2]) == HEADER_SIZE + 500 and firsts[-1] == 31
    assert store.durable(names[-1]) is None


def test_group_commit_under_always():
    """One sync covers every record appended before it; the log reports how many each sync covered."""
    store = FakeStorage()
    log = SegmentLog.open(store)
    for i in range(5):
        log.append(payload(i), now=10.0 + i)
    assert log.pending_sync() == 5 and log.sync_deadline == 10.0
    assert log.sync(now=20.0) == 5
    assert log.pending_sync() == 0 and log.sync_deadline is None
    assert log.sync(now=21.0) == 0
    assert store.syncs == {segment_name(0): 1}
    log.append(b"a", now=22.0)
    log.append(b"b", now=22.0)
    assert log.tick(now=22.0) == 2
    stats = log.stats()
    assert (stats["syncs"], stats["synced_records"], stats["last_sync_records"], stats["max_sync_records"]) == (2, 7, 2, 5)
    assert stats["pending_records"] == stats["pending_bytes"] == 0


@pytest.mark.parametrize("seed", range(30))
def test_crash_under_always_keeps_every_acknowledged_record(seed):
    """Under "always" a crash (with torn writes) keeps every record appended before a completed sync; what survives is a prefix of what was appended."""
    rng = random.Random(seed)
    store = FakeStorage()
    log = SegmentLog.open(store, segment_bytes=rng.choice([64, 200, 1000]))
    appended, acknowledged = [], 0
    for turn in range(rng.randrange(1, 12)):
        for _ in range(rng.randrange(1, 6)):
            appended.append(payload(len(appended)))
            log.append(appended[-1], now=float(turn))
        if turn < 11 and rng.random() < 0.8:
            log.sync(now=float(turn))
            acknowledged = len(appended)
    store.crash(rng)
    again = SegmentLog.open(store, segment_bytes=200)
    kept = [data for _, data in contents(again)]
    assert acknowledged <= len(kept) <= len(appended)
    assert kept == appended[: len(kept)]
    assert again.recovery.lost == () and again.gaps() == []
    assert again.next_index == len(kept)
    assert SegmentLog.open(copy_of(store)).recovery.clean


@pytest.mark.parametrize("seed", range(30))
def test_crash_under_interval_loses_at_most_the_last_interval(seed):
    """Under "interval", with tick called at each sync deadline, a crash loses only records appended within the last interval."""
    rng = random.Random(seed)
    interval = 0.05
    store = FakeStorage()
    log = SegmentLog.open(store, fsync="interval", interval=interval, segment_bytes=300)
    times = sorted(rng.uniform(0, 1.0) for _ in range(rng.randrange(1, 60)))
    crash_at = rng.uniform(0, 1.1)

    def fire_timers(until):
        while log.sync_deadline is not None and log.sync_deadline <= until:
            log.tick(now=log.sync_deadline)

    appended = []
    for t in times:
        if t > crash_at:
            break
        fire_timers(t)
        log.append(payload(len(appended)), now=t)
        appended.append(t)
    fire_timers(crash_at)
    store.crash(rng if seed % 2 else None)
    again = SegmentLog.open(store)
    kept = [data for _, data in contents(again)]
    assert kept == [payload(i) for i in range(len(kept))]
    must_keep = sum(1 for t in appended if t <= crash_at - interval)
    assert must_keep <= len(kept) <= len(appended)
    if seed % 2 == 0:
        assert len(kept) == log.synced_records
    # Syncs come at least an interval apart (one per roll aside): group commit.
    assert log.syncs <= crash_at / interval + 1 + len(log.segments)


def test_interval_deadline_and_tick():
    """Under "interval" the deadline is interval after the oldest unsynced append, and tick syncs only once it has come."""
    log = SegmentLog.open(FakeStorage(), fsync="interval", interval=0.1)
    assert log.sync_deadline is None and log.tick(now=5.0) == 0
    log.append(b"a", now=1.0)
    log.append(b"b", now=1.05)
    assert log.sync_deadline == pytest.approx(1.1)
    assert log.tick(now=1.09) == 0 and log.pending_sync() == 2
    assert log.tick(now=1.1) == 2 and log.sync_deadline is None


def _never_log(store):
    log = SegmentLog.open(store, fsync="never", segment_bytes=100)
    for i in range(25):
        log.append(payload(i), now=float(i))
        assert log.tick(now=float(i) + 100) == 0
    assert log.sync_deadline is None
    return log, int(log.segments[-1].split(".")[0])


def test_crash_under_never_keeps_only_rolled_segments():
    """Under "never" nothing syncs but a roll: a crash keeps exactly the records of the rolled segments."""
    store = FakeStorage()
    log, last_first = _never_log(store)
    assert 0 < last_first < 25 and log.syncs == len(log.segments) - 1
    store.crash()
    assert [d for _, d in contents(SegmentLog.open(store))] == [payload(i) for i in range(last_first)]


def test_close_under_never_syncs_everything():
    """Under "never" close syncs what the newest segment holds, so a crash after it keeps every record."""
    store = FakeStorage()
    log, last_first = _never_log(store)
    assert log.close(now=30.0) == 25 - last_first
    store.crash()
    assert [d for _, d in contents(SegmentLog.open(store))] == [payload(i) for i in range(25)]


def _built(n, segment_bytes=150):
    store = FakeStorage()
    log = SegmentLog.open(store, segment_bytes=segment_bytes)
    for i in range(n):
        log.append(payload(i), now=0.0, timestamp=float(i))
    log.close(now=0.0)
    return store, log


def _long_tail():
    """Records 0-13 in small segments but the last, which holds 6 records."""
    store, _ = _built(8)
    log = SegmentLog.open(store, segment_bytes=10_000)
    for i in range(8, 14):
        log.append(payload(i), now=0.0, timestamp=float(i))
    log.close(now=0.0)
    return store, log


def test_cut_at_every_byte_of_the_last_records():
    """A last segment cut at any byte offset of its last records recovers exactly the complete records before the cut and reports the rest."""
    store, log = _long_tail()
    last = log.segments[-1]
    first = int(last.split(".")[0])
    assert 14 - first >= 6 and len(log.segments) > 1
    boundaries = [0]
    for i in range(first, 14):
        boundaries.append(boundaries[-1] + record_size(i))
    size = store.size(last)
    assert boundaries[-1] == size
    for offset in range(size + 1):
        whole = max(k for k, b in enumerate(boundaries) if b <= offset)
        cut = copy_of(store, cut=offset)
        again = SegmentLog.open(cut)
        assert again.next_index == first + whole
        assert contents(again) == [(i, payload(i)) for i in range(first + whole)]
        assert cut.size(last) == boundaries[whole]
        damage = again.recovery.damage
        if offset == boundaries[whole]:
            assert damage == ()
            continue
        (d,) = damage
        assert d.tail and d.segment == last and d.offset == boundaries[whole]
        assert d.bytes_cut == offset - boundaries[whole]
        assert d.first_index == first + whole and d.records == 1
        assert again.recovery.cut == d and again.recovery.lost == ()
        assert d.reason in ("short header", "past end")
        assert again.append(b"next", now=1.0) == first + whole
        again.sync(now=1.0)
        reopened = SegmentLog.open(cut)
        assert reopened.recovery.clean and reopened.next_index == first + whole + 1


def test_flip_each_byte_of_an_older_record():
    """A byte flipped anywhere in a record of an older segment cuts that segment there, reports the lost index range, and keeps every other segment."""
    store, log = _built(14, segment_bytes=100)
    names = log.segments
    assert len(names) >= 3
    middle = names[1]
    m_first = int(middle.split(".")[0])
    n_first = int(names[2].split(".")[0])
    assert n_first - m_first >= 2
    victim = m_first + 1
    start = record_size(m_first)
    for at in range(start, start + record_size(victim)):
        damaged = copy_of(store)
        byte = damaged.read(middle, at, 1)[0]
        damaged.damage(middle, at, bytes([byte ^ 0x5A]))
        again = SegmentLog.open(damaged)
        (d,) = again.recovery.damage
        assert not d.tail and d.segment == middle and d.offset == start
        assert (d.first_index, d.end_index) == (victim, n_first)
        assert d.bytes_cut == store.size(middle) - start
        assert d.reason in ("checksum", "too long", "past end")
        assert again.recovery.lost == ((victim, n_first),) and again.gaps() == [(victim, n_first)]
        held = [i for i, _ in contents(again)]
        assert held == list(range(victim)) + list(range(n_first, 14))
        assert contents(again) == [(i, payload(i)) for i in held]
        assert again.next_index == 14
    # The cut stays reported as a gap on the next open, until filled from peers.
    reopened = SegmentLog.open(damaged)
    (d,) = reopened.recovery.damage
    assert (d.reason, d.bytes_cut, d.first_index, d.end_index) == ("gap", 0, victim, n_first)
    assert reopened.fill(victim, [(float(i), payload(i)) for i in range(victim, n_first)], now=5.0) == n_first - victim
    assert reopened.gaps() == [] and contents(reopened) == [(i, payload(i)) for i in range(14)]
    damaged.crash()
    assert SegmentLog.open(damaged).recovery.clean


def test_fill_checks_the_gap():
    """fill refuses an index where no gap starts and more records than the gap holds, and fills a gap in parts."""
    store, log = _built(14, segment_bytes=100)
    middle = log.segments[1]
    m_first = int(middle.split(".")[0])
    n_first = int(log.segments[2].split(".")[0])
    store.truncate(middle, 0)
    again = SegmentLog.open(store)
    assert again.gaps() == [(m_first, n_first)]
    with pytest.raises(ValueError, match="no gap"):
        again.fill(m_first + 1, [(0.0, b"x")], now=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        again.fill(m_first, [(0.0, b"x")] * (n_first - m_first + 1), now=0.0)
    assert again.fill(m_first, [(float(m_first), payload(m_first))], now=0.0) == 1
    assert again.gaps() == [(m_first + 1, n_first)]
    assert again.fill(m_first + 1, [(0.0, payload(i)) for i in range(m_first + 1, n_first)], now=0.0)
    assert contents(again) == [(i, payload(i)) for i in range(14)]


def test_corrupt_record_inside_the_last_segment():
    """A bad record followed by good ones in the last segment is cut with everything after it, and the cut counts those records."""
    store, log = _long_tail()
    last = log.segments[-1]
    first = int(last.split(".")[0])
    store.damage(last, record_size(first) + HEADER_SIZE, b"\xff")
    again = SegmentLog.open(store)
    d = again.recovery.cut
    assert d.reason == "checksum" and d.first_index == first + 1
    assert d.end_index == 14 and d.records == 14 - first - 1
    assert again.next_index == first + 1


def test_zero_filled_tail_is_cut():
    """Zeros after the last record (a file extended without its data) fail the checksum and are cut."""
    store, log = _built(5)
    last = log.segments[-1]
    size = store.size(last)
    store.append(last, bytes(64))
    store.sync(last)
    again = SegmentLog.open(store)
    d = again.recovery.cut
    assert d.reason == "checksum" and d.bytes_cut == 64 and store.size(last) == size
    assert again.next_index == 5


def test_huge_length_is_damage_not_an_allocation():
    """A length field beyond the cap, or beyond the file, counts as damage and never sizes a read."""
    for length in (2**31, 10_000):
        store, log = _built(3)
        last = log.segments[-1]
        store.append(last, struct.pack(">IId", length, 0, 0.0) + b"junk")
        store.sync(last)
        store.reads.clear()
        again = SegmentLog.open(store, max_record_bytes=1_000_000)
        assert again.recovery.cut.reason == ("too long" if length > 1_000_000 else "past end")
        assert again.next_index == 3
        assert max(store.reads) <= READ_CHUNK


def test_missing_middle_segment_is_a_gap():
    """A segment file deleted from the middle shows as a reported gap, and reads skip it."""
    store, log = _built(14, segment_bytes=100)
    names = log.segments
    store.delete(names[1])
    again = SegmentLog.open(store)
    lost = (int(names[1].split(".")[0]), int(names[2].split(".")[0]))
    assert again.recovery.lost == (lost,) and again.recovery.damage[0].reason == "gap"
    assert [i for i, _ in contents(again)] == [i for i in range(14) if not lost[0] <= i < lost[1]]


def test_overlapping_segment_is_cut():
    """Records of a segment that run past the next segment's first index are cut as overlap, nothing reported lost."""
    store, log = _built(14, segment_bytes=100)
    names = log.segments
    second = int(names[1].split(".")[0])
    store.append(names[0], encode(b"extra", 0.0))
    store.sync(names[0])
    again = SegmentLog.open(store)
    (d,) = again.recovery.damage
    assert d.reason == "overlap" and d.records == 0 and d.bytes_cut == HEADER_SIZE + 5
    assert contents(again) == [(i, payload(i)) for i in range(14)]
    assert again.first_index == 0 and second > 0


def test_other_files_are_ignored_and_reported():
    """Files that are not segments are left alone and named in the recovery report."""
    store = FakeStorage()
    store.append("notes.txt", b"hello")
    log = SegmentLog.open(store)
    assert log.recovery.ignored == ("notes.txt",) and log.recovery.clean


def test_read_detects_damage_after_open():
    """A record damaged after the log was opened makes a read raise a one-line StorageError naming its index."""
    store, log = _built(5)
    again = SegmentLog.open(store)
    store.damage(again.segments[-1], HEADER_SIZE, b"\x00\x00")
    with pytest.raises(StorageError) as caught:
        list(again.read_from(0))
    assert "record" in str(caught.value) and "reopen" in str(caught.value)


def test_retention_by_size_reports_overflow():
    """Past max_bytes, trim drops the oldest whole segments, never the newest, and reports the overflow."""
    store = FakeStorage()
    log = SegmentLog.open(store, segment_bytes=100, max_bytes=300)
    for i in range(20):
        log.append(b"x" * 30, now=float(i))  # 46-byte records, 2 per segment
    assert len(log.segments) == 10 and log.size_bytes == 920
    protected = log.trim(now=20.0, keep_after_index=5)
    assert (protected.segments, protected.first_index, protected.end_index, protected.overflow) == (3, 0, 6, 6)
    trimmed = log.trim(now=20.0)
    assert (trimmed.first_index, trimmed.end_index) == (6, 14)
    assert (trimmed.overflow, trimmed.overflow_bytes, trimmed.expired) == (8, 8 * 46, 0)
    assert trimmed.records == 8 and trimmed.bytes == 368 and trimmed.error is None
    assert log.first_index == 14 and log.size_bytes == 276 <= 300
    assert log.trim(now=20.0).records == 0
    log.sync(now=20.0)
    store.crash()
    again = SegmentLog.open(store, max_bytes=300)
    assert (again.first_index, again.next_index) == (14, 20)
    assert [i for i, _, _ in again.read_from(0)] == list(range(14, 20))


def test_retention_by_age_uses_record_timestamps():
    """trim drops the oldest segments whose newest record timestamp is past max_age, stopping at the first younger one."""
    log = SegmentLog.open(FakeStorage(), segment_bytes=100, max_age=10.0)
    stamps = [0, 1, 2, 3, 50, 4, 5, 6]  # the third segment holds a late stamp
    for i, stamp in enumerate(stamps):
        log.append(b"y" * 30, now=100.0, timestamp=stamp)
    trimmed = log.trim(now=12.5)  # oldest kept: 2.5
    assert (trimmed.expired, trimmed.overflow, trimmed.first_index, trimmed.end_index) == (2, 0, 0, 2)
    assert log.trim(now=59.0).end_index == 4  # [2,4) expired; [4,6) holds 50
    assert log.trim(now=59.0).records == 0 and log.first_index == 4
    last = log.trim(now=60.5)  # [4,6) and the newest segment [6,8) expired
    assert (last.expired, last.first_index, last.end_index, log.first_index) == (4, 4, 8, 8)


def test_retention_can_empty_the_log_and_keep_its_next_index():
    """When every record expired trim drops the newest segment too, rolling to an empty one, so a restart keeps next_index."""
    store = FakeStorage()
    log = SegmentLog.open(store, segment_bytes=100, max_age=1.0)
    for i in range(7):
        log.append(b"z" * 30, now=0.0, timestamp=0.0)
    trimmed = log.trim(now=5.0)
    assert (trimmed.expired, trimmed.first_index, trimmed.end_index) == (7, 0, 7)
    assert log.first_index == log.next_index == 7 and log.size_bytes == 0
    assert log.segments == [segment_name(7)]
    store.crash()
    again = SegmentLog.open(store)
    assert (again.first_index, again.next_index) == (7, 7) and again.recovery.clean
    assert again.append(b"a", now=6.0) == 7


def test_full_disk_refuses_an_append_and_keeps_the_log_whole():
    """An append on a full disk raises StorageError with .full, leaves no partial record, and the log goes on once there is room."""
    store = FakeStorage()
    log = SegmentLog.open(store)
    for i in range(3):
        log.append(payload(i), now=0.0)
    log.sync(now=0.0)
    size = store.size(log.segments[-1])
    store.full_after(10)
    with pytest.raises(StorageError) as caught:
        log.append(b"w" * 100, now=1.0)
    assert caught.value.full and "No space left" in str(caught.value)
    assert store.size(log.segments[-1]) == size and log.next_index == 3 and log.failed is None
    store.full_after(None)
    assert log.append(b"after", now=2.0) == 3
    log.sync(now=2.0)
    store.crash()
    assert [d for _, d in contents(SegmentLog.open(store))] == [payload(0), payload(1), payload(2), b"after"]


def test_failed_sync_stops_the_log():
    """After a failed sync the log refuses appends and syncs with a one-line error telling to reopen; reopening recovers what was synced."""
    store = FakeStorage()
    log = SegmentLog.open(store)
    log.append(b"a", now=0.0)
    log.sync(now=0.0)
    log.append(b"b", now=1.0)
    store.fail_syncs()
    with pytest.raises(StorageError):
        log.sync(now=1.0)
    assert log.failed is not None
    for call in (lambda: log.append(b"c", now=2.0), lambda: log.sync(now=2.0)):
        with pytest.raises(StorageError, match="reopen") as caught:
            call()
        assert "\n" not in str(caught.value)
    assert log.close(now=3.0) == 0
    store.fail_syncs(None)
    store.crash()
    assert [d for _, d in contents(SegmentLog.open(store))] == [b"a"]


def test_bad_arguments_are_clear_errors():
    """Bad settings, oversized payloads and non-finite timestamps raise ValueError; use before recover() is refused."""
    for settings in ({"fsync": "sometimes"}, {"interval": 0}, {"segment_bytes": 3}, {"max_bytes": -1}):
        with pytest.raises(ValueError):
            SegmentLog(FakeStorage(), **settings)
    log = SegmentLog(FakeStorage(), max_record_bytes=10)
    with pytest.raises(RuntimeError):
        log.append(b"x", now=0.0)
    log.recover()
    with pytest.raises(RuntimeError):
        log.recover()
    with pytest.raises(ValueError, match="over the 10-byte limit"):
        log.append(b"x" * 11, now=0.0)
    with pytest.raises(ValueError, match="finite"):
        log.append(b"x", now=0.0, timestamp=float("nan"))
    assert log.next_index == 0


def test_file_storage_round_trip(tmp_path):
    """On real files with real fsyncs, a closed log reopens with every record, and a torn tail is cut."""
    store = FileStorage(tmp_path / "channel")
    log = SegmentLog.open(store, segment_bytes=1024)
    for i in range(200):
        log.append(payload(i), now=float(i), timestamp=float(i))
        if i % 10 == 9:
            assert log.sync(now=float(i)) > 0 and log.pending_sync() == 0
    assert log.close(now=200.0) == 0
    store.close()
    last = log.segments[-1]
    with open(tmp_path / "channel" / last, "ab") as f:
        f.write(b"\x00\x00\x00\x09torn")
    store = FileStorage(tmp_path / "channel")
    again = SegmentLog.open(store, segment_bytes=1024)
    assert again.recovery.cut.bytes_cut == 8 and again.next_index == 200
    assert contents(again) == [(i, payload(i)) for i in range(200)]
    assert len(again.segments) == len(log.segments) > 3
    store.close()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 KiB tmpfs (needs root and mount), to fill a real file system."""
    folder = tmp_path / "small"
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_full_real_file_system(small_filesystem):
    """Filling a real file system gives a clear .full StorageError naming the segment, and the log keeps every whole record."""
    store = FileStorage(small_filesystem)
    log = SegmentLog.open(store, segment_bytes=1 << 20)
    appended = 0
    with pytest.raises(StorageError) as caught:
        for _ in range(1000):
            log.append(b"e" * 1000, now=0.0)
            appended += 1
    message = str(caught.value)
    assert caught.value.full and "No space left" in message and log.segments[-1] in message
    assert log.failed is None and log.next_index == appended > 0
    assert log.sync(now=0.0) == appended
    store.close()
    again = SegmentLog.open(FileStorage(small_filesystem))
    assert again.recovery.clean and again.next_index == appended
    again.storage.close()


def test_read_goes_on_past_segments_retention_drops():
    """A read under way when retention drops the segments ahead of it jumps to what remains, without an error."""
    log = SegmentLog.open(FakeStorage(), segment_bytes=100, max_bytes=100)
    for i in range(12):
        log.append(b"x" * 30, now=0.0)
    reading = log.read_from(0)
    assert next(reading)[0] == 0
    assert log.trim(now=0.0).overflow == 10
    assert [i for i, _, _ in reading] == [10, 11]
