"""
The sink's sinks progress each at its own pace: a sink that is down holds
its own queue while the others keep forwarding, up to the subscriber's
window and each sink's backlog bound; and the sink process's metrics.
"""

import json
import urllib.request

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from benchmarks.cluster import free_ports
from fit_broker.errors import ConfigError
from fit_broker.sink.config import FileSinkSpec, SinkSettings, SyslogSinkSpec, parse_settings
from fit_broker.sink.forwarder import FileSink, Forwarder, SyslogConnectionFactory, SyslogSink
from fit_broker.sink.metrics import sink_families
from fit_broker.sink.service import SinkClient, make_sink_service
from fit_broker.units import (
    MAX_CREDIT_BYTES,
    MAX_CREDIT_EVENTS,
    Event,
    batch_digest,
    digest_form,
    pack_contents,
)
from fit_broker.voters import MatchingCopiesVoter
from tests import byzantine
from tests.simnet import SimNet, cluster_config

NOW = 1_800_000_000.0


def event(n, content=None):
    return Event("probe", n, NOW, 60.0, 0, content if content is not None else b"e%d" % n)


def syslog_sink(clock, **options):
    return SyslogSink(SyslogSinkSpec("siem", "tcp:127.0.0.1:1", **options), "host", clock)


def file_sink(tmp_path, clock, **options):
    return FileSink(FileSinkSpec("archive", str(tmp_path / "e.jsonl"), **options), clock)


def connect(sink):
    transport = StringTransport()
    SyslogConnectionFactory(sink).buildProtocol(None).makeConnection(transport)
    return transport


def frames(data):
    out = []
    while data:
        length, _, rest = data.partition(b" ")
        out.append(rest[: int(length)].rsplit(b" ", 1)[1])
        data = rest[int(length) :]
    return out


def lines(tmp_path):
    path = tmp_path / "e.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["content"] for line in path.read_bytes().splitlines()]


def samples(families):
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples
    }


# The forwarder alone.


def test_each_group_fires_once_both_sinks_hold_it(tmp_path):
    """With syslog down the file takes every group at once; each Deferred fires, in order, only when syslog holds it too."""
    clock = Clock()
    siem, archive = syslog_sink(clock), file_sink(tmp_path, clock)
    forwarder = Forwarder([siem, archive])
    fired = []
    for n in range(3):
        d = forwarder.forward("events", [event(2 * n), event(2 * n + 1)])
        d.addCallback(lambda _, n=n: fired.append(n))
    assert lines(tmp_path) == [f"e{i}" for i in range(6)]
    assert fired == [] and forwarder.open_groups == 3
    assert siem.held() == 6 and siem.held_bytes() > 6 * 40 and archive.held() == 0
    transport = connect(siem)
    assert fired == [0, 1, 2] and forwarder.open_groups == 0 and forwarder.forwarded == 6
    assert frames(transport.value()) == [b"e%d" % i for i in range(6)]


def test_backlog_bound_holds_every_sink(tmp_path):
    """Once the down sink holds backlog_events, new groups wait in the forwarder for every sink, then flow in order."""
    clock = Clock()
    siem, archive = syslog_sink(clock, backlog_events=3), file_sink(tmp_path, clock)
    forwarder = Forwarder([siem, archive])
    groups = [forwarder.forward("events", [event(2 * n), event(2 * n + 1)]) for n in range(4)]
    # 2 held < 3: the second group is offered too; then the sink is full
    assert lines(tmp_path) == ["e0", "e1", "e2", "e3"]
    assert forwarder.full() == ["siem"] and forwarder.waiting_events == 4
    assert siem.snapshot()["held"] == 4 and not any(d.called for d in groups)
    transport = connect(siem)
    assert all(d.called for d in groups) and forwarder.waiting_events == 0
    assert frames(transport.value()) == [b"e%d" % i for i in range(8)]
    assert lines(tmp_path) == [f"e{i}" for i in range(8)]


def test_backlog_bound_in_bytes(tmp_path):
    """A sink's backlog is bounded in bytes too: large events fill it before the event count does."""
    clock = Clock()
    siem, archive = syslog_sink(clock, backlog_bytes=4096), file_sink(tmp_path, clock)
    forwarder = Forwarder([siem, archive])
    for n in range(5):
        forwarder.forward("events", [event(n, b"x" * 3000)])
    assert len(lines(tmp_path)) == 2 and forwarder.full() == ["siem"]
    assert siem.held() == 2 and siem.held_bytes() > 4096
    connect(siem)
    assert len(lines(tmp_path)) == 5 and forwarder.open_groups == 0


