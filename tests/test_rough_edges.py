"""
Rough edges a new user met, in-process: listen errors before and after
daemonizing, one-line configuration errors, schemes checked before keys,
what `init` writes, the greeting, TTL and clock checks of the publisher.
"""

import os
import socket
import tomllib

import pytest
from twisted.application.internet import UDPServer
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from fit_broker import tap
from fit_broker.client.publisher import Publisher
from fit_broker.config import load_config, parse_config
from fit_broker.credentials import replica_credentials
from fit_broker.errors import ConfigError, RequestFailed, UnknownComponent
from fit_broker.init import cluster_toml, init_cluster
from fit_broker.listening import ListenError, MustListen, check_listeners, report_to_twistd
from fit_broker.local import describe_channels, make_local_cluster
from fit_broker.syslog.config import check_against_cluster, default_settings_path, load_settings
from tests.processes import ROOT
from tests.simnet import SimNet, cluster_config


@pytest.fixture
def taken_tcp():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    yield taken.getsockname()[1]
    taken.close()


@pytest.fixture
def taken_udp():
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    yield taken.getsockname()[1]
    taken.close()


def _stream(port):
    return MustListen(serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"), Factory())


def test_check_listeners_names_a_taken_tcp_port(taken_tcp):
    """The pre-daemon check finds a taken TCP port anywhere in the service tree and names it."""
    top = MultiService()
    inner = MultiService()
    inner.setServiceParent(top)
    _stream(taken_tcp).setServiceParent(inner)
    with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{taken_tcp}: Address already in use"):
        check_listeners(top)


def test_check_listeners_names_a_taken_udp_port(taken_udp):
    """The pre-daemon check also tries UDP servers, as the syslog adapter's."""
    top = MultiService()
    UDPServer(taken_udp, DatagramProtocol(), interface="127.0.0.1").setServiceParent(top)
    with pytest.raises(ListenError, match=f"127.0.0.1:{taken_udp}: Address already in use"):
        check_listeners(top)


def test_check_listeners_passes_free_ports():
    """Free ports pass the check and stay free (the probe socket is closed)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    top = MultiService()
    _stream(port).setServiceParent(top)
    check_listeners(top)
    again = socket.socket()
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    again.bind(("127.0.0.1", port))
    again.close()


def test_listen_error_after_daemonizing_reaches_twistds_status_pipe(taken_tcp):
    """A port taken after the check is written to twistd's status pipe, so its waiting parent prints it and exits."""
    read, write = os.pipe()
    twistd_options = {"statusPipe": write}
    top = MultiService()
    listener = _stream(taken_tcp)
    listener.setServiceParent(top)
    report_to_twistd(top, twistd_options, "fitbroker-syslog")
    try:
        with pytest.raises(SystemExit, match=f"^fitbroker-syslog: cannot listen on 127.0.0.1:{taken_tcp}"):
            listener.privilegedStartService()
        data = os.read(read, 200)
    finally:
        os.close(read)
    assert data.startswith(f"1 fitbroker-syslog: cannot listen on 127.0.0.1:{taken_tcp}".encode())
    assert len(data) <= 100
    assert twistd_options["statusPipe"] is None


def test_config_error_under_twistd_is_one_line(tmp_path):
    """Under twistd a bad configuration file ends with one line, not twistd's usage block."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nfaults = -1\n")
    with pytest.raises(SystemExit) as raised:
        ServerOptions().parseOptions(["fitbroker", "--config", str(bad), "--replica-id", "0"])
    message = str(raised.value.code)
    assert message.startswith(f"fitbroker: {bad}: [cluster.faults]: expected")
    assert "\n" not in message
    with pytest.raises(usage.UsageError, match="cluster.faults"):
        tap.Options().parseOptions(["--config", str(bad), "--replica-id", "0"])


def test_syslog_config_error_under_twistd_is_one_line(tmp_path):
    """Under twistd a missing syslog settings file ends with one line naming it."""
    with pytest.raises(SystemExit) as raised:
        ServerOptions().parseOptions(
            ["fitbroker-syslog", "--config", os.path.join(ROOT, "etc", "local-cluster.toml"),
             "--syslog-config", str(tmp_path / "none.toml")]
        )
    assert str(raised.value.code).startswith(f"fitbroker-syslog: {tmp_path / 'none.toml'}: no such")


def _keyless(tmp_path, scheme, plugins=False):
    text = cluster_toml(
        "demo", 0, [7450], ["probe"], [("demo", "demo", "default", "cft", scheme, ["probe"], ["probe"])],
        keys_dir=None, tls=False, admins=[], classes={},
        plugin_folders=[os.path.join(ROOT, "plugins")] if plugins else (),
    )
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return load_config(str(path))


def test_unknown_scheme_on_a_keyless_cluster_is_named_first(tmp_path):
    """A scheme no plugin provides is reported as such, not as a missing keys folder."""
    config = _keyless(tmp_path, "rot14")
    with pytest.raises(UnknownComponent, match="'rot14', which no plugin provides"):
        replica_credentials(config, 0)
    options = tap.Options()
    options.parseOptions(["--config", config.path, "--replica-id", "0"])
    with pytest.raises(SystemExit, match="no plugin provides") as raised:
        tap.makeService(options, MemoryReactorClock())
    assert "keys_dir" not in str(raised.value.code)


def test_a_scheme_that_uses_no_keys_needs_no_keys_folder(tmp_path):
    """The ROT13 demo declares uses_keys = False, so its keyless cluster starts without keys_dir."""
    config = _keyless(tmp_path, "rot13-demo", plugins=True)
    assert replica_credentials(config, 0) == (None, None, None)


def test_init_writes_the_syslog_client_channel_and_settings(tmp_path):
    """A cluster from init has the syslog client, its channel, and a syslog.toml the adapter accepts."""
    path = init_cluster(str(tmp_path / "c"), clients=["local"], syslog_client="syslog", syslog_port=5600)
    config = load_config(path)
    assert "syslog" in config.clients
    channel = config.channel("syslog")
    assert channel.may_publish("syslog") and channel.may_subscribe("local")
    settings = load_settings(default_settings_path(path))
    check_against_cluster(settings, config)
    assert settings.client == "syslog"
    assert {spec.endpoint for spec in settings.listeners} == {
        "udp:5600:interface=127.0.0.1", "tcp:5600:interface=127.0.0.1"
    }


def test_init_refuses_an_existing_cluster_unless_forced(tmp_path):
    """Re-running init names --force; with force it writes new keys."""
    folder = str(tmp_path / "c")
    init_cluster(folder)
    with open(os.path.join(folder, "clients", "local", "mac-keys.json")) as f:
        before = f.read()
    with pytest.raises(ConfigError, match="pass --force") as raised:
        init_cluster(folder)
    assert "overwrite=True" not in str(raised.value)
    init_cluster(folder, force=True)
    with open(os.path.join(folder, "clients", "local", "mac-keys.json")) as f:
        assert f.read() != before


def test_greeting_gives_each_channel_its_own_mode(tmp_path, monkeypatch):
    """The embedded cluster's greeting lists every channel with its own mode and scheme."""
    monkeypatch.chdir(tmp_path)
    make_local_cluster(MemoryReactorClock())
    text = describe_channels(load_config(str(tmp_path / "fitbroker-local" / "cluster.toml")))
    assert "alerts (BFT, HA)" in text
    assert "health (CFT, SI)" in text
    assert "syslog (BFT, HA)" in text
    assert "audit (BFT, HA, global order)" in text
    with open(tmp_path / "fitbroker-local" / "syslog.toml", "rb") as f:
        assert tomllib.load(f)["client"] == "syslog"


class SkewedClock:
    """
    A publisher's clock C{offset} seconds away from the cluster's, sharing
    its timers.
    """

    def __init__(self, clock, offset):
        self.clock = clock
        self.offset = offset

    def seconds(self):
        return self.clock.seconds() + self.offset

    def callLater(self, delay, f, *args, **kwargs):
        return self.clock.callLater(delay, f, *args, **kwargs)


def _publish_with_offset(offset):
    net = SimNet(cluster_config(qop="bft"))
    session = net.client("probe")
    publisher = Publisher(session.proxy, SkewedClock(net.clock, offset), net.schemes)
    outcome = []
    publisher.publish_many("events", [b"a", b"b", b"c"]).addBoth(outcome.append)
    net.run(1.0)
    return outcome, session


def test_publish_fails_when_a_quorum_discarded_it_as_expired():
    """A publisher 10 minutes behind is told its events expired at a quorum, not that they were published."""
    outcome, session = _publish_with_offset(-600)
    assert len(outcome) == 1
    failure = outcome[0]
    assert failure.check(RequestFailed)
    assert failure.value.status == "expired"
    assert "3 event(s) were already past their TTL at a quorum of replicas" in failure.value.text
    assert "clock" in failure.value.text
    assert session.proxy.counters.get("expired-on-arrival:replica-0") == 1


def test_publish_with_a_right_clock_succeeds():
    """The same publish with the cluster's time is acknowledged with its ids and nothing counted."""
    outcome, session = _publish_with_offset(0)
    assert len(outcome) == 1 and isinstance(outcome[0], list) and len(outcome[0]) == 3
    assert not any(k.startswith("expired-on-arrival") for k in session.proxy.counters)


@pytest.mark.parametrize("ttl", [-1, float("nan"), float("-inf")])
def test_publisher_refuses_negative_ttls(ttl):
    """A negative or non-number TTL is refused at once, not taken as the channel's default."""
    net = SimNet(cluster_config())
    session = net.client("probe")
    outcome = []
    session.publisher.publish("events", b"x", ttl=ttl).addBoth(outcome.append)
    assert outcome[0].check(RequestFailed)
    assert outcome[0].value.status == "bad-request"


def test_benchmarks_readme_installs_in_compat_mode():
    """The benchmarks' editable install keeps twistd's plugin findable (compat mode), as the main README says."""
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        text = f.read()
    installs = [line for line in text.splitlines() if "pip install -e" in line]
    assert installs
    for line in installs:
        assert "--config-settings editable_mode=compat" in line, line
