"""
The first-copy voter (CFT): each event delivered once, never expired, never stale.
"""

from fit_broker.voters import FirstCopyVoter

NOW = 1000.0


def ev(first_id, publisher="p", urgency=0, timestamp=NOW, ttl=10.0):
    """A one-event wire batch."""
    return (publisher, first_id, timestamp, ttl, urgency, b"\x91\xc4\x01c", b"")


def test_first_copy_wins_once():
    """The first copy of each batch is delivered; copies from other replicas are counted duplicates."""
    voter = FirstCopyVoter()
    assert [e[1] for e in voter.offer(0, [ev(1), ev(2)], NOW)] == [1, 2]
    assert [e[1] for e in voter.offer(1, [ev(2), ev(3), ev(1)], NOW)] == [3]
    assert voter.counters["duplicate"] == 2 and voter.counters["delivered"] == 3


def test_expired_copy_not_delivered():
    """A copy that arrives after its TTL is dropped and counted."""
    voter = FirstCopyVoter()
    assert voter.offer(0, [ev(1, ttl=1.0)], NOW + 5) == []
    assert voter.counters["expired"] == 1


def test_stale_copies_after_window_are_not_redelivered():
    """A paused replica's old copies, arriving after the window moved on, are counted stale, not delivered."""
    voter = FirstCopyVoter(window=10)
    voter.offer(0, [ev(i) for i in range(100)], NOW)
    late = voter.offer(3, [ev(i) for i in range(50, 60)], NOW)
    assert late == []
    assert voter.counters["stale"] == 10


def test_floors_are_per_urgency_level():
    """An urgent flood does not make a later routine event of the same publisher look stale."""
    voter = FirstCopyVoter(window=10)
    voter.offer(0, [ev(1000 + i, urgency=3) for i in range(100)], NOW)
    assert [e[1] for e in voter.offer(0, [ev(5, urgency=0)], NOW)] == [5]


def test_publishers_are_independent():
    """The same event id from two publishers is two events."""
    voter = FirstCopyVoter()
    assert len(voter.offer(0, [ev(1, "a"), ev(1, "b")], NOW)) == 2