def test_group_handed_over_from_a_callback_keeps_order(tmp_path):
    """A Deferred that hands over a new group while the forwarder offers waiting ones does not reorder them."""
    clock = Clock()
    siem, archive = syslog_sink(clock, backlog_events=1), file_sink(tmp_path, clock)
    forwarder = Forwarder([siem, archive])
    first = forwarder.forward("events", [event(0)])
    forwarder.forward("events", [event(1)])
    first.addCallback(lambda _: forwarder.forward("events", [event(2)]))
    transport = connect(siem)
    assert frames(transport.value()) == [b"e0", b"e1", b"e2"]
    assert lines(tmp_path) == ["e0", "e1", "e2"] and forwarder.open_groups == 0


# With a whole cluster and the real subscriber.


def sink_on(net, sinks, window=4, credit=1000, channels=("events",)):
    """A SinkClient on simulated network C{net}, forwarding to C{sinks}."""
    settings = SinkSettings(client="console", channels=channels, sinks=(), window=window, credit=credit)
    opened = []

    def open_session(cluster, client, reactor, keys=None, endpoints=None, **options):
        opened.append(options)
        return net.client(client, **options)

    client = SinkClient(net.config, settings, Forwarder(sinks), net.clock, open_session=open_session)
    client.startService()
    net.run()
    assert client.subscribed == set(channels)
    assert opened == [{"credit": credit, "credit_bytes": settings.credit_bytes(), "window": window}]
    return client


def queue_state(net):
    """Per replica, what it holds for the sink's client: (waiting, sent and unacknowledged)."""
    out = []
    for replica in net.replicas:
        queue = replica.snapshot()["channels"]["events"]["subscribers"]["console"]
        out.append((queue["waiting"], queue["unacknowledged"]))
    return out


def test_down_sink_lets_the_other_run_ahead_up_to_the_window(tmp_path):
    """With syslog down, the file keeps getting new groups until `window` are open; then all hold, and nothing is lost."""
    net = SimNet(cluster_config())
    siem, archive = syslog_sink(net.clock), file_sink(tmp_path, net.clock)
    client = sink_on(net, [siem, archive], window=4)
    pub = net.client("probe")
    for n in range(10):
        net.clock.advance(0.1)
        assert pub.publisher.publish_many("events", [b"r%d-%d" % (n, i) for i in range(3)]) is not None
        net.run(0.2)
        if n < 4:
            # the healthy sink is not held back by the down one
            assert len(lines(tmp_path)) == 3 * (n + 1)
    forwarder = client.forwarder
    assert forwarder.open_groups == 4 and len(lines(tmp_path)) == 12 and siem.held() == 12
    # the stream holds; every replica keeps what the sink did not acknowledge
    assert all(waiting + unacked >= 30 for waiting, unacked in queue_state(net))
    transport = connect(siem)
    net.run(1.0)
    expected = [f"r{n}-{i}" for n in range(10) for i in range(3)]
    assert lines(tmp_path) == expected
    assert [f.decode() for f in frames(transport.value())] == expected
    assert forwarder.open_groups == 0 and forwarder.forwarded == 30
    net.run(1.0)
    assert queue_state(net) == [(0, 0)] * 4
    client.stopService()


def test_window_of_one_holds_every_sink():
    """window = 1 is the old behaviour: one group open, so a down sink holds the others at once."""
    net = SimNet(cluster_config())
    siem = syslog_sink(net.clock)
    other = syslog_sink(net.clock)
    other.name = "other"
    connect(other)
    client = sink_on(net, [siem, other], window=1)
    pub = net.client("probe")
    for n in range(3):
        pub.publisher.publish_many("events", [b"w%d" % n])
        net.run(0.2)
    assert client.forwarder.open_groups == 1 and other.counters["forwarded"] == 1
    client.stopService()


# Settings.

GOOD = {"client": "siem", "channels": ["events"], "sinks": [{"kind": "file", "path": "e.jsonl"}]}


