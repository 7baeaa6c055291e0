"""
Voters: how a subscriber combines the copies of batches that replicas send it.

Every voter remembers what it delivered (L{RecentIds}, keyed by the batch's
publisher and first event id, and given by the subscriber so that it can
outlive the process), so nothing is delivered twice; refuses a batch whose
id range overlaps a different delivered batch of its publisher; and checks
the TTL itself, capped at the channel class's, so a replica with a wrong
clock cannot make it deliver an expired event nor hold a copy for longer
than the class allows (a deadline that is not a number counts as passed).
Copies are compared whole, payload and proof included, and only decided
batches are ever decoded.

Voters hold state per subscriber and channel, so channels choose a
L{VoterFactory} by name: the module-level factories below are the built-in
plugins (L{fit_broker.plugins.builtin_voters}).

Voters never turn slowness into loss.  A copy they are done with (decided,
refused, or evicted) is reported through L{release}, and the subscriber
returns that replica's flow-control credit only then: a replica whose copies
wait for slower ones is paused, not dropped.
"""

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.dedup import IdRanges, RecentIds
from fit_broker.interfaces import IVoter, IVoterFactory
from fit_broker.units import batch_bytes, batch_digest, credit_cost

DEFAULT_WINDOW = 16_384
DEFAULT_MAX_PENDING = 20_000
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
# No publisher's share of pending batches is smaller than this.
MIN_PUBLISHER_SHARE = 256
# Keys of evicted batches remembered, so that a later copy asks for the rest again.
EVICTED_WINDOW = 65_536
# Seconds to wait for a designated replica's full copy once f+1 digests agree,
# and between two fetches of one batch.
FETCH_DELAY = 0.25
REFETCH_INTERVAL = 2.0
# Batches being fetched at once, at most.
MAX_WANTED = 4096


class CreditAndAcks:
    """
    What a voter, ordered or not, owes the replicas: the flow-control
    credit of the copies it is done with, and acknowledgements of copies of
    what it delivered already; and its counters.
    """

    def __init__(self, counters):
        self.counters = counters
        self._released = {}
        self._acks = []

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def _credit(self, replica, events, nbytes):
        released = self._released.get(replica)
        if released is None:
            self._released[replica] = [events, nbytes]
        else:
            released[0] += events
            released[1] += nbytes

    def release(self):
        """
        Return C{{replica: [events, bytes]}}: the credit of the copies this
        voter is done with since the last call.
        """
        released, self._released = self._released, {}
        return {replica: value for replica, value in released.items() if value[0] or value[1]}

    def take_acks(self):
        """
        Return C{(replica, key)} for each copy dropped because its batch was
        already delivered: that replica should forget it (it may have missed
        the acknowledgement, or resent what it had not heard of).
        """
        acks, self._acks = self._acks, []
        return acks


class _Voter(CreditAndAcks):
    """
    What every voter shares: the memory of delivered batches, id-range
    checks, TTL caps and the credit each replica's copies hold.
    """

    def __init__(self, memory_window=DEFAULT_WINDOW, memory=None, max_ttl=None, max_clock_skew=300.0):
        """
        @param memory: a L{RecentIds} of what was delivered before (a
            subscriber's delivery record), or C{None} to start empty.
        @param max_ttl: the channel class's TTL: no copy counts as living
            longer.
        """
        self._decided = memory if memory is not None else RecentIds(memory_window)
        self._ranges = {}
        self._window = memory_window
        self.max_ttl = float("inf") if max_ttl is None else max_ttl
        self.max_clock_skew = max_clock_skew
        super().__init__({"delivered": 0, "duplicate": 0, "stale": 0, "expired": 0})
        self._dropped = []

    def _deadline(self, batch, now):
        """
        The time after which C{batch} is dead here: its own deadline, its TTL
        capped at the class's, and never later than a copy stamped now could
        live.
        """
        return min(
            batch[2] + min(batch[3], self.max_ttl),
            now + self.max_ttl + self.max_clock_skew,
        )

    def take_dropped(self):
        """
        Return C{(replica, key)} for each undecided batch the voter evicted
        that replica's copy of: the replica may forget it (a later copy from
        another replica makes the voter fetch it from whoever still holds
        it).
        """
        dropped, self._dropped = self._dropped, []
        return dropped

    def _screen(self, replica, batch, now):
        """
        Return C{None} when C{batch} may be voted on, else the reason it was
        dropped (already counted).
        """
        key = (batch[0], batch[1])
        decided = self._decided
        if key in decided:
            self.counters["duplicate"] += 1
            self._acks.append((replica, key))
            return "duplicate"
        if not self._deadline(batch, now) > now:
            self.counters["expired"] += 1
            return "expired"
        if decided.is_stale(batch[0], batch[4], batch[1]):
            self.counters["stale"] += 1
            self._acks.append((replica, key))
            return "stale"
        return None

    def _conflicts(self, batch, count, digest):
        ranges = self._ranges.get(batch[0])
        return ranges is not None and ranges.check(batch[1], count, digest) == "conflict"

    def _remember(self, batch, count, digest):
        self._decided.add((batch[0], batch[1]), batch[4])
        ranges = self._ranges.get(batch[0])
        if ranges is None:
            ranges = self._ranges[batch[0]] = IdRanges(self._window, floors=False)
        if ranges.check(batch[1], count, digest) == "new":
            ranges.add(batch[1], count, digest)



