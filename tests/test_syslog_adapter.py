"""
The syslog adapter without sockets: the bridge's spool, backpressure,
retries and counters with a fake publisher and a Clock; the protocols on
StringTransport and in-memory TLS; routing to channels; the service tree,
its settings file and the twistd options; and a whole in-memory cluster
receiving what senders wrote.
"""

import base64
import json
import tomllib

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService, UDPServer
from twisted.application.service import IServiceMaker
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.test import iosim

from fit_broker.config import parse_config
from fit_broker.errors import ConfigError, NoQuorum, RequestFailed
from fit_broker.init import cluster_toml
from fit_broker.local import write_local_config
from fit_broker.config import load_config
from fit_broker import pki
from fit_broker.syslog import tap
from fit_broker.syslog.bridge import SPOOL, SyslogBridge, TokenBuckets
from fit_broker.syslog.config import (
    RateLimit,
    SpoolLimits,
    SyslogSettings,
    ListenerSpec,
    TlsSpec,
    check_against_cluster,
    parse_settings,
    parse_udp_endpoint,
)
from fit_broker.syslog.framing import Frame
from fit_broker.syslog.protocol import (
    MAX_PACKET_SIZE,
    SyslogDatagramProtocol,
    SyslogStreamFactory,
    describe_address,
)
from fit_broker.syslog.routing import Router
from fit_broker.syslog.service import (
    SyslogAdapter,
    local_syslog_settings,
    make_syslog_service,
    tls_options,
)
from tests.simnet import SimNet, cluster_config

LINE = b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8"
RFC5424 = b"<165>1 2003-10-11T22:14:15.003Z host app - ID47 [x@1 a=\"1\"] hello"


class FakePublisher:
    """
    Records publish_many calls; each returns a Deferred the test fires.
    """

    def __init__(self):
        self.calls = []

    def publish_many(self, channel, contents, urgency=0, ttl=0.0):
        d = Deferred()
        self.calls.append((channel, list(contents), urgency, d))
        return d

    def ack_all(self):
        calls, self.calls = self.calls, []
        for channel, contents, urgency, d in calls:
            d.callback(list(range(len(contents))))

    def fail_all(self, error):
        calls, self.calls = self.calls, []
        for channel, contents, urgency, d in calls:
            d.errback(error)

    def events(self):
        return [json.loads(c) for _, contents, _, _ in self.calls for c in contents]


class FakeReader:
    """
    A stream reader that records its pause reasons.
    """

    def __init__(self):
        self.pauses = set()
        self.framer = type("F", (), {"counters": {"frames": 0}})()

    def pause_reading(self, reason):
        self.pauses.add(reason)

    def resume_reading(self, reason):
        self.pauses.discard(reason)


def make_bridge(routing=None, publisher=None, **options):
    clock = Clock()
    clock.advance(1_700_000_000)
    router = Router.from_config(routing or {"default": "syslog"})
    publisher = FakePublisher() if publisher is None else publisher
    bridge = SyslogBridge(router, clock, publisher=publisher, **options)
    return bridge, publisher, clock


def assert_accounted(bridge):
    """Every received message is in exactly one terminal counter or the spool."""
    c = bridge.counters
    ends = sum(
        c.get(k, 0)
        for k in (
            "empty", "dropped-udp", "spool-full", "rate-limited", "dropped-malformed", "dropped-stopping"
        )
    )
    assert c.get("received", 0) == c.get("accepted", 0) + ends
    done = c.get("acked", 0) + c.get("failed", 0) + c.get("unacked-at-shutdown", 0)
    assert c.get("accepted", 0) == done + bridge.spooled_events


# The bridge.


def test_datagram_becomes_one_event():
    """A datagram is parsed, routed and published as the JSON event once the turn ends."""
    bridge, publisher, clock = make_bridge()
    bridge.receive_datagram(LINE + b"\n", "192.0.2.7:514", "192.0.2.7")
    assert publisher.calls == []
    clock.advance(0)
    [(channel, contents, urgency, _)] = publisher.calls
    event = json.loads(contents[0])
    assert (channel, urgency) == ("syslog", 3)  # auth.crit is urgent
    assert event["format"] == "rfc3164" and event["source"] == "192.0.2.7:514"
    assert base64.b64decode(event["raw_b64"]) == LINE  # the datagram's LF trimmed
    publisher.ack_all()
    assert bridge.counters["acked"] == 1 and bridge.spooled_events == 0
    assert_accounted(bridge)


