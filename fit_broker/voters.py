"""
Voters: how a subscriber combines the copies of batches that replicas send it.

Every voter remembers what it delivered (L{RecentIds}, keyed by the batch's
publisher and first event id), so nothing is delivered twice, and checks the
TTL itself, so a replica with a wrong clock cannot make it deliver an
expired event (a deadline that is not a number counts as passed).  Copies are compared whole, payload and proof included, and
only decided batches are ever decoded.
"""

from zope.interface import implementer

from fit_broker.dedup import RecentIds
from fit_broker.interfaces import IVoter
from fit_broker.units import batch_digest

DEFAULT_WINDOW = 16_384
DEFAULT_MAX_PENDING = 20_000


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


class _FirstAcceptable(_Voter):
    """
    Deliver the first full copy of each batch that L{_refusal} accepts.
    """

    def _refusal(self, batch):
        return None

    def offer(self, replica, batches, now):
        decided_ids = self._decided
        counters = self.counters
        decided = []
        for batch in batches:
            key = (batch[0], batch[1])
            if key in decided_ids:
                counters["duplicate"] += 1
            elif not batch[5]:
                self.count("digest-only")
            elif not batch[2] + batch[3] > now:
                counters["expired"] += 1
            elif decided_ids.is_stale(batch[0], batch[4], batch[1]):
                counters["stale"] += 1
            else:
                reason = self._refusal(batch)
                if reason is None:
                    decided_ids.add(key, batch[4])
                    decided.append(batch)
                else:
                    self.count(f"{reason}:replica-{replica}")
        counters["delivered"] += len(decided)
        return decided


@implementer(IVoter)
class FirstCopyVoter(_FirstAcceptable):
    """
    CFT: the first copy of each batch wins and later copies are dropped.

    Replicas are trusted not to lie in CFT mode, so any one copy is the batch.
    """

    name = "first-copy"

    def __init__(self, faults=0, window=DEFAULT_WINDOW, **context):
        """
        @param context: what other voters need (scheme, keys, channel,
            replicas) and this one does not.
        """
        super().__init__(window)


@implementer(IVoter)
class SignatureVoter(_FirstAcceptable):
    """
    BFT with a subscriber-verifiable scheme (PKS, PKE): the first copy whose
    signature verifies is the batch, so one correct replica suffices.
    """

    name = "signature"

    def __init__(self, faults=0, window=DEFAULT_WINDOW, scheme=None, keys=None, channel="", **context):
        super().__init__(window)
        if scheme is None or not scheme.subscriber_verifiable:
            raise ValueError("the signature voter needs a subscriber-verifiable scheme")
        self._check = scheme.check_delivered
        self._keys = keys
        self._channel = channel

    def _refusal(self, batch):
        return self._check(self._keys, self._channel, batch)


@implementer(IVoter)
class MatchingCopiesVoter(_Voter):
    """
    BFT: a batch is delivered once f+1 replicas vouched for the same digest
    of it (publisher, ids, timestamp, TTL, urgency, payload and proof) and a
    full copy with that digest is at hand.  f liars can never agree on a
    forgery alone, and a withheld copy is made up for by correct replicas.

    Replicas send full copies of a batch from f+1 designated replicas and
    only digests from the others (PBFT's reply optimisation): at least one
    designated replica is correct, so a full copy always arrives, and a
    subscriber reads about half the bytes.

    Pending batches are bounded: each replica may vouch for at most
    C{max_pending // n} undecided batches, so a replica that floods bogus
    batches fills only its own quota.  With a subscriber-verifiable scheme,
    full copies that fail verification are refused before they count.
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
            scheme.check_delivered if scheme is not None and scheme.subscriber_verifiable else None
        )
        self._keys = keys
        self._channel = channel

    @property
    def pending(self):
        return len(self._pending)

    def offer(self, replica, batches, now):
        decided_ids = self._decided
        pending = self._pending
        owned = self._owned
        needed = self.needed
        counters = self.counters
        check = self._check
        decided = []
        for batch in batches:
            key = (batch[0], batch[1])
            if key in decided_ids:
                counters["duplicate"] += 1
                continue
            deadline = batch[2] + batch[3]
            if not deadline > now:
                counters["expired"] += 1
                continue
            if decided_ids.is_stale(batch[0], batch[4], batch[1]):
                counters["stale"] += 1
                continue
            if batch[5]:
                if check is not None:
                    reason = check(self._keys, self._channel, batch)
                    if reason is not None:
                        self.count(f"{reason}:replica-{replica}")
                        continue
                digest = batch_digest(batch)
                full = batch
            else:
                digest = batch[6]
                if len(digest) != 32:
                    self.count(f"malformed-digest:replica-{replica}")
                    continue
                full = None
            entry = pending.get(key)
            if entry is None:
                if owned.get(replica, 0) >= self.quota:
                    self.count(f"over-quota:replica-{replica}")
                    continue
                entry = pending[key] = [{}, {}, deadline]
            else:
                if any(replica in voters for voters in entry[0].values()):
                    self.count(f"repeated:replica-{replica}")
                    continue
                if owned.get(replica, 0) >= self.quota:
                    self.count(f"over-quota:replica-{replica}")
                    continue
                if deadline > entry[2]:
                    entry[2] = deadline
            voters = entry[0].get(digest)
            if voters is None:
                voters = entry[0][digest] = set()
            voters.add(replica)
            owned[replica] = owned.get(replica, 0) + 1
            if full is not None and digest not in entry[1]:
                entry[1][digest] = full
            if len(voters) >= needed:
                winner = entry[1].get(digest)
                if winner is not None:
                    self._decide(key, digest)
                    if not winner[2] + winner[3] > now:
                        counters["expired"] += 1
                    else:
                        decided.append(winner)
        counters["delivered"] += len(decided)
        return decided

    def _decide(self, key, digest):
        votes, fulls, _ = self._pending.pop(key)
        owned = self._owned
        for variant, voters in votes.items():
            for replica in voters:
                owned[replica] -= 1
                if variant != digest:
                    self.count(f"mismatch:replica-{replica}")
        self._decided.add(key, fulls[digest][4])

    def expire(self, now):
        """
        Drop pending batches whose latest claimed deadline passed, counting each.
        """
        owned = self._owned
        for key, (votes, _, deadline) in list(self._pending.items()):
            if not deadline > now:
                del self._pending[key]
                self.counters["expired"] += 1
                for voters in votes.values():
                    for replica in voters:
                        owned[replica] -= 1

    def lag(self):
        """
        Batches waiting on each replica's word: a withholding replica shows
        as the one never among them.
        """
        return dict(self._owned)
