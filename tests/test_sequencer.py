"""
The ordered voter and the merge across global channels on their own, and
the ordered-delivery frame (kind 4) on the wire.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from fit_broker.errors import ProtocolError
from fit_broker.interfaces import IOrderedVoter
from fit_broker.sequencer import GlobalMerge, Lane, OrderedItem, OrderedVoter
from fit_broker.units import (
    BATCH_OVERHEAD,
    OrderedDelivery,
    batch_bytes,
    batch_digest,
    digest_form,
    entry_cost,
    pack_contents,
)
from fit_broker.voters import FETCH_DELAY
from fit_broker.wire.codec import decode, encode_ordered_delivery
from tests.mutation import mutated

NOW = 1_000.0


def batch(first_id, content=b"x", publisher="p", ttl=60.0, timestamp=NOW, count=1):
    return (publisher, first_id, timestamp, ttl, 0, pack_contents([content] * count), b"")


def light(full):
    return digest_form(full, batch_digest(full))


def entry(position, seq, b=None, note="", span=1):
    b = batch(seq) if b is None else b
    return (position, seq, b, note, span)


def tomb(position, seq, span=1, note="expired"):
    return (position, seq, light(batch(seq)), note, span)


def started(after=0, **options):
    """A BFT voter (f=1) resuming after sequence number C{after}."""
    options.setdefault("window", (100, 1 << 20))
    return OrderedVoter(faults=1, resume=(after * 10, after), **options)


def delivered(items):
    return [(item.seq, item.batch[1]) for item in items if item.batch is not None]


# The voter's contract.


def test_ordered_voter_provides_its_interface():
    """OrderedVoter provides IOrderedVoter."""
    assert verifyObject(IOrderedVoter, OrderedVoter(faults=1))


def test_each_number_needs_f_plus_one_matching_copies_and_comes_in_order():
    """One copy decides nothing under BFT; the second matching one delivers, in sequence order."""
    voter = started()
    assert voter.offer(0, [entry(10, 1), entry(20, 2)], NOW) == []
    items = voter.offer(1, [entry(10, 1), entry(20, 2)], NOW)
    assert delivered(items) == [(1, 1), (2, 2)]
    assert [(item.position, item.seq, item.end) for item in items] == [(10, 1, 2), (20, 2, 3)]
    assert voter.next_seq == 3 and voter.counters["delivered"] == 2
    # a third copy is late: acknowledged to its sender, decided nothing
    assert voter.offer(2, [entry(10, 1)], NOW) == []
    assert voter.counters["duplicate"] == 1 and voter.take_acks() == [(2, ("p", 1))]


def test_a_later_number_with_a_quorum_waits_for_the_earlier_ones():
    """Copies arrive in any order across replicas: number 2 decided first still waits for number 1."""
    voter = started()
    assert voter.offer(0, [entry(10, 1), entry(20, 2)], NOW) == []
    # replica 1 disagrees on number 1, agrees on 2: 2 has a quorum, 1 has none
    assert voter.offer(1, [entry(10, 1, batch(1, b"other")), entry(20, 2)], NOW) == []
    items = voter.offer(2, [entry(10, 1)], NOW)
    assert delivered(items) == [(1, 1), (2, 2)]
    assert voter.counters["mismatch:replica-1"] == 1


def test_cft_delivers_the_first_copy():
    """Under CFT (byzantine=False) one copy decides a number."""
    voter = OrderedVoter(faults=1, byzantine=False, resume=(0, 0))
    assert delivered(voter.offer(3, [entry(10, 1), entry(20, 2)], NOW)) == [(1, 1), (2, 2)]


@pytest.mark.parametrize(
    "lie",
    [
        entry(10, 1, batch(1, b"forged")),  # wrong digest
        entry(11, 1),  # wrong position
        entry(10, 1, batch(1, ttl=3600.0)),  # wrong header
    ],
    ids=["digest", "position", "header"],
)
def test_one_liar_cannot_decide_a_number(lie):
    """A liar's copy with another digest, position or header never matches a correct one."""
    voter = started()
    assert voter.offer(3, [lie], NOW) == []
    assert voter.offer(0, [entry(10, 1)], NOW) == []
    items = voter.offer(1, [entry(10, 1)], NOW)
    assert delivered(items) == [(1, 1)] and items[0].position == 10
    assert voter.counters["mismatch:replica-3"] == 1


