"""
The subscriber on ordered channels, driven in memory: a fake proxy stands
for the replicas and a Clock for time.  Also `fitbroker tail --from`.
"""

import argparse

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from fit_broker import units
from fit_broker.cli import CommandError, _check_from, _parser, event_json
from fit_broker.client.subscriber import Subscriber
from fit_broker.config import ChannelSpec, ClusterConfig, ReplicaSpec
from fit_broker.errors import RequestFailed
from fit_broker.qos import QoSClass
from fit_broker.schemes.si import si
from fit_broker.units import (
    Delivery,
    OrderedDelivery,
    Reply,
    batch_digest,
    digest_form,
    pack_contents,
)

NOW = 1_000.0


@pytest.fixture(autouse=True)
def start_at_once(request, monkeypatch):
    """
    These tests feed a few replicas' streams by hand: a fresh voter starts
    as soon as enough copies agree, instead of waiting for n-f streams
    (the tests marked wait_to_start check that wait).
    """
    if "wait_to_start" not in request.keywords:
        monkeypatch.setattr("fit_broker.sequencer.START_WAIT", 0.0)


def make_config(qop="bft", **orderings):
    classes = {name: QoSClass(name, ordering=name) for name in set(orderings.values())}
    channels = {
        tag: ChannelSpec(tag, tag, classes[ordering], qop, "si", "f-plus-one" if qop == "bft" else "first-copy",
                         frozenset({"*"}), frozenset({"*"}))
        for tag, ordering in orderings.items()
    }
    replicas = tuple(ReplicaSpec(i, f"tcp:{7500 + i}", f"tcp:127.0.0.1:{7500 + i}") for i in range(4))
    return ClusterConfig("/nowhere/cluster.toml", "test", 1, replicas, frozenset({"sub", "pub"}), "sub",
                         classes, channels)


class FakeProxy:
    """
    The replicas as the subscriber sees them: what it sends is kept, and
    every request it invokes succeeds.
    """

    def __init__(self, config):
        self.config = config
        self.client = "sub"
        self.on_delivery = None
        self.on_link_up = []
        self.links = {index: object() for index in range(len(config.replicas))}
        self.counters = {}
        self.sent = []
        self.invoked = []
        self._seq = 0

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def next_seq(self):
        self._seq += 1
        return self._seq

    def send(self, index, request):
        self.sent.append((index, request))

    def invoke(self, request, quorum, timeout=None, retry=True, observe=None, only=None):
        self.invoked.append((request, only, observe))
        return succeed(Reply(request.seq, "ok"))

    def acked(self, index, tag):
        keys = []
        for to, request in self.sent:
            if to == index and request.method == units.ACK:
                keys += [tuple(key) for key in request.options.get("keys", {}).get(tag, [])]
        return keys

    def credited(self, index, tag):
        return sum(
            request.count for to, request in self.sent
            if to == index and request.method == units.CREDIT and request.channel == tag
        )


def batch(first_id, content=b"x"):
    return ("p", first_id, NOW, 600.0, 0, pack_contents([content]), b"")


def light(full):
    return digest_form(full, batch_digest(full))


def entry(position, seq, b=None):
    return (position, seq, batch(seq) if b is None else b, "", 1)


def tomb(position, seq, span=1):
    return (position, seq, light(batch(seq)), "expired", span)


class Setup:
    def __init__(self, state_dir=None, credit=1000, qop="bft", **orderings):
        self.config = make_config(qop, **orderings or {"events": "channel"})
        self.clock = Clock()
        self.clock.advance(NOW)
        self.proxy = FakeProxy(self.config)
        self.subscriber = Subscriber(self.proxy, self.clock, lambda name: si, credit=credit,
                                     state_dir=state_dir)
        self.got = []

    def subscribe(self, tag="events", batches=True, **options):
        def callback(items):
            self.got += [(tag, item) for item in items]

        return self.subscriber.subscribe(tag, callback, batches=batches, **options)

    def push(self, index, entries, watermark=0, tag="events"):
        self.proxy.on_delivery(index, OrderedDelivery(tag, tuple(entries), watermark))

    def settle(self, seconds=0.1):
        self.clock.advance(seconds)

    def seqs(self, tag=None):
        return [item.seq for t, item in self.got if tag is None or t == tag]


