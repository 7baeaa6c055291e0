"""
Ordered channels across a whole simulated cluster: replicas ordering
through their log, publishers and subscribers, with crashes, pauses and
restarts on a fake clock.
"""

import pytest

from tests.simnet import SimNet, cluster_config


def _net(qop="bft", ordering="channel", channels=("events",), replicas=4, orderer_options=None, **qos):
    config = cluster_config(
        channels, replicas=replicas, qop=qop, keys_dir="keys", ordering=ordering,
        clients=("probe", "probe2", "console", "console2"), **qos
    )
    return SimNet(config, orderer_options=orderer_options)


def _subscribe(net, name, tags=("events",)):
    session = net.client(name)
    got = []
    for tag in tags:
        d = session.subscriber.subscribe(tag, got.extend)
        net.run(seconds=0.5)
        assert d.called and d.result.ok, d
    return session, got


def _publish(net, session, contents, tag="events"):
    d = session.publisher.publish_many(tag, contents)
    return d


def _seen(got):
    return [(e.publisher, e.event_id) for e in got]


@pytest.mark.parametrize("qop, replicas", [("bft", 4), ("cft", 3)])
def test_every_subscriber_delivers_the_same_order(qop, replicas):
    """Two publishers and two subscribers: each subscriber gets every event once, both in one order, each publisher's in its order."""
    net = _net(qop=qop, replicas=replicas)
    _, got1 = _subscribe(net, "console")
    _, got2 = _subscribe(net, "console2")
    p1, p2 = net.client("probe"), net.client("probe2")
    done = []
    for i in range(20):
        done.append(_publish(net, p1, [b"a%d" % i]))
        done.append(_publish(net, p2, [b"b%d" % i, b"c%d" % i]))
        net.run(seconds=0.05)
    net.run(seconds=2)
    assert all(d.called for d in done)
    assert len(got1) == 60 and _seen(got1) == _seen(got2)
    assert len(set(_seen(got1))) == 60
    for publisher in ("probe", "probe2"):
        ids = [i for p, i in _seen(got1) if p == publisher]
        assert ids == sorted(ids)
    seqs = [e.seq for e in got1]
    assert seqs == sorted(seqs) and seqs[0] == 1


def test_the_leader_crashing_under_load_loses_and_reorders_nothing():
    """Replica 0, the first leader, crashes mid-load: a new leader takes over and subscribers still get everything once, in one order."""
    net = _net()
    _, got1 = _subscribe(net, "console")
    _, got2 = _subscribe(net, "console2")
    publisher = net.client("probe")
    acked = []
    for i in range(30):
        d = _publish(net, publisher, [b"e%d" % i])
        d.addCallback(acked.extend)
        net.run(seconds=0.05)
        if i == 10:
            net.kill(0)
    net.run(seconds=15)
    statuses = [r.replicated_log.orderer.status() for r in net.replicas[1:]]
    assert all(s["regency"] >= 1 for s in statuses)
    assert len(acked) == 30
    assert sorted(e.event_id for e in got1) == sorted(acked)
    assert _seen(got1) == _seen(got2)


def test_a_paused_leader_is_replaced_and_rejoins_without_two_orders():
    """The leader paused past its timeout is replaced; resumed, it follows the new regency and the order stays one."""
    net = _net()
    _, got1 = _subscribe(net, "console")
    _, got2 = _subscribe(net, "console2")
    publisher = net.client("probe")
    _publish(net, publisher, [b"before"])
    net.run(seconds=0.5)
    net.paused.add(0)
    late = _publish(net, publisher, [b"during"])
    net.run(seconds=8)
    assert late.called
    net.paused.discard(0)
    net.run(seconds=2)
    after = _publish(net, publisher, [b"after"])
    net.run(seconds=3)
    assert after.called
    assert [e.content for e in got1] == [b"before", b"during", b"after"]
    assert _seen(got1) == _seen(got2)
    positions = {r.broker.state.position for r in net.replicas}
    assert len(positions) == 1


def test_a_restarted_replica_catches_up_by_state_transfer_and_serves_again():
    """A replica that lost everything while the log moved past checkpoints restores a certified state and applies new entries."""
    net = _net(orderer_options={"checkpoint_interval": 4})
    _, got = _subscribe(net, "console")
    publisher = net.client("probe")
    net.kill(3)
    for i in range(20):
        _publish(net, publisher, [b"e%d" % i])
        net.run(seconds=0.1)
    net.restart(3)
    for i in range(20, 24):
        _publish(net, publisher, [b"e%d" % i])
        net.run(seconds=0.5)
    net.run(seconds=5)
    assert len(got) == 24
    positions = [r.broker.state.position for r in net.replicas]
    assert len(set(positions)) == 1, positions
    assert net.replicas[3].broker.counters.get("state-restored", 0) >= 1
    assert net.replicas[3].broker.state_snapshot() == net.replicas[1].broker.state_snapshot()


