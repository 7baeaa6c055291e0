"""
A channel: one row of the control table and the state it carries at a replica.
"""

from fit_broker.broker.queue import OutputQueue
from fit_broker.broker.stream import Stream
from fit_broker.dedup import IdRanges
from fit_broker.errors import Status
from fit_broker.units import batch_bytes, batch_digest, digest_form, full_copy_senders, payload_count


# Batches remembered per publisher and channel: more than a client proxy
# keeps for a replica that is away (4,096 requests), so that every batch it
# sends again on reconnecting is recognised.
DEDUP_WINDOW = 8192


def _identity(batch):
    """
    What tells two batches with the same ids apart, without hashing the
    payload: the proof (a MAC vector or signature commits to the content)
    and the payload's length and ends.  A publisher that crafts a different
    batch with the same identity only has it dropped as a duplicate of its
    first, never delivered beside it.
    """
    payload = batch[5]
    return (len(payload), payload[:32], payload[-32:], batch[6])


class Refused(Exception):
    """
    A request the channel will not carry out, with its status and reason.
    """

    def __init__(self, status, text, reason):
        super().__init__(text)
        self.status = status
        self.text = text
        self.reason = reason


class Channel:
    """
    A channel's replica-side state: who published what, and who waits for it.

    Channels share nothing, so the per-event path takes no global structure.
    An unordered channel applies what it admits at once; an ordered one
    (L{fit_broker.broker.ordered_channel.OrderedChannel}) after the log
    decided it.

    @ivar queues: subscriber name -> L{OutputQueue}.
    @ivar counters: reason -> count, for everything accepted or refused here.
    """

    ordered = False

    def __init__(
        self, spec, scheme, keys=None, max_clock_skew=300.0, dedup_window=DEDUP_WINDOW,
        light_copies=None,
    ):
        """
        @param light_copies: C{(replica index, replicas, full copies)} when
            this replica sends full copies of only some batches and digests
            of the others (BFT), or C{None} to send every batch in full.
        """
        self.spec = spec
        self.light_copies = light_copies
        self.tag = spec.tag
        self.scheme = scheme
        self.keys = keys
        self.max_clock_skew = max_clock_skew
        self.dedup_window = dedup_window
        self.queues = {}
        self.registered = set()
        self._recent = {}
        self.counters = {"accepted": 0, "duplicate": 0, "expired-on-arrival": 0}

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def refuse(self, status, text, reason):
        self.count(f"refused:{reason}")
        return Refused(status, text, reason)

    def check_publisher(self, client):
        if not self.spec.may_publish(client):
            raise self.refuse(
                Status.UNAUTHORIZED,
                f"client {client!r} may not publish to channel {self.tag!r}",
                "unauthorized",
            )

    def check_subscriber(self, client):
        if not self.spec.may_subscribe(client):
            raise self.refuse(
                Status.UNAUTHORIZED,
                f"client {client!r} may not subscribe to channel {self.tag!r}",
                "unauthorized",
            )

    def publish(self, client, batches, now):
        """
        Accept batches from C{client}; return the C{(count, outgoing, full,
        bytes)} entries appended.

        Admission (L{admit}) first, then application: duplicates and
        batches already expired are dropped and counted, and the publish
        still succeeds.  Payloads are never decoded here.
        """
        checked = self.admit(client, batches, now)
        return self.apply(client, checked, now)

    def admit(self, client, batches, now):
        """
        Check a publish as every replica does before anything is applied:
        authorisation, shape, the protection scheme, and ids.  Return
        C{(count, batch, identity, verdict)} for each batch, the verdict
        being L{IdRanges.check}'s against what this channel accepted.

        A request is refused whole (L{Refused}) when a batch is not authentic
        or malformed, so a publisher never has to guess which part was taken.
        A batch whose id range overlaps another batch of the same publisher
        (not the same batch again) is refused: events are identified by
        C{(publisher, event id)}, and two contents for one identity must
        never both be delivered.
        """
        self.check_publisher(client)
        qos = self.spec.qos
        levels = qos.urgency_levels
        max_ttl = qos.ttl
        latest = now + self.max_clock_skew
        ranges = self._ranges(client)
        checked = []
        for index, batch in enumerate(batches):
            publisher, first_id, timestamp, ttl, urgency, payload, _ = batch
            if publisher != client:
                raise self.refuse(
                    Status.BAD_REQUEST,
                    f"batch {index} names publisher {publisher!r}, the connection is {client!r}",
                    "publisher-mismatch",
                )
            count = payload_count(payload)
            if not count:
                raise self.refuse(
                    Status.BAD_REQUEST,
                    f"batch {index}: payload is not a non-empty array of contents",
                    "bad-payload",
                )
            if not 0 <= urgency < levels:
                raise self.refuse(
                    Status.BAD_REQUEST,
                    f"batch {index}: urgency {urgency} outside 0..{levels - 1}",
                    "bad-urgency",
                )
            if not 0 < ttl <= max_ttl:
                raise self.refuse(
                    Status.BAD_REQUEST,
                    f"batch {index}: ttl {ttl} outside (0, {max_ttl}]",
                    "bad-ttl",
                )
            if not timestamp <= latest:
                raise self.refuse(
                    Status.BAD_REQUEST,
                    f"batch {index}: timestamp out of bounds ({timestamp - now:.1f} s ahead)",
                    "timestamp-out-of-bounds",
                )
            reason = self.scheme.check_batch(self.keys, self.tag, client, batch)
            if reason is not None:
                raise self.refuse(
                    Status.AUTH_FAILED,
                    f"batch {index} from {client!r} on {self.tag!r} failed the "
                    f"{self.scheme.name} check: {reason}",
                    reason,
                )
            digest = _identity(batch)
            verdict = ranges.check(first_id, count, digest)
            if verdict == "conflict":
                raise self._overlap(index, client, first_id, count)
            checked.append((count, batch, digest, verdict))
        return checked

    def _ranges(self, client):
        ranges = self._recent.get(client)
        if ranges is None:
            ranges = self._recent[client] = IdRanges(self.dedup_window)
        return ranges

    def apply(self, client, checked, now):
        """
        Append admitted batches (L{admit}) to every subscriber's queue:
        duplicates and batches already expired are dropped and counted.
        """
        ranges = self._ranges(client)
        fresh = []
        duplicates = expired = 0
        several = len(checked) > 1
        for count, batch, digest, verdict in checked:
            first_id = batch[1]
            if several:
                # an earlier batch of this request may have taken these ids
                verdict = ranges.check(first_id, count, digest)
                if verdict == "conflict":
                    raise self._overlap(len(fresh), client, first_id, count)
            if verdict != "new":
                duplicates += count
            elif not batch[2] + batch[3] > now:
                expired += count
            else:
                ranges.add(first_id, count, digest)
                fresh.append((count, self._outgoing(batch), batch, batch_bytes(batch)))
        self._applied(client, fresh, duplicates, expired)
        return fresh

    def _applied(self, client, fresh, duplicates, expired):
        """
        Count what a publish dropped, and queue what it brought.
        """
        if duplicates:
            self.count("duplicate", duplicates)
        if expired:
            self.count("expired-on-arrival", expired)
        self.registered.add(client)
        self.append(fresh)

    def _overlap(self, index, client, first_id, count):
        return self.refuse(
            Status.BAD_REQUEST,
            f"batch {index}: event ids {first_id}..{first_id + count - 1} overlap a different "
            f"batch already accepted from {client!r}; a retry must resend the same batch",
            "overlapping-ids",
        )

    def _outgoing(self, batch):
        """
        Return what subscribers get from this replica for C{batch}: the batch,
        or its digest form when other replicas are designated to send it.
        """
        if self.light_copies is None:
            return batch
        index, replicas, copies = self.light_copies
        start = full_copy_senders(batch[0], batch[1], replicas, copies)
        if (index - start) % replicas < copies:
            return batch
        return digest_form(batch, batch_digest(batch))

    def append(self, entries):
        """
        Put ordered C{(count, outgoing, full, bytes)} entries into every
        subscriber's queue.
        """
        if not entries:
            return
        events = sum(entry[0] for entry in entries)
        self.counters["accepted"] += events
        for queue in self.queues.values():
            queue.extend(entries)

    def subscribe(self, client, resume):
        """
        Return C{(queue, skipped)}: the subscriber's queue, kept from before
        unless C{resume} is false, when what waited in it is skipped and
        counted.
        """
        self.check_subscriber(client)
        queue = self.queues.get(client)
        skipped = 0
        if queue is None:
            qos = self.spec.qos
            queue = self.queues[client] = OutputQueue(
                qos.capacity, qos.urgency_levels, qos.overflow, qos.max_bytes
            )
        elif not resume:
            skipped = queue.clear()
        return queue, skipped

    def unsubscribe(self, client):
        queue = self.queues.pop(client, None)
        if queue is not None:
            queue.clear()
        return queue

    def queue_of(self, client):
        queue = self.queues.get(client)
        if queue is None:
            raise self.refuse(
                Status.NOT_SUBSCRIBED,
                f"client {client!r} is not subscribed to {self.tag!r}",
                "not-subscribed",
            )
        return queue

    def lookup(self, client, key):
        """
        Return the full batch of C{key} for a fetch by C{client}: one that
        waits in its queue or was sent to it and not acknowledged.
        """
        return self.queue_of(client).lookup(key)

    def open_stream(self, client, events, nbytes):
        """
        Start pushing to C{client}: what it was sent and did not
        acknowledge is queued again first.
        """
        queue = self.queue_of(client)
        queue.requeue_unacked()
        return Stream(self.tag, queue, events, nbytes)

    def take(self, client, count, now):
        """
        Pull mode: remove batches of about C{count} events; they count as
        delivered once taken, since a pull has no acknowledgement.
        """
        queue = self.queue_of(client)
        batches = queue.take(count, now)
        queue.ack([(b[0], b[1]) for b in batches])
        return batches

    def expire(self, now):
        for queue in self.queues.values():
            queue.expire(now)

    def snapshot(self, subscriber=None):
        """
        Counters of the channel and of each subscriber's queue (only
        C{subscriber}'s when given).
        """
        return {
            "counters": dict(self.counters),
            "subscribers": {
                name: dict(
                    queue.counters, waiting=len(queue), bytes=queue.bytes,
                    unacknowledged=queue.unacked_events,
                )
                for name, queue in self.queues.items()
                if subscriber is None or name == subscriber
            },
        }