def test_batches_are_handed_over_in_order_with_their_position_and_acknowledged_to_all():
    """f+1 matching entries make a batch go to the application with its position and seq, then every replica gets its ack."""
    setup = Setup()
    setup.subscribe()
    setup.push(0, [entry(10, 1), entry(20, 2)])
    assert setup.got == []
    setup.push(1, [entry(10, 1), entry(20, 2)])
    assert [(b.position, b.seq, b.first_id, b.contents) for _, b in setup.got] == [
        (10, 1, 1, [b"x"]), (20, 2, 2, [b"x"])
    ]
    setup.settle()
    for index in range(4):
        assert setup.proxy.acked(index, "events") == [("p", 1), ("p", 2)]


def test_events_carry_position_and_seq():
    """Without batches=True the application gets events, each with its batch's position and seq."""
    setup = Setup()
    setup.subscribe(batches=False)
    setup.push(0, [entry(10, 1)])
    setup.push(2, [entry(10, 1)])
    (_, event), = setup.got
    assert (event.publisher, event.event_id, event.position, event.seq) == ("p", 1, 10, 1)
    assert '"position": 10, "seq": 1' in event_json("events", event)


def test_frames_of_the_wrong_kind_are_dropped_and_counted():
    """A batch delivery on an ordered channel, or an ordered one on an unordered channel, is refused and counted."""
    setup = Setup(events="channel", plain="none")
    setup.subscribe()
    setup.subscriber.subscribe("plain", lambda events: None)
    setup.proxy.on_delivery(0, Delivery("events", (batch(1),)))
    setup.push(0, [entry(10, 1)], tag="plain")
    counters = setup.subscriber.counters
    assert counters["unordered-delivery-on-ordered-channel:replica-0"] == 1
    assert counters["ordered-delivery-on-unordered-channel:replica-0"] == 1
    assert setup.got == []


def test_ordered_channels_refuse_pulls_and_positions_need_an_ordered_channel():
    """Pulling an ordered channel, streaming it without a callback, or a start position on an unordered one fails clearly."""
    setup = Setup(events="channel", plain="none")
    failures = []
    for d in (
        setup.subscriber.receive("events", 10),
        setup.subscriber.subscribe("events"),
        setup.subscriber.subscribe("plain", lambda events: None, from_position=5),
    ):
        d.addErrback(lambda f: failures.append(f.value))
    assert [type(e) for e in failures] == [RequestFailed] * 3
    assert "is ordered" in failures[0].text and "not ordered" in failures[2].text


def test_tombstones_skip_and_a_restart_resumes_from_the_record_without_repeats(tmp_path):
    """Delivered and skipped numbers are recorded; a restarted subscriber neither repeats them nor waits for them."""
    first = Setup(state_dir=str(tmp_path))
    first.subscribe()
    for index in (0, 1):
        first.push(index, [entry(10, 1), entry(20, 2), tomb(30, 3, span=2)])
    assert first.seqs() == [1, 2]
    assert first.subscriber.voters["events"].counters["skipped-expired"] == 2
    first.settle()
    first.subscriber.stop()

    second = Setup(state_dir=str(tmp_path))
    second.subscribe()
    assert second.subscriber.voters["events"].next_seq == 5
    (subscribe, _, _), = second.proxy.invoked
    assert subscribe.options["from"] == 31 and subscribe.options["stream"]
    # replicas send again what they had not heard acknowledged
    for index in (0, 1):
        second.push(index, [entry(20, 2), tomb(30, 3, span=2), entry(50, 5)])
    assert second.seqs() == [5]
    second.settle()
    assert ("p", 2) in second.proxy.acked(0, "events") and ("p", 3) in second.proxy.acked(1, "events")
    second.subscriber.stop()


def test_a_start_position_skips_what_lies_before_it():
    """subscribe(from_position=P) asks replicas to stream from P and hands over nothing before it, acknowledging it."""
    setup = Setup()
    setup.subscribe(from_position=25)
    (subscribe, _, _), = setup.proxy.invoked
    assert subscribe.options["from"] == 25
    for index in (0, 1):
        setup.push(index, [entry(10, 1), entry(20, 2), entry(30, 3)])
    assert setup.seqs() == [3]
    setup.settle()
    assert {("p", 1), ("p", 2)} <= set(setup.proxy.acked(0, "events"))