class _FirstAcceptable(_Voter):
    """
    Deliver the first full copy of each batch that L{_refusal} accepts.

    Replicas may send only the digest of a batch when others are designated
    to send it in full; a batch of which only digests came is fetched, after
    L{FETCH_DELAY}, from the replicas that sent them.
    """

    def __init__(self, memory_window=DEFAULT_WINDOW, memory=None, max_ttl=None):
        super().__init__(memory_window, memory, max_ttl)
        self._awaiting = {}
        self.fetch_ready = False

    def _refusal(self, batch):
        return None

    def forget_replica(self, replica):
        """
        Nothing to forget: every copy is done with as soon as it is offered.
        """

    # Every copy is done with as soon as it is offered: the subscriber returns
    # its credit at once instead of asking L{release}.
    holds_copies = False

    def offer(self, replica, batches, now):
        decided_ids = self._decided
        acks = self._acks
        counters = self.counters
        decided = []
        for batch in batches:
            key = (batch[0], batch[1])
            if key in decided_ids:
                # the common case: a later copy of what another replica sent
                counters["duplicate"] += 1
                acks.append((replica, key))
            else:
                self._take(replica, batch, now, decided)
        counters["delivered"] += len(decided)
        return decided

    def _take(self, replica, batch, now, decided):
        if self._screen(replica, batch, now) is not None:
            return
        key = (batch[0], batch[1])
        if not batch[5]:
            awaiting = self._awaiting.get(key)
            if awaiting is None:
                if len(self._awaiting) >= MAX_WANTED:
                    self.count("fetch-backlog")
                    return
                self._awaiting[key] = [now + FETCH_DELAY, [replica], self._deadline(batch, now)]
            elif replica not in awaiting[1]:
                awaiting[1].append(replica)
            return
        reason = self._refusal(batch)
        if reason is not None:
            self.count(f"{reason}:replica-{replica}")
            return
        # the first acceptable copy is the batch: its id range is all that
        # can conflict with another, so no digest is needed
        count = credit_cost(batch)
        ranges = self._ranges.get(batch[0])
        if ranges is None:
            ranges = self._ranges[batch[0]] = IdRanges(self._window, floors=False)
        verdict = ranges.check(batch[1], count, b"")
        if verdict == "conflict":
            self.count(f"overlapping-ids:replica-{replica}")
            return
        if self._awaiting:
            self._awaiting.pop(key, None)
        self._decided.add(key, batch[4])
        if verdict == "new":
            ranges.add(batch[1], count, b"")
        decided.append(batch)

    def offer_fetched(self, replica, batches, now):
        decided = []
        for batch in batches:
            if (batch[0], batch[1]) not in self._awaiting or not batch[5]:
                self.count("late-fetch")
                continue
            self._take(replica, batch, now, decided)
        self.counters["delivered"] += len(decided)
        return decided

    def wanted(self, now):
        """
        Return C{(key, replicas)} for each batch of which only digests came
        for L{FETCH_DELAY}; asked again every L{REFETCH_INTERVAL}.
        """
        self.fetch_ready = False
        due = []
        for key, awaiting in self._awaiting.items():
            if awaiting[0] <= now:
                due.append((key, awaiting[1]))
                awaiting[0] = now + REFETCH_INTERVAL
        return due

    def expire(self, now):
        """
        Forget batches awaited in full whose deadline passed, counting each.
        """
        awaiting = self._awaiting
        for key in [k for k, a in awaiting.items() if not a[2] > now]:
            del awaiting[key]
            self.counters["expired"] += 1


