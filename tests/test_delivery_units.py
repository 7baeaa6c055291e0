"""
The pieces of acknowledged delivery on their own: a queue's unacknowledged
batches, a stream's credits in events and bytes, and the BFT voter's
fetches, evictions, credit and TTL caps.
"""

from fit_broker.broker.queue import OutputQueue
from fit_broker.broker.stream import Stream
from fit_broker.units import (
    MAX_CREDIT_BYTES,
    MAX_CREDIT_EVENTS,
    batch_bytes,
    batch_digest,
    credit_cost,
    digest_form,
    pack_contents,
)
from fit_broker.voters import FETCH_DELAY, FirstCopyVoter, MatchingCopiesVoter

NOW = 1_000.0


def batch(first_id, publisher="p", count=1, size=10, ttl=60.0, urgency=0, timestamp=NOW):
    return (publisher, first_id, timestamp, ttl, urgency, pack_contents([b"x" * size] * count), b"")


def entry(b):
    return (credit_cost(b), b, b, batch_bytes(b))


def test_taken_batches_wait_for_acknowledgement_and_count_delivered_only_then():
    """A taken batch stays unacknowledged (not delivered) until acked; an ack of a queued one removes it too."""
    queue = OutputQueue(100, 1)
    queue.extend([entry(batch(i)) for i in range(3)])
    taken = queue.take(1, NOW)
    assert [b[1] for b in taken] == [0]
    assert queue.unacked_events == 1 and queue.counters["delivered"] == 0
    assert queue.ack([("p", 0), ("p", 2)]) == 2
    assert queue.counters["delivered"] == 2 and queue.unacked_events == 0 and len(queue) == 1
    assert [b[1] for b in queue.take(10, NOW)] == [1]


def test_unacknowledged_batches_are_sent_again_first_after_a_reconnect():
    """requeue_unacked puts what was sent back at the head, in sending order, and counts it as resent."""
    queue = OutputQueue(100, 1)
    queue.extend([entry(batch(i)) for i in range(4)])
    queue.take(2, NOW)
    assert queue.requeue_unacked() == 2
    assert [b[1] for b in queue.take(10, NOW)] == [0, 1, 2, 3]
    assert queue.counters["resent"] == 2


def test_a_lagging_replica_never_sends_what_was_acknowledged_elsewhere():
    """An acknowledgement for a batch not queued yet makes the queue skip it when it arrives."""
    queue = OutputQueue(100, 1)
    queue.ack([("p", 7)])
    queue.extend([entry(batch(7)), entry(batch(8))])
    assert [b[1] for b in queue.take(10, NOW)] == [8]
    assert queue.counters["acked-ahead"] == 1


def test_lookup_serves_the_full_batch_of_a_digest_copy():
    """A replica that sent only a digest still holds the full batch until it is acknowledged."""
    queue = OutputQueue(100, 1)
    full = batch(5, count=3)
    light = digest_form(full, batch_digest(full))
    queue.extend([(3, light, full, batch_bytes(full))])
    assert queue.take(10, NOW) == [light]
    assert queue.lookup(("p", 5)) == full
    queue.ack([("p", 5)])
    assert queue.lookup(("p", 5)) is None


def test_queues_are_bounded_in_bytes_and_unacknowledged_batches_expire():
    """Past max_bytes the oldest batches go, counted; an unacknowledged batch past its TTL is dropped, counted."""
    queue = OutputQueue(1000, 1, max_bytes=5 * (100 + 64))
    queue.extend([entry(batch(i, size=100)) for i in range(8)])
    assert queue.bytes <= 5 * (100 + 64) and queue.counters["overflowed"] > 0
    queue.take(1, NOW)
    assert queue.expire(NOW + 61) >= 1
    assert queue.unacked_events == 0 and queue.counters["expired"] >= 1


def test_stream_credit_counts_events_and_bytes_and_is_capped():
    """A stream pushes while both credits are positive, charges each batch, and caps a subscriber's grant."""
    queue = OutputQueue(10_000, 1)
    queue.extend([entry(batch(i, size=1000)) for i in range(20)])
    stream = Stream("t", queue, 100, 3 * batch_bytes(batch(0, size=1000)))
    taken = stream.take(NOW)
    assert len(taken) == 3 and stream.bytes == 0 and not stream.open
    stream.grant(10**9, 10**12)
    assert stream.events <= MAX_CREDIT_EVENTS and stream.bytes <= MAX_CREDIT_BYTES
    stream.grant(-5, "lots")
    assert stream.events <= MAX_CREDIT_EVENTS


def bft_voter(**options):
    options.setdefault("window", (100, 1 << 20))
    return MatchingCopiesVoter(faults=1, replicas=4, **options)


