"""
The twistd plugin: options, the service tree, and per-replica pid and log files.
"""

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from fit_broker import tap


def test_plugin_found():
    """twistd finds the fitbroker plugin among its service makers."""
    names = {maker.tapname for maker in getPlugins(IServiceMaker)}
    assert "fitbroker" in names


def test_replica_service_tree():
    """--config and --replica-id build one replica: a listener and an expiry timer."""
    options = tap.Options()
    options.parseOptions(["--config", "etc/local-cluster.toml", "--replica-id", "2"])
    service = tap.makeService(options, MemoryReactorClock())
    children = list(service)
    assert any(isinstance(c, StreamServerEndpointService) for c in children)
    assert any(isinstance(c, TimerService) for c in children)
    assert service.replica.index == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "etc/local-cluster.toml"], "go together"),
        (["--config", "etc/local-cluster.toml", "--replica-id", "4"], "replicas 0 to 3, found 4"),
        (["--config", "etc/local-cluster.toml", "--replica-id", "x"], "expected an integer"),
        (["--config", "nope.toml", "--replica-id", "0"], "no such configuration file"),
    ],
)
def test_usage_errors(argv, message):
    """Wrong options are usage errors with a precise message."""
    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions(argv)


def test_each_replica_gets_its_own_pidfile():
    """Replicas started from one folder get distinct pid and log files unless the user chose them."""
    pidfiles = set()
    for index in ("0", "1"):
        config = ServerOptions()
        config.parseOptions(["fitbroker", "--config", "etc/local-cluster.toml", "--replica-id", index])
        pidfiles.add(config["pidfile"])
    assert len(pidfiles) == 2
    assert all(p.endswith(f"fitbroker-local-replica-{i}.pid") for p, i in zip(sorted(pidfiles), "01"))
    config = ServerOptions()
    config.parseOptions(["--pidfile", "mine.pid", "fitbroker", "--config", "etc/local-cluster.toml", "--replica-id", "0"])
    assert config["pidfile"].endswith("mine.pid")
    assert config["logfile"] == "fitbroker-local-replica-0.log"
    config = ServerOptions()
    config.parseOptions(["-n", "fitbroker", "--config", "etc/local-cluster.toml", "--replica-id", "1"])
    assert config["logfile"] is None


def test_embedded_cluster(tmp_path, monkeypatch):
    """No options: four replicas in one service and the client configuration in fitbroker-local/."""
    monkeypatch.chdir(tmp_path)
    options = tap.Options()
    options.parseOptions([])
    service = tap.makeService(options, MemoryReactorClock())
    replicas = [c for c in service if hasattr(c, "replica")]
    assert len(replicas) == 4
    assert (tmp_path / "fitbroker-local" / "cluster.toml").exists()


def test_a_port_in_use_stops_start_up_with_one_line():
    """A replica whose port is taken ends start-up with a line naming the address, not a traceback."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    from fit_broker.listening import MustListen

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        service = MustListen(serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"), Factory())
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            service.privilegedStartService()
    finally:
        taken.close()
