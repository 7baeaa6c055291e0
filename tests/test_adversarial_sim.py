"""
BFT delivery under attack, on the simulated network: at most f Byzantine
replicas, honest replicas that are slow, and certified clients that
misbehave.  Every acknowledged event reaches every live, authorised
subscriber once, or is counted where it was dropped; nothing forged,
replayed or delivered twice; memory within its bounds.
"""

import pytest

from fit_broker import units
from fit_broker.units import Request, pack_contents
from tests import byzantine
from tests.simnet import SimNet, cluster_config

CLIENTS = ("probe", "honest", "mallory", "console", "dashboard")


def net_for(scheme="si", faulty=None, liars=None, voter=None, **qos):
    qos.setdefault("ttl", 600)
    qos.setdefault("capacity", 100_000)
    config = cluster_config(("events",), qop="bft", scheme=scheme, voter=voter, clients=CLIENTS, **qos)
    return SimNet(config, faulty=faulty, liars=liars, keys=scheme != "si")


def subscribe(net, session, tag="events", **options):
    got = []
    d = session.subscriber.subscribe(tag, got.extend, **options)
    net.run()
    assert d.called and d.result.ok, d.result
    return got


def publish_one_by_one(net, session, count, prefix, run_every=50):
    """Publish C{count} one-event batches; return {event id: content} of those acknowledged."""
    acked = {}
    waiting = []
    for i in range(count):
        content = prefix + b"-%d" % i
        d = session.publisher.publish("events", content)
        d.addCallback(lambda event_id, c=content: acked.__setitem__(event_id, c))
        waiting.append(d)
        if i % run_every == run_every - 1:
            net.run()
    net.run()
    return acked, waiting


def check_c0(got, acked):
    ids = [(e.publisher, e.event_id) for e in got]
    duplicated = len(ids) - len(set(ids))
    assert duplicated == 0, f"{duplicated} duplicated"
    delivered = {(e.publisher, e.event_id): e.content for e in got}
    unexpected = [k for k, c in delivered.items() if acked.get(k) != c]
    assert not unexpected, f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"
    lost = set(acked) - set(delivered)
    assert not lost, f"{len(lost)} acknowledged events never delivered, e.g. {sorted(lost)[:3]}"


def keyed(session, acked):
    return {(session.proxy.client, i): c for i, c in acked.items()}


def junk_batch(session, first_id, content):
    scheme = session.publisher.schemes(session.proxy.config.channels["events"].scheme)
    batch = (session.proxy.client, first_id, session.publisher.clock.seconds(), 600.0, 0,
             pack_contents([content]), b"")
    return scheme.protect(session.publisher.keys, "events", batch)


@pytest.mark.parametrize("scheme", ["si", "ha"])
def test_publisher_sending_each_replica_different_batches_blocks_no_one(scheme):
    """A certified publisher that sends each replica batches no other replica gets only evicts its own; two honest publishers' events all reach both subscribers."""
    net = net_for(scheme)
    mallory = net.client("mallory")
    probe, honest = net.client("probe", batch_size=1), net.client("honest", batch_size=1)
    console, dashboard = net.client("console", credit=200), net.client("dashboard", credit=200)
    got_console, got_dashboard = subscribe(net, console), subscribe(net, dashboard)
    acked = {}
    base = 10**15
    for round_ in range(8):
        for i in range(160):
            n = round_ * 160 + i
            mallory.proxy.send(
                n % 4, Request(0, units.PUBLISH, "events", 0, (junk_batch(mallory, base + n, b"junk"),))
            )
        a, _ = publish_one_by_one(net, probe, 60, b"p%d" % round_)
        acked.update(keyed(probe, a))
        a, _ = publish_one_by_one(net, honest, 60, b"h%d" % round_)
        acked.update(keyed(honest, a))
    net.run(2)
    assert len(acked) == 8 * 120
    check_c0(got_console, acked)
    check_c0(got_dashboard, acked)
    voter = console.subscriber.voters["events"]
    assert voter.counters.get("evicted:replica-window", 0) > 0
    assert not any(e.publisher == "mallory" for e in got_console)


def test_withholding_replica_and_a_slow_one_lose_nothing():
    """One replica withholds everything and an honest one is paused while one-event batches are published: after it resumes, every acknowledged event is delivered once."""
    net = net_for(faulty={3: byzantine.withhold})
    probe = net.client("probe", batch_size=1)
    console = net.client("console", credit=300)
    got = subscribe(net, console)
    net.paused.add(1)
    acked, _ = publish_one_by_one(net, probe, 1500, b"w")
    assert len(acked) == 1500, "publishes need 2f+1 = 3 acknowledgements: 0, 2 and the liar"
    net.run(1)
    net.paused.discard(1)
    net.run(5)
    check_c0(got, keyed(probe, acked))
    assert console.subscriber.counters.get("over-credit:replica-0", 0) == 0