def test_matching_digests_without_a_full_copy_are_fetched_from_those_who_vouched():
    """When f+1 replicas sent the same digest and no full copy came, the voter wants the batch from them after a short delay."""
    voter = bft_voter()
    full = batch(1)
    light = digest_form(full, batch_digest(full))
    assert voter.offer(2, [light], NOW) == []
    assert voter.offer(3, [light], NOW) == []
    assert voter.wanted(NOW) == []
    assert voter.wanted(NOW + FETCH_DELAY) == [(("p", 1), [2, 3])]
    assert voter.offer_fetched(2, [full], NOW + 0.3) == [full]
    assert voter.pending == 0
    released = voter.release()
    assert released[2][0] == 1 and released[3][0] == 1


def test_unasked_fetch_answers_are_refused():
    """A full copy sent as a fetch answer for a batch nobody asked for counts against its sender."""
    voter = bft_voter()
    assert voter.offer_fetched(1, [batch(9)], NOW) == []
    assert voter.counters["unasked:replica-1"] == 1


def test_a_replica_window_full_of_undecidable_batches_evicts_the_biggest_publisher_first():
    """Batches only one replica vouched for fill its window: the publisher holding most of it is evicted, not the honest one."""
    voter = bft_voter(window=(40, 1 << 20))
    honest = [batch(i, publisher="honest") for i in range(5)]
    voter.offer(0, honest, NOW)
    junk = [batch(1000 + i, publisher="mallory") for i in range(40)]
    voter.offer(0, junk, NOW)
    assert voter.counters["evicted:replica-window"] > 0
    # the honest batches still wait for a second copy, and are decided with it
    assert voter.offer(1, honest, NOW) == honest


def test_a_later_copy_of_an_evicted_batch_asks_everyone_again():
    """After eviction, the next copy of that batch makes the voter fetch it from every replica at once."""
    voter = bft_voter(window=(4, 1 << 20))
    voter.offer(0, [batch(i) for i in range(6)], NOW)
    evicted = voter.counters["evicted:replica-window"]
    assert evicted > 0
    assert voter.offer(1, [batch(0)], NOW) == []
    assert voter.counters["refetched"] == 1
    assert (("p", 0), None) in voter.wanted(NOW)
    assert voter.offer_fetched(0, [batch(0)], NOW) == [batch(0)]


def test_a_claimed_ttl_is_capped_at_the_class_ttl():
    """A copy claiming a TTL of 1e12 s is held no longer than the channel class allows."""
    voter = bft_voter(max_ttl=30.0)
    voter.offer(1, [batch(1, ttl=1e12)], NOW)
    assert voter.pending == 1
    voter.expire(NOW + 31)
    assert voter.pending == 0 and voter.counters["expired"] == 1


def test_pending_bytes_stay_within_the_bound():
    """Undecidable large copies never take the voter past its byte bound."""
    voter = bft_voter(window=(10**6, 10**9), max_pending_bytes=200_000)
    voter.offer(1, [batch(i, size=50_000) for i in range(20)], NOW)
    assert voter.pending_bytes <= 200_000
    assert sum(v for k, v in voter.counters.items() if k.startswith("evicted:")) > 0


def test_overlapping_ids_are_refused_by_voters():
    """A batch whose ids overlap a different delivered batch of the same publisher is never delivered."""
    for voter in (FirstCopyVoter(), bft_voter()):
        a, b = batch(100, count=10), batch(105, count=10)
        decided = voter.offer(0, [a], NOW) + voter.offer(1, [a], NOW)
        assert decided == [a]
        assert voter.offer(0, [b], NOW) + voter.offer(1, [b], NOW) == []
        assert any(k.startswith("overlapping-ids") for k in voter.counters)


def test_a_dropped_link_forgets_its_copies_and_their_credit():
    """When a replica's link drops, its undecided copies are forgotten; it will send them again."""
    voter = bft_voter()
    voter.offer(0, [batch(1), batch(2)], NOW)
    voter.forget_replica(0)
    assert voter.pending == 0 and voter.pending_bytes == 0
    assert voter.release() == {}


def test_first_copy_voters_fetch_batches_of_which_only_digests_came():
    """A CFT or signature voter that got only digest copies of a batch fetches it from their senders."""
    voter = FirstCopyVoter()
    full = batch(3)
    light = digest_form(full, batch_digest(full))
    assert voter.offer(1, [light], NOW) == []
    assert voter.wanted(NOW + FETCH_DELAY) == [(("p", 3), [1])]
    assert voter.offer_fetched(1, [full], NOW) == [full]
