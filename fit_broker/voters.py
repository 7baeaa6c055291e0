"""
Voters: how a subscriber combines the copies that replicas send it.
"""

from zope.interface import implementer

from fit_broker.dedup import RecentIds
from fit_broker.interfaces import IVoter


@implementer(IVoter)
class FirstCopyVoter:
    """
    CFT: the first copy of each event wins and later copies are dropped.

    Replicas are trusted not to lie in CFT mode, so any one copy is the event.
    """

    name = "first-copy"

    def __init__(self, faults=0, window=65_536):
        self._seen = RecentIds(window)
        self.counters = {"delivered": 0, "duplicate": 0, "stale": 0, "expired": 0}

    def offer(self, replica, events, now):
        seen = self._seen
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

    def expire(self, now):
        """
        Nothing is pending: a first copy is decided at once.
        """
