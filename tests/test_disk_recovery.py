"""
Disk channel recovery from peers, sans-IO: replicas' broker state machines
on FakeStorage linked by an in-memory network, one of which lost its log;
f+1 matching copies in BFT, one in CFT; pages, caps and lying or malformed
peers.
"""

import msgpack
import pytest

from fit_broker.broker.disk_channel import DiskChannel
from fit_broker.broker.machine import BrokerStateMachine
from fit_broker.errors import Status
from fit_broker.replica import disk_recovery
from fit_broker.replica.disk_recovery import BATCHES, PAGE_BATCHES, SYNC, DiskRecovery
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.storage import FakeStorage
from fit_broker.units import Request, pack_contents
from tests.simnet import cluster_config

NOW = 1_800_000_000.0
pack = msgpack.Packer(use_bin_type=True).pack


class Disk:
    """The FakeStorages of one replica's disk channels, kept across its restarts."""

    def __init__(self):
        self.stores = {}

    def __call__(self, tag):
        return self.stores.setdefault(tag, (FakeStorage(), FakeStorage()))


def event(first_id, size=1, publisher="probe", timestamp=NOW, ttl=60.0):
    return (publisher, first_id, timestamp, ttl, 0, pack_contents([b"x" * size]), b"")


class Net:
    """
    Replicas 0..n-1, each a broker on its own Disk with a DiskRecovery; a
    frame is delivered when the test pumps the network.  C{tamper[j]},
    when set, rewrites (or drops, returning None) every frame replica j sends.
    """

    def __init__(self, qop="cft", replicas=4, faults=1, **qos):
        self.config = cluster_config(
            ("events",), replicas=replicas, faults=faults, clients=("probe", "console"), qop=qop,
            persistence="disk", capacity=100_000, **{"fsync": "interval", **qos}
        )
        self.disks = [Disk() for _ in range(replicas)]
        self.brokers = [None] * replicas
        self.recoveries = [None] * replicas
        self.wire = []
        self.tamper = {}
        self.down = set()
        self.ready = []
        for j in range(replicas):
            self.start(j)

    def start(self, j, **settings):
        broker = BrokerStateMachine(self.config, scheme_lookup(self.config), storage=self.disks[j])
        self.brokers[j] = broker

        def send(to, kind, body, j=j):
            if j in self.down or to in self.down:
                return False
            self.wire.append((j, to, kind, body))
            return True

        self.recoveries[j] = DiskRecovery(
            j, len(self.brokers), self.config.faults, broker.channels, send,
            lambda tag, j=j: self.ready.append((j, tag)), **settings
        )
        return self.recoveries[j]

    def channel(self, j):
        return self.brokers[j].channels["events"]

    def publish(self, batches, to=None):
        for j, broker in enumerate(self.brokers):
            if to is not None and j not in to:
                continue
            reply = broker.handle("probe", Request(1, "publish", "events", 0, tuple(batches)), NOW)
            assert reply.ok, reply

    def pump(self, now=NOW, rounds=10_000):
        for _ in range(rounds):
            if not self.wire:
                return
            sender, to, kind, body = self.wire.pop(0)
            change = self.tamper.get(sender)
            if change is not None:
                body = change(kind, body)
                if body is None:
                    continue
            self.recoveries[to].received(sender, kind, body, now)
        raise AssertionError("the network never went quiet")

    def lose(self, j, **settings):
        """Replica j restarts with an empty data folder and recovers its channel."""
        self.disks[j] = Disk()
        recovery = self.start(j, **settings)
        recovery.begin({"events": "its data folder was new"}, NOW)
        return recovery

    def held(self, j):
        channel = self.channel(j)
        return sorted(
            msgpack.unpackb(payload, raw=False)[1]
            for _, _, payload in channel.log.read_from(channel.log.first_index)
        )


def forge(kind, body):
    """A liar's rewrite of its pages: every batch's payload replaced."""
    if kind != BATCHES:
        return body
    tag, rid, cursor, state, batches = msgpack.unpackb(body, raw=False, use_list=True)
    for batch in batches:
        batch[5] = pack_contents([b"forged"])
    return pack([tag, rid, cursor, state, batches])


