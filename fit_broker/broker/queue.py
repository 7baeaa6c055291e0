"""
A subscriber's bounded output queue with urgency levels, TTL and
acknowledgements.
"""

from collections import deque

from fit_broker.dedup import RecentIds
from fit_broker.units import BATCH_OVERHEAD, MAX_CREDIT_BYTES, MAX_CREDIT_EVENTS

# Entry fields: a queue entry is a list, cheaper than an object on the hot path.
COUNT, OUT, FULL, SIZE, STATE = range(5)
QUEUED, SENT, GONE = 0, 1, 2

# Acknowledgements for batches this replica has not queued yet (it lags): remembered
# so that the batch is dropped when it arrives instead of being sent later.
ACKED_AHEAD_WINDOW = 8192

# What every subscriber queue counts, in events.
QUEUE_COUNTERS = ("enqueued", "delivered", "expired", "overflowed", "skipped", "resent", "dropped-by-voter")


class BoundedQueue:
    """
    What a subscriber's queue, ordered or not, bounds and counts: the events
    and bytes waiting (at most C{capacity} and C{max_bytes} before overflow
    discards), those sent and not acknowledged (at most the credit a
    subscriber may hold), and what became of them (L{QUEUE_COUNTERS}).
    """

    __slots__ = (
        "capacity", "max_bytes", "drop_oldest", "size", "bytes", "counters",
        "_index", "_unacked", "unacked_events", "unacked_bytes",
    )

    def __init__(self, capacity, overflow="drop-oldest", max_bytes=None):
        self.capacity = capacity
        self.max_bytes = max_bytes if max_bytes is not None else 1 << 62
        self.drop_oldest = overflow == "drop-oldest"
        self.size = 0
        self.bytes = 0
        self.unacked_events = 0
        self.unacked_bytes = 0
        self._index = {}
        self._unacked = {}
        self.counters = dict.fromkeys(QUEUE_COUNTERS, 0)

    def __len__(self):
        return self.size

    @property
    def unacked(self):
        return len(self._unacked)

    def _over_bounds(self):
        return self.size > self.capacity or self.bytes > self.max_bytes

    def _over_credit(self):
        return self.unacked_events > MAX_CREDIT_EVENTS or self.unacked_bytes > MAX_CREDIT_BYTES

    def _requeued(self, events):
        """
        Count what was sent and not acknowledged as waiting again, C{events}
        of it as resent.
        """
        self.size += self.unacked_events
        self.bytes += self.unacked_bytes
        self.unacked_events = self.unacked_bytes = 0
        self.counters["resent"] += events

    def _cleared(self):
        """
        Forget every entry, waiting or unacknowledged, counting their events
        as skipped; return them.
        """
        skipped = self.size + self.unacked_events
        self._index.clear()
        self._unacked.clear()
        self.size = self.bytes = self.unacked_events = self.unacked_bytes = 0
        self.counters["skipped"] += skipped
        return skipped


