"""
Voters: how a subscriber combines the copies that replicas send it.

Every voter remembers what it delivered (L{RecentIds}), so nothing is
delivered twice, and checks the TTL itself, so a replica with a wrong clock
cannot make it deliver an expired event.
"""

from zope.interface import implementer

from fit_broker.dedup import RecentIds
from fit_broker.interfaces import IVoter

DEFAULT_WINDOW = 65_536
DEFAULT_MAX_PENDING = 100_000


class _Voter:
    def __init__(self, window):
        self._decided = RecentIds(window)
        self.counters = {"delivered": 0, "duplicate": 0, "stale": 0, "expired": 0}

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def expire(self, now):
        """
        Nothing is pending in voters that decide on the first acceptable copy.
        """


@implementer(IVoter)
class FirstCopyVoter(_Voter):
    """
    CFT: the first copy of each event wins and later copies are dropped.

    Replicas are trusted not to lie in CFT mode, so any one copy is the event.
    """

    name = "first-copy"

    def __init__(self, faults=0, window=DEFAULT_WINDOW, **context):
        """
        @param context: what other voters need (scheme, keys, channel,
            replicas) and this one does not.
        """
        super().__init__(window)

    def offer(self, replica, events, now):
        seen = self._decided
        decided = []
        duplicates = stale = expired = 0
        for event in events:
            key = (event[0], event[1])
            if key in seen:
                duplicates += 1
            elif event[2] + event[3] <= now:
                expired += 1
            elif seen.is_stale(event[0], event[4], event[1]):
                stale += 1
            else:
                seen.add(key, event[4])
                decided.append(event)
        counters = self.counters
        counters["delivered"] += len(decided)
        if duplicates:
            counters["duplicate"] += duplicates
        if stale:
            counters["stale"] += stale
        if expired:
            counters["expired"] += expired
        return decided


@implementer(IVoter)
class SignatureVoter(_Voter):
    """
    BFT with a subscriber-verifiable scheme (PKS, PKE): the first copy whose
    signature verifies is the event, so one correct replica suffices.
    """

    name = "signature"

    def __init__(self, faults=0, window=DEFAULT_WINDOW, scheme=None, keys=None, channel="", **context):
        super().__init__(window)
        if scheme is None or not scheme.subscriber_verifiable:
            raise ValueError("the signature voter needs a subscriber-verifiable scheme")
        self._scheme = scheme
        self._keys = keys
        self._channel = channel

    def offer(self, replica, events, now):
        seen = self._decided
        check = self._scheme.check_event
        keys, channel = self._keys, self._channel
        decided = []
        for event in events:
            key = (event[0], event[1])
            if key in seen:
                self.counters["duplicate"] += 1
            elif event[2] + event[3] <= now:
                self.counters["expired"] += 1
            elif seen.is_stale(event[0], event[4], event[1]):
                self.counters["stale"] += 1
            else:
                reason = check(keys, channel, event)
                if reason is None:
                    seen.add(key, event[4])
                    decided.append(event)
                else:
                    self.count(f"{reason}:replica-{replica}")
        self.counters["delivered"] += len(decided)
        return decided


@implementer(IVoter)
class MatchingCopiesVoter(_Voter):
    """
    BFT: an event is delivered once f+1 replicas sent identical copies
    (same publisher, event id, timestamp, TTL, urgency, content and
    protection).  f liars can never agree on a forgery alone, and a withheld
    copy is made up for by the correct replicas.

    Pending copies are bounded: each replica may have at most
    C{max_pending // n} events waiting on its word alone, so a replica that
    floods bogus events fills only its own quota.  With a subscriber-verifiable
    scheme, copies that fail verification are refused before they count.
    """

    name = "f-plus-one"

    def __init__(self, faults=1, window=DEFAULT_WINDOW, scheme=None, keys=None, channel="",
                 replicas=None, max_pending=DEFAULT_MAX_PENDING):
        super().__init__(window)
        self.needed = faults + 1
        self._pending = {}
        self._owned = {}
        replicas = replicas or 3 * faults + 1
        self.quota = max(1, max_pending // replicas)
        self._check = (
            scheme.check_event if scheme is not None and scheme.subscriber_verifiable else None
        )
        self._keys = keys
        self._channel = channel

    @property
    def pending(self):
        return len(self._pending)

    def offer(self, replica, events, now):
        decided_ids = self._decided
        pending = self._pending
        owned = self._owned
        needed = self.needed
        counters = self.counters
        check = self._check
        decided = []
        for event in events:
            key = (event[0], event[1])
            if key in decided_ids:
                counters["duplicate"] += 1
                continue
            if event[2] + event[3] <= now:
                counters["expired"] += 1
                continue
            if decided_ids.is_stale(event[0], event[4], event[1]):
                counters["stale"] += 1
                continue
            if check is not None:
                reason = check(self._keys, self._channel, event)
                if reason is not None:
                    self.count(f"{reason}:replica-{replica}")
                    continue
            variants = pending.get(key)
            if variants is None:
                if owned.get(replica, 0) >= self.quota:
                    self.count(f"over-quota:replica-{replica}")
                    continue
                pending[key] = {event: {replica}}
                owned[replica] = owned.get(replica, 0) + 1
                if needed == 1:
                    decided.append(self._decide(key, event))
                continue
            if any(replica in voters for voters in variants.values()):
                self.count(f"repeated:replica-{replica}")
                continue
            voters = variants.get(event)
            if voters is None:
                voters = variants[event] = set()
            voters.add(replica)
            owned[replica] = owned.get(replica, 0) + 1
            if len(voters) >= needed:
                decided.append(self._decide(key, event))
        counters["delivered"] += len(decided)
        return decided

    def _decide(self, key, event):
        variants = self._pending.pop(key)
        owned = self._owned
        for variant, voters in variants.items():
            for replica in voters:
                owned[replica] -= 1
                if variant != event:
                    self.count(f"mismatch:replica-{replica}")
        self._decided.add(key, event[4])
        return event

    def expire(self, now):
        """
        Drop pending events whose TTL passed, counting each replica's copies.
        """
        owned = self._owned
        for key, variants in list(self._pending.items()):
            some = next(iter(variants))
            if some[2] + some[3] <= now:
                del self._pending[key]
                self.counters["expired"] += 1
                for voters in variants.values():
                    for replica in voters:
                        owned[replica] -= 1

    def lag(self):
        """
        Copies waiting on each replica's word: a withholding replica shows
        as the one never among them.
        """
        return dict(self._owned)