def test_cft_accepts_one_copy_and_logs_it_without_sending_it_again():
    """On a crash-tolerant channel one peer's copy of a lost batch is enough: it is logged and counted, but not queued for a subscriber (it may have acknowledged it; first copy wins would deliver it twice), not even after a restart, and the recovery ends once every peer answered its last page."""
    net = Net("cft")
    net.publish([event(i * 10) for i in range(20)])
    recovery = net.lose(3)
    sub = net.brokers[3].handle("console", Request(2, "subscribe", "events"), NOW)
    assert sub.ok
    assert net.channel(3).recovering is not None
    assert net.channel(3).snapshot()["recovering"] is True
    net.pump()
    channel = net.channel(3)
    assert channel.recovering is None
    assert net.held(3) == [i * 10 for i in range(20)]
    assert channel.counters["recovered-from-peers"] == 20
    assert len(channel.queues["console"]) == 0
    assert recovery.finished["events"]["recovered"] == 20
    assert recovery.finished["events"]["complete"] is True
    assert (3, "events") in net.ready
    net.publish([event(500)])
    assert len(channel.queues["console"]) == 1
    net.start(3)
    again = net.channel(3)
    assert net.held(3) == [i * 10 for i in range(20)] + [500]
    assert len(again.queues["console"]) == 1


def test_cft_gets_a_batch_only_one_peer_holds():
    """A CFT recovery waits for every peer, so a batch only one other replica logged is recovered."""
    net = Net("cft")
    net.publish([event(1)])
    net.publish([event(2)], to={1})
    net.lose(3)
    net.pump()
    assert net.held(3) == [1, 2]


def test_bft_needs_f_plus_one_matching_copies():
    """On a Byzantine channel a batch is taken once f+1 peers sent the same copy, and a batch only one peer sends is never taken."""
    net = Net("bft")
    net.publish([event(1), event(2)])
    net.publish([event(3)], to={0})
    recovery = net.lose(3)
    net.pump()
    assert net.held(3) == [1, 2]
    done = recovery.finished["events"]
    assert done["recovered"] == 2 and done["unconfirmed"] == 1
    assert net.channel(3).counters["recovered-from-peers"] == 2


def test_bft_never_takes_a_single_liars_forged_batch():
    """A single lying peer rewrites every batch it serves: its forged copies are never taken, and the copies f+1 correct peers agree on are."""
    net = Net("bft")
    net.publish([event(i) for i in range(1, 6)])
    net.tamper[0] = forge
    recovery = net.lose(3)
    net.pump()
    channel = net.channel(3)
    assert net.held(3) == [1, 2, 3, 4, 5]
    for _, _, payload in channel.log.read_from(0):
        assert b"forged" not in payload
    assert recovery.finished["events"]["unconfirmed"] == 0


def test_bft_liar_alone_with_one_correct_peer_gets_nothing_in():
    """With only the liar and one correct peer answering, no forged batch is taken (f+1 = 2 copies never match it) while the correct ones wait unconfirmed."""
    net = Net("bft")
    net.publish([event(1), event(2)])
    net.tamper[0] = forge
    net.down.add(2)
    recovery = net.lose(3, peer_wait=1.0)
    net.pump()
    recovery.tick(NOW + 2.0)
    net.pump(NOW + 2.0)
    assert net.held(3) == []
    assert recovery.finished["events"]["unconfirmed"] == 2
    assert net.channel(3).recovering is None