def test_one_publish_per_channel_and_urgency_per_turn():
    """Messages of one turn travel in one publish_many call per (channel, urgency)."""
    bridge, publisher, clock = make_bridge(
        {"default": "syslog", "rules": [{"app_name": "su", "channel": "auth"}]}
    )
    reader = FakeReader()
    bridge.add_reader(reader)
    frames = [Frame(LINE), Frame(RFC5424), Frame(RFC5424), Frame(LINE)]
    bridge.receive_frames(frames, "h:1", "h", reader)
    bridge.receive_datagram(RFC5424, "h:2", "h")
    clock.advance(0)
    calls = {(c, u): len(contents) for c, contents, u, _ in publisher.calls}
    assert calls == {("auth", 3): 2, ("syslog", 1): 3}
    assert_accounted(bridge)


def test_backpressure_pauses_readers_and_drops_udp():
    """Over the high-water mark readers pause and datagrams drop; under low water they resume."""
    bridge, publisher, clock = make_bridge(spool=SpoolLimits(max_events=10, high_water=0.8, low_water=0.5))
    reader, late = FakeReader(), FakeReader()
    bridge.add_reader(reader)
    bridge.receive_frames([Frame(LINE)] * 7, "h:1", "h", reader)
    assert not reader.pauses
    bridge.receive_frames([Frame(LINE)], "h:1", "h", reader)
    assert reader.pauses == {SPOOL} and bridge.paused
    bridge.add_reader(late)
    assert late.pauses == {SPOOL}, "a connection made while full starts paused"
    bridge.receive_datagram(LINE, "u:1", "u")
    assert bridge.counters["dropped-udp"] == 1
    # Frames already read still fit up to the hard bound, then are counted.
    bridge.receive_frames([Frame(LINE)] * 5, "h:1", "h", reader)
    assert bridge.spooled_events == 10 and bridge.counters["spool-full"] == 3
    clock.advance(0)
    publisher.ack_all()
    assert not reader.pauses and not late.pauses and not bridge.paused
    assert bridge.counters["pauses"] == bridge.counters["resumes"] == 1
    assert_accounted(bridge)


def test_byte_bound():
    """The spool's byte bound pauses readers even when few events are held."""
    bridge, publisher, clock = make_bridge(spool=SpoolLimits(max_events=1000, max_bytes=4096))
    reader = FakeReader()
    bridge.add_reader(reader)
    big = b"<13>" + b"x" * 400  # about 1.2 KB as a JSON event
    bridge.receive_frames([Frame(big)] * 2, "h:1", "h", reader)
    assert not reader.pauses
    bridge.receive_frames([Frame(big)], "h:1", "h", reader)
    assert reader.pauses == {SPOOL} and bridge.spooled_events == 3


def test_cluster_unreachable_retries_and_keeps_spool():
    """A publish that finds no quorum is retried later; the spool holds it meanwhile."""
    bridge, publisher, clock = make_bridge(spool=SpoolLimits(max_events=4))
    reader = FakeReader()
    bridge.add_reader(reader)
    bridge.receive_frames([Frame(LINE)] * 4, "h:1", "h", reader)
    clock.advance(0)
    publisher.fail_all(NoQuorum("1 of 4 replicas reachable"))
    assert bridge.counters["retried"] == 4 and bridge.spooled_events == 4
    assert reader.pauses == {SPOOL}
    clock.advance(0.5)
    publisher.fail_all(NoQuorum("still"))
    clock.advance(0.9)
    assert publisher.calls == [], "the second retry backs off"
    clock.advance(0.1)
    publisher.ack_all()
    assert bridge.counters["acked"] == 4 and not reader.pauses
    assert_accounted(bridge)


def test_refusal_is_counted_not_retried():
    """A refusal no retry can cure is counted as failed by status and frees the spool."""
    bridge, publisher, clock = make_bridge()
    bridge.receive_datagram(LINE, "h:1", "h")
    clock.advance(0)
    publisher.fail_all(RequestFailed("unauthorized", "no"))
    clock.advance(60)
    assert publisher.calls == []
    assert bridge.counters["failed"] == bridge.counters["failed:unauthorized"] == 1
    assert bridge.spooled_events == 0
    assert_accounted(bridge)


def test_publisher_raising_is_counted():
    """A publisher that raises instead of failing its Deferred costs a count, not the adapter."""

    class Raising:
        def publish_many(self, *args):
            raise ValueError("boom")

    bridge, _, clock = make_bridge(publisher=Raising())
    bridge.receive_datagram(LINE, "h:1", "h")
    clock.advance(0)
    assert bridge.counters["failed:ValueError"] == 1
    assert_accounted(bridge)


