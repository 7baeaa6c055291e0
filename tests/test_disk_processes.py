"""
Disk channels with real `twistd fitbroker` replica processes on loopback:
every replica SIGKILLed at once and restarted, and one restarted with its
data folder deleted; a subscriber process then gets every acknowledged
event once.
"""

import json
import os
import shutil
import signal
from collections import Counter

import pytest

from benchmarks.cluster import free_ports
from fit_broker.config import load_config
from fit_broker.init import cluster_toml
from tests.processes import ReplicaProcesses, loadgen, read_history

pytestmark = pytest.mark.integration

CHANNELS = ["d0", "d1"]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    # the replicas' default data folders go under this test's folder
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    ports = free_ports(4)
    rows = [(tag, tag, "durable", "cft", "si", ["probe"], ["console"]) for tag in CHANNELS]
    text = cluster_toml(
        "disk", 1, ports, ["probe", "console"], rows, keys_dir=None, tls=False, admins=[],
        classes={"durable": {"capacity": 100_000, "ttl": 600, "persistence": "disk", "fsync": "always"}},
    )
    path = str(tmp_path / "cluster.toml")
    with open(path, "w") as f:
        f.write(text)
    replicas = ReplicaProcesses(str(tmp_path), path, ports)
    replicas.start_all()
    yield replicas
    replicas.stop_all()


def run(role, cluster, *args, timeout=60):
    process = loadgen(role, "--config", cluster.config_path, *args)
    out, err = process.communicate(timeout=timeout)
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()[-2000:]
    summary = json.loads(lines[-1])
    assert "error" not in summary, (summary, err.decode()[-2000:])
    return summary


def subscribe(cluster, expect, delivered, idle):
    return run(
        "subscribe", cluster, "--as", "console", "--channels", ",".join(CHANNELS),
        "--expect", str(expect), "--idle", str(idle), "--delivered", delivered,
    )


def publish(cluster, events, acked):
    summary = run(
        "publish", cluster, "--as", "probe", "--channels", ",".join(CHANNELS),
        "--events", str(events), "--batch", "20", "--acked", acked,
    )
    assert summary["acked"] == events, summary
    return summary


def kill_all_and_restart(cluster, before_restart=lambda: None):
    for index in range(len(cluster.ports)):
        cluster.signal(index, signal.SIGKILL)
    for process in cluster.processes.values():
        process.wait(10)
    before_restart()
    cluster.start_all()


def compare(acked_path, delivered_path):
    acked = read_history(acked_path)
    got = read_history(delivered_path)
    counts = Counter(got)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = len(set(acked) - set(counts))
    unexpected = len(set(counts) - set(acked))
    print(f"acked {len(acked)} delivered {len(got)}: lost {lost} duplicated {duplicated} unexpected {unexpected}")
    return lost, duplicated, unexpected


def test_every_acknowledged_event_survives_a_restart_of_every_replica(cluster, tmp_path):
    """Events published under fsync "always" survive a SIGKILL of every replica at once and are delivered once after the restart; then a replica restarted with its data folder deleted serves new events, and the subscriber still gets everything and nothing it acknowledged before."""
    # subscribe, then leave: the replicas keep the subscription on disk
    subscribe(cluster, 0, str(tmp_path / "none.txt"), idle=0.5)

    acked = str(tmp_path / "acked-1.txt")
    publish(cluster, 2000, acked)
    kill_all_and_restart(cluster)
    delivered = str(tmp_path / "delivered-1.txt")
    # no --expect: the subscriber stays until idle, so its last
    # acknowledgements (sent after a short delay) reach the replicas
    summary = subscribe(cluster, 0, delivered, idle=5)
    assert compare(acked, delivered) == (0, 0, 0), summary

    # what the subscriber acknowledged is not resent; a replica whose data
    # folder is gone starts empty, and the others still hold everything
    lost_folder = load_config(cluster.config_path).data_folder(3)
    assert os.path.isdir(lost_folder)
    kill_all_and_restart(cluster, lambda: shutil.rmtree(lost_folder))
    acked = str(tmp_path / "acked-2.txt")
    publish(cluster, 500, acked)
    delivered = str(tmp_path / "delivered-2.txt")
    summary = subscribe(cluster, 0, delivered, idle=4)
    assert compare(acked, delivered) == (0, 0, 0), summary
    stored = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(lost_folder)
        for name in names
        if name.endswith(".seg") and os.path.basename(folder) == "batches"
    )
    assert stored > 0, "the replica restarted without data stored no new event"
    for index in range(4):
        output = cluster.output(index)
        assert "Traceback" not in output, output[-3000:]