@implementer(IVoter)
class FirstCopyVoter(_FirstAcceptable):
    """
    CFT: the first copy of each batch wins and later copies are dropped.

    Replicas are trusted not to lie in CFT mode, so any one copy is the batch.
    """

    name = "first-copy"

    def __init__(self, faults=0, memory_window=DEFAULT_WINDOW, memory=None, max_ttl=None, **context):
        """
        @param context: what other voters need (scheme, keys, channel,
            replicas, credit window) and this one does not.
        """
        super().__init__(memory_window, memory, max_ttl)


@implementer(IVoter)
class SignatureVoter(_FirstAcceptable):
    """
    BFT with a subscriber-verifiable scheme (PKS, PKE): the first copy whose
    signature verifies is the batch, so one correct replica suffices.
    """

    name = "signature"

    def __init__(self, faults=0, memory_window=DEFAULT_WINDOW, scheme=None, keys=None, channel="",
                 memory=None, max_ttl=None, **context):
        super().__init__(memory_window, memory, max_ttl)
        if scheme is None or not scheme.subscriber_verifiable:
            raise ValueError("the signature voter needs a subscriber-verifiable scheme")
        self._check = scheme.check_delivered
        self._keys = keys
        self._channel = channel

    def _refusal(self, batch):
        return self._check(self._keys, self._channel, batch)


class _Pending:
    """
    The copies of one undecided batch.

    @ivar votes: digest -> replicas that vouched for it.
    @ivar fulls: digest -> a full copy with that digest.
    @ivar costs: replica -> C{(events, bytes)} of credit its copy holds
        (fetched copies hold none).
    @ivar voters: every replica that vouched for any digest of it.
    """

    __slots__ = ("publisher", "votes", "fulls", "costs", "voters", "deadline", "size")

    def __init__(self, publisher, deadline):
        self.publisher = publisher
        self.votes = {}
        self.fulls = {}
        self.costs = {}
        self.voters = set()
        self.deadline = deadline
        self.size = 0