def test_resumed_backlog_with_two_slow_replicas_loses_nothing():
    """A subscriber away while 2,000 events queue comes back while two honest replicas are slow and one withholds: it delivers all of them."""
    net = net_for(faulty={3: byzantine.withhold})
    probe = net.client("probe", batch_size=1)
    console = net.client("console", credit=250)
    subscribe(net, console)
    net.crash_client(console)
    acked, _ = publish_one_by_one(net, probe, 2000, b"b")
    console = net.client("console", credit=250)
    net.paused.update({1, 2})
    got = []
    d = console.subscriber.subscribe("events", got.extend)
    net.run(1)
    net.paused.discard(1)
    net.run(2)
    net.paused.discard(2)
    net.run(5)
    assert d.called and d.result.ok
    check_c0(got, keyed(probe, acked))


@pytest.mark.parametrize("liar", ["acks-without-storing", "stores-and-withholds"])
def test_designated_full_senders_missing_are_fetched_from_others(liar):
    """A replica that acknowledges without storing (or stores and withholds) and a paused honest one are the designated full senders of many batches: the subscriber fetches those from the replicas that vouched for their digests."""
    if liar == "acks-without-storing":
        net = net_for(liars={3: byzantine.AcksWithoutStoring})
    else:
        net = net_for(faulty={3: byzantine.withhold})
    probe = net.client("probe")
    console = net.client("console")
    got = subscribe(net, console)
    net.paused.add(0)
    acked = {}
    for round_ in range(40):
        d = probe.publisher.publish_many("events", [b"f%d-%d" % (round_, i) for i in range(100)])
        net.run()
        assert d.called, "acknowledged by 1, 2 and 3"
        acked.update(keyed(probe, dict(zip(d.result, [b"f%d-%d" % (round_, i) for i in range(100)]))))
    net.run(2)
    check_c0(got, acked)
    assert console.subscriber.counters.get("fetches", 0) > 0
    net.paused.discard(0)
    net.run(3)
    check_c0(got, acked)


@pytest.mark.parametrize("voter", ["f-plus-one", "signature"])
def test_replays_after_a_subscriber_restart_are_not_delivered_again(tmp_path, voter):
    """A replica replays every authentic batch when a subscriber comes back (one honest replica lagging): nothing delivered before the restart is delivered again."""
    net = net_for("pks", faulty={2: byzantine.replay()}, voter=voter)
    probe = net.client("probe")
    state = str(tmp_path / "state")
    console = net.client("console", state_dir=state)
    got = subscribe(net, console)
    acked = {}
    for round_ in range(10):
        d = probe.publisher.publish_many("events", [b"r%d-%d" % (round_, i) for i in range(50)])
        net.run()
        acked.update(keyed(probe, dict(zip(d.result, [b"r%d-%d" % (round_, i) for i in range(50)]))))
    net.run(1)
    check_c0(got, acked)
    net.crash_client(console)
    net.paused.add(1)
    again = net.client("console", state_dir=state)
    more = subscribe(net, again)
    d = probe.publisher.publish_many("events", [b"after-%d" % i for i in range(50)])
    net.run(2)
    fresh = keyed(probe, dict(zip(d.result, [b"after-%d" % i for i in range(50)])))
    check_c0(more, fresh)
    assert again.subscriber.voters["events"].counters["duplicate"] + again.subscriber.voters["events"].counters["stale"] > 0


def test_restart_without_state_is_said_and_with_state_hands_over_once(tmp_path):
    """A subscriber killed with events sent to it but never taken by its application gets them after a restart, and what it took before is not handed over again."""
    net = net_for()
    probe = net.client("probe")
    state = str(tmp_path / "state")
    console = net.client("console", state_dir=state, credit=500)
    taken = []
    hung = []

    def application(events):
        if len(taken) >= 300:
            hung.extend(events)
            from twisted.internet.defer import Deferred

            return Deferred()  # the terminal stopped reading: never fires
        taken.extend(events)

    d = console.subscriber.subscribe("events", application)
    net.run()
    assert d.result.ok
    acked = {}
    for round_ in range(12):
        contents = [b"t%d-%d" % (round_, i) for i in range(50)]
        d = probe.publisher.publish_many("events", contents)
        net.run()
        acked.update(keyed(probe, dict(zip(d.result, contents))))
    assert hung, "the application stopped taking events"
    net.crash_client(console)
    again = net.client("console", state_dir=state)
    got = subscribe(net, again)
    net.run(2)
    check_c0(taken + got, acked)