def test_a_liar_that_skips_a_number_is_dropped_and_reopened_when_needed():
    """A copy past the next number with a gap in its sender's stream is dropped, and the stream reopened once that number is due."""
    voter = started()
    assert voter.offer(3, [entry(10, 1), entry(30, 3)], NOW) == []
    assert voter.counters["ahead:replica-3"] == 1
    assert voter.release() == {3: [1, batch_bytes(batch(3))]}
    assert voter.take_reopen(NOW) == []  # number 3 is not needed yet
    voter.offer(0, [entry(10, 1), entry(20, 2)], NOW)
    voter.offer(1, [entry(10, 1), entry(20, 2)], NOW)
    assert voter.next_seq == 3
    assert voter.take_reopen(NOW) == [3]
    assert voter.take_reopen(NOW + 1) == []  # at most every REOPEN_INTERVAL
    voter.forget_replica(3)
    # the reopened stream sends again from its oldest unacknowledged entry
    assert voter.offer(3, [entry(20, 2), entry(30, 3)], NOW) == []
    assert delivered(voter.offer(0, [entry(30, 3)], NOW)) == [(3, 3)]


def test_a_copy_that_goes_back_is_dropped():
    """Within one link, a replica's copies must go forward: one that overlaps its last is counted and dropped."""
    voter = started()
    voter.offer(3, [entry(10, 1), entry(20, 2)], NOW)
    voter.offer(3, [entry(10, 1)], NOW)
    assert voter.counters["out-of-order:replica-3"] == 1
    assert voter.pending == 2


def test_tombstones_of_one_liar_skip_nothing():
    """A lone tombstone is no reason to skip: the number is delivered when matching copies come."""
    voter = started()
    assert voter.offer(3, [tomb(10, 1, span=5)], NOW) == []
    assert voter.next_seq == 1
    assert voter.offer(0, [entry(10, 1)], NOW) == []
    assert delivered(voter.offer(1, [entry(10, 1)], NOW)) == [(1, 1)]
    assert not any(k.startswith("skipped") for k in voter.counters)


def test_a_huge_number_from_a_liar_takes_no_memory():
    """A copy numbered far past the next is dropped at once, its credit returned, and numbers are never skipped for it."""
    voter = started()
    voter.offer(3, [entry(10, 10**15)], NOW)
    assert voter.pending == 0 and voter.counters["ahead:replica-3"] == 1
    assert voter.release()[3][0] == 1
    voter.offer(0, [entry(10, 1)], NOW)
    assert delivered(voter.offer(1, [entry(10, 1)], NOW)) == [(1, 1)]
    assert voter.next_seq == 2


def test_f_plus_one_tombstones_skip_the_numbers_they_all_cover():
    """Tombstones of different spans skip as far as f+1 of them cover, counted by note, and the acks wait for the item."""
    voter = started()
    voter.offer(0, [tomb(10, 1, span=4), entry(50, 5)], NOW)
    items = voter.offer(1, [tomb(10, 1, span=2), tomb(30, 3, span=2), entry(50, 5)], NOW)
    assert [(item.seq, item.end, item.note, item.batch is None) for item in items] == [
        (1, 3, "expired", True),
        (3, 5, "expired", True),
        (5, 6, "", False),
    ]
    assert voter.counters["skipped-expired"] == 4
    # nothing was acknowledged yet: the skipped copies are acknowledged with their items
    assert voter.take_acks() == []
    assert set(items[0].acks) == {(1, ("p", 1))}
    assert set(items[1].acks) == {(0, ("p", 1)), (1, ("p", 3))}
    assert voter.last == (50, 5)


def test_tombstones_and_batches_at_one_number_decide_whichever_gets_a_quorum():
    """Correct replicas may disagree (one expired a batch, others still hold it): f+1 copies of the batch deliver it."""
    voter = started()
    voter.offer(0, [tomb(10, 1, note="overflow")], NOW)
    voter.offer(1, [entry(10, 1)], NOW)
    assert delivered(voter.offer(2, [entry(10, 1)], NOW)) == [(1, 1)]
    # the tombstone covered only number 1: it is passed and freed
    assert voter.pending == 0


def test_only_digests_are_fetched_from_those_who_vouched():
    """With f+1 matching digests and no full copy, the batch is wanted after FETCH_DELAY from them, and a fetched copy must match."""
    voter = started()
    full = batch(1)
    assert voter.offer(2, [entry(10, 1, light(full))], NOW) == []
    assert voter.offer(3, [entry(10, 1, light(full))], NOW) == []
    assert voter.wanted(NOW) == []
    assert voter.wanted(NOW + FETCH_DELAY) == [(("p", 1), [2, 3])]
    assert voter.offer_fetched(2, [batch(1, b"forged")], NOW + 0.3) == []
    assert voter.counters["fetch-mismatch:replica-2"] == 1
    items = voter.offer_fetched(3, [full], NOW + 0.3)
    assert delivered(items) == [(1, 1)] and items[0].batch == full
    assert voter.offer_fetched(2, [full], NOW + 0.4) == []
    assert voter.counters["late-fetch"] == 1


