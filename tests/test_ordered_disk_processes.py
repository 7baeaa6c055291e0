"""
Ordered disk channels with real `twistd fitbroker` replica processes on
loopback: every replica SIGKILLed at once and restarted, then one restarted
with its data folder (agreement journal and channel logs) deleted; a
subscriber process then gets every acknowledged event once, in one order.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from fit_broker.config import load_config
from tests.processes import ROOT
from tests.test_disk_processes import compare, kill_all_and_restart, publish, start_cluster, subscribe

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    replicas = start_cluster(tmp_path, monkeypatch, ordering="channel")
    yield replicas
    replicas.stop_all()


def publish_one(cluster, text):
    """Publish one event with `fitbroker publish`; return the log position it printed."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
         "publish", "--config", cluster.config_path, "--as", "probe", "d0", text],
        cwd=ROOT, capture_output=True, timeout=60, env=cluster.env(),
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    found = re.search(r"log position (\d+)", result.stdout.decode() + result.stderr.decode())
    assert found, result.stdout.decode() + result.stderr.decode()
    return int(found.group(1))


def test_ordered_disk_events_survive_a_restart_of_every_replica(cluster, tmp_path):
    """Ordered events published under fsync "always" survive a SIGKILL of every replica at once, each delivered once after the restart with no position reused; a replica restarted with its data folder deleted then recovers from its peers and the subscriber still gets every new event once."""
    subscribe(cluster, 0, str(tmp_path / "none.txt"), idle=0.5)
    acked = str(tmp_path / "acked-1.txt")
    publish(cluster, 2000, acked)
    before = publish_one(cluster, "last before the restart")
    kill_all_and_restart(cluster)
    after = publish_one(cluster, "first after the restart")
    assert after > before, (before, after)
    delivered = str(tmp_path / "delivered-1.txt")
    summary = subscribe(cluster, 0, delivered, idle=5)
    lost, duplicated, unexpected = compare(acked, delivered)
    # the two single events are delivered too, once each
    assert (lost, duplicated, unexpected) == (0, 0, 2), summary

    lost_folder = load_config(cluster.config_path).data_folder(3)
    assert os.path.isdir(os.path.join(lost_folder, "agreement"))
    kill_all_and_restart(cluster, lambda: shutil.rmtree(lost_folder))
    acked = str(tmp_path / "acked-2.txt")
    publish(cluster, 500, acked)
    delivered = str(tmp_path / "delivered-2.txt")
    summary = subscribe(cluster, 0, delivered, idle=4)
    assert compare(acked, delivered) == (0, 0, 0), summary
    for index in range(4):
        output = cluster.output(index)
        assert "Traceback" not in output, output[-3000:]