def test_bogus_full_copies_with_huge_ttl_stay_within_bounds():
    """A replica that sends large invented copies claiming a TTL of 1e12 s fills at most its credit; they expire with the class's TTL and honest events flow."""
    net = net_for(faulty={1: byzantine.bogus_full_copies(per_delivery=40, size=100_000)}, ttl=30)
    probe = net.client("probe")
    console = net.client("console")
    got = subscribe(net, console)
    acked = {}
    net.paused.add(2)  # an honest replica is slow meanwhile
    for round_ in range(10):
        contents = [b"g%d-%d" % (round_, i) for i in range(100)]
        d = probe.publisher.publish_many("events", contents)
        net.run()
        acked.update(keyed(probe, dict(zip(d.result, contents))))
    net.run(1)
    net.paused.discard(2)
    net.run(1)
    check_c0(got, acked)
    voter = console.subscriber.voters["events"]
    credit_bytes = console.subscriber.credit_bytes
    assert voter.pending_bytes <= 4 * credit_bytes + 100_000
    assert console.subscriber.counters.get("over-credit:replica-1", 0) > 0
    net.run(40)
    assert voter.pending == 0 and voter.pending_bytes == 0


def test_overlapping_id_ranges_are_refused_at_replicas_and_voters():
    """A publisher that sends batches whose id ranges overlap gets them refused with a count; a subscriber never delivers one id with two contents, even when replicas saw the two in different orders."""
    net = net_for()
    mallory = net.client("mallory")
    console = net.client("console")
    got = subscribe(net, console)
    a = junk_batch(mallory, 1000, b"")[:5] + (pack_contents([b"a%d" % i for i in range(10)]), b"")
    b = junk_batch(mallory, 1005, b"")[:5] + (pack_contents([b"b%d" % i for i in range(10)]), b"")
    for index in (0, 1):
        mallory.proxy.send(index, Request(0, units.PUBLISH, "events", 0, (a,)))
        mallory.proxy.send(index, Request(0, units.PUBLISH, "events", 0, (b,)))
    for index in (2, 3):
        mallory.proxy.send(index, Request(0, units.PUBLISH, "events", 0, (b,)))
        mallory.proxy.send(index, Request(0, units.PUBLISH, "events", 0, (a,)))
    net.run(1)
    ids = [e.event_id for e in got]
    assert len(ids) == len(set(ids)), "one event id delivered twice"
    assert {1000, 1005} & set(ids), "one of the batches is delivered"
    counters = net.replicas[0].broker.channels["events"].counters
    assert counters.get("refused:overlapping-ids", 0) == 1
    voter = console.subscriber.voters["events"]
    assert sum(v for k, v in voter.counters.items() if k.startswith("overlapping-ids")) > 0


def test_large_events_are_bounded_in_bytes_at_replicas():
    """150 events of 3 MiB each: every subscriber queue stays within its byte bound and the overflow is counted."""
    net = net_for(max_bytes=16 * 1024 * 1024)
    from twisted.internet.defer import Deferred

    probe = net.client("probe")
    console = net.client("console")
    d = console.subscriber.subscribe("events", lambda events: Deferred())  # a console that hangs
    net.run()
    assert d.result.ok
    content = b"x" * (3 * 1024 * 1024)
    for _ in range(30):
        probe.publisher.publish("events", content)
        net.run()
    queue = net.replicas[0].broker.channels["events"].queues["console"]
    assert queue.bytes <= 16 * 1024 * 1024
    assert queue.counters["overflowed"] > 0


def test_status_shows_each_client_its_own_channels():
    """A client that is not an administrator sees only its own channels and queues; an administrator sees everything."""
    config = cluster_config(("events", "secret"), qop="bft", clients=CLIENTS)
    secret = config.channels["secret"]
    config.channels["secret"] = secret.__class__(
        **{f: getattr(secret, f) for f in ("tag", "topic", "qos", "qop", "scheme", "voter")},
        publishers=frozenset({"probe"}), subscribers=frozenset({"dashboard"}),
    )
    object.__setattr__(config, "admins", frozenset({"dashboard"}))
    net = SimNet(config)
    console, dashboard = net.client("console"), net.client("dashboard")
    subscribe(net, console)
    subscribe(net, dashboard, "secret")
    subscribe(net, dashboard)
    for session, admin in ((console, False), (dashboard, True)):
        replies = []
        d = session.proxy.invoke(
            Request(session.proxy.next_seq(), units.STATUS), 4, observe=lambda i, r: replies.append(r.info)
        )
        net.run()
        assert d.called and len(replies) == 4
        for info in replies:
            if admin:
                assert set(info["channels"]) == {"events", "secret"}
                assert "connections" in info
            else:
                assert set(info["channels"]) == {"events"}
                assert set(info["channels"]["events"]["subscribers"]) == {"console"}
                assert "connections" not in info