def test_a_decided_batch_whose_ttl_passed_is_consumed_not_delivered():
    """A batch that expired before it could be handed over is counted expired and its number passed."""
    voter = started(max_ttl=30.0)
    old = batch(1, timestamp=NOW - 40)
    voter.offer(0, [entry(10, 1, light(old))], NOW)
    items = voter.offer(1, [entry(10, 1, light(old))], NOW)
    assert [(item.seq, item.note, item.batch) for item in items] == [(1, "expired", None)]
    assert voter.counters["expired"] == 1 and voter.next_seq == 2


def test_waiting_for_a_fetch_ends_when_the_batch_expires():
    """expire() consumes a number whose batch never came in full once its TTL passed."""
    voter = started()
    full = batch(1, ttl=1.0)
    voter.offer(2, [entry(10, 1, light(full))], NOW)
    voter.offer(3, [entry(10, 1, light(full))], NOW)
    assert voter.expire(NOW + 0.5) == []
    items = voter.expire(NOW + 2)
    assert [(item.seq, item.note) for item in items] == [(1, "expired")]


# The start.


def test_without_a_record_the_first_number_with_a_quorum_starts_and_earlier_copies_are_acknowledged():
    """A fresh subscriber starts at the first number f+1 replicas agree on; copies before it are acknowledged, not delivered."""
    voter = OrderedVoter(faults=1)
    assert voter.next_seq is None
    voter.offer(0, [entry(10, 1), entry(20, 2)], NOW)
    items = voter.offer(1, [entry(20, 2)], NOW)
    assert delivered(items) == [(2, 2)]
    assert (0, ("p", 1)) in voter.take_acks()


def test_a_record_resumes_after_its_last_number():
    """With a record's (position, seq), copies up to seq are acknowledged and the next number is delivered."""
    voter = OrderedVoter(faults=1, resume=(20, 2))
    voter.offer(0, [entry(10, 1), entry(20, 2), entry(30, 3)], NOW)
    items = voter.offer(1, [entry(30, 3)], NOW)
    assert delivered(items) == [(3, 3)]
    assert voter.take_acks() == [(0, ("p", 1)), (0, ("p", 2))]
    assert voter.resume_position() == 31


def test_start_from_a_position_acknowledges_what_lies_before_it():
    """start_from(P): entries before position P are acknowledged and not delivered; the first quorum at or after P starts."""
    voter = OrderedVoter(faults=1)
    voter.start_from(25)
    assert voter.resume_position() == 25
    voter.offer(0, [entry(10, 1), entry(20, 2), entry(30, 3)], NOW)
    items = voter.offer(1, [entry(10, 1), entry(20, 2), entry(30, 3)], NOW)
    assert delivered(items) == [(3, 3)]
    assert voter.counters["before-start"] == 4
    with pytest.raises(ValueError):
        voter.start_from(40)


# Memory and credit.


def test_copies_past_a_replicas_window_are_dropped_and_asked_again():
    """A replica's copies are bounded by its window: the excess is dropped, counted, and its stream reopened once needed."""
    voter = started(window=(3, 1 << 20))
    voter.offer(0, [entry(10 * i, i) for i in range(1, 6)], NOW)
    # the fourth overflows the window; the fifth then leaves a gap in the stream
    assert voter.pending == 3
    assert voter.counters["over-window:replica-0"] == 1 and voter.counters["ahead:replica-0"] == 1
    assert voter.release() == {0: [2, 2 * batch_bytes(batch(1))]}
    voter.offer(1, [entry(10 * i, i) for i in range(1, 4)], NOW)
    assert voter.next_seq == 4
    released = voter.release()
    assert released[0][0] == 3 and released[1][0] == 3
    assert voter.take_reopen(NOW) == [0]


def test_tombstones_cost_one_event_and_the_batch_overhead():
    """An entry costs its batch's events and bytes; a tombstone one event and BATCH_OVERHEAD bytes."""
    full = batch(1, count=5)
    assert entry_cost(full, "") == (5, batch_bytes(full))
    assert entry_cost(light(full), "") == (1, 32 + BATCH_OVERHEAD)
    assert entry_cost(light(full), "overflow") == (1, BATCH_OVERHEAD)


