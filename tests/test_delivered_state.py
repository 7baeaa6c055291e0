"""
The subscriber's delivery record: what was handed survives a restart, once.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fit_broker.client.delivered import DeliveryRecord, safe_name
from fit_broker.errors import ConfigError, FitBrokerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deliver(record, *groups):
    """Hand each group as the subscriber would: handing, application, handed."""
    for group in groups:
        record.handing(group)
        record.handed()


def test_round_trip(tmp_path):
    """Handed keys, with their urgencies, are remembered after a reopen."""
    path = tmp_path / "state" / "events.delivered"
    with DeliveryRecord.open(path) as record:
        deliver(record, [("p", 1, 0), ("q", 7, 2)], [("p", 2, 0)])
    record = DeliveryRecord.open(path)
    assert ("p", 1) in record.seen and ("q", 7) in record.seen and ("p", 2) in record.seen
    assert ("p", 3) not in record.seen
    assert record.seen._seen[("q", 7)] == 2
    assert len(record.maybe_repeated) == 0
    assert record.describe() == f"delivery state in {path} (3 batches remembered)"
    assert oct(os.stat(tmp_path / "state").st_mode & 0o777) == "0o700"
    record.close()


def test_killed_between_handing_and_handed(tmp_path):
    """A group never marked handed is not seen after a restart but reported once as maybe repeated."""
    path = tmp_path / "c.delivered"
    record = DeliveryRecord.open(path)
    deliver(record, [("p", 1, 0)])
    record.handing([("p", 2, 0), ("p", 3, 1)])
    record.close()  # the process dies inside the application callback

    record = DeliveryRecord.open(path)
    assert ("p", 1) in record.seen
    assert ("p", 2) not in record.seen and ("p", 3) not in record.seen
    assert set(record.maybe_repeated) == {("p", 2), ("p", 3)}
    assert record.was_maybe_repeated(("p", 2)) is True
    assert record.was_maybe_repeated(("p", 2)) is False
    assert record.was_maybe_repeated(("p", 1)) is False
    deliver(record, [("p", 2, 0)])
    record.close()

    # Another restart before (p, 3) was delivered again: still unknown, still reported.
    record = DeliveryRecord.open(path)
    assert ("p", 2) in record.seen
    assert set(record.maybe_repeated) == {("p", 3)}
    record.close()


def test_torn_last_line_ignored(tmp_path):
    """A line cut by a kill mid-write is ignored and cut off, and later lines append cleanly."""
    path = tmp_path / "c.delivered"
    with DeliveryRecord.open(path) as record:
        deliver(record, [("p", 1, 0)])
    with open(path, "ab") as f:
        f.write(b'{"h":[["p",2,0]')
    record = DeliveryRecord.open(path)
    assert record.counters["torn-lines"] == 1 and record.counters["corrupt-lines"] == 0
    assert ("p", 1) in record.seen and ("p", 2) not in record.seen
    deliver(record, [("p", 3, 0)])
    record.close()
    record = DeliveryRecord.open(path)
    assert ("p", 3) in record.seen and record.counters["torn-lines"] == 0
    record.close()


def test_garbage_lines_skipped_and_counted(tmp_path):
    """Lines that are not valid records are skipped and counted; the valid ones around them still count."""
    path = tmp_path / "c.delivered"
    with DeliveryRecord.open(path) as record:
        deliver(record, [("p", 1, 0)])
    with open(path, "ab") as f:
        f.write(b"\x00\xffnot json\n")
        f.write(b'{"h":[["p","two",0]]}\n')
        f.write(b"[" * 100_000 + b"\n")
        f.write(b'{"x":1}\n')
        f.write(b'{"h":[["p",4,0]]}\n{"d":1}\n')
    record = DeliveryRecord.open(path)
    assert record.counters["corrupt-lines"] == 4
    assert ("p", 1) in record.seen and ("p", 4) in record.seen
    record.close()


def test_not_a_state_file(tmp_path):
    """A file whose first line is not a delivery state header is refused in one line, not overwritten."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"dear diary\n")
    with pytest.raises(ConfigError, match="not a delivery state file") as info:
        DeliveryRecord.open(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == b"dear diary\n"


def test_floors_survive_compaction(tmp_path):
    """A key forgotten before a compaction is still stale after a reopen, per publisher and urgency."""
    path = tmp_path / "c.delivered"
    record = DeliveryRecord.open(path, window=10)
    for i in range(100):
        deliver(record, [("p", i, 0)])
    assert record.counters["compactions"] >= 2
    record.close()
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    assert json.loads(lines[0]) == {"fitbroker-delivered": 1}
    assert len(lines) < 2 + 2 * 4 * 10 + 2

    record = DeliveryRecord.open(path, window=10)
    assert ("p", 5) not in record.seen
    assert record.seen.is_stale("p", 0, 5) and record.seen.is_stale("p", 0, 89)
    assert not record.seen.is_stale("p", 0, 100) and not record.seen.is_stale("p", 1, 5)
    assert ("p", 99) in record.seen and len(record.seen) == 10
    record.close()


def test_compaction_bounds_file_size(tmp_path):
    """Over 200k handed batches with a window of 1000, the file stays within a few windows of records."""
    path = tmp_path / "c.delivered"
    record = DeliveryRecord.open(path, window=1000)
    largest = 0
    for i in range(0, 200_000, 2):
        deliver(record, [("publisher-a", i, i % 3), ("publisher-b", i + 1, 0)])
        if i % 1000 == 0:
            largest = max(largest, os.path.getsize(path))
    record.close()
    # One record is about 30 bytes; 200k of them would be about 6 MB.
    assert largest < 300_000
    assert record.counters["compactions"] > 30
    record = DeliveryRecord.open(path, window=1000)
    assert ("publisher-b", 199_999) in record.seen and len(record.seen) == 1000
    assert record.seen.is_stale("publisher-a", 0, 0)
    record.close()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_smaller_window_on_reopen(tmp_path):
    """Reopening with a smaller window forgets the oldest keys and raises their floors."""
    path = tmp_path / "c.delivered"
    with DeliveryRecord.open(path, window=100) as record:
        deliver(record, *[[("p", i, 0)] for i in range(50)])
    with DeliveryRecord.open(path, window=10) as record:
        assert len(record.seen) == 10 and ("p", 49) in record.seen
        assert record.seen.is_stale("p", 0, 39)


def test_unwritable_folder(tmp_path):
    """A folder the subscriber cannot write gives one ConfigError line naming the path and the OS error."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o500)
        path = str(folder / "sub" / "c.delivered")
    else:
        # Root writes through file modes; sysfs refuses new files to anyone.
        folder = None
        path = "/sys/fitbroker-test.delivered"
    try:
        with pytest.raises(ConfigError) as info:
            DeliveryRecord.open(path)
    finally:
        if folder is not None:
            folder.chmod(0o700)
    message = str(info.value)
    assert path in message and "\n" not in message
    refusals = ("Permission denied", "Read-only file system", "Operation not permitted")
    assert any(text in message for text in refusals)
    assert not os.path.exists(path)


def test_parent_is_a_file(tmp_path):
    """A path under a regular file gives a ConfigError naming the path, not a traceback."""
    (tmp_path / "plain").write_text("x")
    path = tmp_path / "plain" / "c.delivered"
    with pytest.raises(ConfigError, match="Not a directory") as info:
        DeliveryRecord.open(path)
    assert str(path) in str(info.value)


def test_write_after_close_is_a_clear_error(tmp_path):
    """Handing to a closed record raises a FitBrokerError, so the group is not handed unrecorded."""
    record = DeliveryRecord.open(tmp_path / "c.delivered")
    record.close()
    with pytest.raises(FitBrokerError, match="closed"):
        record.handing([("p", 1, 0)])


def test_default_path(monkeypatch, tmp_path):
    """The default path is under XDG_STATE_HOME (or ~/.local/state) with every name made file-safe."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = DeliveryRecord.default_path("prod", "con/sole", "..")
    assert path == os.path.join(str(tmp_path), "fitbroker", "prod", "con%2Fsole", "%2E..delivered")
    monkeypatch.setenv("XDG_STATE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DeliveryRecord.default_path("c", "a", "é b") == os.path.join(
        str(tmp_path / "home"), ".local", "state", "fitbroker", "c", "a", "%C3%A9%20b.delivered"
    )
    assert safe_name("100%") == "100%25" and safe_name("a.b-c_d") == "a.b-c_d"


CHILD = r"""
import os, sys
from fit_broker.client.delivered import DeliveryRecord
path, round_ = sys.argv[1], int(sys.argv[2])
record = DeliveryRecord.open(path, window=200)
app = os.open(path + ".app", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(1, b"ready\n")
i = 0
while True:
    group = [("r%d" % round_, n, n % 2) for n in range(i, i + 1 + i % 3)]
    record.handing(group)
    os.write(app, "".join("%s %d\n" % (g[0], g[1]) for g in group).encode())
    record.handed()
    os.write(1, ("%d\n" % group[-1][1]).encode())
    i += len(group)
"""


@pytest.mark.integration
def test_sigkill_during_delivery(tmp_path):
    """A subscriber SIGKILLed at random moments leaves a file remembering every handed key and no other."""
    path = str(tmp_path / "c.delivered")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random(7)
    for round_ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(round_)], stdout=subprocess.PIPE, env=env, cwd=ROOT
        )
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 0.4))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        lines = out.splitlines()
        last = int(lines[-1]) if lines else -1
        assert last > 200, "the child handed too little to exercise compaction"
        publisher = f"r{round_}"
        with open(path + ".app") as f:
            received = {int(n) for p, n in (line.split() for line in f) if p == publisher}

        record = DeliveryRecord.open(path, window=200)
        seen = record.seen
        assert record.counters["corrupt-lines"] == 0
        for n in range(last + 1):
            # Handed: remembered, or forgotten under a floor so any copy is stale.
            assert (publisher, n) in seen or seen.is_stale(publisher, n % 2, n), (round_, n)
        assert all((publisher, n) in seen for n in range(last - 150, last + 1))
        # Nothing remembered that the application did not get (no loss) ...
        assert all(n in received for p, n in seen._seen if p == publisher)
        # ... and what it got after the last confirmed group is remembered or reported as a possible repeat.
        for n in received:
            if n > last:
                assert ((publisher, n) in seen) != ((publisher, n) in record.maybe_repeated), (round_, n)
        assert all(n > last for p, n in record.maybe_repeated if p == publisher)
        record.close()