def test_a_second_subscriber_with_the_same_name_is_refused_unless_it_takes_over():
    """Two processes subscribing as one client on one channel: the second is refused with a clear reason; with takeover it replaces the first, which gets nothing more."""
    net = net_for()
    probe = net.client("probe")
    first = net.client("console")
    got_first = subscribe(net, first)
    second = net.client("console")
    d = second.subscriber.subscribe("events", lambda events: None)
    net.run()
    assert d.called
    failure = d.result
    d.addErrback(lambda f: None)
    assert "already subscribed" in str(failure.value)
    third = net.client("console")
    got_third = subscribe(net, third, takeover=True)
    p = probe.publisher.publish_many("events", [b"after-%d" % i for i in range(20)])
    net.run(1)
    assert len(got_third) == 20 and p.called
    assert got_first == []


def test_a_clients_own_reconnect_replaces_its_old_link():
    """A subscriber whose link dropped and came back keeps streaming: its session id says it is the same subscriber."""
    net = net_for()
    probe = net.client("probe")
    console = net.client("console")
    got = subscribe(net, console)
    for index, pump in list(net.pumps):
        if pump.client.proxy is console.proxy and index == 0:
            pump.clientIO.loseConnection()
            pump.pump(advanceClock=False)
    net.run(3)
    d = probe.publisher.publish_many("events", [b"x%d" % i for i in range(30)])
    net.run(1)
    check_c0(got, keyed(probe, dict(zip(d.result, [b"x%d" % i for i in range(30)]))))
    assert all(0 in s.proxy.links for s in (console,))


def test_skipping_the_backlog_says_how_many_events_were_skipped():
    """A subscriber that comes back and asks to skip its backlog is told how many events it skipped; by default it resumes."""
    net = net_for()
    probe = net.client("probe")
    console = net.client("console")
    subscribe(net, console)
    net.crash_client(console)
    d = probe.publisher.publish_many("events", [b"s%d" % i for i in range(25)])
    net.run()
    again = net.client("console")
    got = []
    s = again.subscriber.subscribe("events", got.extend, resume=False)
    net.run(1)
    assert s.result.info["skipped"] == 25
    assert got == []
    net.crash_client(again)
    d = probe.publisher.publish_many("events", [b"t%d" % i for i in range(25)])
    net.run()
    third = net.client("console")
    got = subscribe(net, third)
    net.run(1)
    assert sorted(e.event_id for e in got) == sorted(d.result)


def test_a_window_of_hand_overs_lets_a_consumer_hold_several_groups():
    """With window=3 a consumer holds three groups at once; each is acknowledged when its own Deferred fires, in any order, and a fourth waits."""
    from twisted.internet.defer import Deferred

    net = SimNet(cluster_config(("events",), clients=CLIENTS))
    probe = net.client("probe")
    console = net.client("console", window=3)
    held = []

    def hold(events):
        d = Deferred()
        held.append((events, d))
        return d

    console.subscriber.subscribe("events", hold)
    net.run()
    for round_ in range(4):
        probe.publisher.publish_many("events", [b"w%d-%d" % (round_, i) for i in range(5)])
        net.run()
    assert len(held) == 3, "a fourth group waits until one finishes"
    queue = net.replicas[0].broker.channels["events"].queues["console"]
    held[1][1].callback(None)
    net.run(1)
    assert queue.counters["delivered"] == 5
    assert len(held) == 4
    for _, d in (held[0], held[2], held[3]):
        d.callback(None)
    net.run(1)
    assert queue.counters["delivered"] == 20


def test_a_state_folder_needs_one_hand_over_at_a_time(tmp_path):
    """A subscriber cannot be given both a delivery record and a window of several hand-overs."""
    net = SimNet(cluster_config(("events",), clients=CLIENTS))
    with pytest.raises(ValueError):
        net.client("console", window=2, state_dir=str(tmp_path))
