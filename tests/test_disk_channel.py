"""
Disk channels, sans-IO: the broker state machine on FakeStorage, crashed
(every unsynced write lost, or torn) and rebuilt, under each fsync policy;
retention, full disks, acknowledgements and their compaction; the storage
driver's group commit on a fake clock.
"""

import random

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from fit_broker.broker import disk_channel
from fit_broker.broker.disk_channel import DISK_FULL, STORAGE_FAILED, DiskChannel, folder_name
from fit_broker.broker.machine import BrokerStateMachine
from fit_broker.errors import ConfigError, Status
from fit_broker.replica.storage_driver import DataFolder, StorageDriver
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.storage import FakeStorage
from fit_broker.units import Request, pack_contents
from tests.simnet import cluster_config

NOW = 1_800_000_000.0


class Disk:
    """The FakeStorages of every disk channel of one replica, kept across its restarts."""

    def __init__(self):
        self.stores = {}

    def __call__(self, tag):
        return self.stores.setdefault(tag, (FakeStorage(), FakeStorage()))

    def crash(self, rng=None):
        for batches, acks in self.stores.values():
            batches.crash(rng)
            acks.crash(rng)


def config(**qos):
    return cluster_config(("events",), clients=("probe", "console", "other"), persistence="disk", **qos)


def start(cfg, disk):
    return BrokerStateMachine(cfg, scheme_lookup(cfg), storage=disk)


def event(first_id, timestamp=NOW, ttl=60.0, size=1, publisher="probe"):
    return (publisher, first_id, timestamp, ttl, 0, pack_contents([b"x" * size]), b"")


def publish(broker, batches, token=None, now=NOW, client="probe"):
    return broker.handle(client, Request(1, "publish", "events", 0, tuple(batches)), now, token)


def subscribe(broker, client="console", resume=True):
    reply = broker.handle(client, Request(2, "subscribe", "events", options={"resume": resume}), NOW)
    assert reply.ok, reply
    return reply


def sync(broker, now=NOW):
    """Run every disk channel's group commit inline; return the answers, token -> reply."""
    for channel in broker.disk_channels():
        broker.storage_synced(channel.sync_now(now))
    return dict(broker.take_answers())


def queued_ids(broker, client="console", now=NOW):
    """The first ids of the batches waiting for client, taken (and so acknowledged)."""
    reply = broker.handle(client, Request(3, "receive", "events", 1_000_000), now)
    assert reply.ok, reply
    return [b[1] for b in reply.batches]


def waiting_ids(broker, client="console"):
    """The first ids waiting for client, without taking them."""
    queue = broker.channels["events"].queues[client]
    return sorted(e[1][1] for level in queue.levels for e in level if e[4] == 0)


def test_disk_channel_is_chosen_for_disk_classes():
    """A class with persistence = "disk" gives unordered channels a DiskChannel; memory stays the default."""
    assert type(start(config(), Disk()).channels["events"]) is DiskChannel
    memory = cluster_config(("events",))
    assert type(start(memory, Disk()).channels["events"]) is not DiskChannel
    assert memory.classes["test"].persistence == "memory"


def test_always_answers_after_the_sync_and_survives_a_crash():
    """Under fsync "always" a publish is answered only once synced, and every answered publish survives crash() and rebuild, exactly once in the subscriber's queue."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    tokens = [object() for _ in range(5)]
    for i, token in enumerate(tokens):
        assert publish(broker, [event(i + 1)], token) is None
    answers = sync(broker)
    assert set(answers) == set(tokens) and all(r.ok for r in answers.values())
    assert publish(broker, [event(6)], object()) is None  # appended, never synced
    disk.crash()
    again = start(cfg, disk)
    assert waiting_ids(again) == [1, 2, 3, 4, 5]
    assert again.channels["events"].counters["recovered"] == 5


def test_always_random_crashes_keep_every_acknowledged_publish():
    """Random publishes, syncs, acknowledgements and torn crashes: every publish answered ok is in the rebuilt queue once, and nothing acknowledged by the subscriber comes back."""
    cfg = config()
    for seed in range(30):
        rng = random.Random(seed)
        disk = Disk()
        broker = start(cfg, disk)
        subscribe(broker)
        answered, acked, sent = set(), set(), {}
        next_id = 1
        for _ in range(rng.randrange(5, 60)):
            roll = rng.random()
            if roll < 0.6:
                token = object()
                n = rng.randrange(1, 4)
                batches = [event(next_id + k, size=rng.randrange(1, 300)) for k in range(n)]
                sent[token] = [b[1] for b in batches]
                next_id += n
                reply = publish(broker, batches, token)
                assert reply is None
            elif roll < 0.85:
                for token, reply in sync(broker).items():
                    assert reply.ok
                    answered.update(sent[token])
            else:
                acked.update(queued_ids(broker))
        synced_acks = set(acked)
        if rng.random() < 0.5:
            for token, reply in sync(broker).items():
                answered.update(sent[token])
        else:
            synced_acks = None  # acknowledgements since the last sync may be lost
        disk.crash(rng)
        again = start(cfg, disk)
        waiting = waiting_ids(again)
        assert len(waiting) == len(set(waiting)), seed
        assert answered - acked <= set(waiting), seed
        if synced_acks is not None:
            assert not set(waiting) & synced_acks, seed
        assert set(waiting) <= set(range(1, next_id)), seed


def test_acknowledged_batches_are_not_resent_after_a_restart():
    """What a subscriber acknowledged (push ack or pull) is recorded, so a rebuilt queue holds only the rest."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    subscribe(broker, client="other")
    publish(broker, [event(i) for i in range(1, 7)], object())
    sync(broker)
    assert queued_ids(broker) == [1, 2, 3, 4, 5, 6]
    broker.ack("events", "other", (("probe", 2), ("probe", 4)))
    publish(broker, [event(7)], object())
    sync(broker)
    disk.crash()
    again = start(cfg, disk)
    assert waiting_ids(again) == [7]
    assert waiting_ids(again, "other") == [1, 3, 5, 6, 7]


