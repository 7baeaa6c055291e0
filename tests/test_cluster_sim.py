"""
Whole clusters in one process (simulated network, fake clock): the client
library, the replicas and the broker state machine together, under crashes and pauses.
"""

from twisted.internet.defer import Deferred
from twisted.test import iosim

from fit_broker.errors import NoQuorum, RequestFailed
from fit_broker.replica.protocol import ReplicaProtocol
from tests.simnet import SimNet, cluster_config


def collect(net, session, tag, **options):
    got = []
    d = session.subscriber.subscribe(tag, got.extend, **options)
    net.run()
    assert d.called and d.result.ok
    return got


def published(net, session, tag, count, prefix=b"e", **options):
    d = session.publisher.publish_many(tag, [prefix + b"%d" % i for i in range(count)], **options)
    net.run()
    return d


def assert_exactly_once(got, expected_ids):
    ids = [e.event_id for e in got]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert set(ids) == set(expected_ids)


def test_every_event_delivered_once_across_channels():
    """Events on three channels reach the subscriber once each, with their content."""
    net = SimNet(cluster_config(("a", "b", "c")))
    pub, sub = net.client("probe"), net.client("console")
    got = {tag: collect(net, sub, tag) for tag in "abc"}
    acked = {tag: published(net, pub, tag, 250).result for tag in "abc"}
    for tag in "abc":
        assert_exactly_once(got[tag], acked[tag])
    assert got["a"][0].content == b"e0" and got["a"][0].publisher == "probe"
    assert sub.subscriber.voters["a"].counters["duplicate"] == 3 * 3


def test_crash_of_f_replicas_loses_nothing():
    """With one of four replicas killed mid-run, publishes are acknowledged and all delivered once (F1)."""
    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    got = collect(net, sub, "events")
    first = published(net, pub, "events", 300).result
    net.kill(1)
    net.run(1)
    d = published(net, pub, "events", 300, prefix=b"f")
    net.run(1)
    assert d.called, "publish not acknowledged with one replica down"
    assert_exactly_once(got, first + d.result)


def test_restarted_replica_rejoins_without_duplicates():
    """A replica killed and restarted catches up on what it missed and causes no duplicate delivery (F2)."""
    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    got = collect(net, sub, "events")
    net.kill(2)
    ids = published(net, pub, "events", 200).result
    net.restart(2)
    net.run(10)
    assert 2 in pub.proxy.links and 2 in sub.proxy.links
    more = published(net, pub, "events", 200, prefix=b"g").result
    net.run(1)
    assert_exactly_once(got, ids + more)
    assert net.replicas[2].broker.channels["events"].counters["accepted"] >= 200


def test_paused_replica_resumes_without_duplicates_or_stale_events():
    """A replica paused while the stream runs, then resumed, adds no duplicates (F4)."""
    net = SimNet(cluster_config(capacity=100_000))
    pub, sub = net.client("probe"), net.client("console")
    got = collect(net, sub, "events")
    ids = published(net, pub, "events", 100).result
    net.paused.add(3)
    for round_ in range(5):
        ids += published(net, pub, "events", 500, prefix=b"r%d-" % round_).result
    net.paused.discard(3)
    net.run(2)
    assert_exactly_once(got, ids)


def test_paused_replica_expired_events_not_delivered():
    """Events that expire while a replica is paused are never delivered from its stale queue."""
    net = SimNet(cluster_config(ttl=5))
    pub, sub = net.client("probe"), net.client("console")
    got = collect(net, sub, "events")
    for i in (0, 1, 2):
        net.paused.add(i)
    d = published(net, pub, "events", 10)
    assert not d.called
    net.paused.discard(0)
    net.run()
    assert d.called
    assert len(got) == 10
    net.clock.advance(10)
    net.paused.clear()
    net.run(1)
    assert len(got) == 10


def test_no_quorum_no_acknowledgement():
    """With three of four replicas down, a publish is not acknowledged and times out with a clear reason."""
    net = SimNet(cluster_config())
    pub = net.client("probe", timeout=5)
    for i in (0, 1, 2):
        net.kill(i)
    net.run(1)
    d = published(net, pub, "events", 5)
    assert not d.called
    net.run(6)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(NoQuorum)
    assert "1 of 2 acknowledgements needed" in str(failure.value)


def test_retried_request_reaches_returning_replica():
    """A publish waiting for a second replica is acknowledged once one comes back."""
    net = SimNet(cluster_config())
    pub = net.client("probe", timeout=60)
    for i in (0, 1, 2):
        net.kill(i)
    net.run(1)
    d = published(net, pub, "events", 5)
    assert not d.called
    net.restart(0)
    net.run(10)
    assert d.called and len(d.result) == 5


def test_unauthorised_publish_fails_everywhere():
    """A publish to a channel the client may not use fails with the control table's reason."""
    net = SimNet(cluster_config(clients=("probe", "console")))
    net.config.channels["events"] = net.config.channels["events"].__class__(
        **{f: getattr(net.config.channels["events"], f) for f in ("tag", "topic", "qos", "qop", "scheme", "voter", "subscribers")},
        publishers=frozenset({"console"}),
    )
    pub = net.client("probe")
    d = pub.publisher.publish("events", b"x")
    net.run()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(RequestFailed) and failure.value.status == "unauthorized"


