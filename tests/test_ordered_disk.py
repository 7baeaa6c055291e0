"""
Ordered channels kept on disk (persistence = "disk" in an ordered class):
the channel's logs on a storage that loses unsynced writes, and whole
simulated clusters whose replicas all lose power at once.
"""

import pytest

from fit_broker.broker.ordered import batch_ref
from fit_broker.broker.ordered_disk_channel import OrderedDiskChannel
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.storage import FakeStorage
from fit_broker.units import batch_digest, pack_contents
from tests.simnet import SimNet, cluster_config

NOW = 1_800_000_000.0


def _config(**qos):
    settings = {"persistence": "disk", "ordering": "channel", "fsync": "always", **qos}
    return cluster_config(("events",), replicas=4, qop="cft", clients=("probe", "console", "late"), **settings)


def _channel(config, storages):
    spec = config.channels["events"]
    return OrderedDiskChannel(spec, scheme_lookup(config)(spec.scheme), storage=storages)


def _batch(first_id, text=b"x", ttl=60.0):
    return ("probe", first_id, NOW, ttl, 0, pack_contents([text]), b"")


def _apply(channel, batches, position=0, seq=0):
    for batch in batches:
        channel.keep(batch, batch_digest(batch))
        position += 1
        seq += 1
        channel.apply(batch_ref("events", batch, batch_digest(batch)), position, seq, NOW)
    return position, seq


def _queued(channel, client):
    return [entry[1] for entry in channel.queues[client].entries]


def test_a_reopened_channel_queues_exactly_what_each_subscriber_did_not_acknowledge():
    """After a crash that keeps only synced writes, a channel reopened on the same storages holds every synced body and queues for each subscriber the entries from its start it did not acknowledge."""
    config = _config()
    storages = (FakeStorage(), FakeStorage())
    channel = _channel(config, storages)
    channel.subscribe("console", True)
    channel.subscribed("console", 1)
    batches = [_batch(i, b"event %d" % i) for i in range(1, 7)]
    _apply(channel, batches[:3])
    channel.subscribe("late", True)
    channel.subscribed("late", 4)
    _apply(channel, batches[3:], position=3, seq=3)
    taken = channel.queues["console"].take(100, 1 << 20, NOW, channel.form)
    assert [t[1] for t in taken] == [1, 2, 3, 4, 5, 6]
    channel.acknowledge("console", [("probe", 1), ("probe", 2)])
    channel.sync_bodies(NOW)
    channel.tick(NOW + 1)
    for storage in storages:
        storage.crash()
    again = _channel(config, storages)
    for client in ("console", "late"):
        again.queues[client] = again.new_queue()
    again.rebuild()
    assert _queued(again, "console") == [3, 4, 5, 6]
    assert _queued(again, "late") == [4, 5, 6]
    assert again.logged_seq == 6
    assert all(again.holds(batch_ref("events", b, batch_digest(b))) for b in batches)
    # replaying an entry the log holds queues nothing twice
    again.apply(batch_ref("events", batches[5], batch_digest(batches[5])), 6, 6, NOW)
    assert _queued(again, "console") == [3, 4, 5, 6]


def test_unsynced_bodies_are_lost_under_never_and_kept_under_always():
    """Under fsync = "always" a body is durable once synced before it is announced; under "never" a power loss takes what no segment roll synced."""
    for policy, survives in (("always", True), ("never", False)):
        config = _config(fsync=policy)
        storages = (FakeStorage(), FakeStorage())
        channel = _channel(config, storages)
        batch = _batch(1)
        channel.keep(batch, batch_digest(batch))
        channel.sync_bodies(NOW)
        for storage in storages:
            storage.crash()
        again = _channel(config, storages)
        assert again.holds(batch_ref("events", batch, batch_digest(batch))) is survives, policy


def test_a_full_disk_refuses_the_publish_and_keeps_what_was_held():
    """A body the disk has no room for refuses its publish with disk-full, so it is never announced; a batch fetched from a peer meanwhile is held in memory without raising; what the channel held before stays."""
    from fit_broker.broker.channel import Refused

    config = _config()
    storages = (FakeStorage(), FakeStorage())
    channel = _channel(config, storages)
    first = _batch(1)
    assert len(channel.admit_refs("probe", (first,), NOW)) == 1
    storages[0].full_after(0)
    with pytest.raises(Refused) as refused:
        channel.admit_refs("probe", (_batch(2),), NOW)
    assert refused.value.status == "disk-full"
    fetched = _batch(3)
    channel.keep(fetched, batch_digest(fetched))
    assert channel.holds(batch_ref("events", fetched, batch_digest(fetched)))
    assert channel.holds(batch_ref("events", first, batch_digest(first)))
    assert channel.counters["body-log-failed"] == 2 and channel.failed is None


def test_acknowledging_a_lost_tombstone_logs_no_number_it_names():
    """A lost tombstone's span comes from the subscriber's own resume claim: acknowledging it logs nothing, however far it reaches, and the entries the log holds stay acknowledged one by one."""
    config = _config()
    channel = _channel(config, (FakeStorage(), FakeStorage()))
    channel.subscribe("console", True)
    channel.subscribed("console", 1)
    _apply(channel, [_batch(1)])
    queue = channel.queues["console"]
    queue.floor = 10**12
    assert channel.lost_before("console", 1, 1) == 10**12 - 1
    records = channel.entry_log.next_index
    channel.acknowledge("console", [("~lost", 1)])
    assert channel.entry_log.next_index == records
    assert not channel._acked["console"]
    channel.acknowledge("console", [("probe", 1)])
    assert channel._acked["console"] == {1}