def test_interval_loses_at_most_the_last_interval():
    """Under fsync "interval" a crash loses only batches appended within the interval before it, never older ones."""
    cfg = config(fsync="interval", fsync_interval=100)
    disk = Disk()
    broker = start(cfg, disk)
    channel = broker.channels["events"]
    subscribe(broker)
    broker.storage_synced(channel.sync_now(NOW))
    appended_at = {}
    now = NOW
    for i in range(1, 200):
        now += 0.013
        reply = publish(broker, [event(i, timestamp=now)], object(), now=now)
        assert reply is not None and reply.ok  # answered at once under interval
        appended_at[i] = now
        if channel.sync_due(now):
            channel.sync_now(now)
    disk.crash()
    again = start(cfg, disk)
    kept = set(waiting_ids(again))
    lost = set(appended_at) - kept
    assert lost and kept
    assert all(now - appended_at[i] < 0.1 + 1e-9 for i in lost)
    assert kept == set(range(1, min(lost)))


def test_never_keeps_a_prefix_and_counts_a_torn_tail():
    """Under fsync "never" a crash may lose everything since the last full segment; what survives is a prefix, and a torn tail is cut and counted."""
    cfg = config(fsync="never", max_bytes=256 * 1024)
    disk = Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    channel = broker.channels["events"]
    broker.storage_synced(channel.sync_now(NOW))
    for i in range(1, 400):
        assert publish(broker, [event(i, size=500)], object()).ok
        if channel.sync_due(NOW):
            channel.sync_now(NOW)  # what the driver does when a segment rolled
    assert len(channel.log.segments) > 1
    disk.crash(random.Random(3))
    again = start(cfg, disk)
    kept = waiting_ids(again)
    assert kept == list(range(1, len(kept) + 1)) and 0 < len(kept) < 399
    counters = again.channels["events"].counters
    assert counters["recovery-cut"] >= 0 and counters["recovered"] == len(kept)


def test_torn_tail_is_cut_counted_and_logged():
    """A batch log whose last record is torn loses only that record, counted as recovery-cut."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    publish(broker, [event(1), event(2)], object())
    sync(broker)
    batches, _ = disk("events")
    name = batches.files()[-1]
    batches.truncate(name, batches.size(name) - 3)
    again = start(cfg, disk)
    assert waiting_ids(again) == [1]
    assert again.channels["events"].counters["recovery-cut"] == 1


def test_duplicates_are_recognised_after_a_restart():
    """A publisher retrying a batch after every replica restarted gets it acknowledged as a duplicate, not queued twice."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    publish(broker, [event(1), event(2)], object())
    sync(broker)
    again = start(cfg, disk)
    token = object()
    assert publish(again, [event(2), event(3)], token) is None
    reply = sync(again)[token]
    assert reply.ok and reply.info["appended"] == 1
    assert queued_ids(again) == [1, 2, 3]
    assert again.channels["events"].counters["duplicate"] == 1