def test_two_global_channels_merge_in_position_order_including_an_idle_one():
    """Events of global channels reach the application in log order; an idle one holds others back until f+1 watermarks pass."""
    setup = Setup(a="global", b="global", idle="global")
    for tag in ("a", "b", "idle"):
        setup.subscribe(tag)
    for index in (0, 1):
        setup.push(index, [entry(10, 1), entry(40, 2)], watermark=40, tag="a")
        setup.push(index, [entry(20, 1)], watermark=20, tag="b")
    # the idle channel said nothing yet: everything waits
    assert setup.got == []
    setup.push(0, [], watermark=25, tag="idle")
    setup.push(1, [], watermark=30, tag="idle")
    assert [(tag, item.position) for tag, item in setup.got] == [("a", 10), ("b", 20)]
    # a's 40 still waits: b's replicas vouch up to 20 only, the idle channel's up to 25
    setup.push(0, [], watermark=45, tag="b")
    setup.push(1, [], watermark=45, tag="b")
    setup.push(3, [], watermark=10**6, tag="idle")  # one replica's word is not enough
    assert len(setup.got) == 2
    setup.push(0, [], watermark=41, tag="idle")
    assert [(tag, item.position) for tag, item in setup.got][-1] == ("a", 40)


def test_credit_stays_held_while_the_merge_waits():
    """Decided items waiting for another global channel keep their credit from going back, so waiting stays within the window."""
    setup = Setup(credit=4, a="global", idle="global")
    setup.subscribe("a")
    setup.subscribe("idle")
    for index in (0, 1):
        setup.push(index, [entry(10 * s, s) for s in range(1, 5)], tag="a")
    setup.settle()
    assert setup.got == [] and setup.proxy.credited(0, "a") == 0
    setup.push(0, [entry(50, 5)], tag="a")
    assert setup.subscriber.counters["over-credit:replica-0"] == 1
    for index in (0, 1):
        setup.push(index, [], watermark=100, tag="idle")
    setup.settle()
    assert setup.seqs("a") == [1, 2, 3, 4]
    assert setup.proxy.credited(0, "a") == 4 and setup.proxy.credited(1, "a") == 4


def test_a_slow_application_holds_the_order():
    """While the application has not finished a group, the next waits; it goes once the Deferred fires."""
    setup = Setup()
    pending = []

    def callback(items):
        setup.got += [("events", item) for item in items]
        pending.append(Deferred())
        return pending[-1]

    setup.subscriber.subscribe("events", callback, batches=True)
    for index in (0, 1):
        setup.push(index, [entry(10, 1)])
    for index in (0, 1):
        setup.push(index, [entry(20, 2)])
    assert setup.seqs() == [1]
    setup.settle()
    assert setup.proxy.acked(0, "events") == []
    pending[0].callback(None)
    assert setup.seqs() == [1, 2]
    setup.settle()
    assert setup.proxy.acked(0, "events") == [("p", 1)]


def test_a_batch_of_which_only_digests_came_is_fetched_and_delivered():
    """When f+1 replicas sent only the digest, the subscriber fetches the batch from them after the delay and hands it over."""
    setup = Setup()
    setup.subscribe()
    full = batch(1)
    setup.push(2, [entry(10, 1, light(full))])
    setup.push(3, [entry(10, 1, light(full))])
    setup.settle(0.3)
    fetches = [(r, only, observe) for r, only, observe in setup.proxy.invoked if r.method == units.FETCH]
    (request, only, observe), = fetches
    assert request.options["keys"] == [("p", 1)] and only == (2, 3)
    observe(2, Reply(request.seq, "ok", batches=(full,)))
    assert setup.seqs() == [1]


def test_cft_channels_deliver_the_first_copy():
    """On a CFT ordered channel one replica's entry is enough."""
    setup = Setup(qop="cft")
    setup.subscribe()
    setup.push(3, [entry(10, 1), entry(20, 2)])
    assert setup.seqs() == [1, 2]