def test_global_channels_are_merged_by_log_position():
    """A subscriber of two global channels gets their events in log order across both, an idle one holding nothing back."""
    net = _net(ordering="global", channels=("alpha", "beta", "idle"))
    _, got = _subscribe(net, "console", tags=("alpha", "beta", "idle"))
    publisher = net.client("probe")
    for i in range(10):
        _publish(net, publisher, [b"a%d" % i], tag="alpha")
        _publish(net, publisher, [b"b%d" % i], tag="beta")
        net.run(seconds=0.05)
    net.run(seconds=2)
    assert len(got) == 20
    positions = [e.position for e in got]
    assert positions == sorted(positions)


def _subscribe_each(net, name, tags=("events", "audit")):
    session = net.client(name)
    got = {}
    for tag in tags:
        got[tag] = []
        d = session.subscriber.subscribe(tag, got[tag].extend)
        net.run(seconds=0.5)
        assert d.called and d.result.ok, d
    return got


def _random_run(seed, qop):
    import random

    from fit_broker.client.admin import Administrator
    from fit_broker.errors import RequestFailed

    rng = random.Random(seed)
    replicas = 4 if qop == "bft" else 3
    config = cluster_config(
        ("events", "audit"), replicas=replicas, qop=qop, keys_dir="keys", ordering="channel",
        clients=("probe", "probe2", "console", "console2", "ops"), admins=("ops",),
    )
    net = SimNet(config, keys=True, orderer_options={"checkpoint_interval": rng.choice([2, 4, 64])})
    ops = net.client("ops")
    admin = Administrator(ops.proxy, net.keyrings["ops"])
    changes = []
    got1, got2 = _subscribe_each(net, "console"), _subscribe_each(net, "console2")
    publishers = [net.client("probe"), net.client("probe2")]
    acked = []
    down = None
    for step in range(40):
        tag = rng.choice(["events", "audit"])
        d = _publish(net, rng.choice(publishers), [b"%d-%d" % (seed, step)], tag=tag)
        d.addCallback(lambda ids, tag=tag: acked.extend((tag, i) for i in ids))
        action = rng.random()
        if action < 0.08 and down is None:
            down = rng.randrange(replicas)
            net.kill(down)
        elif action < 0.16 and down is not None:
            net.restart(down)
            down = None
        elif action < 0.22 and down is None and not net.paused:
            net.paused.add(rng.randrange(replicas))
        elif action < 0.30:
            net.paused.clear()
        elif action < 0.40:
            role = rng.choice(["publish", "subscribe"])
            op = rng.choice(["grant", "revoke"])
            change = admin.change({"op": op, "tag": "audit", "client": "ops", "role": role})
            change.addErrback(lambda failure: failure.trap(RequestFailed))  # a no-op is refused alike everywhere
            changes.append(change)
        net.run(seconds=rng.choice([0.01, 0.05, 0.3]))
    net.paused.clear()
    if down is not None:
        net.restart(down)
    net.run(seconds=30)
    return net, acked, got1, got2


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("qop", ["bft", "cft"])
def test_random_crashes_and_pauses_never_split_the_order(qop, seed):
    """Seeded runs with replicas crashed, restarted and paused under load and the control table changed meanwhile: after healing, every acknowledged event is delivered once to each subscriber, in one order, and every replica holds the same state and table."""
    net, acked, got1, got2 = _random_run(seed, qop)
    replay = f"replay: pytest tests/test_ordered_sim.py -k 'never_split and {qop} and {seed}'"
    for tag in ("events", "audit"):
        for got in (got1, got2):
            delivered = _seen(got[tag])
            assert len(delivered) == len(set(delivered)), replay
            seqs = [e.seq for e in got[tag]]
            assert seqs == sorted(seqs), replay
        assert _seen(got1[tag]) == _seen(got2[tag]), replay
        ids = {i for t, i in acked if t == tag}
        assert ids <= {e.event_id for e in got1[tag]}, replay
    snapshots = {r.broker.state_snapshot() for r in net.replicas}
    assert len(snapshots) == 1, replay
    versions = {r.broker.table.version for r in net.replicas}
    assert len(versions) == 1, replay


def test_a_whole_cluster_restarted_without_memory_orders_again():
    """Every replica killed and restarted (ordering state in memory only): none holds a vote any more, so they start the log afresh instead of waiting for each other."""
    net = _net()
    publisher = net.client("probe")
    first = _publish(net, publisher, [b"before"])
    net.run(seconds=1)
    assert first.called
    for index in range(4):
        net.kill(index)
    for index in range(4):
        net.restart(index)
    again = _publish(net, publisher, [b"after"])
    net.run(seconds=20)
    assert again.called
    assert all(r.replicated_log.orderer.status()["recovering"] is False for r in net.replicas)


