"""
A cluster written by `fitbroker init`, run as real processes over mutual TLS,
with BFT channels under HA, PKS and PKE.
"""

import json
import os
import subprocess
import sys

import pytest

from fit_broker.config import load_config
from tests.processes import ROOT, ReplicaProcesses, free_ports

pytestmark = pytest.mark.integration


def cli(*args, timeout=60, stdin=None):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())", *args],
        cwd=ROOT, capture_output=True, timeout=timeout, input=stdin,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )


def consecutive_free_ports(count):
    """
    Return the first of C{count} consecutive ports that are free right now
    (fitbroker init numbers replica ports from one base).
    """
    import socket

    for _ in range(200):
        base = free_ports(1)[0]
        if base + count > 65000:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise AssertionError("no run of free ports found")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    first = consecutive_free_ports(4)
    directory = str(folder / "c")
    result = cli("init", directory, "--replicas", "4", "--faults", "1", "--clients", "local", "probe",
                 "--first-port", str(first))
    assert result.returncode == 0, result.stderr
    path = os.path.join(directory, "cluster.toml")
    config = load_config(path)
    ports = [int(spec.connect.rsplit(":", 1)[1]) for spec in config.replicas]
    replicas = ReplicaProcesses(str(folder), path, ports)
    replicas.start_all()
    yield replicas
    replicas.stop_all()


def test_init_writes_private_keys_0600(cluster):
    """Every private key fitbroker init wrote is readable by its owner only."""
    directory = os.path.dirname(cluster.config_path)
    private = []
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".key") or name in ("mac-keys.json", "channel-keys.json"):
                private.append(os.path.join(root, name))
    assert len(private) > 10
    for path in private:
        assert os.stat(path).st_mode & 0o777 == 0o600, path


@pytest.mark.parametrize("channel", ["events", "signed", "sealed"])
def test_publish_and_tail_over_tls(cluster, channel):
    """Events published on each BFT sample channel arrive, once each, over mutual TLS."""
    tail = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
         "tail", "--config", cluster.config_path, "--count", "3", channel],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert b"subscribed" in tail.stderr.readline()
    result = cli("publish", "--config", cluster.config_path, "--as", "probe", channel, "a", "b", "c")
    assert result.returncode == 0, result.stderr
    out, err = tail.communicate(timeout=60)
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["content"] for r in records] == ["a", "b", "c"], err
    assert {r["publisher"] for r in records} == {"probe"}


def test_client_of_another_ca_is_refused(cluster, tmp_path):
    """A client whose certificate comes from another CA cannot reach any replica."""
    other = str(tmp_path / "other")
    assert cli("init", other, "--clients", "local", "probe").returncode == 0
    # the other cluster's keys, this cluster's replicas
    config_text = open(cluster.config_path).read()
    path = os.path.join(other, "cluster.toml")
    with open(path, "w") as f:
        f.write(config_text)
    result = cli("publish", "--config", path, "events", "x", timeout=60)
    assert result.returncode != 0
    assert "cannot reach the cluster" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
    status = cli("status", "--json", "--config", cluster.config_path)
    assert status.returncode == 0, status.stderr
    replicas = json.loads(status.stdout).values()
    assert all(r["connections"].get("closed-before-hello", 0) >= 1 for r in replicas), list(replicas)
    assert "ended before hello" in cluster.output(0)