def test_slow_subscriber_only_slows_itself():
    """A console that does not finish its work stops its own stream; its queue overflows with counts; others get everything."""
    net = SimNet(cluster_config(capacity=500), clock=None)
    config = net.config
    pub, fast, slow = net.client("probe"), net.client("console"), net.client("probe", credit=100)
    got_fast = collect(net, fast, "events")
    held = []
    stalled = Deferred()

    def stuck(events):
        held.extend(events)
        return stalled

    slow.subscriber.subscribe("events", stuck)
    net.run()
    ids = []
    for round_ in range(6):
        ids += published(net, pub, "events", 400, prefix=b"s%d-" % round_).result
    assert_exactly_once(got_fast, ids)
    assert len(held) <= 200 * len(config.replicas)
    queue = net.replicas[0].broker.channels["events"].queues["probe"]
    assert queue.counters["overflowed"] > 0
    c = queue.counters
    assert c["enqueued"] == c["delivered"] + c["expired"] + c["overflowed"] + len(queue) + queue.unacked_events
    assert net.replicas[0].broker.channels["events"].queues["console"].counters["overflowed"] == 0
    stalled.callback(None)
    net.run(1)
    assert len({e.event_id for e in held}) == len(held)


def test_urgent_events_overtake_a_backlog():
    """With a backlog queued, urgent events are delivered before routine ones."""
    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    sub.subscriber.subscribe("events")
    net.run()
    published(net, pub, "events", 50, prefix=b"routine")
    published(net, pub, "events", 5, prefix=b"urgent", urgency=3)
    d = sub.subscriber.receive("events", 10)
    net.run()
    contents = [e.content for e in d.result]
    assert contents[:5] == [b"urgent%d" % i for i in range(5)]


def test_pull_receive():
    """A subscriber without a callback pulls with receive(n) and gets each event once."""
    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    sub.subscriber.subscribe("events")
    net.run()
    ids = published(net, pub, "events", 30).result
    got = []
    for _ in range(4):
        d = sub.subscriber.receive("events", 10)
        net.run()
        got += d.result
    assert_exactly_once(got, ids)


def test_garbage_from_a_client_closes_only_that_connection():
    """A client sending malformed frames is counted and cut off; the replica keeps serving others."""
    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    got = collect(net, sub, "events")
    replica = net.replicas[0]
    server = ReplicaProtocol(replica)
    transport = iosim.FakeTransport(server, isServer=True)
    server.makeConnection(transport)
    server.dataReceived(b"\x00\x00\x00\x05\x09garbage")
    assert transport.disconnecting
    assert replica.counters["bad-frame"] == 1
    assert b"unsupported protocol version" in transport.stream[0] if transport.stream else True
    ids = published(net, pub, "events", 10).result
    assert_exactly_once(got, ids)


def test_unknown_client_refused_at_hello():
    """A client name the control table does not know is refused by every replica with the reason."""
    net = SimNet(cluster_config())
    from fit_broker.client.proxy import ServiceProxy
    from tests.simnet import _SimEndpoint

    proxy = ServiceProxy(
        net.config, "mallory", net.clock, endpoints=[_SimEndpoint(net, i) for i in range(4)]
    )
    proxy.start()
    net.run(2)
    assert not proxy.links
    assert "unknown client 'mallory'" in proxy.refusals[0]
    waiting = proxy.wait_for_links(2, 1)
    net.run(2)
    failure = waiting.result
    waiting.addErrback(lambda f: None)
    assert "refused: replica 0: unknown client 'mallory'" in str(failure.value)
    assert net.replicas[0].counters["refused-hello"] >= 1


def test_batch_subscribers_get_contents_with_ids():
    """A subscriber asking for batches gets each batch once, its contents in order and its first event id."""
    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    got = []
    sub.subscriber.subscribe("events", got.extend, batches=True)
    net.run()
    ids = published(net, pub, "events", 250).result
    assert [len(b.contents) for b in got] == [100, 100, 50]
    assert [b.first_id for b in got] == [ids[0], ids[100], ids[200]]
    assert [e.event_id for b in got for e in b.events()] == ids
    assert got[0].contents[0] == b"e0"


def test_expired_events_are_counted_and_logged_at_replicas():
    """Events already past their TTL when they arrive are acknowledged, never delivered, counted and logged."""
    from twisted.logger import capturedLogs

    from fit_broker.units import Request, pack_contents

    net = SimNet(cluster_config())
    pub, sub = net.client("probe"), net.client("console")
    got = collect(net, sub, "events")
    old = ("probe", 1, net.clock.seconds() - 100, 10.0, 0, pack_contents([b"stale"]), b"")
    with capturedLogs() as logs:
        d = pub.proxy.invoke(Request(pub.proxy.next_seq(), "publish", "events", 0, (old,)), 2)
        net.run()
    assert d.result.ok
    assert got == []
    for replica in net.replicas:
        assert replica.broker.channels["events"].counters["expired-on-arrival"] == 1
    assert any("past their TTL" in str(e.get("text", "")) for e in logs)