def test_one_restarted_replica_waits_to_vote_until_it_caught_up():
    """A replica restarted alone votes again only once the log moved two instances past what its peers had decided, and the cluster goes on meanwhile."""
    net = _net()
    publisher = net.client("probe")
    for i in range(3):
        _publish(net, publisher, [b"e%d" % i])
        net.run(seconds=0.2)
    net.kill(2)
    net.restart(2)
    assert net.replicas[2].replicated_log.orderer.status()["recovering"] is True
    later = []
    for i in range(4):
        later.append(_publish(net, publisher, [b"later%d" % i]))
        net.run(seconds=1)
    net.run(seconds=5)
    assert all(d.called for d in later)
    status = net.replicas[2].replicated_log.orderer.status()
    assert status["recovering"] is False
    assert len({r.broker.state.position for r in net.replicas}) == 1


def test_a_replica_lying_in_its_ordered_deliveries_changes_nothing_subscribers_deliver():
    """One replica alters, shifts, tombstones, forges or withholds every ordered entry it sends: subscribers still deliver every event once, unaltered, in one order."""
    from tests.byzantine import ordered_liar

    config = cluster_config(
        ("events",), qop="bft", keys_dir="keys", ordering="channel",
        clients=("probe", "console", "console2"),
    )
    net = SimNet(config, faulty={3: ordered_liar()})
    _, got1 = _subscribe(net, "console")
    _, got2 = _subscribe(net, "console2")
    publisher = net.client("probe")
    contents = [b"e%d" % i for i in range(40)]
    for content in contents:
        _publish(net, publisher, [content])
        net.run(seconds=0.05)
    net.run(seconds=5)
    assert [e.content for e in got1] == contents
    assert _seen(got1) == _seen(got2)


def test_a_publisher_learns_the_log_position_f_plus_one_replicas_answered():
    """An ordered publish reports the log position its batch got, as f+1 replicas answered it."""
    net = _net()
    publisher = net.client("probe")
    _publish(net, publisher, [b"one"])
    net.run(seconds=1)
    first = publisher.publisher.positions["events"]
    _publish(net, publisher, [b"two"])
    net.run(seconds=1)
    assert publisher.publisher.positions["events"] > first >= 1


@pytest.mark.parametrize("qop, replicas", [("bft", 4), ("cft", 3)])
def test_a_whole_cluster_losing_power_keeps_positions_and_revocations(qop, replicas):
    """Every replica losing power at once (journals keep only what was synced) and restarting from its journal reuses no log position, keeps the revocation it ordered, and goes on ordering: the revoked subscriber is refused, the other gets every event once in one order."""
    from fit_broker.client.admin import Administrator
    from fit_broker.errors import RequestFailed

    config = cluster_config(
        ("events",), replicas=replicas, qop=qop, keys_dir="keys", ordering="channel",
        clients=("probe", "console", "console2", "ops"), admins=("ops",),
    )
    net = SimNet(config, keys=True, journals=True, orderer_options={"checkpoint_interval": 4})
    admin = Administrator(net.client("ops").proxy, net.keyrings["ops"])
    console, got = _subscribe(net, "console")
    publisher = net.client("probe")
    before = []
    for i in range(12):
        d = _publish(net, publisher, [b"before-%d" % i])
        d.addCallback(before.extend)
        net.run(seconds=0.2)
    revoked = admin.change({"op": "revoke", "tag": "events", "client": "console2", "role": "subscribe"})
    net.run(seconds=1)
    assert revoked.called and not isinstance(revoked.result, Exception), revoked
    positions = {r.broker.state.position for r in net.replicas}
    version = net.replicas[0].broker.table.version
    assert len(positions) == 1 and version >= 1
    for index in range(replicas):
        net.kill(index, power_loss=True)
    for index in range(replicas):
        net.restart(index)
    net.run(seconds=1)
    assert {r.broker.state.position for r in net.replicas} == positions
    assert {r.broker.table.version for r in net.replicas} == {version}
    assert all(r.replicated_log.orderer.status()["recovering"] is False for r in net.replicas)
    after = []
    for i in range(6):
        d = _publish(net, publisher, [b"after-%d" % i])
        d.addCallback(after.extend)
        net.run(seconds=0.5)
    net.run(seconds=15)
    assert len(before) == 12 and len(after) == 6
    assert min(r.broker.state.position for r in net.replicas) > max(positions)
    delivered = _seen(got)
    assert len(delivered) == len(set(delivered))
    assert {i for _, i in delivered} >= set(after)
    seqs = [e.seq for e in got]
    assert seqs == sorted(seqs)
    assert len({r.broker.state_snapshot() for r in net.replicas}) == 1
    outsider = net.client("console2")
    refused = outsider.subscriber.subscribe("events", lambda events: None)
    net.run(seconds=2)
    assert refused.called
    result = refused.result
    if hasattr(result, "value"):
        assert isinstance(result.value, RequestFailed)
        refused.addErrback(lambda failure: None)
    else:
        assert not result.ok