def test_window_metrics_and_backlog_settings():
    """window, metrics and each sink's backlog bounds are read with defaults; the byte credit fits the window."""
    settings = parse_settings("/etc/sink.toml", GOOD)
    assert settings.window == 64 and settings.metrics is None
    assert settings.sinks[0].backlog_events == 100_000 and settings.sinks[0].backlog_bytes == 64 << 20
    assert (settings.window + 1) * settings.credit <= MAX_CREDIT_EVENTS
    assert (settings.window + 1) * settings.credit_bytes() <= MAX_CREDIT_BYTES
    settings = parse_settings(
        "/etc/sink.toml",
        {
            **GOOD,
            "window": 8,
            "metrics": "tcp:9480:interface=127.0.0.1",
            "sinks": [{"kind": "syslog", "connect": "tcp:h:1", "backlog_events": 10, "backlog_bytes": 2048}],
        },
    )
    assert settings.window == 8 and settings.metrics == "tcp:9480:interface=127.0.0.1"
    assert settings.sinks[0].backlog_events == 10 and settings.credit_bytes() == 1 << 20


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"window": 0}, "[window]: expected a number from 1"),
        ({"window": "many"}, "[window]"),
        ({"window": 100}, "[window]: expected at most 64 with credit = 1000"),
        ({"window": 200, "credit": 500}, "[window]: expected at most 130 with credit = 500"),
        ({"metrics": 9480}, "[metrics]: expected a server endpoint string"),
        ({"metrics": ""}, "[metrics]"),
        ({"sinks": [{"kind": "file", "path": "x", "backlog_events": 0}]}, "[sinks[0].backlog_events]"),
        ({"sinks": [{"kind": "file", "path": "x", "backlog_bytes": 10}]}, "[sinks[0].backlog_bytes]"),
    ],
)
def test_window_and_metrics_errors(change, fragment):
    """A window past what replicas keep unacknowledged, or a bad metrics or backlog value, is one ConfigError."""
    with pytest.raises(ConfigError) as error:
        parse_settings("/etc/sink.toml", {**GOOD, **change})
    assert str(error.value).startswith("/etc/sink.toml: ") and fragment in str(error.value)


# Metrics.


@attrs.define
class FakeProxy:
    links: dict
    counters: dict = attrs.Factory(dict)
    refusals: dict = attrs.Factory(dict)


@attrs.define
class FakeSubscriber:
    voters: dict
    counters: dict

    def subscribe(self, tag, callback, resume=True):
        return succeed(None)

    def stop(self):
        pass


@attrs.define
class FakeSession:
    proxy: FakeProxy
    subscriber: FakeSubscriber

    def stop(self):
        pass


def _batch(first_id, content=b"c"):
    return ("probe", first_id, NOW, 60.0, 0, pack_contents([content]), b"")


def test_voter_evidence_families(tmp_path):
    """Mismatches and over-credit become evidence per replica; a replica that has not vouched for a pending batch shows as withholding."""
    voter = MatchingCopiesVoter(faults=1, replicas=4)
    true, forged = _batch(1), _batch(1, b"forged")
    voter.offer(0, [forged], NOW)
    voter.offer(2, [digest_form(true, batch_digest(true))], NOW)
    assert voter.offer(1, [true], NOW) == [true]
    pending = _batch(5)
    voter.offer(1, [digest_form(pending, batch_digest(pending))], NOW)
    voter.offer(2, [digest_form(pending, batch_digest(pending))], NOW)
    session = FakeSession(
        FakeProxy({0: None, 1: None, 2: None}, {"unopenable:events": 2}),
        FakeSubscriber({"events": voter}, {"over-credit:replica-3": 4, "fetches": 7}),
    )
    cluster = cluster_config(clients=("probe", "console"))
    settings = SinkSettings(client="console", channels=("events",), sinks=(), window=8)
    client = SinkClient(cluster, settings, Forwarder([file_sink(tmp_path, Clock())]), Clock(),
                        open_session=lambda *a, **k: session)
    client.startService()
    client.forwarder.forward("events", [event(1), event(2)])
    got = samples(sink_families(client))
    ch = ("channel", "events")
    assert got[("fitbroker_sink_voter_evidence_total", (ch, ("reason", "mismatch"), ("replica", "0")))] == 1
    over = (("reason", "over-credit"), ("replica", "3"))
    assert got[("fitbroker_sink_subscriber_evidence_total", over)] == 4
    withheld = [got[("fitbroker_sink_voter_withheld", (ch, ("replica", str(i))))] for i in range(4)]
    assert withheld == [1, 0, 0, 1]
    assert got[("fitbroker_sink_voter_pending", (ch,))] == 1
    assert got[("fitbroker_sink_voter_delivered_total", (ch,))] == 1
    assert got[("fitbroker_sink_subscriber_fetches_total", ())] == 7
    assert got[("fitbroker_sink_client_unopenable_total", (("reason", "events"),))] == 2
    assert got[("fitbroker_sink_links_up", ())] == 3 and got[("fitbroker_sink_replicas", ())] == 4
    sink = ("sink", "archive")
    assert got[("fitbroker_sink_forwarded_total", (sink,))] == 2
    assert got[("fitbroker_sink_held", (sink,))] == 0
    assert got[("fitbroker_sink_state", (sink, ("state", "up")))] == 1
    assert got[("fitbroker_sink_state", (sink, ("state", "down")))] == 0
    assert got[("fitbroker_sink_forwarder_forwarded_total", ())] == 2
    assert got[("fitbroker_sink_forwarder_window", ())] == 8