def test_pages_are_bounded_in_batches_and_bytes():
    """A peer serves at most PAGE_BATCHES batches and PAGE_BYTES bytes a page, and the recovery follows the cursor to the end."""
    net = Net("cft")
    for start in range(0, 1200, 100):
        net.publish([event(i) for i in range(start, start + 100)])
    pages = []

    def spy(kind, body):
        if kind == BATCHES:
            pages.append(len(msgpack.unpackb(body, raw=False)[4]))
        return body

    net.tamper[0] = spy
    net.down.update({1, 2})
    net.lose(3)
    net.pump()
    assert pages == [PAGE_BATCHES, PAGE_BATCHES, 1200 - 2 * PAGE_BATCHES]
    assert net.held(3) == list(range(1200))
    batches, cursor, end = net.channel(0).read_batches(0, 1000, 3000)
    assert 0 < len(batches) < 1000 and not end
    assert sum(len(pack(list(b))) for b in batches) <= 3000


def test_a_reply_claiming_more_than_a_page_is_a_counted_drop():
    """A page with more than PAGE_BATCHES batches, or undecodable, or with a cursor going back, or unasked, is counted and dropped, never a traceback."""
    net = Net("cft")
    net.publish([event(1)])
    recovery = net.lose(3)
    rid = recovery.recovering["events"].peers[0].request
    too_many = pack(["events", rid, 600, "more", [list(event(i)) for i in range(PAGE_BATCHES + 1)]])
    recovery.received(0, BATCHES, too_many, NOW)
    recovery.received(0, BATCHES, b"\xc1garbage", NOW)
    recovery.received(0, BATCHES, b"\x00" * (disk_recovery.MAX_REPLY_BYTES + 1), NOW)
    recovery.received(0, BATCHES, pack(["events", rid, 5, "bogus", []]), NOW)
    recovery.received(0, BATCHES, pack({"a": 1}), NOW)
    recovery.received(1, SYNC, pack(["events", "x", -1]), NOW)
    recovery.received(1, SYNC, b"\x00" * 5000, NOW)
    recovery.received(1, "disk-other", b"", NOW)
    counters = recovery.counters
    assert counters["dropped:too-many-batches"] == 1
    assert counters["dropped:undecodable"] == 2
    assert counters["dropped:too-large"] == 2
    assert counters["dropped:bad-page"] == 1
    assert counters["dropped:bad-request"] == 1
    assert counters["dropped:unknown-kind"] == 1
    assert counters["dropped:replica-0"] == 5
    assert net.held(3) == []
    # an unasked page (another request id) is not taken either
    recovery.received(2, BATCHES, pack(["events", 10**6, 1, "end", [list(event(9))]]), NOW)
    assert counters["late-pages"] == 1 and net.held(3) == []


def test_a_bad_batch_or_cursor_in_a_page_drops_the_page():
    """A page whose batch is not a wire batch, or whose cursor goes back, is dropped whole and asked again later."""
    net = Net("cft")
    net.publish([event(1)])
    recovery = net.lose(3)
    peer = recovery.recovering["events"].peers[0]
    bad = list(event(1))
    bad[5] = b""  # no events
    recovery.received(0, BATCHES, pack(["events", peer.request, 1, "end", [bad]]), NOW)
    assert recovery.counters["dropped:bad-batch"] == 1
    recovery.tick(NOW + 2)  # the retry interval passed
    peer.cursor = 7
    recovery.received(0, BATCHES, pack(["events", peer.request, 3, "end", []]), NOW + 2)
    assert recovery.counters["dropped:bad-cursor"] == 1
    assert net.held(3) == []


def test_pending_votes_are_capped_per_peer():
    """In BFT, votes waiting for more copies are capped per peer in keys; past the cap they are counted and dropped."""
    net = Net("bft")
    net.publish([event(i) for i in range(10)], to={0})
    recovery = net.lose(3, max_pending_keys=4)
    net.pump()
    done = recovery.finished["events"]
    assert done["unconfirmed"] == 4 and done["votes-dropped"] == 6
    assert net.held(3) == []