def test_a_replica_whose_copies_were_dropped_is_asked_to_stream_again():
    """A replica that left a gap is reopened once the gap is due; its credit starts over when it answers."""
    setup = Setup()
    setup.subscribe()
    for index in (0, 1):
        setup.push(index, [entry(10, 1)])
    setup.push(3, [entry(10, 1), entry(30, 3)])
    assert setup.subscriber.voters["events"].counters["ahead:replica-3"] == 1
    for index in (0, 1):
        setup.push(index, [entry(20, 2)])
    setup.settle()
    reopen = [(r, only, observe) for r, only, observe in setup.proxy.invoked[1:] if r.method == units.SUBSCRIBE]
    (request, only, observe), = reopen
    assert only == (3,) and request.options["resume"] and request.options["stream"]
    stream = setup.subscriber._streams["events"]
    assert stream.outstanding[3][0] == float("inf")
    observe(3, Reply(request.seq, "ok"))
    assert stream.outstanding[3] == [setup.subscriber.credit, setup.subscriber.credit_bytes]
    setup.push(3, [entry(30, 3)])
    setup.push(0, [entry(30, 3)])
    assert setup.seqs() == [1, 2, 3]


# The delivery record's positions.


def test_the_record_keeps_the_last_position_through_kills_and_compaction(tmp_path):
    """last_order follows handed groups and skips; a group killed mid-hand-over does not move it; compaction keeps it (format 2)."""
    import json

    from fit_broker.client.delivered import DeliveryRecord

    path = tmp_path / "events.delivered"
    with DeliveryRecord.open(path) as record:
        assert record.last_order is None
        record.handing([("p", 1, 0)], order=(10, 1))
        assert record.last_order is None
        record.handed()
        record.skipped(30, 3)
        record.handing([("p", 4, 0)], order=(40, 4))  # killed before handed
    with DeliveryRecord.open(path) as record:
        assert record.last_order == (30, 3) and ("p", 4) in record.maybe_repeated
        record.handing([("p", 4, 0)], order=(40, 4))
        record.handed()
    assert json.loads(path.read_text().splitlines()[0]) == {"fitbroker-delivered": 2}
    with DeliveryRecord.open(path) as record:
        assert record.last_order == (40, 4)


# The command line.


def test_tail_from_parses_a_position():
    """`tail --from N` gives the position to start at; without it, none."""
    assert _parser().parse_args(["tail", "--from", "42", "events"]).from_position == 42
    assert _parser().parse_args(["tail", "events"]).from_position is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["tail", "--from", "soon", "events"])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["tail", "--from", "0", "events"], "--from: expected a log position"),
        (["tail", "--from", "3", "events", "plain"], "not an ordered channel: plain"),
        (["tail", "--from", "3", "--skip-backlog", "events"], "contradict"),
    ],
)
def test_tail_from_is_refused_in_one_line(argv, fragment):
    """A bad --from (not a position, an unordered channel, with --skip-backlog) is one CommandError."""
    config = make_config(events="channel", plain="none")
    args = _parser().parse_args(argv)
    with pytest.raises(CommandError) as error:
        _check_from(config, args)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_tail_from_on_ordered_channels_is_accepted():
    """--from on ordered channels passes the checks."""
    config = make_config(events="channel", g="global")
    _check_from(config, argparse.Namespace(from_position=7, skip_backlog=False, channels=["events", "g"]))


# Against a simulated cluster: real replicas ordering through their log.


def _sim(ordering="channel", channels=("events",), **qos):
    from tests.simnet import SimNet, cluster_config

    config = cluster_config(
        channels, replicas=4, qop="bft", keys_dir="keys", ordering=ordering,
        clients=("probe", "console"), **qos
    )
    return SimNet(config)


def _sim_subscribe(net, tags=("events",), **options):
    session = net.client("console", **{k: options.pop(k) for k in ("state_dir",) if k in options})
    got = []
    for tag in tags:
        d = session.subscriber.subscribe(tag, got.extend, **options)
        net.run(seconds=0.5)
        assert d.called and d.result.ok, d
    return session, got


def _sim_publish(net, contents, tag="events"):
    publisher = net.client("probe")
    for content in contents:
        publisher.publisher.publish_many(tag, [content])
        net.run(seconds=0.05)
    net.run(seconds=1)


def test_a_simulated_cluster_delivers_gapless_numbers_and_resumes_from_the_record(tmp_path):
    """Real replicas: events come with seq 1, 2, ... and rising positions; a restarted subscriber resumes after its record."""
    net = _sim()
    session, got = _sim_subscribe(net, state_dir=str(tmp_path))
    _sim_publish(net, [b"e%d" % i for i in range(6)])
    assert [e.content for e in got] == [b"e%d" % i for i in range(6)]
    assert [e.seq for e in got] == list(range(1, 7))
    positions = [e.position for e in got]
    assert positions == sorted(positions) and len(set(positions)) == 6
    net.crash_client(session)
    _sim_publish(net, [b"late%d" % i for i in range(3)])
    session, again = _sim_subscribe(net, state_dir=str(tmp_path))
    net.run(seconds=1)
    assert [e.seq for e in again] == [7, 8, 9]
    assert session.subscriber.counters.get("repeated-after-crash", 0) == 0