def test_a_forgotten_replica_takes_its_votes_along():
    """After forget_replica, a replica's copies no longer count, and its credit is not released (the stream restarts)."""
    voter = started()
    voter.offer(0, [entry(10, 1)], NOW)
    voter.forget_replica(0)
    assert voter.release() == {} and voter.pending == 0
    assert voter.offer(1, [entry(10, 1)], NOW) == []
    assert delivered(voter.offer(2, [entry(10, 1)], NOW)) == [(1, 1)]


# Watermarks and the merge.


def test_settled_is_what_f_plus_one_replicas_vouch_for():
    """settled() is the (f+1)-th highest of each replica's word: below its next copy, else its watermark."""
    voter = started()
    voter.note_watermark(0, 100)
    assert voter.settled() == -1  # one replica is not enough
    voter.note_watermark(3, 10**9)
    voter.note_watermark(1, 40)
    assert voter.settled() == 100
    voter.offer(0, [entry(60, 1)], NOW)
    assert voter.settled() == 59


def item(position, seq, deliver=True):
    b = batch(seq) if deliver else None
    return OrderedItem(position, seq, seq + 1, b, "" if deliver else "expired", ())


def lanes(*tags):
    merge = GlobalMerge()
    made = {}
    for tag in tags:
        made[tag] = Lane(tag, started())
        merge.add(made[tag])
    return merge, made


def test_the_merge_hands_over_in_position_order_across_channels():
    """Batches of two global channels go in log-position order; a run of one channel goes as one group."""
    merge, made = lanes("a", "b")
    made["a"].push([item(10, 1), item(11, 2), item(40, 3)])
    made["b"].push([item(20, 1), item(30, 2)])
    groups = []
    while (group := merge.next_group(lambda tag: False)) is not None:
        groups.append((group[0], [i.position for i in group[1]]))
    assert groups == [("a", [10, 11]), ("b", [20, 30])]
    # b's voter has not vouched past 30 yet: a's 40 waits
    assert made["a"].items and merge.next_group(lambda tag: False) is None


def test_an_idle_channel_holds_the_merge_until_f_plus_one_watermarks_pass():
    """A batch at position p of channel a waits for idle channel b until f+1 of b's replicas sent a watermark >= p."""
    merge, made = lanes("a", "idle")
    made["a"].push([item(50, 1)])
    idle = made["idle"].voter
    idle.note_watermark(3, 1000)  # a liar alone changes nothing
    assert merge.next_group(lambda tag: False) is None
    idle.note_watermark(0, 49)
    assert merge.next_group(lambda tag: False) is None
    idle.note_watermark(1, 50)
    tag, items = merge.next_group(lambda tag: False)
    assert tag == "a" and [i.position for i in items] == [50]


def test_skips_go_at_once_and_a_busy_channel_holds_its_turn():
    """Skips need no merge; the channel with the lowest batch waiting, if busy, holds everyone."""
    merge, made = lanes("a", "b")
    made["a"].push([item(5, 1, deliver=False), item(10, 2)])
    made["b"].push([item(20, 1)])
    tag, items = merge.next_group(lambda t: False)
    assert tag == "a" and items[0].batch is None
    assert merge.next_group(lambda t: t == "a") is None
    assert merge.next_group(lambda t: False)[0] == "a"


# The frame.


def test_ordered_delivery_round_trips():
    """Kind 4 carries entries and a watermark; decoding gives an OrderedDelivery."""
    entries = (entry(10, 1), tomb(11, 2, span=3, note="overflow"))
    encoded = encode_ordered_delivery("events", entries, 11)
    assert decode(encoded[4:]) == OrderedDelivery("events", entries, 11)
    assert decode(encode_ordered_delivery("events", (), 12)[4:]) == OrderedDelivery("events", (), 12)


@pytest.mark.parametrize(
    "entries, watermark, message",
    [
        ((entry(0, 1),), 1, "position >= 1"),
        ((entry(1, -1),), 1, "seq >= 0"),
        (((1, 1, batch(1), "gone", 1),), 1, "note must be one of"),
        (((1, 1, batch(1), "", 2),), 1, "span must be 1"),
        (((1, 1, light(batch(1)), "expired", 0),), 1, "span must be 1"),
        (((1, 1, batch(1), "expired", 1),), 1, "digest form"),
        (((1, 1, batch(1)),), 1, "[position, seq, batch, note, span]"),
        (((1, 1, ("p", 1), "", 1),), 1, "each batch must be"),
        ((entry(1, 1),), -1, "watermark"),
        ((entry(1, 1),), "9", "watermark"),
    ],
)
def test_bad_ordered_deliveries_say_what_is_wrong(entries, watermark, message):
    """Each malformed ordered delivery is a ProtocolError naming the problem."""
    with pytest.raises(ProtocolError) as error:
        decode(encode_ordered_delivery("events", entries, watermark)[4:])
    assert message in str(error.value)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_ordered_frames_never_crash(data):
    """A valid ordered frame with bytes flipped, cut or inserted decodes or raises ProtocolError only."""
    raw = mutated(data, encode_ordered_delivery("events", (entry(10, 1), tomb(11, 2, span=4)), 11)[4:])
    try:
        decode(raw)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(1, 3), st.booleans(),
                          st.booleans()), max_size=60))
