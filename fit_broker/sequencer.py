"""
Ordered channels at the subscriber: the voter that turns every replica's
entries into one gapless sequence, and the merge that hands the entries of
several C{ordering = "global"} channels over in log-position order.

Replicas push entries C{(position, seq, batch, note, span)}
(L{fit_broker.units.OrderedDelivery}), each replica in sequence order.  The
voter decides sequence numbers one after the other, never skipping one that
C{needed} replicas did not tombstone, so a subscriber sees the same
sequence as every other whatever f replicas do.  Both are sans-IO: callers
pass C{now}.
"""

from collections import deque

import attrs
from zope.interface import implementer

from fit_broker.interfaces import IOrderedVoter
from fit_broker.units import MAX_CREDIT_BYTES, MAX_CREDIT_EVENTS, batch_digest, entry_cost
from fit_broker.voters import FETCH_DELAY, MAX_WANTED, REFETCH_INTERVAL, CreditAndAcks

# The QoS-class orderings whose channels are delivered through this module.
ORDERED_SCOPES = ("channel", "global")
# Seconds between two reopenings of one replica's stream.
REOPEN_INTERVAL = 2.0
# Seconds a subscriber without a start waits for n-f replicas' streams
# before it starts at the earliest number offered so far.
START_WAIT = 1.0
# The tombstone note of numbers a replica no longer holds for this
# subscriber (fit_broker.broker.ordered.LOST).
LOST = "lost"


@attrs.frozen
class OrderedItem:
    """
    One decision of an L{OrderedVoter}: sequence numbers C{seq .. end-1}.

    @ivar batch: the full wire batch to hand over, or C{None} when the
        numbers are skipped (tombstones, or a batch whose TTL passed here).
    @ivar note: C{""} for a batch; else why it is skipped (C{"expired"},
        C{"overflow"}).
    @ivar acks: C{(replica, key)} pairs to acknowledge once the item is
        handled; replica C{None} means every replica.  They wait until then
        so that a subscriber killed before recording the item gets the
        entries again.
    """

    position: int
    seq: int
    end: int
    batch: tuple | None
    note: str
    acks: tuple

    @property
    def key(self):
        return None if self.batch is None else (self.batch[0], self.batch[1])


class _Copy:
    """
    One replica's entry, held until the voter passes its numbers.

    @ivar vote: what matching copies share (position, header, digest), or
        C{None} for a tombstone.
    """

    __slots__ = ("seq", "end", "position", "key", "vote", "note", "events", "nbytes")

    def __init__(self, seq, end, position, key, vote, note, events, nbytes):
        self.seq = seq
        self.end = end
        self.position = position
        self.key = key
        self.vote = vote
        self.note = note
        self.events = events
        self.nbytes = nbytes


class _Slot:
    """
    The batch copies at one sequence number: vote -> replicas, and the full
    copies at hand by digest.
    """

    __slots__ = ("votes", "fulls")

    def __init__(self):
        self.votes = {}
        self.fulls = {}