def test_malformed_published_raw_to_malformed_channel():
    """Unparsable input is counted by reason and published raw to the malformed channel."""
    bridge, publisher, clock = make_bridge({"default": "syslog", "malformed_channel": "raw"})
    for data in (b"<1000>x", b"<>y", b"<192>z"):
        bridge.receive_datagram(data, "h:1", "h")
    clock.advance(0)
    [(channel, contents, urgency, _)] = publisher.calls
    assert (channel, urgency) == ("raw", 0)
    events = [json.loads(c) for c in contents]
    assert {e["format"] for e in events} == {"unparsed"}
    assert [base64.b64decode(e["raw_b64"]) for e in events] == [b"<1000>x", b"<>y", b"<192>z"]
    c = bridge.counters
    assert c["malformed"] == 3
    assert (c["malformed:pri-too-long"], c["malformed:pri-empty"], c["malformed:pri-out-of-range"]) == (1, 1, 1)


def test_malformed_without_channel_is_a_counted_drop():
    """Without a malformed channel, unparsable input is dropped and counted."""
    bridge, publisher, clock = make_bridge()
    bridge.receive_datagram(b"<1a>nope", "h:1", "h")
    bridge.receive_datagram(b"\n\0", "h:1", "h")
    clock.advance(0)
    assert publisher.calls == []
    assert bridge.counters["dropped-malformed"] == 1 and bridge.counters["empty"] == 1
    assert_accounted(bridge)


def test_truncated_and_lenient_counted():
    """Truncation and parser leniencies are counted; the event says truncated."""
    bridge, publisher, clock = make_bridge(max_size=600)
    reader = FakeReader()
    bridge.receive_frames([Frame(b"<13>" + b"a" * 600, truncated=True)], "h:1", "h", reader)
    bridge.receive_datagram(b"no pri at all", "h:1", "h")
    clock.advance(0)
    events = publisher.events()
    assert events[0]["truncated"] is True
    assert bridge.counters["truncated"] == 1
    assert bridge.counters["lenient:pri-missing"] == 1


def test_urgency_lowered_to_channel_levels():
    """An urgency above the channel's levels is lowered to its top level."""
    bridge, publisher, clock = make_bridge(urgency_levels={"syslog": 2})
    bridge.receive_datagram(b"<8>Jan  1 00:00:00 h k: emergency", "h:1", "h")
    clock.advance(0)
    assert publisher.calls[0][2] == 1


def test_rate_limit_udp_drops_and_refills():
    """Datagrams over a sender's rate are dropped and counted; the bucket refills."""
    bridge, publisher, clock = make_bridge(rate_limit=RateLimit(rate=10.0, burst=3))
    for _ in range(5):
        bridge.receive_datagram(LINE, "a:1", "a")
    bridge.receive_datagram(LINE, "b:1", "b")
    assert bridge.counters["rate-limited"] == 2
    clock.advance(0.2)
    bridge.receive_datagram(LINE, "a:1", "a")
    assert bridge.counters["rate-limited"] == 2
    assert_accounted(bridge)


def test_rate_limit_pauses_stream_sender():
    """A stream sender over its rate is paused until its bucket is back out of debt."""
    bridge, publisher, clock = make_bridge(rate_limit=RateLimit(rate=100.0, burst=10))
    reader = FakeReader()
    bridge.add_reader(reader)
    bridge.receive_frames([Frame(LINE)] * 30, "a:1", "a", reader)
    assert reader.pauses == {"rate"} and bridge.spooled_events == 30
    clock.advance(0.19)
    assert reader.pauses == {"rate"}
    clock.advance(0.02)
    assert not reader.pauses


def test_token_buckets_bounded():
    """At most max_buckets senders are remembered."""
    buckets = TokenBuckets(1.0, 1, max_buckets=3)
    for host in "abcde":
        buckets.try_take(host, 0.0)
    assert len(buckets._buckets) == 3


def test_connection_cap():
    """Readers beyond the connection cap are refused and counted."""
    bridge, _, _ = make_bridge(max_connections=2)
    readers = [FakeReader() for _ in range(3)]
    assert [bridge.add_reader(r) for r in readers] == [True, True, False]
    assert bridge.counters["connections-refused"] == 1
    bridge.remove_reader(readers[0])
    assert bridge.add_reader(readers[2])


def test_waits_for_publisher():
    """Messages read before the session exists wait in the spool and go once it is attached."""
    bridge, _, clock = make_bridge(publisher=None)
    bridge.publisher = None
    bridge.receive_datagram(LINE, "h:1", "h")
    clock.advance(1)
    publisher = FakePublisher()
    bridge.attach(publisher)
    clock.advance(0)
    assert len(publisher.calls) == 1


