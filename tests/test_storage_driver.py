"""
The storage driver's batched group commit, on a fake clock: one thread-pool
job syncs every channel due at once, "always" answers only after the sync
covering a publish, "interval" syncs within fsync_interval of an append,
and a failed sync stops only the channels it failed for.
"""

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from fit_broker.broker.disk_channel import STORAGE_FAILED
from fit_broker.broker.machine import BrokerStateMachine
from fit_broker.replica.storage_driver import TICK, DataFolder, StorageDriver
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.units import Request, pack_contents
from tests.simnet import cluster_config
from tests.test_disk_channel import Disk

NOW = 1_800_000_000.0
TAGS = ("a", "b", "c")


def start(**qos):
    cfg = cluster_config(TAGS, clients=("probe", "console"), persistence="disk", **qos)
    disk = Disk()
    broker = BrokerStateMachine(cfg, scheme_lookup(cfg), storage=disk)
    for tag in TAGS:
        assert broker.handle("console", Request(2, "subscribe", tag, options={"resume": True}), NOW).ok
    return broker, disk


def turn(driver, clock):
    """End the reactor turn: the driver's look runs."""
    driver.kick()
    clock.advance(0)


def publish(broker, tag, first_id, now, token=None):
    batch = ("probe", first_id, now, 60.0, 0, pack_contents([b"x"]), b"")
    return broker.handle("probe", Request(1, "publish", tag, 0, (batch,)), now, token)


class Jobs:
    """A run_in_thread that holds each job until the test runs it."""

    def __init__(self):
        self.waiting = []

    def __call__(self, f):
        d = Deferred()
        self.waiting.append((f, d))
        return d

    def run_all(self):
        waiting, self.waiting = self.waiting, []
        for f, d in waiting:
            d.callback(f())
        return len(waiting)


def durable(disk, tag):
    batches, _ = disk(tag)
    return sum(len(batches.durable(name) or b"") for name in batches.files())


def written(disk, tag):
    batches, _ = disk(tag)
    return sum(batches.size(name) for name in batches.files())


def test_interval_syncs_every_channel_in_one_job_within_the_interval():
    """Under interval, appends to several channels at different times are synced by one job within fsync_interval of the first, and the timer stops once nothing is pending."""
    broker, disk = start(fsync="interval", fsync_interval=200)
    clock = Clock()
    clock.advance(NOW)
    driver = StorageDriver(broker, clock, lambda t, r: None, run_in_thread=maybeDeferred)
    for tag in TAGS:
        assert publish(broker, tag, 1, clock.seconds(), object()).ok
        turn(driver, clock)
        clock.advance(0.05)
    assert all(durable(disk, tag) < written(disk, tag) for tag in TAGS)
    clock.advance(0.05 + 1e-3)  # 0.2 s after the first append (and float rounding)
    assert driver.batches == 1 and driver.syncs == 3
    assert all(durable(disk, tag) == written(disk, tag) for tag in TAGS)
    clock.advance(0.2)  # a last look finds nothing pending
    assert clock.getDelayedCalls() == [] and driver.batches == 1


def test_interval_channel_that_synced_past_its_deadline_syncs_again_at_once():
    """An interval channel whose appends waited for a sync running longer than the interval starts its next sync as soon as that one ends."""
    broker, disk = start(fsync="interval", fsync_interval=100)
    clock = Clock()
    clock.advance(NOW)
    jobs = Jobs()
    driver = StorageDriver(broker, clock, lambda t, r: None, run_in_thread=jobs)
    publish(broker, "a", 1, clock.seconds())
    turn(driver, clock)
    clock.advance(0.1)
    assert len(jobs.waiting) == 1
    publish(broker, "a", 2, clock.seconds())
    turn(driver, clock)
    clock.advance(0.15)  # the sync of id 1 still runs: id 2 is overdue
    assert jobs.run_all() == 1
    assert len(jobs.waiting) == 1 and driver.batches == 2
    jobs.run_all()
    assert durable(disk, "a") == written(disk, "a")


