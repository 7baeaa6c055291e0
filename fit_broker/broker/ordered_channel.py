"""
An ordered channel at a replica: admission before the log, application after.
"""

from collections import OrderedDict

from fit_broker.broker.channel import Channel
from fit_broker.broker.ordered import (
    EXPIRED,
    OrderedQueue,
    OrderedStream,
    batch_ref,
    full_or_digest,
    ref_key,
)
from fit_broker.errors import Status
from fit_broker.units import batch_digest


class OrderedChannel(Channel):
    """
    A channel whose batches are delivered in log order.

    A publish is admitted here (authorisation, shape, the protection scheme,
    ids) and its batches' bodies kept; what goes to the log is a reference
    per batch (L{batch_ref}).  Once the log decides a reference, L{apply}
    gives it its sequence number in every subscriber's queue; whether it
    expired is judged against the decided entry's timestamp, which every
    correct replica agrees on, so all of them queue the same entries.

    @ivar bodies: C{(publisher, first_id) -> (digest, batch)}: the batches
        this replica holds, to send and to serve fetches; bounded in bytes,
        oldest forgotten first (a forgotten body is sent as its digest, and
        subscribers fetch it from another replica).
    """

    ordered = True

    def __init__(self, spec, scheme, keys=None, max_clock_skew=300.0, light_copies=None,
                 max_body_bytes=None):
        super().__init__(spec, scheme, keys, max_clock_skew, light_copies=light_copies)
        self.bodies = OrderedDict()
        self.body_bytes = 0
        self.max_body_bytes = max_body_bytes or max(4 * spec.qos.max_bytes, 64 * 1024 * 1024)
        self.form = full_or_digest(self.bodies, light_copies)
        self.counters.update({"ordered": 0, "tombstoned": 0, "bodies-dropped": 0})

    def admit_refs(self, client, batches, now):
        """
        Admit a publish; return C{(reference, verdict)} for each batch not
        already expired (expired ones are counted, as on unordered channels),
        the verdict saying whether this replica admitted it before.
        """
        checked = self.admit(client, batches, now)
        ranges = self._ranges(client)
        refs = []
        expired = 0
        for count, batch, identity, verdict in checked:
            if not batch[2] + batch[3] > now:
                expired += count
                continue
            if verdict == "new":
                ranges.add(batch[1], count, identity)
            digest = batch_digest(batch)
            self.keep(batch, digest)
            refs.append((batch_ref(self.tag, batch, digest), verdict))
        if expired:
            self.count("expired-on-arrival", expired)
        return refs

    def keep(self, batch, digest):
        """
        Hold C{batch}'s body (from a publisher, or fetched from a peer and
        checked against C{digest}).
        """
        key = (batch[0], batch[1])
        if key in self.bodies:
            return
        size = len(batch[5]) + len(batch[6])
        self.bodies[key] = (digest, batch)
        self.body_bytes += size
        while self.body_bytes > self.max_body_bytes and len(self.bodies) > 1:
            _, (_, old) = self.bodies.popitem(last=False)
            self.body_bytes -= len(old[5]) + len(old[6])
            self.count("bodies-dropped")

    def holds(self, ref):
        held = self.bodies.get(ref_key(ref))
        return held is not None and held[0] == ref[5]

    def body(self, key):
        held = self.bodies.get(key)
        return None if held is None else held[1]

    def apply(self, ref, position, seq, decided_at, queued=True):
        """
        Queue the decided reference C{ref} as sequence number C{seq} for
        every subscriber (unless not C{queued}): a tombstone when its TTL
        had passed at the decided entry's timestamp.  Return the
        subscribers that had acknowledged it already.
        """
        note = "" if ref[6] + ref[7] > decided_at else EXPIRED
        if note:
            self.count("tombstoned", ref[4])
        else:
            self.counters["accepted"] += ref[4]
            self.count("ordered", ref[4])
        if not queued:
            return []
        return [client for client, queue in self.queues.items() if not queue.append(position, seq, ref, note)]

    def subscribe(self, client, resume):
        self.check_subscriber(client)
        queue = self.queues.get(client)
        skipped = 0
        if queue is None:
            queue = self.queues[client] = self.new_queue()
        elif not resume:
            skipped = queue.clear()
        return queue, skipped

    def subscribed(self, client, next_seq):
        """
        The log made C{client} a subscriber, its queue starting at sequence
        number C{next_seq}.
        """
        queue = self.queues.get(client)
        if queue is not None and queue.floor is None:
            queue.floor = next_seq

    def lost_before(self, client, seq, position):
        """
        C{client} resumes at sequence number C{seq}: tell it which numbers
        before this replica's queue it will never get from here.
        """
        queue = self.queues.get(client)
        if queue is None:
            return 0
        lost = queue.lost_before(self.tag, seq, position)
        if lost:
            self.count("lost-claimed", lost)
        return lost

    def forget_queues(self, next_seq):
        """
        This replica restarted with the channel in memory: what it queued
        before is gone; every queue starts empty at C{next_seq}.
        """
        for client in list(self.queues):
            queue = self.queues[client] = self.new_queue()
            queue.floor = next_seq

    def new_queue(self):
        qos = self.spec.qos
        return OrderedQueue(qos.capacity, qos.overflow, qos.max_bytes)

    def take(self, client, count, now):
        raise self.refuse(
            Status.BAD_REQUEST,
            f"channel {self.tag!r} is ordered: subscribe with a stream, pulls are for unordered channels",
            "pull-on-ordered",
        )

    def lookup(self, client, key):
        """
        Return the full batch of C{key} for a fetch by C{client}: one it was
        queued or sent and has not acknowledged.
        """
        queue = self.queue_of(client)
        if not queue.holds(key):
            return None
        return self.body(key)

    def open_stream(self, client, events, nbytes):
        queue = self.queue_of(client)
        queue.requeue_unacked()
        return OrderedStream(self.tag, queue, events, nbytes, self.form)

    def expire(self, now):
        for queue in self.queues.values():
            queue.expire(now)
        bodies = self.bodies
        horizon = now - self.max_clock_skew
        while bodies:
            key, (_, batch) = next(iter(bodies.items()))
            if batch[2] + batch[3] > horizon:
                break
            del bodies[key]
            self.body_bytes -= len(batch[5]) + len(batch[6])
