"""
An append-only log of checksummed records in segment files, with group
commit, retention and crash recovery.

Sans-IO in the sense that matters here: no reactor, no clock (every call
that needs the time takes C{now}), and all I/O through an L{IStorage} the
caller chooses, so tests run it on L{FakeStorage} and crash it.
"""

import math
import re
from bisect import bisect_right

from twisted.logger import Logger
from zope.interface import implementer

from fit_broker.interfaces import ISegmentLog
from fit_broker.storage.records import (
    HEADER_SIZE,
    MAX_RECORD_BYTES,
    Reader,
    count_damaged,
    encode,
)
from fit_broker.storage.reports import Damage, Recovery, Trimmed
from fit_broker.storage.seam import StorageError

FSYNC_POLICIES = ("always", "interval", "never")

MiB = 1024 * 1024

#: A segment remembers the offset of one record per this many bytes, so a
#: read from an index scans at most this much before its first record.
MARK_BYTES = 64 * 1024

_NAME = re.compile(r"^([0-9]{20})\.seg$")


def segment_name(first_index):
    """
    Return the file name of the segment whose first record is C{first_index}.
    """
    return f"{first_index:020d}.seg"


def parse_segment_name(name):
    """
    Return the first index a segment file name holds, or C{None}.
    """
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


class _Segment:
    """
    One segment file as the log knows it: its records' indexes and bytes.
    """

    __slots__ = ("name", "first", "count", "size", "newest", "mark_indexes", "mark_offsets")

    def __init__(self, name, first):
        self.name = name
        self.first = first
        self.count = 0
        self.size = 0
        self.newest = -math.inf
        self.mark_indexes = [first]
        self.mark_offsets = [0]

    @property
    def end(self):
        return self.first + self.count

    def add(self, offset, length, timestamp):
        if offset - self.mark_offsets[-1] >= MARK_BYTES:
            self.mark_indexes.append(self.end)
            self.mark_offsets.append(offset)
        self.count += 1
        self.size = offset + length
        if timestamp > self.newest:
            self.newest = timestamp

    def seek(self, index):
        """
        Return C{(offset, index)} of a record at or before C{index}.
        """
        k = bisect_right(self.mark_indexes, index) - 1
        return self.mark_offsets[k], self.mark_indexes[k]