@implementer(IOrderedVoter)
class OrderedVoter(CreditAndAcks):
    """
    Decide an ordered channel's sequence numbers from every replica's copies.

    BFT: a number is delivered once f+1 replicas sent the same position,
    header and digest and a full copy with that digest is at hand (its
    batch is fetched from those replicas when only digests came within
    L{FETCH_DELAY}); skipped once f+1 replicas sent tombstones covering it,
    counted by note.  CFT: the first copy decides.  f liars can neither
    make a forged batch, a wrong position nor a skip, and cannot stop the
    2f+1 correct replicas.

    Each replica's copies must come in sequence order: one that goes back
    is dropped (C{out-of-order}); one that would leave a gap in that
    replica's stream past the next number, or exceed its credit window
    (C{window}, events and bytes, the credit the subscriber gives it), is
    dropped (C{ahead}, C{over-window}) and L{take_reopen} names the replica
    once those numbers are needed, so that it sends its unacknowledged
    entries again.  Memory is thus bounded per replica by its window, and
    a fast or lying replica can only fill its own.

    The start is the delivery record's last number plus one (C{resume}),
    or else the first number to gather matching copies, among entries at
    or after L{start_from}'s position when given.  Copies before the start
    are acknowledged and not delivered.

    A decided batch whose TTL (capped at C{max_ttl}) passed at the
    subscriber is not handed over: it is counted C{expired} and its number
    consumed, like a tombstone.
    """

    name = "ordered"
    holds_copies = True

    def __init__(self, faults=1, byzantine=True, window=None, resume=None, max_ttl=None,
                 channel="", replicas=None, **context):
        """
        @param resume: C{(position, seq)} delivered last (a delivery
            record's), or C{None}.
        @param window: C{(events, bytes)} of credit each replica is given.
        @param replicas: how many replicas there are (n): numbers that n-f
            of them say they no longer hold (C{"lost"}) are skipped; without
            it, never.
        @param context: what other voters take and this one does not.
        """
        self.needed = faults + 1 if byzantine else 1
        self.lost_needed = replicas - faults if replicas else None
        self.window = tuple(window) if window is not None else (MAX_CREDIT_EVENTS, MAX_CREDIT_BYTES)
        self.max_ttl = float("inf") if max_ttl is None else max_ttl
        self.channel = channel
        self.from_position = None
        self.last = None
        self.version = 0  # moves whenever what settled() reads may have changed
        self.next_seq = None
        if resume is not None:
            self.last = (resume[0], resume[1])
            self.next_seq = resume[1] + 1
        super().__init__({"delivered": 0, "duplicate": 0, "expired": 0})
        self.fetch_ready = False
        self._copies = {}
        self._held = {}
        self._expect = {}
        self._watermarks = {}
        self._missed = {}
        self._reopened = {}
        self._slots = {}
        self._starts = {}
        self._candidates = set()  # numbers that could start the voter
        self._offerers = set()  # replicas that offered copies before the start
        self._first_offer = None
        self._wanted = {}
        self._wanted_keys = {}
        self._offered = False

    # -- the start ---------------------------------------------------------

    def start_from(self, position):
        self.version += 1
        if self._offered:
            raise ValueError("the start of an ordered channel is set before its first entry")
        if type(position) is not int or position < 1:
            raise ValueError(f"a log position is an integer >= 1, not {position!r}")
        self.from_position = position
        self.last = None
        self.next_seq = None

    def resume_position(self):
        if self.last is not None:
            return self.last[0] + 1
        return self.from_position

    def resume_seq(self):
        """
        The next sequence number this subscriber needs, when it knows it.
        """
        if self.next_seq is not None:
            return self.next_seq
        return None if self.last is None else self.last[1] + 1

    def _start(self, seq, now):
        """
        Begin at C{seq}: what lies wholly before it is acknowledged to its
        sender now (it was never delivered, so no record waits for it).
        """
        self._starts.clear()
        self._candidates.clear()
        self._offerers.clear()
        for pair in self._pass(seq):
            if pair[0] is not None:
                self._acks.append(pair)

    # -- taking copies -----------------------------------------------------

    def offer(self, replica, entries, now, costs=None):
        self.version += 1
        self._offered = True
        copies = self._copies.get(replica)
        if copies is None:
            copies = self._copies[replica] = deque()
            self._held[replica] = [0, 0]
        if self.next_seq is None and entries:
            self._offerers.add(replica)
            if self._first_offer is None:
                self._first_offer = now
        for index, entry in enumerate(entries):
            cost = costs[index] if costs is not None else entry_cost(entry[2], entry[3])
            self._take(replica, copies, entry, cost[0], cost[1], now)
        out = []
        self._advance(now, out)
        return out

    def _free(self, replica, events, nbytes, reason=None):
        self._credit(replica, events, nbytes)
        if reason is not None:
            self.count(f"{reason}:replica-{replica}")

    def _miss(self, replica, seq):
        missed = self._missed.get(replica)
        if missed is None or seq < missed:
            self._missed[replica] = seq

    def _take(self, replica, copies, entry, events, nbytes, now):
        position, seq, batch, note, span = entry
        end = seq + span
        key = (batch[0], batch[1])
        start = self.next_seq
        if start is not None and end <= start:
            # the common case of a late copy: decided already
            self.counters["duplicate"] += 1
            self._acks.append((replica, key))
            self._free(replica, events, nbytes)
            return
        if start is None and self.from_position is not None and position < self.from_position:
            self.count("before-start")
            self._acks.append((replica, key))
            self._free(replica, events, nbytes)
            return
        expect = self._expect.get(replica)
        if expect is not None and seq < expect:
            self._free(replica, events, nbytes, "out-of-order")
            return
        if start is not None and seq > (start if expect is None or expect < start else expect):
            self._free(replica, events, nbytes, "ahead")
            self._miss(replica, seq)
            return
        held = self._held[replica]
        if held[0] + events > self.window[0] or held[1] + nbytes > self.window[1]:
            self._free(replica, events, nbytes, "over-window")
            self._miss(replica, seq)
            return
        full = None
        if note:
            vote = None
        else:
            if batch[5]:
                digest = batch_digest(batch)
                full = batch
            else:
                digest = batch[6]
                if len(digest) != 32:
                    self._free(replica, events, nbytes, "malformed-digest")
                    return
            vote = (position, batch[0], batch[1], batch[2], batch[3], batch[4], digest)
        copies.append(_Copy(seq, end, position, key, vote, note, events, nbytes))
        self._expect[replica] = end
        held[0] += events
        held[1] += nbytes
        missed = self._missed.get(replica)
        if missed is not None and missed <= seq:
            del self._missed[replica]
        if vote is None:
            if start is None and note != LOST:
                starters = self._starts.setdefault(seq, set())
                starters.add(replica)
                if len(starters) >= self.needed:
                    self._candidates.add(seq)
            return
        slot = self._slots.get(seq)
        if slot is None:
            slot = self._slots[seq] = _Slot()
        voters = slot.votes.get(vote)
        if voters is None:
            voters = slot.votes[vote] = []
        voters.append(replica)
        if full is not None and digest not in slot.fulls:
            slot.fulls[digest] = full
        if len(voters) >= self.needed:
            if self.next_seq is None:
                self._candidates.add(seq)
            if digest not in slot.fulls:
                self._want(seq, key, digest, now + FETCH_DELAY, now)

    # -- deciding ----------------------------------------------------------

    def _maybe_start(self, now):
        """
        Without a start, begin at the earliest number enough copies agree
        on, once n-f replicas offered their streams or L{START_WAIT} passed:
        a replica that lags, or caught up by state transfer, may hold only
        later numbers, and starting at its first would skip earlier ones
        that the others still hold for this subscriber.
        """
        if not self._candidates:
            return
        if (
            self.lost_needed is not None
            and len(self._offerers) < self.lost_needed
            and now - self._first_offer < START_WAIT
        ):
            return
        self._start(min(self._candidates), now)

    def _advance(self, now, out):
        """
        Decide as many numbers from C{next_seq} on as the copies allow.
        """
        if self.next_seq is None:
            self._maybe_start(now)
        needed = self.needed
        while self.next_seq is not None:
            seq = self.next_seq
            slot = self._slots.get(seq)
            if slot is not None:
                winner = None
                for vote, voters in slot.votes.items():
                    if len(voters) >= needed:
                        winner = vote
                        break
                if winner is not None:
                    position, publisher, first_id, timestamp, ttl, _, digest = winner
                    full = slot.fulls.get(digest)
                    alive = timestamp + min(ttl, self.max_ttl) > now
                    if full is None and alive:
                        self._want(seq, (publisher, first_id), digest, now + FETCH_DELAY, now)
                        return
                    for vote, voters in slot.votes.items():
                        if vote != winner:
                            for replica in voters:
                                self.count(f"mismatch:replica-{replica}")
                    key = (publisher, first_id)
                    acks = [(None, key)]
                    acks.extend(pair for pair in self._pass(seq + 1) if pair[1] != key)
                    if alive:
                        self.counters["delivered"] += 1
                        out.append(OrderedItem(position, seq, seq + 1, full, "", tuple(acks)))
                    else:
                        self.counters["expired"] += 1
                        out.append(OrderedItem(position, seq, seq + 1, None, "expired", tuple(acks)))
                    self.last = (position, seq)
                    continue
            covering = []
            for copies in self._copies.values():
                if copies:
                    front = copies[0]
                    if front.vote is None and front.seq <= seq < front.end:
                        covering.append(front)
            lost = sum(1 for copy in covering if copy.note == LOST)
            if len(covering) - lost >= needed:
                covering = [copy for copy in covering if copy.note != LOST]
            elif lost and self.lost_needed is not None and len(covering) >= self.lost_needed:
                # at most f replicas may still hold these numbers: no f+1 of
                # them can ever vouch for a batch there
                needed = self.lost_needed
            else:
                return
            end = sorted((copy.end for copy in covering), reverse=True)[needed - 1]
            needed = self.needed
            notes = {}
            for copy in covering:
                notes[copy.note] = notes.get(copy.note, 0) + 1
            note = max(notes, key=notes.get)
            position = min(copy.position for copy in covering)
            if self.last is not None and self.last[0] > position:
                position = self.last[0]
            self.count(f"skipped-{note}", end - seq)
            out.append(OrderedItem(position, seq, end, None, note, self._pass(end)))
            self.last = (position, end - 1)

    def _pass(self, end):
        """
        Move C{next_seq} to C{end}: forget the slots below it and free every
        copy that ends at or before it.  Return the C{(replica, key)} of
        those copies, plus C{(None, key)} for a key that C{needed} replicas
        sent (all may forget it).
        """
        begin = self.next_seq
        self.next_seq = end
        slots = self._slots
        if begin is not None and end - begin <= len(slots):
            gone = range(begin, end)
        else:
            gone = [seq for seq in slots if seq < end]
        wanted = self._wanted
        for seq in gone:
            slots.pop(seq, None)
            want = wanted.pop(seq, None)
            if want is not None:
                self._wanted_keys.pop(want[1], None)
        pairs = []
        senders = {}
        for replica, copies in self._copies.items():
            if not copies or copies[0].end > end:
                continue
            held = self._held[replica]
            events = nbytes = 0
            while copies and copies[0].end <= end:
                copy = copies.popleft()
                events += copy.events
                nbytes += copy.nbytes
                pairs.append((replica, copy.key))
                senders[copy.key] = senders.get(copy.key, 0) + 1
            held[0] -= events
            held[1] -= nbytes
            self._free(replica, events, nbytes)
        for key, count in senders.items():
            if count >= self.needed:
                pairs.append((None, key))
        return tuple(pairs)

    # -- fetching ----------------------------------------------------------

    def _want(self, seq, key, digest, due, now):
        if seq in self._wanted:
            return
        if len(self._wanted) >= MAX_WANTED:
            self.count("fetch-backlog")
            return
        self._wanted[seq] = [due, key, digest]
        self._wanted_keys[key] = seq
        if due <= now:
            self.fetch_ready = True

    def wanted(self, now):
        """
        Return C{(key, replicas)} for each batch that f+1 replicas vouched
        for without a full copy coming within L{FETCH_DELAY}: ask those
        replicas, again every L{REFETCH_INTERVAL}.
        """
        self.version += 1
        self.fetch_ready = False
        due = []
        for seq, want in self._wanted.items():
            if want[0] <= now:
                want[0] = now + REFETCH_INTERVAL
                slot = self._slots.get(seq)
                replicas = set()
                if slot is not None:
                    for vote, voters in slot.votes.items():
                        if vote[6] == want[2] and len(voters) >= self.needed:
                            replicas.update(voters)
                due.append((want[1], sorted(replicas) or None))
        return due

    def offer_fetched(self, replica, batches, now):
        self.version += 1
        for batch in batches:
            seq = self._wanted_keys.get((batch[0], batch[1]))
            if seq is None or not batch[5]:
                self.count("late-fetch")
                continue
            want = self._wanted[seq]
            if batch_digest(batch) != want[2]:
                self.count(f"fetch-mismatch:replica-{replica}")
                continue
            del self._wanted[seq]
            del self._wanted_keys[want[1]]
            slot = self._slots.get(seq)
            if slot is not None:
                slot.fulls[want[2]] = batch
        out = []
        self._advance(now, out)
        return out

    def expire(self, now):
        self.version += 1
        out = []
        self._advance(now, out)
        return out

    # -- watermarks, for the merge across global channels -----------------

    def note_watermark(self, replica, watermark):
        self.version += 1
        self._watermarks[replica] = watermark

    def settled(self):
        """
        A replica vouches that nothing of the channel below a position is
        left to decide: below its copy at the next number when it sent one,
        else up to its watermark (it sent every entry up to there, and all
        of them are decided).  A replica whose stream has a gap, or whose
        first copy lies past the next number, vouches for nothing.  Return
        what C{needed} replicas vouch for.
        """
        start = self.next_seq
        bounds = []
        for replica in set(self._watermarks).union(self._copies):
            copies = self._copies.get(replica)
            if replica in self._missed:
                bound = -1
            elif copies:
                front = copies[0]
                bound = front.position - 1 if start is None or front.seq <= start else -1
            else:
                bound = self._watermarks.get(replica, -1)
            bounds.append(bound)
        if len(bounds) < self.needed:
            return -1
        bounds.sort(reverse=True)
        return bounds[self.needed - 1]

    # -- credit, acknowledgements, links -------------------------------------

    def take_dropped(self):
        return []

    def take_reopen(self, now):
        self.version += 1
        start = self.next_seq
        if start is None or not self._missed:
            return []
        reopen = []
        for replica, seq in self._missed.items():
            if seq <= start and now - self._reopened.get(replica, -REOPEN_INTERVAL) >= REOPEN_INTERVAL:
                self._reopened[replica] = now
                self.count(f"reopened:replica-{replica}")
                reopen.append(replica)
        return reopen

    def forget_replica(self, replica):
        """
        Drop a replica's copies without crediting them: the subscriber
        resets that replica's credit as it opens its stream again.
        """
        self.version += 1
        copies = self._copies.pop(replica, None) or ()
        self._held.pop(replica, None)
        self._expect.pop(replica, None)
        self._watermarks.pop(replica, None)
        self._missed.pop(replica, None)
        for copy in copies:
            if copy.vote is None:
                starters = self._starts.get(copy.seq)
                if starters is not None:
                    starters.discard(replica)
                continue
            slot = self._slots.get(copy.seq)
            if slot is None:
                continue
            voters = slot.votes.get(copy.vote)
            if voters is not None and replica in voters:
                voters.remove(replica)
                if not voters:
                    del slot.votes[copy.vote]
                    digest = copy.vote[6]
                    if not any(vote[6] == digest for vote in slot.votes):
                        slot.fulls.pop(digest, None)
            if not slot.votes and copy.seq not in self._wanted:
                del self._slots[copy.seq]

    @property
    def pending(self):
        """
        Copies held, over all replicas.
        """
        return sum(len(copies) for copies in self._copies.values())