def test_a_simulated_cluster_starts_a_subscriber_at_a_position():
    """from_position: of what the replicas still hold for the client, only events at that position or later are handed over."""
    net = _sim()
    session = net.client("console")
    seen = []

    def stuck(events):
        # takes the first group and never finishes: nothing is acknowledged
        seen.extend(events)
        return Deferred()

    session.subscriber.subscribe("events", stuck)
    net.run(seconds=0.5)
    _sim_publish(net, [b"e%d" % i for i in range(5)])
    waiting = [item.position for item in session.subscriber._streams["events"].lane.items]
    positions = [e.position for e in seen] + waiting
    assert len(positions) == 5
    net.crash_client(session)
    session, got = _sim_subscribe(net, from_position=positions[2])
    net.run(seconds=1)
    assert [e.content for e in got] == [b"e2", b"e3", b"e4"]
    assert session.subscriber.voters["events"].counters["before-start"] >= 2


def test_a_simulated_cluster_merges_global_channels_by_position():
    """Two busy global channels and an idle one: the subscriber gets one log order across them."""
    net = _sim(ordering="global", channels=("alpha", "beta", "idle"))
    _, got = _sim_subscribe(net, tags=("alpha", "beta", "idle"))
    publisher = net.client("probe").publisher
    for i in range(5):
        publisher.publish_many("alpha", [b"a%d" % i])
        publisher.publish_many("beta", [b"b%d" % i])
        net.run(seconds=0.05)
    net.run(seconds=2)
    assert len(got) == 10
    positions = [e.position for e in got]
    assert positions == sorted(positions)


def test_a_simulated_cluster_skips_what_overflowed_and_says_so():
    """A stuck application lets the replicas' queues overflow: the overflowed numbers are skipped and counted, the rest delivered in order."""
    net = _sim(capacity=3)
    session = net.client("console", credit=2)
    got = []
    gate = Deferred()

    def slow(events):
        got.extend(events)
        if len(got) == 1:
            return gate

    session.subscriber.subscribe("events", slow)
    net.run(seconds=0.5)
    _sim_publish(net, [b"e%d" % i for i in range(10)])
    gate.callback(None)
    net.run(seconds=2)
    counters = session.subscriber.voters["events"].counters
    skipped = counters.get("skipped-overflow", 0)
    assert skipped > 0 and len(got) + skipped == 10
    seqs = [e.seq for e in got]
    assert seqs == sorted(seqs) and seqs[0] == 1
    assert [e.content for e in got][-1] == b"e9"


@pytest.mark.wait_to_start
def test_a_lagging_replica_streaming_first_does_not_make_a_fresh_subscriber_skip():
    """A fresh CFT subscriber (first copy wins, no record) waits for n-f replicas' streams before it starts: a replica that caught up by state transfer and holds only later numbers, streaming first, does not make it skip the earlier ones the others still hold."""
    setup = Setup(qop="cft")
    setup.subscribe()
    setup.push(3, [entry(40, 4), entry(50, 5)])
    assert setup.got == []
    setup.push(0, [entry(10, 1), entry(20, 2), entry(30, 3), entry(40, 4), entry(50, 5)])
    assert setup.got == []
    setup.push(1, [entry(10, 1), entry(20, 2), entry(30, 3), entry(40, 4), entry(50, 5)])
    assert setup.seqs() == [1, 2, 3, 4, 5]


@pytest.mark.wait_to_start
def test_a_fresh_subscriber_with_fewer_streams_starts_after_the_wait():
    """When fewer than n-f replicas stream anything, the subscriber starts at the earliest number offered once the wait has passed."""
    setup = Setup(qop="cft")
    setup.subscribe()
    setup.push(2, [entry(20, 2)])
    setup.push(0, [entry(10, 1), entry(20, 2)])
    assert setup.got == []
    for _ in range(15):
        setup.settle(0.1)
    assert setup.seqs() == [1, 2]