def test_always_answers_only_after_the_one_job_covering_the_turn():
    """Under always, publishes to several channels in one reactor turn share one job, and none is answered before it completed."""
    broker, disk = start()
    clock = Clock()
    clock.advance(NOW)
    jobs = Jobs()
    answered = []
    driver = StorageDriver(broker, clock, lambda t, r: answered.append((t, r)), run_in_thread=jobs)
    tokens = [object() for _ in TAGS]
    for tag, token in zip(TAGS, tokens):
        assert publish(broker, tag, 1, NOW, token) is None
        driver.kick()
    clock.advance(0)
    assert len(jobs.waiting) == 1 and driver.syncs == 3
    assert answered == [] and all(durable(disk, tag) < written(disk, tag) for tag in TAGS)
    jobs.run_all()
    assert [t for t, _ in answered] == tokens and all(r.ok for _, r in answered)
    assert all(durable(disk, tag) == written(disk, tag) for tag in TAGS)


def test_a_failed_sync_stops_only_its_own_channel():
    """When one channel's fsync fails in a shared job, its publishes are refused with storage-failed; the other channels are answered and go on."""
    broker, disk = start()
    clock = Clock()
    clock.advance(NOW)
    answered = {}
    driver = StorageDriver(broker, clock, lambda t, r: answered.__setitem__(t, r), run_in_thread=maybeDeferred)
    disk("b")[0].fail_syncs()
    tokens = {tag: object() for tag in TAGS}
    for tag in TAGS:
        publish(broker, tag, 1, NOW, tokens[tag])
        driver.kick()
    clock.advance(0)
    assert driver.batches == 1 and driver.failed_syncs == 1
    assert answered[tokens["b"]].status == STORAGE_FAILED
    assert answered[tokens["a"]].ok and answered[tokens["c"]].ok
    assert publish(broker, "b", 2, NOW, object()).status == STORAGE_FAILED
    later = object()
    assert publish(broker, "a", 2, NOW, later) is None
    driver.kick()
    clock.advance(0)
    assert answered[later].ok


def test_never_channels_sync_a_subscription_on_the_timer():
    """Under never, what must be synced whatever the policy (a new subscription) is synced by the driver's timer, and appends are not."""
    broker, disk = start(fsync="never")
    clock = Clock()
    clock.advance(NOW)
    driver = StorageDriver(broker, clock, lambda t, r: None, run_in_thread=maybeDeferred)
    publish(broker, "a", 1, NOW)
    turn(driver, clock)
    _, acks = disk("a")
    assert not any(acks.durable(name) for name in acks.files())
    clock.advance(TICK)
    assert all(acks.durable(name) == acks.read(name, 0, acks.size(name)) for name in acks.files())
    assert durable(disk, "a") < written(disk, "a")


def test_real_files_are_synced_by_one_job(tmp_path):
    """On real files the batch of an interval tick syncs every channel's files in one job, and a restart reads them back."""
    cfg = cluster_config(TAGS, clients=("probe", "console"), persistence="disk", fsync="interval", fsync_interval=50)
    broker = BrokerStateMachine(cfg, scheme_lookup(cfg), storage=DataFolder(str(tmp_path)))
    clock = Clock()
    clock.advance(NOW)
    driver = StorageDriver(broker, clock, lambda t, r: None, run_in_thread=maybeDeferred)
    for tag in TAGS:
        assert broker.handle("console", Request(2, "subscribe", tag, options={"resume": True}), NOW).ok
        publish(broker, tag, 1, NOW)
    turn(driver, clock)
    clock.advance(0.05)
    assert driver.batches == 1 and driver.syncs == 3 and driver.failed_syncs == 0
    assert all(c.durable == (c.log.next_index, c.acks.next_index) for c in broker.disk_channels())
    for channel in broker.disk_channels():
        channel.close(NOW)
    again = BrokerStateMachine(cfg, scheme_lookup(cfg), storage=DataFolder(str(tmp_path)))
    assert all(again.channels[tag].counters["recovered"] == 1 for tag in TAGS)