def test_whatever_one_liar_sends_correct_replicas_decide_the_same_sequence(moves):
    """Replica 3 sends arbitrary copies; replicas 0-2 send the true stream in any interleaving: the delivered sequence is the true one."""
    truth = [entry(10 * s, s) for s in range(1, 9)]
    voter = started(window=(20, 1 << 20))
    sent = {0: 0, 1: 0, 2: 0}
    out = []
    for replica, seq, span, tombstone, forged in moves:
        if replica == 3:
            lie = tomb(10 * seq, seq, span) if tombstone else entry(
                10 * seq + int(forged), seq, batch(seq, b"forged" if forged else b"x")
            )
            out += voter.offer(3, [lie], NOW)
        elif sent[replica] < len(truth):
            out += voter.offer(replica, [truth[sent[replica]]], NOW)
            sent[replica] += 1
    for replica in (0, 1, 2):
        out += voter.offer(replica, truth[sent[replica]:], NOW)
    assert [(i.seq, i.position, i.batch) for i in out] == [(e[1], e[0], e[2]) for e in truth]


def test_a_lane_reuses_its_settled_bound_until_its_voter_takes_something():
    """The merge asks every idle lane's bound for each group; it is computed again only after the voter changed."""
    from fit_broker.sequencer import Lane, OrderedVoter

    voter = OrderedVoter(faults=1, byzantine=True, window=(100, 1 << 20))
    lane = Lane("idle", voter)
    calls = []
    real = voter.settled

    def counted():
        calls.append(1)
        return real()

    voter.settled = counted
    first = lane.limit()
    assert lane.limit() == first and len(calls) == 1
    for replica in (0, 1):
        voter.note_watermark(replica, 40)
    assert lane.limit() == 40 and len(calls) == 2


# Numbers replicas no longer hold ("lost" tombstones).


def test_lost_numbers_are_skipped_only_once_n_minus_f_replicas_say_so():
    """f+1 "lost" tombstones are not enough in BFT (4 replicas, f=1): the numbers are skipped, counted as lost, once 3 replicas say they no longer hold them, and delivery goes on after them."""
    voter = started(replicas=4)
    assert voter.offer(0, [tomb(10, 1, span=5, note="lost"), entry(60, 6)], NOW) == []
    assert voter.offer(1, [tomb(10, 1, span=5, note="lost"), entry(60, 6)], NOW) == []
    assert voter.next_seq == 1
    items = voter.offer(2, [tomb(10, 1, span=5, note="lost")], NOW)
    assert [(item.seq, item.end, item.note) for item in items] == [(1, 6, "lost"), (6, 7, "")]
    assert voter.counters["skipped-lost"] == 5


def test_a_replica_that_still_holds_a_number_wins_over_lost_claims():
    """In CFT (first copy wins, 3 replicas) one replica saying "lost" skips nothing: the batch another still holds is delivered."""
    voter = OrderedVoter(faults=1, byzantine=False, resume=(0, 0), replicas=3, window=(100, 1 << 20))
    assert voter.offer(0, [tomb(10, 1, span=3, note="lost")], NOW) == []
    items = voter.offer(1, [entry(10, 1), entry(20, 2), entry(30, 3)], NOW)
    assert delivered(items) == [(1, 1), (2, 2), (3, 3)]
    assert "skipped-lost" not in voter.counters


def test_without_knowing_how_many_replicas_lost_claims_never_skip():
    """A voter built without the number of replicas never skips on "lost" tombstones, however many come."""
    voter = started()
    for replica in range(4):
        assert voter.offer(replica, [tomb(10, 1, span=2, note="lost")], NOW) == []
    assert voter.next_seq == 1


def test_a_lost_tombstone_crosses_the_wire():
    """An ordered-delivery frame carrying a "lost" tombstone decodes; an unknown note is refused."""
    frame = encode_ordered_delivery("events", (tomb(10, 1, span=3, note="lost"),), 9)
    decoded = decode(frame[4:])
    assert decoded.entries[0][3] == "lost" and decoded.entries[0][4] == 3
    with pytest.raises(ProtocolError):
        decode(encode_ordered_delivery("events", (tomb(10, 1, note="vanished"),), 9)[4:])
