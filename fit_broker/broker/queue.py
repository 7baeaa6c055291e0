"""
A subscriber's bounded output queue with urgency levels and TTL.
"""

from collections import deque


class OutputQueue:
    """
    Batches waiting for one subscriber of one channel, bounded in events.

    Higher urgency levels leave first; within a level, arrival order.  When
    the queue holds more than C{capacity} events, C{drop-oldest} discards the
    oldest batches of the least urgent level present (so an alarm outlives
    routine traffic) and C{drop-newest} discards the arriving ones.  Expired
    batches are dropped when they reach the head of their level and by
    L{expire}.  Discards are whole publisher batches, and every discarded
    event is counted.

    Entries are C{(count, batch)} pairs of wire batches.
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

    def extend(self, entries, events):
        """
        Append C{(count, batch)} entries holding C{events} events in all,
        their urgency already checked in range.
        """
        levels = self.levels
        for entry in entries:
            levels[entry[1][4]].append(entry)
        self.size += events
        self.counters["enqueued"] += events
        if self.size > self.capacity:
            self._overflow(entries)

    def _overflow(self, arrived):
        dropped = 0
        if self.drop_oldest:
            for level in self.levels:
                while level and self.size - dropped > self.capacity:
                    dropped += level.popleft()[0]
                if self.size - dropped <= self.capacity:
                    break
        else:
            for entry in reversed(arrived):
                if self.size - dropped <= self.capacity:
                    break
                self.levels[entry[1][4]].pop()
                dropped += entry[0]
        self.size -= dropped
        self.counters["overflowed"] += dropped

    def take(self, count, now):
        """
        Remove and return unexpired batches, most urgent first, holding at
        least one and at most C{count} events, unless the first batch alone
        holds more.
        """
        taken = []
        events = expired = 0
        full = False
        for level in reversed(self.levels):
            while level:
                entry = level[0]
                batch = entry[1]
                if batch[2] + batch[3] <= now:
                    level.popleft()
                    expired += entry[0]
                    continue
                if taken and events + entry[0] > count:
                    full = True
                    break
                level.popleft()
                taken.append(batch)
                events += entry[0]
                if events >= count:
                    full = True
                    break
            if full:
                break
        self.size -= events + expired
        self.counters["delivered"] += events
        if expired:
            self.counters["expired"] += expired
        return taken

    def expire(self, now):
        """
        Drop expired batches from the head of every level; return the events dropped.

        Batches behind a longer-lived head are caught when they reach it.
        """
        expired = 0
        for level in self.levels:
            while level and level[0][1][2] + level[0][1][3] <= now:
                expired += level.popleft()[0]
        self.size -= expired
        self.counters["expired"] += expired
        return expired

    def clear(self):
        """
        Forget every waiting batch (a subscriber asked to start afresh),
        counting their events as reset.
        """
        for level in self.levels:
            level.clear()
        self.counters["reset"] += self.size
        self.size = 0