def test_unsubscribe_and_fresh_start_survive_a_restart():
    """An unsubscription and a subscribe without resume are recorded: after a restart the one has no queue and the other only what came after it."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    subscribe(broker, client="other")
    publish(broker, [event(1)], object())
    broker.handle("other", Request(4, "unsubscribe", "events"), NOW)
    subscribe(broker, resume=False)
    publish(broker, [event(2)], object())
    sync(broker)
    again = start(cfg, disk)
    assert waiting_ids(again) == [2]
    assert "other" not in again.channels["events"].queues


def test_full_disk_refuses_and_keeps_what_was_acknowledged():
    """A full disk refuses a publish with status disk-full; what was acknowledged survives, and publishing works again once there is room."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    publish(broker, [event(1)], object())
    sync(broker)
    batches, _ = disk("events")
    batches.full_after(10)
    reply = publish(broker, [event(2, size=100)], object())
    assert reply.status == DISK_FULL and "disk is full" in reply.text
    channel = broker.channels["events"]
    assert channel.counters["refused:disk-full"] == 1
    batches.full_after(None)
    assert publish(broker, [event(2)], object()) is None
    sync(broker)
    disk.crash()
    assert waiting_ids(start(cfg, disk)) == [1, 2]


def test_a_failed_sync_refuses_what_waited_and_what_follows():
    """When an fsync fails, the publishes waiting for it and every later one are refused with storage-failed."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    token = object()
    publish(broker, [event(1)], token)
    disk("events")[0].fail_syncs()
    assert sync(broker)[token].status == STORAGE_FAILED
    reply = publish(broker, [event(2)], object())
    assert reply.status == STORAGE_FAILED and "restarted" in reply.text


def test_drop_newest_refuses_when_the_log_is_full():
    """Under drop-newest a log at its bound refuses publishes with queue-full instead of dropping anything."""
    cfg = config(overflow="drop-newest", max_bytes=4096)
    disk = Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    statuses = []
    for i in range(1, 40):
        reply = publish(broker, [event(i, size=400)], object())
        if reply is not None:
            statuses.append(reply.status)
        sync(broker)
    assert Status.QUEUE_FULL in statuses
    channel = broker.channels["events"]
    assert channel.log.size_bytes <= channel.log_limit
    assert channel.counters["refused:log-full"] >= 1
    assert channel.counters.get("log-overflow", 0) == 0


def test_drop_newest_reclaims_acknowledged_segments():
    """Under drop-newest, segments every subscriber acknowledged are dropped when the log is full, so publishing goes on."""
    cfg = config(overflow="drop-newest", max_bytes=4096)
    broker = start(cfg, Disk())
    subscribe(broker)
    now = NOW
    for i in range(1, 200):
        now += 1.0
        reply = publish(broker, [event(i, size=400, timestamp=now)], object(), now=now)
        assert reply is None, reply
        sync(broker, now)
        queued_ids(broker, now=now)


def test_size_cut_drops_what_queues_no_longer_hold_silently():
    """A log over its size bound first drops segments no queue holds any more (the queues' own overflow already counted them)."""
    cfg = config(max_bytes=4096)
    broker = start(cfg, Disk())
    subscribe(broker)
    for i in range(1, 80):
        publish(broker, [event(i, size=300)], object())
        sync(broker)
        broker.expire(NOW)
    channel = broker.channels["events"]
    queue = channel.queues["console"]
    assert channel.log.size_bytes <= channel.log_limit
    assert channel.counters["log-overflow"] == 0
    assert queue.counters["enqueued"] == 79 == queue.counters["overflowed"] + len(queue)


def test_drop_oldest_size_cut_counts_overflow(monkeypatch):
    """Under drop-oldest, when the log's size bound drops batches a queue still holds, they leave the queue counted as overflowed."""
    monkeypatch.setattr(disk_channel, "LOG_BYTES_FACTOR", 0.5)
    cfg = config(max_bytes=8192)
    broker = start(cfg, Disk())
    subscribe(broker)
    for i in range(1, 80):
        publish(broker, [event(i, size=300)], object())
        sync(broker)
        broker.expire(NOW)
    channel = broker.channels["events"]
    queue = channel.queues["console"]
    assert channel.log.size_bytes <= channel.log_limit
    assert channel.counters["log-overflow"] > 0
    assert queue.counters["overflowed"] >= channel.counters["log-overflow"]
    assert queue.counters["enqueued"] == 79 == queue.counters["overflowed"] + len(queue)
    assert set(waiting_ids(broker)) == {channel._keys[i][1] for i in channel._keys}


def test_age_retention_drops_expired_segments():
    """Log segments whose events all outlived the TTL are dropped by the expiry pass."""
    cfg = config(max_bytes=4096)
    broker = start(cfg, Disk())
    subscribe(broker)
    for i in range(1, 40):
        publish(broker, [event(i, size=300, ttl=10.0)], object())
        sync(broker)
    channel = broker.channels["events"]
    assert channel.log.records > 0
    broker.expire(NOW + 61)
    sync(broker, NOW + 61)
    assert channel.log.records == 0
    assert channel.counters["log-expired-batches"] > 0


def test_ack_log_compaction_keeps_the_state(monkeypatch):
    """Once the acknowledgement log grows it is rewritten in a few records and its old segments dropped; a restart still resends nothing acknowledged."""
    monkeypatch.setattr(disk_channel, "ACK_COMPACT_BYTES", 2048)
    monkeypatch.setattr(disk_channel, "ACK_SEGMENT_BYTES", 1024)
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    subscribe(broker, client="other")
    channel = broker.channels["events"]
    grew = 0
    for i in range(1, 200):
        publish(broker, [event(i)], object())
        broker.ack("events", "console", (("probe", i),))
        sync(broker)
        grew = max(grew, channel.acks.size_bytes)
        broker.expire(NOW)
        sync(broker)
    assert channel.acks.size_bytes < grew
    disk.crash()
    again = start(cfg, disk)
    assert waiting_ids(again) == []
    assert waiting_ids(again, "other") == list(range(1, 200))


def test_folder_names_are_plain_and_distinct():
    """Channel folder names never hold separators or dots alone, and different tags never share one."""
    tags = ["events", "a/b", "..", ".", "x" * 400, "x" * 399 + "y", "é", "a%2Fb"]
    names = [folder_name(t) for t in tags]
    assert len(set(names)) == len(names)
    assert all("/" not in n and n not in (".", "..") and len(n) < 200 for n in names)


def test_data_folder_opens_real_files(tmp_path):
    """DataFolder gives each channel a batch and an acknowledgement folder of real files; a channel on them survives being reopened."""
    cfg = config()
    folder = DataFolder(str(tmp_path))
    broker = start(cfg, folder)
    subscribe(broker)
    token = object()
    assert publish(broker, [event(1)], token) is None
    assert set(sync(broker)) == {token}
    for channel in broker.disk_channels():
        channel.close(NOW)
    assert (tmp_path / folder_name("events") / "batches").is_dir()
    assert waiting_ids(start(cfg, DataFolder(str(tmp_path)))) == [1]


def test_driver_group_commit_answers_after_the_sync():
    """The storage driver syncs once per reactor turn and answers every publish of that turn after it; under interval it syncs on a timer."""
    cfg, disk = config(), Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    clock = Clock()
    clock.advance(NOW)
    answered = []
    driver = StorageDriver(broker, clock, lambda t, r: answered.append((t, r)), run_in_thread=maybeDeferred)
    tokens = [object() for _ in range(3)]
    for i, token in enumerate(tokens):
        assert publish(broker, [event(i + 1)], token) is None
        driver.kick()
    assert answered == []
    clock.advance(0)
    assert [t for t, _ in answered] == tokens and all(r.ok for _, r in answered)
    assert driver.syncs == 1

    cfg2, disk2 = config(fsync="interval", fsync_interval=200), Disk()
    broker2 = start(cfg2, disk2)
    subscribe(broker2)
    driver2 = StorageDriver(broker2, clock, lambda t, r: None, run_in_thread=maybeDeferred)
    driver2.kick()
    clock.advance(0)  # the subscription is synced whatever the policy
    before = driver2.syncs
    publish(broker2, [event(1)], object(), now=clock.seconds())
    driver2.kick()
    clock.advance(0)
    batches, _ = disk2("events")
    assert not batches.durable(batches.files()[-1])
    clock.advance(0.25)
    assert driver2.syncs == before + 1 and len(batches.durable(batches.files()[-1])) > 0


def test_ordered_disk_classes_load_and_a_bad_fsync_is_refused():
    """An ordered class may be kept on disk; an unknown fsync policy stops the config load with one line."""
    config = cluster_config(("events",), persistence="disk", ordering="channel")
    assert config.channels["events"].qos.persistence == "disk"
    with pytest.raises(ConfigError) as e:
        cluster_config(("events",), persistence="disk", fsync="sometimes")
    assert "fsync" in str(e.value) and "\n" not in str(e.value)


def test_damage_in_an_older_segment_is_counted_and_the_rest_kept():
    """A byte flipped in an older segment loses only the records from there to that segment's end, counted as recovery-lost; later segments are kept."""
    cfg = config(max_bytes=16384)
    disk = Disk()
    broker = start(cfg, disk)
    subscribe(broker)
    for i in range(1, 30):
        publish(broker, [event(i, size=300)], object())
        sync(broker)
    channel = broker.channels["events"]
    segments = channel.log.segments
    assert len(segments) >= 3
    batches, _ = disk("events")
    batches.damage(segments[0], 20, b"\xff")
    again = start(cfg, disk)
    counters = again.channels["events"].counters
    kept = waiting_ids(again)
    assert counters["recovery-lost"] > 0
    assert len(kept) == 29 - counters["recovery-lost"]
    assert kept[-1] == 29 and 1 not in kept