class OutputQueue(BoundedQueue):
    """
    Batches waiting for one subscriber of one channel, bounded in events and
    in bytes, and the batches sent to it that it has not acknowledged yet.

    Higher urgency levels leave first; within a level, arrival order.  When
    the queue holds more than C{capacity} events or C{max_bytes} bytes,
    C{drop-oldest} discards the oldest batches of the least urgent level
    present (so an alarm outlives routine traffic) and C{drop-newest}
    discards the arriving ones.  Expired batches are dropped when they reach
    the head of their level and by L{expire}.  Discards are whole publisher
    batches, and every discarded event is counted.

    A batch taken for sending stays here, unacknowledged, until the
    subscriber acknowledges it (L{ack}; only then is it counted as
    delivered), its TTL passes, or the subscriber comes back and it is queued
    again (L{requeue_unacked}).  The full batch is kept even when the
    subscriber was sent its digest form, so that it can be fetched
    (L{lookup}).

    Entries come in as C{(count, outgoing batch, full batch, bytes)}.
    """

    __slots__ = ("levels", "_acked_ahead")

    def __init__(self, capacity, urgency_levels, overflow="drop-oldest", max_bytes=None):
        super().__init__(capacity, overflow, max_bytes)
        self.levels = [deque() for _ in range(urgency_levels)]
        self._acked_ahead = RecentIds(ACKED_AHEAD_WINDOW, floors=False)
        self.counters["acked-ahead"] = 0

    def forget_acked_ahead(self):
        """
        Forget acknowledgements that came before their batch, so that such
        batches are queued when they come (the subscriber asks for them again).
        """
        self._acked_ahead = RecentIds(ACKED_AHEAD_WINDOW, floors=False)

    def extend(self, entries):
        """
        Append C{(count, outgoing, full, bytes)} entries, their urgency
        already checked in range.
        """
        levels = self.levels
        index = self._index
        acked_ahead = self._acked_ahead
        added = []
        events = 0
        size = 0
        for count, out, full, nbytes in entries:
            key = (out[0], out[1])
            if key in index:
                continue
            if key in acked_ahead:
                self.counters["acked-ahead"] += count
                continue
            entry = [count, out, full, nbytes, QUEUED]
            index[key] = entry
            levels[out[4]].append(entry)
            added.append(entry)
            events += count
            size += nbytes
        self.size += events
        self.bytes += size
        self.counters["enqueued"] += events
        if self._over_bounds():
            self._overflow(added)

    def _full(self, dropped, dropped_bytes):
        return self.size - dropped > self.capacity or self.bytes - dropped_bytes > self.max_bytes

    def _overflow(self, arrived):
        dropped = dropped_bytes = 0
        index = self._index
        if self.drop_oldest:
            for level in self.levels:
                while level and self._full(dropped, dropped_bytes):
                    entry = level.popleft()
                    if entry[STATE] != QUEUED:
                        continue
                    entry[STATE] = GONE
                    del index[(entry[OUT][0], entry[OUT][1])]
                    dropped += entry[COUNT]
                    dropped_bytes += entry[SIZE]
                if not self._full(dropped, dropped_bytes):
                    break
        else:
            for entry in reversed(arrived):
                if not self._full(dropped, dropped_bytes):
                    break
                level = self.levels[entry[OUT][4]]
                if level and level[-1] is entry:
                    level.pop()
                entry[STATE] = GONE
                del index[(entry[OUT][0], entry[OUT][1])]
                dropped += entry[COUNT]
                dropped_bytes += entry[SIZE]
        self.size -= dropped
        self.bytes -= dropped_bytes
        self.counters["overflowed"] += dropped

    def take(self, count, now, max_bytes=None):
        """
        Move unexpired batches, most urgent first, to the unacknowledged
        ones and return their outgoing forms: at least one batch and at most
        C{count} events and C{max_bytes} bytes (of outgoing forms), unless
        the first batch alone holds more.
        """
        if max_bytes is None:
            max_bytes = 1 << 62
        taken = []
        events = expired = 0
        taken_bytes = expired_bytes = sent_bytes = 0
        unacked = self._unacked
        index = self._index
        full = False
        for level in reversed(self.levels):
            while level:
                entry = level[0]
                if entry[STATE] != QUEUED:
                    level.popleft()
                    continue
                out = entry[OUT]
                if not out[2] + out[3] > now:
                    level.popleft()
                    entry[STATE] = GONE
                    del index[(out[0], out[1])]
                    expired += entry[COUNT]
                    expired_bytes += entry[SIZE]
                    continue
                cost = len(out[5]) + len(out[6]) + BATCH_OVERHEAD
                if taken and (events + entry[COUNT] > count or sent_bytes + cost > max_bytes):
                    full = True
                    break
                level.popleft()
                entry[STATE] = SENT
                unacked[(out[0], out[1])] = entry
                taken.append(out)
                events += entry[COUNT]
                taken_bytes += entry[SIZE]
                sent_bytes += cost
                if events >= count or sent_bytes >= max_bytes:
                    full = True
                    break
            if full:
                break
        self.size -= events + expired
        self.bytes -= taken_bytes + expired_bytes
        self.unacked_events += events
        self.unacked_bytes += taken_bytes
        if expired:
            self.counters["expired"] += expired
        if self._over_credit():
            self._overflow_unacked()
        return taken

    def _overflow_unacked(self):
        """
        Forget the oldest sent batches while those not acknowledged exceed
        the most credit a subscriber may hold, counting them as overflowed: a
        correct subscriber acknowledges before it returns credit, and one that
        does not cannot make a replica hold more.
        """
        unacked = self._unacked
        index = self._index
        dropped = 0
        while unacked and self._over_credit():
            key = next(iter(unacked))
            entry = unacked.pop(key)
            del index[key]
            entry[STATE] = GONE
            self.unacked_events -= entry[COUNT]
            self.unacked_bytes -= entry[SIZE]
            dropped += entry[COUNT]
        self.counters["overflowed"] += dropped

    def ack(self, keys, delivered=True):
        """
        The subscriber holds the batches of C{keys} (C{(publisher, first_id)}
        pairs): forget them, sent or still queued, and count them delivered.
        A key not here yet is remembered so that its batch, when this
        replica receives it late, is not sent at all.  With C{delivered}
        false, the subscriber's voter gave these batches up undecided (no
        other replica vouched for them in time): forget them, counted as
        C{dropped-by-voter}.

        @return: the events acknowledged.
        """
        index = self._index
        acked = 0
        for key in keys:
            entry = index.pop(key, None)
            if entry is None:
                if delivered:
                    self._acked_ahead.add(key, 0)
                continue
            acked += entry[COUNT]
            if entry[STATE] == SENT:
                del self._unacked[key]
                self.unacked_events -= entry[COUNT]
                self.unacked_bytes -= entry[SIZE]
            else:
                self.size -= entry[COUNT]
                self.bytes -= entry[SIZE]
            entry[STATE] = GONE
        self.counters["delivered" if delivered else "dropped-by-voter"] += acked
        return acked

    def lookup(self, key):
        """
        Return the full batch of C{key} if it waits here or was sent and
        not acknowledged, else C{None}.
        """
        entry = self._index.get(key)
        return None if entry is None else entry[FULL]

    def requeue_unacked(self):
        """
        Put every sent, unacknowledged batch back at the head of its level,
        in the order it was sent (the subscriber reconnected and may not
        have them).

        @return: the events queued again.
        """
        if not self._unacked:
            return 0
        levels = self.levels
        events = 0
        for entry in reversed(list(self._unacked.values())):
            entry[STATE] = QUEUED
            levels[entry[OUT][4]].appendleft(entry)
            events += entry[COUNT]
        self._unacked.clear()
        self._requeued(events)
        if self._over_bounds():
            self._overflow(())
        return events

    def expire(self, now):
        """
        Drop expired batches from the head of every level and among the
        unacknowledged ones; return the events dropped.

        Queued batches behind a longer-lived head are caught when they reach it.
        """
        expired = expired_bytes = 0
        index = self._index
        for level in self.levels:
            while level:
                entry = level[0]
                if entry[STATE] != QUEUED:
                    level.popleft()
                    continue
                out = entry[OUT]
                if out[2] + out[3] > now:
                    break
                level.popleft()
                entry[STATE] = GONE
                del index[(out[0], out[1])]
                expired += entry[COUNT]
                expired_bytes += entry[SIZE]
        self.size -= expired
        self.bytes -= expired_bytes
        unacked = self._unacked
        if unacked:
            gone = [key for key, entry in unacked.items() if not entry[OUT][2] + entry[OUT][3] > now]
            for key in gone:
                entry = unacked.pop(key)
                del index[key]
                entry[STATE] = GONE
                expired += entry[COUNT]
                self.unacked_events -= entry[COUNT]
                self.unacked_bytes -= entry[SIZE]
        self.counters["expired"] += expired
        return expired

    def clear(self):
        """
        Skip every waiting batch (a subscriber asked to start afresh),
        counting their events as skipped.

        @return: the events skipped.
        """
        for level in self.levels:
            for entry in level:
                entry[STATE] = GONE
            level.clear()
        for entry in self._unacked.values():
            entry[STATE] = GONE
        return self._cleared()