def test_abandon_counts_unacked():
    """Stopping counts what the cluster has not acknowledged; later outcomes are ignored."""
    bridge, publisher, clock = make_bridge()
    bridge.receive_datagram(LINE, "h:1", "h")
    clock.advance(0)
    bridge.receive_datagram(LINE, "h:1", "h")
    assert bridge.abandon() == 2
    publisher.ack_all()
    bridge.receive_datagram(LINE, "h:1", "h")
    assert bridge.counters["unacked-at-shutdown"] == 2
    assert bridge.counters["dropped-stopping"] == 1
    assert "acked" not in bridge.counters
    assert_accounted(bridge)


def test_snapshot_includes_router_and_framers():
    """The snapshot shows routing and framing counters of open and closed connections."""
    bridge, publisher, clock = make_bridge()
    factory = SyslogStreamFactory(bridge, clock)
    protocols = []
    for data in (b"5 <13>a", b"<13>b\n"):
        p = factory.buildProtocol(None)
        p.makeConnection(StringTransport())
        p.dataReceived(data)
        protocols.append(p)
    protocols[0].connectionLost(None)
    snapshot = bridge.snapshot()
    assert snapshot["framing:frames"] == 2
    assert snapshot["framing:octet-counted"] == snapshot["framing:lf-framed"] == 1
    assert snapshot["routing:default"] == 2
    assert snapshot["connections-open"] == 1 and snapshot["spool-events"] == 2


# The protocols.


def stream(bridge=None, clock=None, **factory_options):
    if bridge is None:
        bridge, publisher, clock = make_bridge()
    factory = SyslogStreamFactory(bridge, clock, **factory_options)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, bridge


def test_stream_frames_in_pieces():
    """Octet-counted and LF frames split across reads reach the bridge whole."""
    bridge, publisher, clock = make_bridge()
    protocol, transport, _ = stream(bridge, clock)
    data = b"%d %s" % (len(RFC5424), RFC5424) + LINE + b"\n" + b"<13>tail"
    for i in range(0, len(data), 7):
        protocol.dataReceived(data[i : i + 7])
    protocol.connectionLost(None)
    clock.advance(0)
    msgs = sorted(e["msg"] for e in publisher.events())
    assert msgs == ["'su root' failed for lonvick on /dev/pts/8", "hello", "tail"]
    assert bridge.snapshot()["framing:unterminated"] == 1
    assert all(e["source"] == "192.168.1.1:54321" for e in publisher.events())


def test_stream_pause_and_resume_transport():
    """The spool's pause and resume reach the transport; a rate pause holds until it ends too."""
    protocol, transport, bridge = stream()
    protocol.pause_reading(SPOOL)
    protocol.pause_reading("rate")
    assert transport.producerState == "paused"
    protocol.resume_reading(SPOOL)
    assert transport.producerState == "paused"
    protocol.resume_reading("rate")
    assert transport.producerState == "producing"


def test_stream_over_cap_aborted():
    """A connection beyond the cap is aborted at once and reads nothing."""
    bridge, publisher, clock = make_bridge(max_connections=1)
    stream(bridge, clock)
    protocol, transport, _ = stream(bridge, clock)
    assert transport.disconnecting
    protocol.dataReceived(LINE + b"\n")
    protocol.connectionLost(None)
    assert bridge.counters.get("received", 0) == 0 and len(bridge.readers) == 1


def test_idle_timeout():
    """A connection silent for idle_timeout seconds is closed; traffic restarts the timer."""
    bridge, publisher, clock = make_bridge()
    protocol, transport, _ = stream(bridge, clock, idle_timeout=10)
    clock.advance(9)
    protocol.dataReceived(b"<13>x\n")
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting and bridge.counters["idle-closed"] == 1


def test_datagram_protocol_keeps_64k():
    """A 64 KiB datagram arrives whole: the listener reads 65535 bytes, the parser keeps them."""
    assert MAX_PACKET_SIZE == 65535
    bridge, publisher, clock = make_bridge()
    body = b"<13>Jan  1 00:00:00 h app: " + b"y" * 65000
    SyslogDatagramProtocol(bridge).datagramReceived(body, ("::1", 514, 0, 0))
    clock.advance(0)
    [event] = publisher.events()
    assert event["truncated"] is False and base64.b64decode(event["raw_b64"]) == body
    assert event["source"] == "[::1]:514"


def test_describe_address():
    """Sources are host:port, IPv6 in brackets, None for Unix sockets."""
    from twisted.internet.address import IPv4Address, UNIXAddress

    assert describe_address(IPv4Address("TCP", "192.0.2.1", 5)) == ("192.0.2.1:5", "192.0.2.1")
    assert describe_address(UNIXAddress(None)) == (None, None)