def test_acknowledged_entries_leave_the_entry_log():
    """Once every subscriber acknowledged them, old entry segments are dropped, so the log stays small under a steady load."""
    config = _config()
    storages = (FakeStorage(), FakeStorage())
    channel = _channel(config, storages)
    channel.subscribe("console", True)
    channel.subscribed("console", 1)
    position = seq = 0
    for round_ in range(40):
        batches = [_batch(round_ * 100 + i, b"y" * 2000) for i in range(1, 101)]
        position, seq = _apply(channel, batches, position, seq)
        taken = channel.queues["console"].take(1000, 1 << 24, NOW, channel.form)
        channel.acknowledge("console", [(t[2][0], t[2][1]) for t in taken])
        channel.tick(NOW + round_ * 2)
    stats = channel.entry_log.stats()
    assert stats["segments"] <= 2, stats
    assert channel.logged_seq == 4000


def _run(net, seconds):
    net.run(seconds=seconds)


def _disk_net(qop, replicas, fsync, clients, **options):
    """
    A simulated cluster with one ordered disk channel, journals and disks
    that outlive restarts, and C{console} subscribed to it: return the
    net, the console's session and the list its events go to.
    """
    config = cluster_config(
        ("events",), replicas=replicas, qop=qop, keys_dir="keys", ordering="channel",
        persistence="disk", fsync=fsync, clients=clients,
    )
    net = SimNet(config, journals=True, disks=True, **options)
    console = net.client("console")
    got = []
    d = console.subscriber.subscribe("events", got.extend)
    _run(net, 0.5)
    assert d.called and d.result.ok
    return net, console, got


@pytest.mark.parametrize("qop, replicas", [("bft", 4), ("cft", 3)])
def test_every_acknowledged_event_survives_every_replica_losing_power(qop, replicas):
    """A subscriber away while 15 events are acknowledged, then every replica losing power at once and restarting: the subscriber gets each of them once, in one gapless order, and the log reuses no position."""
    net, console, first = _disk_net(
        qop, replicas, "always", ("probe", "console"), orderer_options={"checkpoint_interval": 4}
    )
    publisher = net.client("probe")
    acked = []
    for i in range(5):
        publisher.publisher.publish_many("events", [b"first %d" % i]).addCallback(acked.extend)
        _run(net, 0.2)
    _run(net, 2)
    assert len(first) == 5
    net.crash_client(console)
    for i in range(15):
        publisher.publisher.publish_many("events", [b"away %d" % i]).addCallback(acked.extend)
        _run(net, 0.2)
    _run(net, 1)
    assert len(acked) == 20
    away = set(acked[5:])
    position = max(r.broker.state.position for r in net.replicas)
    for index in range(replicas):
        net.kill(index, power_loss=True)
    for index in range(replicas):
        net.restart(index)
    _run(net, 1)
    assert {r.broker.state.position for r in net.replicas} == {position}
    back = net.client("console")
    got = []
    d = back.subscriber.subscribe("events", got.extend)
    _run(net, 10)
    assert d.called and d.result.ok
    delivered = [e.event_id for e in got]
    assert away <= set(delivered), (sorted(away - set(delivered)), delivered)
    assert all(delivered.count(i) == 1 for i in away)
    assert set(delivered) <= set(acked)
    seqs = [e.seq for e in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    later = publisher.publisher.publish_many("events", [b"later"])
    _run(net, 3)
    assert later.called
    assert min(r.broker.state.position for r in net.replicas) > position


@pytest.mark.parametrize("qop, replicas", [("bft", 4), ("cft", 3)])
def test_an_ordered_disk_channel_replays_from_a_position_and_from_a_time(qop, replicas):
    """A first subscription asking for position 1 gets every retained entry, acknowledged by others or not; a subscriber that had everything asks again from a time and gets, once each and in order, exactly the entries from the first one stamped at or after it."""
    net, console, got = _disk_net(qop, replicas, "interval", ("probe", "console", "console2"))
    publisher = net.client("probe")
    stamps = []
    for i in range(10):
        stamps.append(net.clock.seconds())
        publisher.publisher.publish_many("events", [b"event %d" % i])
        _run(net, 0.3)
    _run(net, 2)
    assert [e.content for e in got] == [b"event %d" % i for i in range(10)]
    # a newcomer from position 1 gets the whole retained history
    newcomer = net.client("console2")
    history = []
    d = newcomer.subscriber.subscribe("events", history.extend, from_position=1)
    _run(net, 3)
    assert d.called and d.result.ok, d.result
    assert [e.content for e in history] == [b"event %d" % i for i in range(10)]
    # the first subscriber again, from the time event 6 was published
    net.crash_client(console)
    again = net.client("console")
    replayed = []
    d = again.subscriber.subscribe("events", replayed.extend, from_time=stamps[6])
    _run(net, 3)
    assert d.called and d.result.ok, d.result
    assert [e.content for e in replayed] == [b"event %d" % i for i in range(6, 10)]
    seqs = [e.seq for e in replayed]
    assert seqs == list(range(seqs[0], seqs[0] + 4))
    counted = sum(r.broker.channels["events"].counters["replayed"] for r in net.replicas)
    assert counted > 0