def test_a_replica_restarted_from_its_journal_votes_at_once():
    """One replica restarted with its journal intact does not wait to catch up before voting, as one that lost its memory must: it knows every vote it cast."""
    net = SimNet(
        cluster_config(("events",), replicas=4, qop="bft", keys_dir="keys", ordering="channel",
                       clients=("probe", "console")),
        journals=True,
    )
    publisher = net.client("probe")
    for i in range(3):
        _publish(net, publisher, [b"e%d" % i])
        net.run(seconds=0.2)
    net.kill(2)
    net.restart(2)
    status = net.replicas[2].replicated_log.orderer.status()
    assert status["recovering"] is False
    assert status["decided"] >= 1
    later = [_publish(net, publisher, [b"later%d" % i]) for i in range(3)]
    net.run(seconds=5)
    assert all(d.called for d in later)
    assert len({r.broker.state.position for r in net.replicas}) == 1


def _away_and_back(net, tmp_path, restart, replicas):
    """
    A subscriber with a delivery record takes 5 events, goes away while 10
    more are acknowledged, C{restart(net)} happens, it comes back, then 3
    more are published: return (its voter, every event it got).
    """
    state = str(tmp_path / "console-state")
    console = net.client("console", state_dir=state)
    got = []
    d = console.subscriber.subscribe("events", got.extend)
    net.run(seconds=0.5)
    assert d.called and d.result.ok
    publisher = net.client("probe")
    acked = []
    for i in range(5):
        _publish(net, publisher, [b"first %d" % i]).addCallback(acked.extend)
        net.run(seconds=0.2)
    net.run(seconds=2)
    assert len(got) == 5
    net.crash_client(console)
    for i in range(10):
        _publish(net, publisher, [b"away %d" % i]).addCallback(acked.extend)
        net.run(seconds=0.2)
    net.run(seconds=1)
    assert len(acked) == 15
    restart(net)
    net.run(seconds=1)
    back = net.client("console", state_dir=state)
    d = back.subscriber.subscribe("events", got.extend)
    net.run(seconds=3)
    assert d.called and d.result.ok
    for i in range(3):
        _publish(net, publisher, [b"later %d" % i])
        net.run(seconds=0.3)
    net.run(seconds=8)
    return back.subscriber.voters["events"], got


@pytest.mark.parametrize("qop, replicas", [("bft", 4), ("cft", 3)])
def test_after_every_replica_restarts_a_memory_channel_subscriber_skips_what_is_lost(qop, replicas, tmp_path):
    """Every replica losing power while a subscriber was away loses what it queued on a memory channel: each replica says so ("lost" tombstones), the subscriber skips those numbers once n-f replicas did, counts them, and goes on with new events instead of waiting forever."""
    net = _net(qop=qop, replicas=replicas)
    net = SimNet(net.config, journals=True)

    def restart_all(net):
        for index in range(replicas):
            net.kill(index, power_loss=True)
        for index in range(replicas):
            net.restart(index)

    voter, got = _away_and_back(net, tmp_path, restart_all, replicas)
    contents = [e.content for e in got]
    assert contents[:5] == [b"first %d" % i for i in range(5)]
    assert contents[5:] == [b"later %d" % i for i in range(3)], contents
    assert voter.counters.get("skipped-lost") == 10, voter.counters
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 16, 17, 18]


@pytest.mark.parametrize("qop, replicas", [("bft", 4), ("cft", 3)])
def test_one_restarted_replica_saying_lost_makes_nobody_skip(qop, replicas, tmp_path):
    """One replica restarted (even first-copy CFT) says it lost what it queued, but the others still hold it: the returning subscriber gets every event once and skips nothing."""
    net = _net(qop=qop, replicas=replicas)
    net = SimNet(net.config, journals=True)

    def restart_one(net):
        net.kill(1)
        net.restart(1)

    voter, got = _away_and_back(net, tmp_path, restart_one, replicas)
    contents = [e.content for e in got]
    expected = [b"first %d" % i for i in range(5)] + [b"away %d" % i for i in range(10)]
    assert contents == expected + [b"later %d" % i for i in range(3)], contents
    assert not voter.counters.get("skipped-lost"), voter.counters
