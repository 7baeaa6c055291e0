"""
BFT on loopback: three `twistd fitbroker` replicas and one Byzantine replica
process; the subscriber still delivers exactly what was published, once.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.cluster import prepare_cluster
from tests.processes import ROOT, ReplicaProcesses, loadgen, read_history, wait_for_port
from tests.test_e2e_processes import wait_ready

pytestmark = pytest.mark.integration

CHANNELS = ["ch0", "ch1", "ch2"]


@pytest.mark.parametrize("behaviour", ["alter", "forge", "replay", "garbage"])
def test_one_byzantine_replica_process(tmp_path, behaviour):
    """With replica 3 a Byzantine process, 6,000 events over 3 BFT-HA channels are delivered exactly once, none forged."""
    folder = str(tmp_path)
    path, ports = prepare_cluster(folder, "bft-ha", len(CHANNELS))
    replicas = ReplicaProcesses(folder, path, ports)
    liar_out = open(os.path.join(folder, "liar.out"), "wb")
    liar = subprocess.Popen(
        [sys.executable, "-m", "tests.byzantine_replica", path, "3", behaviour],
        cwd=ROOT, stdout=liar_out, stderr=subprocess.STDOUT, env=replicas.env(),
    )
    try:
        for index in range(3):
            replicas.start(index)
        for port in ports:
            wait_for_port(port, 60)
        acked_path = str(tmp_path / "acked.txt")
        delivered_path = str(tmp_path / "delivered.txt")
        channels = ",".join(CHANNELS)
        subscriber = loadgen(
            "subscribe", "--config", path, "--as", "console", "--channels", channels,
            "--expect", "6000", "--idle", "20", "--delivered", delivered_path,
        )
        wait_ready(subscriber)
        publisher = loadgen(
            "publish", "--config", path, "--as", "probe", "--channels", channels,
            "--events", "6000", "--batch", "50", "--acked", acked_path,
        )
        published, _ = publisher.communicate(timeout=120)
        delivered, _ = subscriber.communicate(timeout=120)
    finally:
        liar.kill()
        liar.wait()
        liar_out.close()
        replicas.stop_all()
    summary = json.loads(published.decode().strip().splitlines()[-1])
    assert summary.get("acked") == 6000, summary
    acked = read_history(acked_path)
    counts = Counter(read_history(delivered_path))
    assert not [k for k, n in counts.items() if n > 1], "duplicated"
    # content checksums are part of each record: an altered copy would show as unexpected
    assert set(counts) == set(acked), "lost or unexpected"