# TLS, in memory.


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca = pki.new_certificate_authority("syslog")
    server = ca.issue(dns_names=["syslog.example"], server=True, client=False)
    good = ca.issue(dns_names=["fw1.probes.example"], server=False, client=True)
    other = ca.issue(dns_names=["laptop.example"], server=False, client=True)
    paths = {}
    for name, data in (
        ("ca.pem", ca.cert_pem),
        ("server.pem", server.cert_pem),
        ("server.key", server.key_pem),
    ):
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    return paths, ca, good, other


def tls_exchange(tls_files, client_material, require=True, peers=()):
    paths, ca, _, _ = tls_files
    spec = TlsSpec(paths["server.pem"], paths["server.key"], paths["ca.pem"], require, tuple(peers))
    bridge, publisher, clock = make_bridge()
    server_factory = TLSMemoryBIOFactory(
        tls_options(spec),
        False,
        SyslogStreamFactory(bridge, clock, permitted_peers=spec.permitted_peers, tls=True),
        clock=clock,
    )
    own = {}
    if client_material is not None:
        own = {
            "certificate": x509.load_pem_x509_certificate(client_material.cert_pem),
            "privateKey": load_pem_private_key(client_material.key_pem, None),
        }
    creator = optionsForClientTLS(
        "syslog.example", trustRoot=Certificate.loadPEM(ca.cert_pem), extraCertificateOptions=own
    )

    class Sender(Protocol):
        def connectionMade(self):
            self.transport.write(b"%d %s" % (len(LINE), LINE))

    client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Sender), clock=clock)
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    for _ in range(10):
        clock.advance(0)
        pump.pump()
    clock.advance(0)
    return bridge, publisher


def test_tls_mutual(tls_files):
    """A client with a certificate the CA issued is served over TLS."""
    bridge, publisher = tls_exchange(tls_files, tls_files[2], peers=["*.probes.example"])
    assert [e["format"] for e in publisher.events()] == ["rfc3164"]


def test_tls_requires_client_certificate(tls_files):
    """Without a client certificate, a listener that requires one serves nothing."""
    bridge, publisher = tls_exchange(tls_files, None)
    assert publisher.events() == []
    assert bridge.counters["tls-handshake-failed"] == 1


def test_tls_optional_client_certificate(tls_files):
    """A listener with an optional client certificate serves clients without one."""
    bridge, publisher = tls_exchange(tls_files, None, require=False)
    assert len(publisher.events()) == 1


def test_tls_permitted_peers(tls_files):
    """A certificate whose names match no permitted peer is refused and counted."""
    bridge, publisher = tls_exchange(tls_files, tls_files[3], peers=["*.probes.example"])
    assert publisher.events() == []
    assert bridge.counters["tls-peer-refused"] == 1 and not bridge.readers


def test_tls_options_errors(tmp_path, tls_files):
    """Missing or mismatched TLS files are configuration errors naming the file."""
    paths = tls_files[0]
    with pytest.raises(ConfigError, match="cannot read the TLS certificate"):
        tls_options(TlsSpec(str(tmp_path / "nope.pem"), paths["server.key"]))
    other_key = tmp_path / "other.key"
    other_key.write_bytes(tls_files[2].key_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        tls_options(TlsSpec(paths["server.pem"], str(other_key)))


# Settings, service tree, twistd.


SETTINGS = """
client = "syslog"
max_size = 8192
timezone = "Europe/Lisbon"
stats_interval = 5
[[listeners]]
endpoint = "udp:5514:interface=127.0.0.1"
[[listeners]]
endpoint = "tcp:5514:interface=127.0.0.1"
[spool]
max_events = 500
[rate_limit]
messages_per_second = 100
[routing]
default = "syslog"
malformed_channel = "syslog-raw"
"""


def settings_of(text, path="/etc/x/syslog.toml"):
    import tomllib

    return parse_settings(path, tomllib.loads(text))


def test_settings_file():
    """The settings file gives listeners, spool, rate limit, zone and routing."""
    s = settings_of(SETTINGS)
    assert [l.kind for l in s.listeners] == ["udp", "stream"]
    assert s.spool.max_events == 500 and s.spool.high_water == 0.8
    assert s.rate_limit == RateLimit(100.0, 100)
    assert s.tzinfo().key == "Europe/Lisbon" and s.max_size == 8192
    assert s.channels() == {"syslog", "syslog-raw"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[routing]\ndefault='s'", r"\[listeners\]: expected at least one"),
        ("[[listeners]]\nendpoint='udp:x'\n[routing]\ndefault='s'", "a port number is needed"),
        ("[[listeners]]\nendpoint='udp:5:bogus=1'\n[routing]\ndefault='s'", "unknown argument"),
        ("[[listeners]]\nendpoint='tcp:5'\nca='c.pem'\n[routing]\ndefault='s'", r"\[listeners\[0\].ca\]: expected no TLS key"),
        ("[[listeners]]\nendpoint='tls:5'\n[routing]\ndefault='s'", r"\[listeners\[0\].certificate\]"),
        ("[[listeners]]\nendpoint='tls:5'\ncertificate='a'\nprivate_key='b'\nrequire_client_certificate=true\n[routing]\ndefault='s'", r"\[listeners\[0\].ca\]"),
        ("[[listeners]]\nendpoint='udp:5'", r"\[routing\]"),
        ("[[listeners]]\nendpoint='udp:5'\n[routing]\ndefault=''", r"\[routing.default\]"),
        ("bogus=1\n[[listeners]]\nendpoint='udp:5'\n[routing]\ndefault='s'", r"\[bogus\]"),
        ("timezone='Mars/Olympus'\n[[listeners]]\nendpoint='udp:5'\n[routing]\ndefault='s'", r"\[timezone\]"),
        ("[spool]\nlow_water=0.9\n[[listeners]]\nendpoint='udp:5'\n[routing]\ndefault='s'", r"\[spool.low_water\]"),
        ("max_size=10\n[[listeners]]\nendpoint='udp:5'\n[routing]\ndefault='s'", r"\[max_size\]"),
        ("client='Bad Name'\n[[listeners]]\nendpoint='udp:5'\n[routing]\ndefault='s'", r"\[client\]"),
    ],
)
def test_settings_errors(text, message):
    """Invalid settings are errors naming the file and the key."""
    with pytest.raises(ConfigError, match=message) as info:
        settings_of(text)
    assert str(info.value).startswith("/etc/x/syslog.toml: ")