@implementer(IVoter)
class MatchingCopiesVoter(_Voter):
    """
    BFT: a batch is delivered once f+1 replicas vouched for the same digest
    of it (publisher, ids, timestamp, TTL, urgency, payload and proof) and a
    full copy with that digest is at hand.  f liars can never agree on a
    forgery alone, and a withheld copy is made up for by correct replicas.

    Replicas send full copies of a batch from f+1 designated replicas and
    only digests from the others (PBFT's reply optimisation).  When f+1
    digests agree and no full copy came (a designated replica lied, crashed
    or is slow), L{wanted} names the batch and the replicas that vouched for
    it, and the subscriber fetches it from them (L{offer_fetched}).

    Pending memory is bounded in batches and bytes, shared fairly.  Each
    replica's copies are bounded by the credit the subscriber gave it
    (C{window}); when its undecided copies hold three quarters of that, the
    oldest batches of the publishers holding the most of them are evicted
    until half is free, so a publisher that sends each replica different
    batches (none can ever be decided) pushes out its own and the replica's
    stream keeps flowing.  Each publisher may also hold at most its share of
    all undecided batches.  An evicted batch is counted and its key
    remembered: a later copy of it makes the subscriber ask every replica
    for it again instead of leaving it one vote short.
    """

    name = "f-plus-one"
    holds_copies = True

    def __init__(self, faults=1, memory_window=DEFAULT_WINDOW, scheme=None, keys=None, channel="",
                 replicas=None, max_pending=DEFAULT_MAX_PENDING,
                 max_pending_bytes=DEFAULT_MAX_PENDING_BYTES, publishers=1, memory=None,
                 max_ttl=None, window=None, **context):
        """
        @param publishers: how many publishers the channel has, for their
            fair shares of pending memory.
        @param window: C{(events, bytes)}, the credit each replica is given,
            or C{None} when copies are not credited.
        """
        super().__init__(memory_window, memory, max_ttl)
        self.window = window
        self._held = {}
        self.fetch_ready = False
        self.needed = faults + 1
        self.replicas = replicas or 3 * faults + 1
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        publishers = max(1, publishers)
        self.publisher_share = max(MIN_PUBLISHER_SHARE, max_pending // publishers)
        self.publisher_share_bytes = max_pending_bytes // publishers
        self.pending_bytes = 0
        self._pending = {}
        self._by_publisher = {}
        self._evicted = {}
        self._wanted = {}
        self._check = (
            scheme.check_delivered if scheme is not None and scheme.subscriber_verifiable else None
        )
        self._keys = keys
        self._channel = channel

    @property
    def pending(self):
        return len(self._pending)

    def offer(self, replica, batches, now, costs=None):
        """
        @param costs: C{(events, bytes)} of credit each batch used, when the
            caller counted them already.
        """
        decided_ids = self._decided
        acks = self._acks
        counters = self.counters
        released = self._released.get(replica)
        if released is None:
            released = self._released[replica] = [0, 0]
        decided = []
        for position, batch in enumerate(batches):
            cost = costs[position] if costs is not None else (credit_cost(batch), batch_bytes(batch))
            key = (batch[0], batch[1])
            if key in decided_ids:
                # the common case: a copy beyond the f+1 that decided it
                counters["duplicate"] += 1
                acks.append((replica, key))
                released[0] += cost[0]
                released[1] += cost[1]
            else:
                self._vote(replica, batch, key, cost, now, decided)
        counters["delivered"] += len(decided)
        return decided

    def offer_fetched(self, replica, batches, now):
        """
        Take full copies replica C{replica} sent in answer to a fetch; only
        batches that were asked for count.
        """
        decided = []
        for batch in batches:
            key = (batch[0], batch[1])
            if key not in self._wanted or not batch[5]:
                self.count("late-fetch" if key in self._decided else f"unasked:replica-{replica}")
                continue
            if self._screen(replica, batch, now) is None:
                self._vote(replica, batch, key, None, now, decided)
        self.counters["delivered"] += len(decided)
        return decided

    def _vote(self, replica, batch, key, cost, now, decided):
        """
        Count one copy not yet known to be decided; C{cost} is the credit it
        holds, or C{None} for a fetched copy, which holds none.
        """
        if cost is None:
            events = nbytes = 0
            size = batch_bytes(batch)
        else:
            events, nbytes = cost
            size = nbytes
        deadline = self._deadline(batch, now)
        if not deadline > now:
            self.counters["expired"] += 1
            self._credit(replica, events, nbytes)
            return
        if self._decided.is_stale(batch[0], batch[4], batch[1]):
            self.counters["stale"] += 1
            self._acks.append((replica, key))
            self._credit(replica, events, nbytes)
            return
        if batch[5]:
            if self._check is not None:
                reason = self._check(self._keys, self._channel, batch)
                if reason is not None:
                    self.count(f"{reason}:replica-{replica}")
                    self._credit(replica, events, nbytes)
                    return
            digest = batch_digest(batch)
            if self._conflicts(batch, credit_cost(batch), digest):
                self.count(f"overlapping-ids:replica-{replica}")
                self._credit(replica, events, nbytes)
                return
            full = batch
        else:
            digest = batch[6]
            if len(digest) != 32:
                self.count(f"malformed-digest:replica-{replica}")
                self._credit(replica, events, nbytes)
                return
            full = None
        pending = self._pending
        entry = pending.get(key)
        if entry is None:
            entry = self._open(key, batch[0], deadline, now)
        elif replica in entry.voters:
            voters = entry.votes.get(digest)
            if full is not None and voters is not None and replica in voters and digest not in entry.fulls:
                # the full copy of a digest this replica vouched for: a fetch answered
                entry.fulls[digest] = full
                self._grow(entry, size)
                self._credit(replica, events, nbytes)
                self._maybe_decide(key, entry, digest, now, decided)
                return
            self.count(f"repeated:replica-{replica}")
            self._credit(replica, events, nbytes)
            return
        entry.voters.add(replica)
        voters = entry.votes.get(digest)
        if voters is None:
            voters = entry.votes[digest] = []
        voters.append(replica)
        if cost is not None:
            entry.costs[replica] = cost
            held = self._held.get(replica)
            if held is None:
                held = self._held[replica] = [0, 0, {}]
            held[0] += events
            held[1] += nbytes
            held[2][key] = None
        if full is not None and digest not in entry.fulls:
            entry.fulls[digest] = full
            self._grow(entry, size)
        else:
            self._grow(entry, 64)
        if len(voters) >= self.needed:
            self._maybe_decide(key, entry, digest, now, decided)
        if key in pending:
            share = self._by_publisher[entry.publisher]
            if (
                len(share[0]) > self.publisher_share
                or share[1] > self.publisher_share_bytes
                or len(pending) > self.max_pending
                or self.pending_bytes > self.max_pending_bytes
            ):
                self._bound(key)
            window = self.window
            if cost is not None and window is not None and (
                held[0] * 4 >= window[0] * 3 or held[1] * 4 >= window[1] * 3
            ):
                self._relieve(replica)

    def _open(self, key, publisher, deadline, now):
        entry = self._pending[key] = _Pending(publisher, deadline)
        share = self._by_publisher.get(publisher)
        if share is None:
            share = self._by_publisher[publisher] = [{}, 0]
        share[0][key] = None
        if self._evicted.pop(key, None) is not None:
            # a copy of a batch evicted earlier: ask everyone for it again
            self.count("refetched")
            self._want(key, None, now, now)
        return entry

    def _grow(self, entry, nbytes):
        entry.size += nbytes
        self.pending_bytes += nbytes
        self._by_publisher[entry.publisher][1] += nbytes

    def _maybe_decide(self, key, entry, digest, now, decided):
        voters = entry.votes[digest]
        if len(voters) < self.needed:
            return
        winner = entry.fulls.get(digest)
        if winner is None:
            self._want(key, voters, now, now + FETCH_DELAY)
            return
        self._close(key, entry, winning=digest)
        if not self._deadline(winner, now) > now:
            self.counters["expired"] += 1
            return
        self._remember(winner, credit_cost(winner), digest)
        decided.append(winner)

    def _want(self, key, replicas, now, due):
        wanted = self._wanted
        if key in wanted:
            return
        if len(wanted) >= MAX_WANTED:
            self.count("fetch-backlog")
            return
        wanted[key] = [due, list(replicas) if replicas is not None else None]
        if due <= now:
            self.fetch_ready = True

    def wanted(self, now):
        """
        Return C{(key, replicas)} for each batch to fetch now: C{replicas}
        are those that vouched for its digest, or C{None} for all.  A batch
        still undecided is asked for again every L{REFETCH_INTERVAL}.
        """
        self.fetch_ready = False
        due = []
        for key, want in self._wanted.items():
            if want[0] <= now:
                entry = self._pending.get(key)
                if want[1] is not None and entry is not None:
                    voters = [r for d, v in entry.votes.items() if len(v) >= self.needed for r in v]
                    want[1] = voters or want[1]
                due.append((key, want[1]))
                want[0] = now + REFETCH_INTERVAL
        return due

    def _close(self, key, entry, winning=None, reason=None):
        """
        Forget pending C{entry}: its copies' credit goes back, its digests
        that lost count as mismatches.
        """
        del self._pending[key]
        self._wanted.pop(key, None)
        share = self._by_publisher[entry.publisher]
        del share[0][key]
        share[1] -= entry.size
        if not share[0]:
            del self._by_publisher[entry.publisher]
        self.pending_bytes -= entry.size
        for replica, (events, nbytes) in entry.costs.items():
            self._credit(replica, events, nbytes)
            self._unhold(replica, key, events, nbytes)
        if winning is not None:
            for variant, voters in entry.votes.items():
                if variant != winning:
                    for replica in voters:
                        self.count(f"mismatch:replica-{replica}")
        if reason is not None:
            self.count(reason)

    def _evict(self, key, reason):
        entry = self._pending[key]
        self._close(key, entry, reason=reason)
        dropped = self._dropped
        for voters in entry.votes.values():
            for replica in voters:
                dropped.append((replica, key))
        evicted = self._evicted
        evicted[key] = entry.deadline
        if len(evicted) > EVICTED_WINDOW:
            del evicted[next(iter(evicted))]

    def _unhold(self, replica, key, events, nbytes):
        held = self._held[replica]
        held[0] -= events
        held[1] -= nbytes
        del held[2][key]

    def _relieve(self, replica):
        """
        When C{replica}'s undecided copies hold three quarters of its window,
        evict the oldest batches of the publishers holding the most of them
        until half of the window is free.
        """
        window = self.window
        held = self._held.get(replica)
        if window is None or held is None:
            return
        if held[0] * 4 < window[0] * 3 and held[1] * 4 < window[1] * 3:
            return
        pending = self._pending
        wanted = self._wanted
        # batches being fetched are about to be decided: their credit comes back then
        keys = [key for key in held[2] if key not in wanted]
        shares = {}
        for key in keys:
            publisher = pending[key].publisher
            shares[publisher] = shares.get(publisher, 0) + 1
        for publisher in sorted(shares, key=shares.get, reverse=True):
            for key in keys:
                if held[0] * 2 <= window[0] and held[1] * 2 <= window[1]:
                    return
                entry = pending.get(key)
                if entry is not None and entry.publisher == publisher:
                    self._evict(key, "evicted:replica-window")

    def _bound(self, key):
        """
        Evict the oldest undecided batches of the publisher of C{key} while
        it is over its share, then the oldest of all while the voter is over
        its bounds.
        """
        entry = self._pending.get(key)
        if entry is not None:
            share = self._by_publisher[entry.publisher]
            while len(share[0]) > self.publisher_share or (
                share[1] > self.publisher_share_bytes and len(share[0]) > 1
            ):
                self._evict(next(iter(share[0])), "evicted:publisher-share")
                share = self._by_publisher.get(entry.publisher)
                if share is None:
                    break
        pending = self._pending
        while pending and (
            len(pending) > self.max_pending or self.pending_bytes > self.max_pending_bytes
        ):
            self._evict(next(iter(pending)), "evicted:full")

    def forget_replica(self, replica):
        """
        Drop the copies of a replica whose link went down: it sends what the
        subscriber did not acknowledge again when it is back.
        """
        for key, entry in list(self._pending.items()):
            if replica not in entry.voters:
                continue
            entry.voters.discard(replica)
            cost = entry.costs.pop(replica, None)
            if cost is not None:
                self._unhold(replica, key, *cost)
            for digest, voters in list(entry.votes.items()):
                if replica in voters:
                    voters.remove(replica)
                    if not voters:
                        del entry.votes[digest]
                        entry.fulls.pop(digest, None)
            if not entry.votes:
                self._close(key, entry)
                continue
            votes = sum(len(v) for v in entry.votes.values())
            size = sum(map(batch_bytes, entry.fulls.values())) + 64 * max(0, votes - len(entry.fulls))
            self._grow(entry, size - entry.size)

    def expire(self, now):
        """
        Drop pending batches whose deadline passed, counting each.
        """
        for key, entry in list(self._pending.items()):
            if not entry.deadline > now:
                self._close(key, entry, reason="expired")
        evicted = self._evicted
        for key in [k for k, deadline in evicted.items() if not deadline > now]:
            del evicted[key]

    def lag(self):
        """
        Batches waiting on each replica's word: a withholding replica shows
        as the one never among them.
        """
        lag = {}
        for entry in self._pending.values():
            for voters in entry.votes.values():
                for replica in voters:
                    lag[replica] = lag.get(replica, 0) + 1
        return lag


@implementer(IPlugin, IVoterFactory)
@attrs.frozen
class VoterFactory:
    """
    A named maker of voters: C{voter} is called with the keyword arguments
    of L{IVoterFactory.__call__}, once per channel a subscriber reads.
    """

    name: str
    voter: type

    def __call__(self, faults=0, **context):
        return self.voter(faults=faults, **context)


first_copy = VoterFactory(FirstCopyVoter.name, FirstCopyVoter)
f_plus_one = VoterFactory(MatchingCopiesVoter.name, MatchingCopiesVoter)
signature = VoterFactory(SignatureVoter.name, SignatureVoter)
