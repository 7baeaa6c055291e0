"""
A subscriber's bounded output queue with urgency levels and TTL.
"""

from collections import deque


class OutputQueue:
    """
    Events waiting for one subscriber of one channel.

    Higher urgency levels leave first; within a level, arrival order.  When
    the queue holds C{capacity} events, C{drop-oldest} discards the oldest
    event of the least urgent level present (so an alarm outlives routine
    traffic) and C{drop-newest} discards the arriving event.  Expired events
    are dropped when they reach the head of their level and by L{expire}.
    Every discard is counted.
    """

    __slots__ = ("capacity", "drop_oldest", "levels", "size", "counters")

    def __init__(self, capacity, urgency_levels, overflow="drop-oldest"):
        self.capacity = capacity
        self.drop_oldest = overflow == "drop-oldest"
        self.levels = [deque() for _ in range(urgency_levels)]
        self.size = 0
        self.counters = {
            "enqueued": 0,
            "delivered": 0,
            "expired": 0,
            "overflowed": 0,
            "reset": 0,
        }

    def __len__(self):
        return self.size

    def extend(self, events):
        """
        Append accepted events (their urgency already checked in range).
        """
        levels = self.levels
        if len(levels) == 1:
            levels[0].extend(events)
        else:
            for event in events:
                levels[event[4]].append(event)
        added = len(events)
        self.size += added
        self.counters["enqueued"] += added
        excess = self.size - self.capacity
        if excess > 0:
            self._overflow(excess, events)

    def _overflow(self, excess, arrived):
        counters = self.counters
        counters["overflowed"] += excess
        self.size -= excess
        if self.drop_oldest:
            for level in self.levels:
                while excess and level:
                    take = min(excess, len(level))
                    if take == len(level):
                        level.clear()
                    else:
                        for _ in range(take):
                            level.popleft()
                    excess -= take
                if not excess:
                    return
        else:
            # drop the newest: the arriving events, taken back from the ends
            # of their levels, newest first.
            for event in reversed(arrived):
                if not excess:
                    return
                self.levels[event[4]].pop()
                excess -= 1

    def take(self, count, now):
        """
        Remove and return up to C{count} unexpired events, most urgent first.
        """
        taken = []
        expired = 0
        for level in reversed(self.levels):
            while level and len(taken) < count:
                event = level.popleft()
                if event[2] + event[3] <= now:
                    expired += 1
                else:
                    taken.append(event)
            if len(taken) >= count:
                break
        self.size -= len(taken) + expired
        self.counters["delivered"] += len(taken)
        if expired:
            self.counters["expired"] += expired
        return taken

    def expire(self, now):
        """
        Drop expired events from the head of every level; return how many.

        Events behind a longer-lived head are caught when they reach it.
        """
        expired = 0
        for level in self.levels:
            while level and level[0][2] + level[0][3] <= now:
                level.popleft()
                expired += 1
        self.size -= expired
        self.counters["expired"] += expired
        return expired

    def clear(self):
        """
        Forget every waiting event (a subscriber asked to start afresh),
        counting them as reset.
        """
        for level in self.levels:
            level.clear()
        self.counters["reset"] += self.size
        self.size = 0