class Lane:
    """
    The decided items of one ordered channel waiting to be handed over, in
    sequence order.
    """

    __slots__ = ("tag", "voter", "items", "_settled")

    def __init__(self, tag, voter):
        self.tag = tag
        self.voter = voter
        self.items = deque()
        self._settled = (None, -1)

    def push(self, items):
        self.items.extend(items)

    def first_position(self):
        """
        The position of the first batch waiting, or C{None}.
        """
        for item in self.items:
            if item.batch is not None:
                return item.position
        return None

    def limit(self):
        """
        The highest position another global channel may hand over before
        this one hands over more: below its first batch waiting, else what
        its voter says is settled.
        """
        position = self.first_position()
        if position is not None:
            return position - 1
        # asked for every group another channel hands over: computed again
        # only when the voter took something since
        version, bound = self._settled
        if version != self.voter.version:
            bound = self.voter.settled()
            self._settled = (self.voter.version, bound)
        return bound

    def take_skips(self):
        items = self.items
        skips = []
        while items and items[0].batch is None:
            skips.append(items.popleft())
        return skips

    def take_run(self, limit=None):
        items = self.items
        run = []
        while items and items[0].batch is not None and (limit is None or items[0].position <= limit):
            run.append(items.popleft())
        return run

    def next_group(self):
        """
        The next group to handle in order: leading skips, or the batches up
        to the next skip.
        """
        return self.take_skips() or self.take_run()