@implementer(ISegmentLog)
class SegmentLog:
    """
    A log of records numbered from 0 (or C{start_index}) in segment files
    named by their first record's index, oldest dropped whole by retention.

    Durability follows C{fsync}: under C{"always"} the caller acknowledges a
    record only after L{sync} returned, and one sync covers every record
    appended before it (group commit: append a reactor turn's records, then
    sync once); under C{"interval"} L{tick} syncs once the oldest unsynced
    record is C{interval} seconds old, so a crash loses at most the records
    of the last C{interval} (if ticks come when L{sync_deadline} says);
    under C{"never"} only a segment roll and L{close} sync, and a crash may
    lose anything appended since the last roll.

    Call L{recover} (or build with L{open}) before anything else.

    @param segment_bytes: a segment rolls before it would grow past this
        (a single larger record gets a segment of its own).
    @param max_bytes: retention keeps the segments' bytes under this,
        dropping the oldest; the newest segment is never dropped for size.
    @param max_age: retention drops segments whose newest record's
        timestamp is older than this many seconds.
    @param max_record_bytes: the largest payload; a longer length field
        found on disk is damage, never the size of a read.
    @param start_index: the first index of a log with no segment yet.
    """

    logger = Logger()

    def __init__(
        self,
        storage,
        *,
        segment_bytes=64 * MiB,
        fsync="always",
        interval=0.05,
        max_bytes=None,
        max_age=None,
        max_record_bytes=MAX_RECORD_BYTES,
        start_index=0,
    ):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if segment_bytes < HEADER_SIZE:
            raise ValueError(f"segment_bytes must be at least {HEADER_SIZE}, not {segment_bytes}")
        if not interval > 0:
            raise ValueError(f"interval must be above 0 seconds, not {interval}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
        if max_age is not None and not max_age >= 0:
            raise ValueError(f"max_age must be 0 or more seconds, not {max_age}")
        if not 0 <= max_record_bytes < 2**32:
            raise ValueError(f"max_record_bytes must fit in 32 bits, not {max_record_bytes}")
        if start_index < 0:
            raise ValueError(f"start_index must be 0 or more, not {start_index}")
        self.storage = storage
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.interval = interval
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.max_record_bytes = max_record_bytes
        self.next_index = start_index
        self.size_bytes = 0
        self.recovery = None
        self.failed = None
        self.closed = False
        self._segments = []
        self._firsts = []
        self._unsynced = 0
        self._unsynced_bytes = 0
        self._unsynced_since = None
        self.last_sync = None
        self.syncs = 0
        self.synced_records = 0
        self.last_sync_records = 0
        self.max_sync_records = 0
        self.appended_records = 0
        self.appended_bytes = 0

    @classmethod
    def open(cls, storage, **settings):
        """
        Return a log on C{storage}, recovered; its report is L{recovery}.
        """
        log = cls(storage, **settings)
        log.recover()
        return log

    def __repr__(self):
        return (
            f"<SegmentLog {self.storage!r} [{self.first_index}, {self.next_index})"
            f" {len(self._segments)} segments fsync={self.fsync}>"
        )

    # -- state

    @property
    def first_index(self):
        return self._segments[0].first if self._segments else self.next_index

    @property
    def records(self):
        return sum(s.count for s in self._segments)

    @property
    def segments(self):
        """
        The segment files' names, oldest first.
        """
        return [s.name for s in self._segments]

    def gaps(self):
        """
        Return the index ranges C{(first, end)} missing between segments.
        """
        segs = self._segments
        return [(a.end, b.first) for a, b in zip(segs, segs[1:]) if a.end < b.first]

    def stats(self):
        """
        Return the log's figures as plain data, for status and metrics.
        """
        return {
            "first_index": self.first_index,
            "next_index": self.next_index,
            "records": self.records,
            "bytes": self.size_bytes,
            "segments": len(self._segments),
            "appended_records": self.appended_records,
            "appended_bytes": self.appended_bytes,
            "pending_records": self._unsynced,
            "pending_bytes": self._unsynced_bytes,
            "syncs": self.syncs,
            "synced_records": self.synced_records,
            "last_sync_records": self.last_sync_records,
            "max_sync_records": self.max_sync_records,
        }

    def _check_usable(self):
        if self.recovery is None:
            raise RuntimeError("recover() the log before using it")
        if self.closed:
            raise RuntimeError(f"{self!r} is closed")
        if self.failed is not None:
            raise StorageError(
                f"log stopped after an earlier storage failure ({self.failed}); reopen it to recover",
                errno=self.failed.errno,
                full=False,
            )

    # -- recovery

    def recover(self):
        """
        Scan every segment, checking each record's length and checksum;
        cut what is damaged and return a L{Recovery} saying what was lost.

        The last segment's damaged tail is cut: records appended last, of
        which only the unacknowledged may be lost.  In an older segment the
        first bad record and everything after it in that segment are cut,
        and their index range reported lost (the segments after it are
        kept): those records were synced, so the caller recovers them from
        peers, e.g. with L{fill}.
        """
        if self.recovery is not None:
            raise RuntimeError("recover() runs once, when the log is opened")
        storage = self.storage
        found = []
        ignored = []
        for name in storage.files():
            first = parse_segment_name(name)
            if first is None:
                ignored.append(name)
            else:
                found.append((first, name))
        found.sort()
        damage = []
        segments = []
        for k, (first, name) in enumerate(found):
            last = k == len(found) - 1
            limit = None if last else found[k + 1][0]
            size = storage.size(name)
            seg = _Segment(name, first)
            reader = Reader(storage, name, 0, size, self.max_record_bytes)
            overlap = False
            for offset, timestamp, payload in reader:
                if limit is not None and seg.end >= limit:
                    overlap = True
                    break
                seg.add(offset, HEADER_SIZE + len(payload), timestamp)
            if seg.size < size:
                reason = "overlap" if overlap else reader.error
                if last:
                    end_index = seg.end + count_damaged(
                        storage, name, seg.size, size, self.max_record_bytes
                    )
                else:
                    end_index = max(limit, seg.end)
                damage.append(Damage(name, seg.size, size - seg.size, seg.end, end_index, reason, last))
                storage.truncate(name, seg.size)
            elif not last and seg.end < limit:
                damage.append(Damage(name, seg.size, 0, seg.end, limit, "gap", False))
            segments.append(seg)
        self._segments = segments
        self._firsts = [s.first for s in segments]
        if segments:
            self.next_index = segments[-1].end
        self.size_bytes = sum(s.size for s in segments)
        self.recovery = Recovery(
            segments=len(segments),
            records=self.records,
            bytes=self.size_bytes,
            first_index=self.first_index,
            next_index=self.next_index,
            damage=tuple(damage),
            ignored=tuple(ignored),
        )
        for d in damage:
            self.logger.warn(
                "Segment log {storage}: {damage}", storage=storage, damage=d.describe()
            )
        return self.recovery

    # -- appending and syncing

    def _roll(self, now):
        """
        Sync the active segment, then start an empty one at L{next_index}.
        """
        if self._segments:
            self._sync(now)
        seg = _Segment(segment_name(self.next_index), self.next_index)
        self.storage.append(seg.name, b"")
        self._segments.append(seg)
        self._firsts.append(seg.first)
        return seg

    def _encode(self, payload, now, timestamp):
        if type(payload) is not bytes:
            payload = bytes(payload)
        if len(payload) > self.max_record_bytes:
            raise ValueError(f"record of {len(payload)} bytes is over the {self.max_record_bytes}-byte limit")
        timestamp = now if timestamp is None else float(timestamp)
        if not math.isfinite(timestamp):
            raise ValueError(f"record timestamp must be finite, not {timestamp}")
        return encode(payload, timestamp), timestamp

    def _write(self, seg, record):
        """
        Append C{record} to C{seg}; on failure cut what part of it was
        written, so the file stays whole records.
        """
        try:
            self.storage.append(seg.name, record)
        except StorageError:
            try:
                self.storage.truncate(seg.name, seg.size)
            except StorageError as e:
                self.failed = e
            raise

    def append(self, payload, now, timestamp=None):
        """
        Append one record and return its index.  It is durable only after a
        L{sync} (or what the fsync policy does for the caller).

        @param timestamp: the record's own time (a publisher's clock), which
            retention by age reads; C{now} if omitted.
        @raise StorageError: the storage refused (C{.full} for a full disk);
            nothing of the record stays and the log goes on.
        """
        if self.failed is not None or self.closed or self.recovery is None:
            self._check_usable()
        record, timestamp = self._encode(payload, now, timestamp)
        size = len(record)
        seg = self._segments[-1] if self._segments else None
        if seg is None or (seg.size and seg.size + size > self.segment_bytes):
            seg = self._roll(now)
        self._write(seg, record)
        index = seg.end
        seg.add(seg.size, size, timestamp)
        self.next_index = index + 1
        self.size_bytes += size
        self.appended_records += 1
        self.appended_bytes += size
        if not self._unsynced:
            self._unsynced_since = now
        self._unsynced += 1
        self._unsynced_bytes += size
        return index

    def pending_sync(self):
        """
        Return how many appended records no sync has covered yet.
        """
        return self._unsynced

    @property
    def sync_deadline(self):
        """
        When the fsync policy wants the next sync (C{None}: not before a
        roll or close): under C{"always"} as soon as anything is pending,
        under C{"interval"} C{interval} after the oldest pending append.
        """
        if not self._unsynced or self.fsync == "never":
            return None
        if self.fsync == "always":
            return self._unsynced_since
        return self._unsynced_since + self.interval

    def _sync_file(self, name):
        try:
            self.storage.sync(name)
        except StorageError as e:
            # What a failed fsync leaves on disk is unknown: stop until a
            # reopen recovers from what is really there.
            self.failed = e
            raise

    def _sync(self, now):
        covered = self._unsynced
        if not covered:
            return 0
        self._sync_file(self._segments[-1].name)
        self.syncs += 1
        self.synced_records += covered
        self.last_sync_records = covered
        self.max_sync_records = max(self.max_sync_records, covered)
        self._unsynced = 0
        self._unsynced_bytes = 0
        self._unsynced_since = None
        self.last_sync = now
        return covered

    def sync(self, now):
        """
        Make every record appended so far durable; return how many records
        this sync covered (0: nothing was pending, no fsync made).
        """
        self._check_usable()
        return self._sync(now)

    def tick(self, now):
        """
        Sync if L{sync_deadline} has come; return the records covered.
        """
        deadline = self.sync_deadline
        if deadline is None or now < deadline:
            return 0
        return self.sync(now)

    def close(self, now):
        """
        Sync what is pending under any policy and stop; return the records
        that sync covered.  The storage stays open (its owner closes it).
        """
        if self.closed:
            return 0
        covered = 0
        if self.recovery is not None and self.failed is None:
            covered = self._sync(now)
        self.closed = True
        return covered

    # -- reading

    def read_from(self, index, end=None):
        """
        Iterate C{(index, timestamp, payload)} from C{index} (or the first
        record held after it) up to L{next_index} as of this call, or
        C{end}.  Indexes jump over L{gaps} and over segments that
        retention drops while the iteration goes on.

        @raise StorageError: a record fails its check (damaged since the
            log was opened), or the storage fails.
        """
        if self.recovery is None:
            raise RuntimeError("recover() the log before using it")
        stop = self.next_index if end is None else min(end, self.next_index)
        segs = list(self._segments)
        k = max(0, bisect_right(self._firsts, index) - 1)
        return self._read(segs[k:], index, stop)

    def _read(self, segs, index, stop):
        for seg in segs:
            if seg.first >= stop:
                return
            if index >= seg.end or not seg.count:
                continue
            if self._segments and seg.first < self.first_index:
                continue  # dropped by retention meanwhile
            start = max(index, seg.first)
            offset, at = seg.seek(start)
            last = min(seg.end, stop)
            reader = Reader(self.storage, seg.name, offset, seg.size, self.max_record_bytes)
            try:
                for _, timestamp, payload in reader:
                    if at >= last or seg.first < self.first_index:
                        break
                    if at >= start:
                        yield at, timestamp, payload
                    at += 1
            except StorageError:
                if seg.first < self.first_index:
                    continue  # deleted by retention while being read
                raise
            if at < last and seg.first >= self.first_index:
                raise StorageError(
                    f"record {at} in segment {seg.name} of {self.storage!r} is damaged"
                    f" ({reader.error}); reopen the log to recover"
                )

    # -- retention

    def trim(self, now, keep_after_index=None):
        """
        Drop whole oldest segments past C{max_age} or beyond C{max_bytes};
        return a L{Trimmed} saying what went.

        Segments holding a record above C{keep_after_index} are kept
        whatever the bounds (the caller's floor of what it still needs).
        The newest segment goes only when every record in it expired: the
        log then rolls to an empty segment, so it still knows its
        L{next_index} after a restart.
        """
        self._check_usable()
        segs = self._segments
        if not segs:
            return Trimmed(first_index=self.next_index, end_index=self.next_index)
        limit = self.next_index if keep_after_index is None else keep_after_index + 1
        oldest_kept = None if self.max_age is None else now - self.max_age
        total = self.size_bytes
        drops = []  # (segment, expired?)
        for seg in segs[:-1]:
            if seg.end > limit:
                break
            expired = oldest_kept is not None and seg.newest < oldest_kept
            if not expired and not (self.max_bytes is not None and total > self.max_bytes):
                break
            drops.append((seg, expired))
            total -= seg.size
        active = segs[-1]
        if (
            len(drops) == len(segs) - 1
            and active.count
            and active.end <= limit
            and oldest_kept is not None
            and active.newest < oldest_kept
        ):
            drops.append((active, True))
            self._sync_file(self._roll(now).name)
        if not drops:
            return Trimmed(first_index=self.first_index, end_index=self.first_index)
        figures = {"expired": 0, "expired_bytes": 0, "overflow": 0, "overflow_bytes": 0}
        first = end = drops[0][0].first
        dropped = 0
        error = None
        for seg, expired in drops:
            try:
                self.storage.delete(seg.name)
            except StorageError as e:
                # What was deleted stays counted; the rest waits for the
                # next pass.
                error = str(e)
                self.logger.warn("Segment log {storage}: {error}", storage=self.storage, error=error)
                break
            del self._segments[0]
            del self._firsts[0]
            self.size_bytes -= seg.size
            kind = "expired" if expired else "overflow"
            figures[kind] += seg.count
            figures[kind + "_bytes"] += seg.size
            end = seg.end
            dropped += 1
        return Trimmed(segments=dropped, first_index=first, end_index=end, error=error, **figures)

    # -- repair

    def fill(self, first_index, records, now):
        """
        Write records recovered from peers into the gap that starts at
        C{first_index} (see L{gaps}), synced before this returns; return
        how many were written.

        @param records: C{(timestamp, payload)} pairs for C{first_index}
            onwards, no more than the gap holds.
        """
        self._check_usable()
        segs = self._segments
        k = bisect_right(self._firsts, first_index) - 1
        if not (0 <= k < len(segs) - 1 and segs[k].end == first_index < segs[k + 1].first):
            raise ValueError(f"no gap in the log starts at index {first_index}")
        seg = segs[k]
        room = segs[k + 1].first - first_index
        encoded = [self._encode(payload, now, timestamp) for timestamp, payload in records]
        if len(encoded) > room:
            raise ValueError(
                f"{len(encoded)} records do not fit the gap of {room} at index {first_index}"
            )
        if not encoded:
            return 0
        blob = b"".join(record for record, _ in encoded)
        self._write(seg, blob)
        offset = seg.size
        for record, timestamp in encoded:
            seg.add(offset, len(record), timestamp)
            offset += len(record)
        self.size_bytes += len(blob)
        self._sync_file(seg.name)
        return len(encoded)