def test_udp_endpoint_strings():
    """UDP endpoint strings take a port and an interface, IPv6 colons escaped."""
    assert parse_udp_endpoint("udp:514") == (514, "")
    assert parse_udp_endpoint(r"udp:port=514:interface=\:\:1") == (514, "::1")


def sim_cluster(channels=("syslog", "syslog-raw"), clients=("syslog", "console")):
    return cluster_config(channels=channels, clients=clients)


def test_service_tree():
    """The service has the adapter, one listener per entry (UDP at 64 KiB) and a counter timer."""
    settings = settings_of(SETTINGS)
    service = make_syslog_service(sim_cluster(), settings, MemoryReactorClock())
    children = list(service)
    assert isinstance(children[0], SyslogAdapter)
    [udp] = [c for c in children if isinstance(c, UDPServer)]
    assert udp.args[0] == 5514
    assert udp.kwargs["maxPacketSize"] == 65535 and udp.kwargs["interface"] == "127.0.0.1"
    assert any(isinstance(c, StreamServerEndpointService) for c in children)
    assert any(isinstance(c, TimerService) for c in children)
    assert service.bridge.max_events == 500


def test_tls_listener_wraps_factory(tls_files):
    """A tls: listener serves TCP through TLS with the configured options."""
    paths = tls_files[0]
    settings = SyslogSettings(
        listeners=(ListenerSpec("tls:6514", "tls", TlsSpec(paths["server.pem"], paths["server.key"])),),
    )
    service = make_syslog_service(sim_cluster(), settings, MemoryReactorClock())
    [listener] = [c for c in service if isinstance(c, StreamServerEndpointService)]
    assert isinstance(listener.factory, TLSMemoryBIOFactory)


def test_local_settings(tmp_path):
    """The embedded cluster's adapter listens on 127.0.0.1:5514 UDP and TCP and routes to syslog."""
    settings = local_syslog_settings()
    assert [l.endpoint for l in settings.listeners] == [
        "udp:5514:interface=127.0.0.1",
        "tcp:5514:interface=127.0.0.1",
    ]
    assert settings.client == "syslog" and settings.channels() == {"syslog"}
    cluster = load_config(write_local_config(str(tmp_path)))
    service = make_syslog_service(cluster, settings, MemoryReactorClock())
    assert any(isinstance(c, UDPServer) for c in service)
    assert any(isinstance(c, StreamServerEndpointService) for c in service)


@pytest.mark.parametrize(
    "cluster, message",
    [
        (sim_cluster(clients=("console", "other")), "client 'syslog' is not in"),
        (sim_cluster(channels=("syslog",)), "channel 'syslog-raw' is not in"),
    ],
)
def test_cluster_checks(cluster, message):
    """The cluster must know the adapter's client and every channel routing can choose."""
    with pytest.raises(ConfigError, match=message):
        check_against_cluster(settings_of(SETTINGS), cluster)