def test_sink_service_serves_metrics_over_http(tmp_path):
    """A scrape of the sink's /metrics on 127.0.0.1 shows each sink, the links and a lying replica's mismatches."""
    net = SimNet(cluster_config(qop="bft", clients=("probe", "console")), faulty={1: byzantine.alter})
    reactor = EPollReactor()
    port = free_ports(1)[0]
    settings = SinkSettings(
        client="console",
        channels=("events",),
        sinks=(
            FileSinkSpec("archive", str(tmp_path / "e.jsonl")),
            SyslogSinkSpec("siem", f"tcp:127.0.0.1:{free_ports(1)[0]}"),
        ),
        window=4,
        metrics=f"tcp:{port}:interface=127.0.0.1",
        hostname="host",
    )
    service = make_sink_service(
        net.config, settings, reactor,
        open_session=lambda cluster, client, r, keys=None, endpoints=None, **options: net.client(
            client, **options
        ),
    )
    assert service.metrics is not None and service.metrics.name == f"metrics {settings.metrics}"
    service.startService()
    net.run()
    pub = net.client("probe")
    for n in range(3):
        pub.publisher.publish_many("events", [b"m%d-%d" % (n, i) for i in range(2)])
        net.run(0.2)
    assert len(lines(tmp_path)) == 6
    voter = service.client.session.subscriber.voters["events"]
    result = {}

    def scrape():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                result["text"] = response.read().decode("utf-8")
        except Exception as e:
            result["error"] = e
        reactor.callFromThread(finish)

    def finish():
        if reactor.running:
            service.stopService().addBoth(lambda _: reactor.stop())

    reactor.callLater(0, reactor.callInThread, scrape)
    reactor.callLater(20, finish)
    reactor.run(installSignalHandlers=False)
    assert "error" not in result, result.get("error")
    got = samples(text_string_to_metric_families(result["text"]))
    mismatch = (("channel", "events"), ("reason", "mismatch"), ("replica", "1"))
    assert got[("fitbroker_sink_voter_evidence_total", mismatch)] == voter.counters["mismatch:replica-1"] >= 1
    assert got[("fitbroker_sink_links_up", ())] == 4
    assert got[("fitbroker_sink_forwarded_total", (("sink", "archive"),))] == 6
    assert got[("fitbroker_sink_held", (("sink", "siem"),))] == 6
    assert got[("fitbroker_sink_state", (("sink", "siem"), ("state", "down")))] == 1
    assert got[("fitbroker_sink_forwarder_open_groups", ())] == 3


def test_bad_metrics_endpoint_stops_start_up_with_one_line(tmp_path):
    """A metrics value that is not a server endpoint string stops the sink process with one line."""
    from twisted.internet.testing import MemoryReactorClock

    from fit_broker.sink.tap import Options, makeService
    from tests.test_sink_format import CLUSTER_TOML, SINK_TOML

    (tmp_path / "cluster.toml").write_text(CLUSTER_TOML)
    (tmp_path / "sink.toml").write_text('metrics = "nonsense:1"\n' + SINK_TOML)
    options = Options()
    options.parseOptions(["--config", str(tmp_path / "cluster.toml")])
    with pytest.raises(SystemExit, match=r"^fitbroker-sink: metrics: invalid endpoint 'nonsense:1'"):
        makeService(options, MemoryReactorClock())