def test_a_recovering_replica_refuses_replays_and_answers_peers_it_is_recovering():
    """While its channel recovers, a replica refuses a replay from a time, says "recovering" to a peer that asks for its log, and marks the channel in status."""
    net = Net("cft")
    net.publish([event(1)])
    recovery = net.lose(3)
    broker = net.brokers[3]
    reply = broker.handle(
        "console", Request(2, "subscribe", "events", options={"from_time": NOW - 10}), NOW
    )
    assert reply.status == Status.BUSY and "recovering" in reply.text
    recovery.received(0, SYNC, pack(["events", 1, None]), NOW)
    sent = [m for m in net.wire if m[0] == 3 and m[2] == BATCHES]
    assert msgpack.unpackb(sent[-1][3], raw=False)[3] == "recovering"
    assert broker.snapshot()["channels"]["events"]["disk"]["recovery"]["copies_needed"] == 1
    net.pump()
    assert broker.snapshot()["channels"]["events"]["recovering"] is False


def test_a_silent_peer_is_given_up_and_the_recovery_ends():
    """A peer that never answers is given up after the peer wait, and the recovery ends with what the others sent."""
    net = Net("cft")
    net.publish([event(1)])
    net.tamper[2] = lambda kind, body: None  # its pages never arrive
    recovery = net.lose(3, peer_wait=5.0, request_timeout=2.0)
    net.pump()
    assert "events" in recovery.recovering
    for t in range(1, 7):
        recovery.tick(NOW + t)
        net.pump(NOW + t)
    assert "events" not in recovery.recovering
    assert recovery.finished["events"]["peers"] == [0, 1]
    assert net.held(3) == [1]


def test_recovery_ends_after_its_time_bound():
    """A recovery whose peers never answer ends after max_seconds at the latest."""
    net = Net("cft")
    net.down.update({0, 1, 2})
    recovery = net.lose(3, max_seconds=30.0, peer_wait=1000.0)
    recovery.tick(NOW + 29)
    assert "events" in recovery.recovering
    recovery.tick(NOW + 30)
    assert "events" not in recovery.recovering
    assert net.channel(3).recovering is None


def test_recovered_batches_survive_a_restart_without_fetching_again():
    """Recovered batches are in the log: a later restart rebuilds them like any others, and what the log still holds is not recovered twice."""
    net = Net("cft")
    net.publish([event(i) for i in range(5)])
    net.lose(3)
    net.pump()
    for channel in net.brokers[3].disk_channels():
        channel.sync_now(NOW)
    net.start(3)
    assert net.held(3) == [0, 1, 2, 3, 4]
    recovery = net.recoveries[3]
    recovery.begin({"events": "test"}, NOW)
    net.pump()
    assert recovery.finished["events"]["recovered"] == 0
    assert net.channel(3).counters["recovered-from-peers"] == 0


def test_needed_names_new_folders_of_a_replica_that_ran_before_and_damaged_logs():
    """Recovery is needed for a new folder only when the replica ran before, and for a log that lost records."""
    net = Net("cft")
    channels = net.brokers[0].disk_channels()
    assert DiskRecovery.needed(channels, {"events"}, ran_before=False) == {}
    assert set(DiskRecovery.needed(channels, {"events"}, ran_before=True)) == {"events"}
    channels[0].lost_records = 3
    assert "3 records" in DiskRecovery.needed(channels, (), ran_before=False)["events"]
    assert isinstance(channels[0], DiskChannel)


@pytest.mark.parametrize("qop", ["cft", "bft"])
def test_expired_batches_are_not_recovered(qop):
    """A batch whose TTL passed by the time it comes back is counted as expired, not logged."""
    net = Net(qop)
    net.publish([event(1, ttl=5.0), event(2)])
    recovery = net.lose(3)
    net.pump(NOW + 10)
    assert net.held(3) == [2]
    assert recovery.finished["events"]["expired"] >= 1


def test_status_table_marks_a_recovering_channel():
    """`fitbroker status` marks a channel a replica is recovering from its peers, and only that one."""
    from fit_broker.cli import replica_status, status_table

    info = {
        "now": 10.0, "started": 5.0,
        "channels": {
            "events": {"counters": {}, "subscribers": {}, "recovering": True},
            "other": {"counters": {}, "subscribers": {}, "recovering": False},
        },
    }
    table = status_table({"replica-3": replica_status(info)})
    assert "events (recovering)" in table
    assert "other (recovering)" not in table and "other" in table