def test_cluster_check_publish_right():
    """The cluster must let the adapter's client publish to the routed channels."""
    text = cluster_toml(
        "t", 0, [7600], ["syslog", "console"],
        [("syslog", "syslog", "default", "cft", "si", ["console"], []),
         ("syslog-raw", "syslog-raw", "default", "cft", "si", ["syslog"], [])],
        keys_dir=None, tls=False, admins=[], classes={},
    )
    with pytest.raises(ConfigError, match="does not let client 'syslog' publish to channel 'syslog'"):
        check_against_cluster(settings_of(SETTINGS), parse_config("c.toml", tomllib.loads(text)))


def test_plugin_found():
    """twistd finds the fitbroker-syslog plugin."""
    assert "fitbroker-syslog" in {m.tapname for m in getPlugins(IServiceMaker)}


def test_tap_options(tmp_path):
    """--config alone reads syslog.toml next to it; --syslog-config names another file."""
    options = tap.Options()
    options.parseOptions(["--config", "etc/local-cluster.toml"])
    assert options["settings"].path.endswith("etc/syslog.toml")
    assert options["settings"].client == "syslog"
    service = tap.makeService(options, MemoryReactorClock())
    assert isinstance(list(service)[0], SyslogAdapter)
    other = tmp_path / "s.toml"
    other.write_text(SETTINGS.replace('malformed_channel = "syslog-raw"', ""))
    options = tap.Options()
    options.parseOptions(["--config", "etc/local-cluster.toml", "--syslog-config", str(other)])
    assert options["settings"].max_size == 8192


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--config FILE is required"),
        (["--config", "nope.toml"], "no such configuration file"),
        (["--config", "etc/local-cluster.toml", "--syslog-config", "nope.toml"], "no such syslog settings file"),
    ],
)
def test_tap_usage_errors(argv, message):
    """Wrong options or files are usage errors with a precise message."""
    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions(argv)


def test_tap_checks_settings_against_cluster(tmp_path):
    """Settings routing to a channel the cluster lacks are refused before anything listens."""
    other = tmp_path / "s.toml"
    other.write_text("[[listeners]]\nendpoint = 'udp:5514'\n[routing]\ndefault = 'nowhere'\n")
    with pytest.raises(usage.UsageError, match="channel 'nowhere' is not in etc/local-cluster.toml"):
        tap.Options().parseOptions(["--config", "etc/local-cluster.toml", "--syslog-config", str(other)])


def test_tap_pidfile():
    """The adapter gets its own pid file unless the user chose one."""
    config = ServerOptions()
    config.parseOptions(["fitbroker-syslog", "--config", "etc/local-cluster.toml"])
    assert config["pidfile"].endswith("fitbroker-syslog-local.pid")


# A whole cluster in memory.


def adapter_on(net, settings, **bridge_overrides):
    """Start the adapter's service against SimNet C{net}; return (service, bridge)."""

    def open_session(config, client, reactor, keys=None, endpoints=None, batch_size=None):
        return net.client(client, batch_size=batch_size)

    service = make_syslog_service(net.config, settings, net.clock)
    service.adapter._open_session = open_session
    for name, value in bridge_overrides.items():
        setattr(service.bridge, name, value)
    service.adapter.startService()
    net.run()
    return service, service.bridge


def subscribe(net, channel="syslog"):
    console = net.client("console")
    got = []
    console.subscriber.subscribe(channel, lambda events: got.extend(json.loads(e.content) for e in events))
    net.run()
    return got


def test_in_memory_cluster_receives_syslog():
    """Messages written on a TCP connection reach a subscriber of the cluster as JSON events."""
    net = SimNet(sim_cluster())
    settings = settings_of(SETTINGS)
    service, bridge = adapter_on(net, settings)
    got = subscribe(net)
    raw = subscribe(net, "syslog-raw")
    protocol, transport, _ = stream(bridge, net.clock)
    protocol.dataReceived(LINE + b"\n" + b"%d %s" % (len(RFC5424), RFC5424) + b"<999>bad\n")
    net.run(0.5)
    assert [e["format"] for e in got] == ["rfc3164", "rfc5424"]
    assert [e["format"] for e in raw] == ["unparsed"]
    assert bridge.counters["acked"] == 3
    assert_accounted(bridge)


