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
    voter = FirstCopyVoter(memory_window=10)
    voter.offer(0, [ev(i) for i in range(100)], NOW)
    late = voter.offer(3, [ev(i) for i in range(50, 60)], NOW)
    assert late == []
    assert voter.counters["stale"] == 10


def test_floors_are_per_urgency_level():
    """An urgent flood does not make a later routine event of the same publisher look stale."""
    voter = FirstCopyVoter(memory_window=10)
    voter.offer(0, [ev(1000 + i, urgency=3) for i in range(100)], NOW)
    assert [e[1] for e in voter.offer(0, [ev(5, urgency=0)], NOW)] == [5]


def test_publishers_are_independent():
    """The same event id from two publishers is two events."""
    voter = FirstCopyVoter()
    assert len(voter.offer(0, [ev(1, "a"), ev(1, "b")], NOW)) == 2


def _batch(first_id, content=b"c", ttl=10.0):
    from fit_broker.units import pack_contents

    return ("p", first_id, NOW, ttl, 0, pack_contents([content]), b"")


def test_matching_voter_needs_f_plus_one_digests_and_a_full_copy():
    """Digests alone never deliver; a full copy whose digest f+1 replicas vouch for does."""
    from fit_broker.units import batch_digest, digest_form
    from fit_broker.voters import MatchingCopiesVoter

    voter = MatchingCopiesVoter(faults=1, replicas=4)
    full = _batch(1)
    light = digest_form(full, batch_digest(full))
    assert voter.offer(2, [light], NOW) == []
    assert voter.offer(3, [light], NOW) == []
    assert voter.pending == 1
    assert voter.offer(0, [full], NOW) == [full]
    assert voter.offer(1, [full], NOW) == []
    assert voter.counters["duplicate"] == 1 and voter.pending == 0


def test_matching_voter_refuses_a_lone_full_copy_and_mismatching_digests():
    """One full copy with digests of something else is not delivered; the liar is counted once decided."""
    from fit_broker.units import batch_digest, digest_form
    from fit_broker.voters import MatchingCopiesVoter

    voter = MatchingCopiesVoter(faults=1, replicas=4)
    true, forged = _batch(1), _batch(1, b"forged")
    assert voter.offer(0, [forged], NOW) == []
    assert voter.offer(2, [digest_form(true, batch_digest(true))], NOW) == []
    assert voter.offer(1, [true], NOW) == [true]
    assert voter.counters["mismatch:replica-0"] == 1


def test_matching_voter_expires_pending_and_late_full_copies():
    """Pending batches expire with a count; a full copy that expired while waiting is not delivered."""
    from fit_broker.units import batch_digest, digest_form
    from fit_broker.voters import MatchingCopiesVoter

    voter = MatchingCopiesVoter(faults=1, replicas=4)
    full = _batch(1, ttl=1.0)
    assert voter.offer(0, [full], NOW) == []
    assert voter.offer(2, [digest_form(full, batch_digest(full))], NOW + 5) == []
    assert voter.counters["expired"] == 1
    voter.offer(3, [_batch(50, ttl=1.0)], NOW)
    voter.expire(NOW + 2)
    assert voter.pending == 0