class GlobalMerge:
    """
    Hands the items of several C{ordering = "global"} channels over in log
    position order.

    A batch at position p of channel A goes once every other channel B lets
    it: B's first batch waiting lies past p, or, with none waiting, f+1 of
    B's replicas vouch that B has nothing left to decide up to p
    (L{OrderedVoter.settled}: watermarks and the positions of their next
    copies).  Replicas of an idle channel keep sending watermarks, so it
    holds nobody up for long.  Skips go as soon as their channel is free.
    """

    def __init__(self):
        self.lanes = {}

    def add(self, lane):
        self.lanes[lane.tag] = lane

    def remove(self, tag):
        self.lanes.pop(tag, None)

    def next_group(self, busy):
        """
        Return C{(tag, items)}, the next group to handle, or C{None}.

        @param busy: C{busy(tag)} is true while channel C{tag} can take no
            more (its application has not finished the last group).
        """
        lanes = self.lanes
        best = None
        for lane in lanes.values():
            items = lane.items
            if not items:
                continue
            head = items[0]
            if head.batch is None:
                if not busy(lane.tag):
                    return lane.tag, lane.take_skips()
            elif best is None or head.position < best.items[0].position:
                best = lane
        if best is None or busy(best.tag):
            return None
        limit = None
        for lane in lanes.values():
            if lane is not best:
                bound = lane.limit()
                if limit is None or bound < limit:
                    limit = bound
        run = best.take_run(limit)
        return (best.tag, run) if run else None
