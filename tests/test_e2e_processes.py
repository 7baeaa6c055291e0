"""
Real `twistd fitbroker` replica processes on loopback, with a publisher and a
subscriber process, while replicas are killed and paused.
"""

import json
import signal
import time
from collections import Counter

import pytest

from tests.processes import ReplicaProcesses, loadgen, read_history, write_cluster

pytestmark = pytest.mark.integration

CHANNELS = [f"ch{i}" for i in range(10)]


@pytest.fixture
def cluster(tmp_path):
    path, ports = write_cluster(str(tmp_path), CHANNELS)
    replicas = ReplicaProcesses(str(tmp_path), path, ports)
    replicas.start_all()
    yield replicas
    replicas.stop_all()


def wait_ready(process, timeout=30):
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if line.strip() == b"ready":
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"subscriber not ready: {line!r} {process.stdout.read()!r}")


def test_kill_and_pause_lose_nothing_and_duplicate_nothing(cluster, tmp_path):
    """20,000 events over 10 channels while one replica is SIGKILLed and another SIGSTOPped and resumed: every acknowledged event is delivered exactly once, and nothing unpublished is delivered."""
    acked_path = str(tmp_path / "acked.txt")
    delivered_path = str(tmp_path / "delivered.txt")
    channels = ",".join(CHANNELS)
    subscriber = loadgen(
        "subscribe", "--config", cluster.config_path, "--as", "console", "--channels", channels,
        "--expect", "20000", "--idle", "30", "--delivered", delivered_path,
    )
    wait_ready(subscriber)
    publisher = loadgen(
        "publish", "--config", cluster.config_path, "--as", "probe", "--channels", channels,
        "--events", "20000", "--rate", "4000", "--batch", "50", "--acked", acked_path,
    )
    time.sleep(1.0)
    cluster.signal(1, signal.SIGKILL)
    time.sleep(0.5)
    cluster.signal(2, signal.SIGSTOP)
    time.sleep(2.0)
    cluster.signal(2, signal.SIGCONT)
    published, _ = publisher.communicate(timeout=120)
    delivered, _ = subscriber.communicate(timeout=120)
    pub_summary = json.loads(published.decode().strip().splitlines()[-1])
    sub_summary = json.loads(delivered.decode().strip().splitlines()[-1])
    assert "error" not in pub_summary, pub_summary
    assert pub_summary["acked"] == 20000, pub_summary

    acked = read_history(acked_path)
    got = read_history(delivered_path)
    counts = Counter(got)
    duplicated = [key for key, n in counts.items() if n > 1]
    lost = set(acked) - set(counts)
    unexpected = set(counts) - set(acked)
    assert not duplicated, f"{len(duplicated)} duplicated, e.g. {duplicated[:3]}"
    assert not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:3]}"
    assert not unexpected, f"{len(unexpected)} unexpected"
    assert sub_summary["duplicates"] == 0
    assert {record[0] for record in got} == set(CHANNELS)
    for index in (0, 2, 3):
        assert "Traceback" not in cluster.output(index), cluster.output(index)[-2000:]
