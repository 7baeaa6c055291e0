"""
A subscriber's output queue: urgency, TTL and overflow, every discard counted.
"""

from fit_broker.broker.queue import OutputQueue as _OutputQueue


def ev(event_id, urgency=0, timestamp=100.0, ttl=10.0, count=1, size=64):
    batch = ("p", event_id, timestamp, ttl, urgency, b"", b"")
    return (count, batch, batch, size)


def ids(batches):
    return [b[1] for b in batches]


class OutputQueue(_OutputQueue):
    """The queue, taking and acknowledging at once as a pull does."""

    def take(self, count, now, max_bytes=None):
        taken = super().take(count, now, max_bytes)
        self.ack([(b[0], b[1]) for b in taken])
        return taken


def test_urgent_events_leave_first():
    """Higher urgency levels are taken before lower ones, each in arrival order."""
    queue = OutputQueue(100, 4)
    queue.extend([ev(1, 0), ev(2, 3), ev(3, 1), ev(4, 3)])
    assert ids(queue.take(10, now=101)) == [2, 4, 3, 1]
    assert queue.counters["delivered"] == 4


def test_take_respects_count():
    """take returns at most count events and leaves the rest."""
    queue = OutputQueue(100, 1)
    queue.extend([ev(i) for i in range(5)])
    assert ids(queue.take(2, now=101)) == [0, 1]
    assert len(queue) == 3


def test_expired_events_are_dropped_and_counted():
    """Events past their deadline are never taken; each one is counted as expired."""
    queue = OutputQueue(100, 2)
    queue.extend([ev(1, ttl=1.0), ev(2, ttl=50.0), ev(3, urgency=1, ttl=1.0)])
    assert ids(queue.take(10, now=105)) == [2]
    assert queue.counters["expired"] == 2
    assert len(queue) == 0


def test_expire_sweeps_heads():
    """expire drops expired events at the head of each level without taking others."""
    queue = OutputQueue(100, 1)
    queue.extend([ev(1, ttl=1.0), ev(2, ttl=1.0), ev(3, ttl=100.0)])
    assert queue.expire(now=102) == 2
    assert len(queue) == 1 and queue.counters["expired"] == 2


def test_overflow_drops_oldest_least_urgent():
    """A full drop-oldest queue discards the oldest routine events and keeps alarms."""
    queue = OutputQueue(3, 4)
    queue.extend([ev(1, 3), ev(2, 0), ev(3, 0)])
    queue.extend([ev(4, 0), ev(5, 1)])
    assert queue.counters["overflowed"] == 2
    assert ids(queue.take(10, now=101)) == [1, 5, 4]


def test_overflow_drop_newest():
    """A full drop-newest queue discards the arriving events and keeps what it had."""
    queue = OutputQueue(2, 1, "drop-newest")
    queue.extend([ev(1), ev(2)])
    queue.extend([ev(3), ev(4)])
    assert ids(queue.take(10, now=101)) == [1, 2]
    assert queue.counters["overflowed"] == 2


def test_counters_reconcile():
    """enqueued = delivered + expired + overflowed + skipped + waiting + unacknowledged, always."""
    queue = OutputQueue(5, 2)
    queue.extend([ev(i, i % 2, ttl=1.0 if i % 3 == 0 else 50.0) for i in range(12)])
    queue.take(2, now=102)
    queue.expire(now=102)
    queue.extend([ev(100 + i) for i in range(3)])
    c = queue.counters
    assert c["enqueued"] == c["delivered"] + c["expired"] + c["overflowed"] + c["skipped"] + len(queue) + queue.unacked_events
    queue.clear()
    assert c["enqueued"] == c["delivered"] + c["expired"] + c["overflowed"] + c["skipped"]


def test_batches_count_their_events():
    """Capacity, delivery and overflow count events, and whole batches are discarded oldest first."""
    queue = OutputQueue(250, 1)
    queue.extend([ev(1, count=100), ev(101, count=100)])
    queue.extend([ev(201, count=100)])
    assert len(queue) == 200
    assert queue.counters["overflowed"] == 100
    assert ids(queue.take(150, now=101)) == [101]
    assert ids(queue.take(50, now=101)) == [201]
    assert queue.counters["delivered"] == 200
