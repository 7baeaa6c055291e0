"""
Disk channel recovery with real `twistd fitbroker` replica processes on
loopback: a replica restarted with its data folder deleted gets the lost
batches back from its peers, then another replica is SIGKILLed and the
subscriber still gets every acknowledged event once.
"""

import os
import shutil
import signal
import time

import pytest

from fit_broker.config import load_config
from tests.test_disk_processes import (
    CHANNELS,
    compare,
    kill_and_restart,
    publish,
    start_cluster,
    status,
    subscribe,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    replicas = start_cluster(tmp_path, monkeypatch)
    yield replicas
    replicas.stop_all()


def channels_of(cluster, index):
    return status(cluster)[f"replica-{index}"]["channels"]


def wait_recovered(cluster, index, timeout=60):
    """Wait until no channel of replica C{index} says it is recovering; return its channels."""
    deadline = time.monotonic() + timeout
    while True:
        channels = channels_of(cluster, index)
        if not any(channels[tag].get("recovering") for tag in CHANNELS):
            return channels
        assert time.monotonic() < deadline, channels
        time.sleep(0.5)


def test_a_replica_that_lost_its_data_folder_recovers_it_from_its_peers(cluster, tmp_path):
    """A replica restarted with its data folder deleted logs again, from its peers, every batch the others hold (counted as recovered-from-peers); with another replica then SIGKILLed, the subscriber gets every acknowledged event once."""
    subscribe(cluster, 0, str(tmp_path / "none.txt"), idle=0.5)
    acked = str(tmp_path / "acked.txt")
    publish(cluster, 2000, acked)

    lost_folder = load_config(cluster.config_path).data_folder(3)
    assert os.path.isdir(lost_folder)
    kill_and_restart(cluster, 3, lambda: shutil.rmtree(lost_folder))
    recovered = wait_recovered(cluster, 3)
    healthy = channels_of(cluster, 1)
    for tag in CHANNELS:
        counters = recovered[tag]["counters"]
        print(tag, {k: v for k, v in counters.items() if "recover" in k})
        assert counters["recovered-from-peers"] > 0, counters
        # it holds again every batch a replica that lost nothing holds
        assert recovered[tag]["disk"]["log"]["records"] == healthy[tag]["disk"]["log"]["records"]
    assert sum(recovered[tag]["counters"]["recovered-from-peers"] for tag in CHANNELS) == 2000

    cluster.signal(0, signal.SIGKILL)
    cluster.processes[0].wait(10)
    delivered = str(tmp_path / "delivered.txt")
    summary = subscribe(cluster, 0, delivered, idle=4)
    assert compare(acked, delivered) == (0, 0, 0), summary
    output = cluster.output(3)
    assert "recovering its batch log from replicas [0, 1, 2]" in output, output[-3000:]
    assert "recovery from peers done" in output, output[-3000:]
    for index in range(1, 4):
        assert "Traceback" not in cluster.output(index), cluster.output(index)[-3000:]
