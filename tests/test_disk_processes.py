"""
Disk channels with real `twistd fitbroker` replica processes on loopback:
every replica SIGKILLed at once and restarted, one restarted with its data
folder deleted, one with its last batch segment torn and one with a byte
flipped in an older segment; a subscriber process then gets every
acknowledged event once.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.cluster import free_ports, wait_for_port
from fit_broker.config import load_config
from fit_broker.init import cluster_toml
from fit_broker.replica.storage_driver import DataFolder
from fit_broker.storage.records import HEADER_SIZE
from tests.processes import ROOT, ReplicaProcesses, loadgen, read_history

pytestmark = pytest.mark.integration

CHANNELS = ["d0", "d1"]


def start_cluster(tmp_path, monkeypatch, **durable):
    # the replicas' default data folders go under this test's folder
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    ports = free_ports(4)
    rows = [(tag, tag, "durable", "cft", "si", ["probe"], ["console"]) for tag in CHANNELS]
    settings = {"capacity": 100_000, "ttl": 600, "persistence": "disk", "fsync": "always", **durable}
    text = cluster_toml(
        "disk", 1, ports, ["probe", "console"], rows, keys_dir=None, tls=False, admins=[],
        classes={"durable": settings},
    )
    path = str(tmp_path / "cluster.toml")
    with open(path, "w") as f:
        f.write(text)
    replicas = ReplicaProcesses(str(tmp_path), path, ports)
    replicas.start_all()
    return replicas


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    replicas = start_cluster(tmp_path, monkeypatch)
    yield replicas
    replicas.stop_all()


#: A class bound of 32 KiB makes batch log segments of 8 KiB (a quarter of
#: the log's 2 x max_bytes bound), so that 600 small events a channel (about
#: 17 KiB of records, within each subscriber's queue bound) fill several.
SMALL_MAX_BYTES = 32 * 1024
SMALL_EVENTS = 1200  # over both channels


@pytest.fixture
def small_segments(tmp_path, monkeypatch):
    replicas = start_cluster(tmp_path, monkeypatch, max_bytes=SMALL_MAX_BYTES)
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


def publish(cluster, events, acked, *args):
    summary = run(
        "publish", cluster, "--as", "probe", "--channels", ",".join(CHANNELS),
        "--events", str(events), "--batch", "20", "--acked", acked, *args,
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



def batch_segments(cluster, index, tag):
    """
    The batch log segment files of channel C{tag} on replica C{index},
    oldest first (each is named by its first record's index, zero-padded).
    """
    data = DataFolder(load_config(cluster.config_path).data_folder(index))
    folder = os.path.join(data.channel_folder(tag), "batches")
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".seg"))


def records(path):
    """
    The (offset, size) of each record of a segment file, read from the
    length in each [u32 length][u32 crc32c][f64 timestamp] header.
    """
    with open(path, "rb") as f:
        data = f.read()
    found = []
    offset = 0
    while offset + HEADER_SIZE <= len(data):
        size = HEADER_SIZE + struct.unpack_from(">I", data, offset)[0]
        found.append((offset, size))
        offset += size
    assert offset == len(data), (path, offset, len(data))
    return found


def kill_and_restart(cluster, index, damage):
    cluster.signal(index, signal.SIGKILL)
    cluster.processes[index].wait(10)
    damage()
    cluster.start(index)
    wait_for_port(cluster.ports[index], 60)


def status(cluster):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
         "status", "--json", "--config", cluster.config_path],
        cwd=ROOT, capture_output=True, timeout=60, env=cluster.env(),
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return json.loads(result.stdout)


def recovery_counters(cluster, index):
    channels = status(cluster)[f"replica-{index}"]["channels"]
    return {
        tag: {k: v for k, v in channels[tag]["counters"].items() if k.startswith("recover")}
        for tag in CHANNELS
    }


def test_a_torn_last_segment_is_cut_and_the_others_fill_in(small_segments, tmp_path):
    """A replica SIGKILLed and restarted with its last batch segment truncated into its last record starts, counts the cut as recovery-cut, and the subscriber still gets every acknowledged event once."""
    cluster = small_segments
    subscribe(cluster, 0, str(tmp_path / "none.txt"), idle=0.5)
    acked = str(tmp_path / "acked.txt")
    publish(cluster, SMALL_EVENTS, acked, "--size", "32")

    def tear():
        last = batch_segments(cluster, 1, "d0")[-1]
        offset, size = records(last)[-1]
        with open(last, "r+b") as f:
            f.truncate(offset + size - 5)
        print(f"truncated {os.path.basename(last)} from {offset + size} to {offset + size - 5} bytes")

    kill_and_restart(cluster, 1, tear)
    counters = recovery_counters(cluster, 1)
    print("replica-1 recovery counters", counters)
    assert counters["d0"]["recovery-cut"] == 1, counters
    assert counters["d0"]["recovery-lost"] == 0, counters
    assert counters["d1"]["recovery-cut"] == 0, counters
    delivered = str(tmp_path / "delivered.txt")
    summary = subscribe(cluster, 0, delivered, idle=4)
    assert compare(acked, delivered) == (0, 0, 0), summary
    output = cluster.output(1)
    assert "disk channel 'd0': batch log:" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_a_corrupt_older_segment_loses_its_rest_and_the_others_fill_in(small_segments, tmp_path):
    """A byte flipped in an older batch segment of one replica is found at its restart and counted as recovery-lost (the rest of that segment), and the subscriber still gets every acknowledged event once from the other replicas."""
    cluster = small_segments
    subscribe(cluster, 0, str(tmp_path / "none.txt"), idle=0.5)
    acked = str(tmp_path / "acked.txt")
    publish(cluster, SMALL_EVENTS, acked, "--size", "32")
    segments = batch_segments(cluster, 2, "d1")
    print(f"replica-2 d1 segments (records each): {[len(records(p)) for p in segments]}")
    assert len(segments) >= 2, segments
    first = segments[0]
    in_first = len(records(first))

    def flip():
        # in the first record's payload: it and the rest of its segment are lost
        offset, size = records(first)[0]
        where = offset + HEADER_SIZE + (size - HEADER_SIZE) // 2
        with open(first, "r+b") as f:
            f.seek(where)
            byte = f.read(1)
            f.seek(where)
            f.write(bytes([byte[0] ^ 0xFF]))
        print(f"flipped the byte at {where} of {os.path.basename(first)} ({in_first} records)")

    kill_and_restart(cluster, 2, flip)
    counters = recovery_counters(cluster, 2)
    print("replica-2 recovery counters", counters)
    assert counters["d1"]["recovery-lost"] == in_first, counters
    assert counters["d1"]["recovery-cut"] == 0, counters
    assert counters["d0"]["recovery-lost"] == 0, counters
    delivered = str(tmp_path / "delivered.txt")
    summary = subscribe(cluster, 0, delivered, idle=4)
    assert compare(acked, delivered) == (0, 0, 0), summary
    output = cluster.output(2)
    assert "disk channel 'd1': batch log:" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