def test_in_memory_cluster_outage_backpressure():
    """With the cluster unreachable the spool fills and readers pause; once back, all arrives."""
    net = SimNet(sim_cluster())
    settings = settings_of(SETTINGS.replace("max_events = 500", "max_events = 20"))
    service, bridge = adapter_on(net, settings)
    got = subscribe(net)
    for index in range(3):
        net.kill(index)
    protocol, transport, _ = stream(bridge, net.clock)
    for i in range(3):
        protocol.dataReceived(b"".join(b"<13>m%d-%d\n" % (i, j) for j in range(8)))
        net.run()
    assert transport.producerState == "paused"
    assert bridge.spooled_events == 20 and bridge.counters["spool-full"] == 4
    for index in range(3):
        net.restart(index)
    net.run(40)
    assert transport.producerState == "producing"
    assert bridge.spooled_events == 0
    assert len({e["msg"] for e in got}) == 20
    assert_accounted(bridge)


def test_adapter_stop_drains():
    """Stopping the adapter closes connections, waits for acknowledgements and stops the session."""
    net = SimNet(sim_cluster())
    service, bridge = adapter_on(net, settings_of(SETTINGS))
    protocol, transport, _ = stream(bridge, net.clock)
    protocol.dataReceived(LINE + b"\n")
    d = service.adapter.stopService()
    net.run(0.5)
    assert transport.disconnecting
    assert d.called and bridge.counters["acked"] == 1
    assert service.adapter.session is None


# The event bytes.


JSON_SAMPLES = [
    LINE,
    RFC5424,
    b'<165>1 2003-10-11T22:14:15.003Z h a - - [origin ip="1" ip="2"][q@1 x="a\\"b\\\\c\\]d"] \xef\xbb\xbfcaf\xc3\xa9',
    b"<13>Jan 15 11:59:59 h app: caf\xe9 \x00\t\n\x1b \xe2\x80\xa8 \xf0\x9f\x98\x80",
    b"<189>123: *Mar  1 18:46:11.123: %SYS-5-CONFIG_I: Configured",
    b"<1000>x",
    b"",
    b'<14>1 - - - - - [a b="\xff"]',
]


@pytest.mark.parametrize("data", JSON_SAMPLES)
def test_event_bytes_are_json_dumps(data):
    """The event writer gives exactly json.dumps of the event dict, compact and UTF-8."""
    from fit_broker.syslog.parser import parse

    for truncated in (False, True):
        msg = parse(data, "[2001:db8::1]:514", 1_705_320_000.0, truncated=truncated)
        expected = json.dumps(msg.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        assert msg.to_json_bytes() == expected


def test_event_bytes_any_input():
    """For any bytes, the event writer agrees with json.dumps."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fit_broker.syslog.parser import parse

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.sampled_from([b"<13>", b"<14>1 ", b"<165>1 - - - - - [a@1 b=\""]))
    def check(tail, head):
        msg = parse(head + tail, None, 1_705_320_000.0)
        expected = json.dumps(msg.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        assert msg.to_json_bytes() == expected

    check()


def test_tls_chain_and_several_authorities(tmp_path):
    """A certificate file with an intermediate and a CA file with several CAs both load."""
    root = pki.new_certificate_authority("root")
    other = pki.new_certificate_authority("other")
    leaf = root.issue(dns_names=["syslog.example"], server=True, client=False)
    (tmp_path / "chain.pem").write_bytes(leaf.cert_pem + root.cert_pem)
    (tmp_path / "key.pem").write_bytes(leaf.key_pem)
    (tmp_path / "cas.pem").write_bytes(root.cert_pem + other.cert_pem)
    for require in (True, False):
        spec = TlsSpec(str(tmp_path / "chain.pem"), str(tmp_path / "key.pem"), str(tmp_path / "cas.pem"), require)
        options = tls_options(spec)
        assert options.requireCertificate is require
        options.getContext()


def test_udp_receive_buffer_and_kernel_drops():
    """A UDP listener asks for its receive buffer, and the kernel's drop count is read."""
    import socket

    from fit_broker.syslog.service import SyslogUDPServer, udp_socket_drops

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    class Port:
        def getHandle(self):
            return sock

    class Reactor:
        def listenUDP(self, port, protocol, interface, maxPacketSize):
            self.args = (port, interface, maxPacketSize)
            return Port()

    bridge, _, _ = make_bridge()
    reactor = Reactor()
    listener = SyslogUDPServer(
        514, SyslogDatagramProtocol(bridge), interface="127.0.0.1",
        maxPacketSize=MAX_PACKET_SIZE, reactor=reactor, receive_buffer=1 << 20,
    )
    try:
        listener.privilegedStartService()
        assert reactor.args == (514, "127.0.0.1", 65535)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 1 << 20
        drops = udp_socket_drops(sock)
        assert drops in (None, 0) and listener.kernel_drops() == drops
    finally:
        sock.close()
