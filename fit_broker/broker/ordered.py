"""
Ordered channels at a replica: what the replicated log decides becomes each
subscriber's gapless sequence of entries.

Publishers send every batch to every replica, so the log orders only small
references to batches (L{batch_ref}), never their contents.  Every correct
replica applies the same decided references in the same order, so the
state in L{ReplicatedState} (positions, each channel's next sequence
number, what was deduplicated, who subscribes) is identical at all of them;
queues and the batches' bodies stay local.
"""

from collections import deque

import msgpack

from fit_broker.broker.queue import ACKED_AHEAD_WINDOW, BoundedQueue
from fit_broker.dedup import IdRanges, RecentIds
from fit_broker.units import (
    BATCH_OVERHEAD,
    MAX_CREDIT_BYTES,
    MAX_CREDIT_EVENTS,
    batch_bytes,
    digest_form,
    entry_cost,
    payload_count,
)

# What the log orders, by their first field.
BATCH = "batch"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
REGISTER = "register"
TABLE = "table"

# Tombstone notes: why an entry's batch will not come from this replica.
EXPIRED = "expired"
OVERFLOW = "overflow"
LOST = "lost"
LOST_PUBLISHER = "~lost"

# Batches remembered per publisher and ordered channel for deduplication:
# part of the replicated state, so every replica forgets alike.
ORDERED_DEDUP_WINDOW = 8192

_MAX_TAG = 256
_MAX_NAME = 256


def batch_ref(tag, batch, digest):
    """
    Return the value the log orders for C{batch} of channel C{tag}: every
    field a replica needs to apply it without the batch itself, all derived
    from the batch, so that correct replicas propose identical values.
    """
    publisher, first_id, timestamp, ttl, urgency, payload, _ = batch
    return (
        BATCH, tag, publisher, first_id, payload_count(payload), digest,
        float(timestamp), float(ttl), urgency, batch_bytes(batch),
    )


def _is_str(value, limit):
    return type(value) is str and 0 < len(value) <= limit


def check_value(value):
    """
    Return C{None} when C{value} has the shape of something the broker
    orders, or what is wrong with it: a leader's proposal holding anything
    else is not voted for.
    """
    if type(value) is not tuple or not value:
        return "not an array"
    kind = value[0]
    if kind == BATCH:
        if len(value) != 10:
            return "batch reference: wrong number of fields"
        _, tag, publisher, first_id, count, digest, timestamp, ttl, urgency, nbytes = value
        if not (_is_str(tag, _MAX_TAG) and _is_str(publisher, _MAX_NAME)):
            return "batch reference: bad channel or publisher"
        if not (type(first_id) is int and type(count) is int and 0 < count <= 65_535):
            return "batch reference: bad ids"
        if not (type(digest) is bytes and len(digest) == 32):
            return "batch reference: bad digest"
        if not (type(timestamp) is float and type(ttl) is float and ttl > 0):
            return "batch reference: bad timestamp or ttl"
        if not (type(urgency) is int and 0 <= urgency < 16 and type(nbytes) is int and nbytes > 0):
            return "batch reference: bad urgency or size"
        return None
    if kind in (SUBSCRIBE, UNSUBSCRIBE, REGISTER):
        if len(value) != 3 or not (_is_str(value[1], _MAX_TAG) and _is_str(value[2], _MAX_NAME)):
            return f"{kind}: expected [kind, channel, client]"
        return None
    if kind == TABLE:
        if (
            len(value) != 4
            or not _is_str(value[1], _MAX_NAME)
            or type(value[2]) is not bytes
            or type(value[3]) is not bytes
            or len(value[2]) > 16384
            or len(value[3]) > 256
        ):
            return "table change: expected [kind, admin, change, signature]"
        return None
    return f"unknown kind {str(kind)[:40]!r}"


def ref_key(ref):
    return (ref[2], ref[3])


def ref_header(ref):
    """
    The digest form of a referenced batch: what a replica sends when it does
    not send the batch itself, or the batch is gone (a tombstone).
    """
    _, _, publisher, first_id, _, digest, timestamp, ttl, urgency, _ = ref
    return (publisher, first_id, timestamp, ttl, urgency, b"", digest)


class ReplicatedState:
    """
    The part of a replica's state that the log determines: identical at
    every correct replica after the same position, so it is what a
    checkpoint certifies and what state transfer installs.

    @ivar position: the log position of the last value applied.
    @ivar instance: the last decided instance applied.
    """

    def __init__(self, ordered_tags=()):
        ordered_tags = tuple(ordered_tags)
        self.position = 0
        self.instance = 0
        self.next_seq = {tag: 1 for tag in ordered_tags}
        self.subscribers = {tag: set() for tag in ordered_tags}
        self.registered = {tag: set() for tag in ordered_tags}
        self._dedup = {tag: {} for tag in ordered_tags}
        # the control table's snapshot (L{fit_broker.control.ControlTable}),
        # kept here by the state machine whenever it changes
        self.table = b""

    def add_channel(self, tag):
        if tag not in self.next_seq:
            self.next_seq[tag] = 1
            self.subscribers[tag] = set()
            self.registered[tag] = set()
            self._dedup[tag] = {}

    def dedup(self, ref):
        """
        Return C{"new"} (and remember it), C{"duplicate"}, C{"conflict"} or
        C{"stale"} for a decided batch reference.
        """
        _, tag, publisher, first_id, count, digest = ref[:6]
        by_publisher = self._dedup[tag]
        ranges = by_publisher.get(publisher)
        if ranges is None:
            ranges = by_publisher[publisher] = IdRanges(ORDERED_DEDUP_WINDOW)
        verdict = ranges.check(first_id, count, digest)
        if verdict == "new":
            ranges.add(first_id, count, digest)
        return verdict

    def snapshot(self):
        """
        Return this state as bytes, the same at every replica that applied
        the same log: sorted, no clock, no local detail.
        """
        channels = []
        for tag in sorted(self.next_seq):
            dedup = [
                (publisher, *ranges.export())
                for publisher, ranges in sorted(self._dedup[tag].items())
            ]
            channels.append(
                (tag, self.next_seq[tag], sorted(self.subscribers[tag]),
                 sorted(self.registered[tag]), dedup)
            )
        return msgpack.packb(
            (1, self.position, self.instance, channels, self.table), use_bin_type=True
        )

    @classmethod
    def restore(cls, data):
        """
        Rebuild the state L{snapshot} returned.

        @raise ValueError: when C{data} is not such a snapshot.
        """
        try:
            version, position, instance, channels, table = msgpack.unpackb(
                data, raw=False, use_list=False, strict_map_key=True
            )
            if version != 1:
                raise ValueError(f"snapshot version {version}")
            state = cls()
            state.position = position
            state.instance = instance
            state.table = table
            for tag, next_seq, subscribers, registered, dedup in channels:
                state.add_channel(tag)
                state.next_seq[tag] = next_seq
                state.subscribers[tag] = set(subscribers)
                state.registered[tag] = set(registered)
                for publisher, floor, top, ranges in dedup:
                    state._dedup[tag][publisher] = IdRanges.restored(
                        ORDERED_DEDUP_WINDOW, (floor, top, ranges)
                    )
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"not a replicated state snapshot: {type(e).__name__}") from None
        return state


# Queue entry fields (a list, cheap on the hot path).
POSITION, SEQ, REF, NOTE, SPAN, COST, SIZE, STATE = range(8)
QUEUED, SENT, GONE = 0, 1, 2


class OrderedQueue(BoundedQueue):
    """
    One subscriber's entries of one ordered channel, in sequence order.

    Nothing is ever left out silently: a batch that overflows the queue or
    expires becomes a tombstone that keeps its sequence number, so the
    subscriber sees why there is a gap.  Adjacent tombstones merge, so they
    never outnumber the batches queued.  Bounds (C{capacity} events,
    C{max_bytes} bytes) count batches, not tombstones.
    """

    def __init__(self, capacity, overflow="drop-oldest", max_bytes=None, floor=None):
        super().__init__(capacity, overflow, max_bytes)
        self.entries = deque()
        # the lowest sequence number this queue holds every entry from (what
        # was not acknowledged), or None when not known
        self.floor = floor
        # batches the subscriber acknowledged before this replica applied them
        # (it lags): not queued when they come, as on unordered channels
        self._acked_ahead = RecentIds(ACKED_AHEAD_WINDOW, floors=False)
        self.counters["acked-ahead"] = 0

    def lost_before(self, tag, seq, position):
        """
        The subscriber needs sequence number C{seq} on: when that lies below
        L{floor}, put a tombstone noted L{LOST} covering C{seq .. floor-1}
        first, so that it can skip them once n-f replicas say the same.
        Return the numbers it covers.
        """
        floor = self.floor
        if floor is None or not seq < floor:
            return 0
        ref = (BATCH, tag, LOST_PUBLISHER, seq, 1, bytes(32), 0.0, 1.0, 0, BATCH_OVERHEAD)
        key = ref_key(ref)
        if key in self._index:
            return 0
        entry = [max(1, position), seq, ref, LOST, floor - seq, 1, BATCH_OVERHEAD, QUEUED]
        self.entries.appendleft(entry)
        self._index[key] = entry
        return floor - seq

    @property
    def waiting(self):
        """
        True when an entry (batch or tombstone) waits to be sent.
        """
        for entry in self.entries:
            if entry[STATE] == QUEUED:
                return True
        return False

    def append(self, position, seq, ref, note=""):
        """
        Add the entry of sequence number C{seq}; with a C{note}, a tombstone.
        Return C{False} when the subscriber acknowledged it already (it got
        it from other replicas before this one applied it), else C{True}.
        """
        key = ref_key(ref)
        if key in self._index:
            return True
        if key in self._acked_ahead:
            if not note:
                self.counters["acked-ahead"] += ref[4]
            return False
        if note:
            self._tombstone(position, seq, ref, note)
            return True
        count = ref[4]
        nbytes = ref[9]
        entry = [position, seq, ref, "", 1, count, nbytes, QUEUED]
        self.entries.append(entry)
        self._index[key] = entry
        self.size += count
        self.bytes += nbytes
        self.counters["enqueued"] += count
        if self._over_bounds():
            self._overflow(entry)
        return True

    def _tombstone(self, position, seq, ref, note):
        entries = self.entries
        if entries:
            last = entries[-1]
            if (
                last[STATE] == QUEUED and last[NOTE] == note
                and last[SEQ] + last[SPAN] == seq
            ):
                last[SPAN] += 1
                return
        entry = [position, seq, ref, note, 1, 1, BATCH_OVERHEAD, QUEUED]
        entries.append(entry)
        self._index[ref_key(ref)] = entry

    def _bury(self, entry, note, sent=False):
        """
        Turn a batch entry, queued or C{sent} and unacknowledged, into a
        tombstone in place.
        """
        if sent:
            self.unacked_events -= entry[COST]
            self.unacked_bytes -= entry[SIZE]
        else:
            self.size -= entry[COST]
            self.bytes -= entry[SIZE]
        self.counters["expired" if note == EXPIRED else "overflowed"] += entry[COST]
        entry[NOTE] = note
        entry[COST] = 1
        entry[SIZE] = BATCH_OVERHEAD

    def _overflow(self, arrived):
        if not self.drop_oldest:
            self._bury(arrived, OVERFLOW)
            self._merge_tail()
            return
        for entry in self.entries:
            if not self._over_bounds():
                break
            if entry[STATE] == QUEUED and not entry[NOTE]:
                self._bury(entry, OVERFLOW)
        self._compact()

    def _merge_tail(self):
        entries = self.entries
        if len(entries) >= 2:
            last, before = entries[-1], entries[-2]
            if (
                before[STATE] == QUEUED and last[STATE] == QUEUED and before[NOTE] == last[NOTE] != ""
                and before[SEQ] + before[SPAN] == last[SEQ]
            ):
                before[SPAN] += last[SPAN]
                entries.pop()
                self._index.pop(ref_key(last[REF]), None)

    def _compact(self):
        """
        Merge adjacent queued tombstones and drop finished entries.
        """
        kept = deque()
        index = self._index
        for entry in self.entries:
            if entry[STATE] == GONE:
                continue
            if kept and entry[NOTE] and entry[STATE] == QUEUED:
                before = kept[-1]
                if (
                    before[STATE] == QUEUED and before[NOTE] == entry[NOTE]
                    and before[SEQ] + before[SPAN] == entry[SEQ]
                ):
                    before[SPAN] += entry[SPAN]
                    index.pop(ref_key(entry[REF]), None)
                    continue
            kept.append(entry)
        self.entries = kept

    def take(self, max_events, max_bytes, now, form):
        """
        Move entries, in sequence order, to the unacknowledged ones and
        return them as wire entries C{(position, seq, batch, note, span)}:
        at least one, and within C{max_events} and C{max_bytes} of the
        forms sent (C{form(ref)} gives the batch to send).  A batch whose
        TTL passed is sent as a tombstone.
        """
        taken = []
        events = nbytes = 0
        entries = self.entries
        unacked = self._unacked
        while entries:
            entry = entries[0]
            if entry[STATE] != QUEUED:
                entries.popleft()
                continue
            ref = entry[REF]
            if not entry[NOTE] and not ref[6] + ref[7] > now:
                self._bury(entry, EXPIRED)
            batch = ref_header(ref) if entry[NOTE] else form(ref)
            cost, size = entry_cost(batch, entry[NOTE])
            if taken and (events + cost > max_events or nbytes + size > max_bytes):
                break
            entries.popleft()
            entry[STATE] = SENT
            unacked[ref_key(ref)] = entry
            if not entry[NOTE]:
                self.size -= entry[COST]
                self.bytes -= entry[SIZE]
                self.unacked_events += entry[COST]
                self.unacked_bytes += entry[SIZE]
            taken.append((entry[POSITION], entry[SEQ], batch, entry[NOTE], entry[SPAN]))
            events += cost
            nbytes += size
            if events >= max_events or nbytes >= max_bytes:
                break
        if self._over_credit():
            self._overflow_unacked()
        return taken

    def _overflow_unacked(self):
        """
        A subscriber that does not acknowledge cannot make a replica hold
        more than the most credit it may have: the oldest sent batches
        become tombstones (still unacknowledged, so they are sent again).
        """
        for entry in self._unacked.values():
            if not self._over_credit():
                break
            if not entry[NOTE]:
                self._bury(entry, OVERFLOW, sent=True)

    def ack(self, keys, delivered=True):
        """
        The subscriber delivered (or skipped) the entries of C{keys}.
        """
        acked = 0
        index = self._index
        for key in keys:
            entry = index.pop(key, None)
            if entry is None:
                if delivered:
                    self._acked_ahead.add(key, 0)
                continue
            if entry[STATE] == SENT:
                del self._unacked[key]
                if not entry[NOTE]:
                    self.unacked_events -= entry[COST]
                    self.unacked_bytes -= entry[SIZE]
            elif not entry[NOTE]:
                self.size -= entry[COST]
                self.bytes -= entry[SIZE]
            if not entry[NOTE]:
                acked += entry[COST]
            entry[STATE] = GONE
        self.counters["delivered" if delivered else "dropped-by-voter"] += acked
        return acked

    def holds(self, key):
        return key in self._index

    def requeue_unacked(self):
        """
        Put every sent, unacknowledged entry back at the head, in sequence
        order (the subscriber reconnected).
        """
        if not self._unacked:
            return 0
        sent = sorted(self._unacked.values(), key=lambda e: e[SEQ])
        self._unacked.clear()
        events = 0
        for entry in reversed(sent):
            entry[STATE] = QUEUED
            self.entries.appendleft(entry)
            if not entry[NOTE]:
                events += entry[COST]
        self._requeued(events)
        return events

    def expire(self, now):
        """
        Turn batches at the head whose TTL passed, and sent ones, into
        tombstones; return the events.
        """
        expired = 0
        for entry in self.entries:
            if entry[STATE] != QUEUED or entry[NOTE]:
                continue
            ref = entry[REF]
            if ref[6] + ref[7] > now:
                break
            expired += entry[COST]
            self._bury(entry, EXPIRED)
        for entry in self._unacked.values():
            ref = entry[REF]
            if not entry[NOTE] and not ref[6] + ref[7] > now:
                expired += entry[COST]
                self._bury(entry, EXPIRED, sent=True)
        if expired:
            self._compact()
        return expired

    def watermark(self, applied):
        """
        The highest log position up to which this subscriber was sent every
        entry of the channel.
        """
        for entry in self.entries:
            if entry[STATE] == QUEUED:
                return entry[POSITION] - 1
        return applied

    def clear(self):
        """
        Skip everything waiting or unacknowledged; return the events skipped.
        """
        self.entries.clear()
        return self._cleared()


class OrderedStream:
    """
    Credit-based push of one ordered queue, like L{fit_broker.broker.stream.Stream}:
    each entry costs the events and bytes of the form sent (a digest form or
    tombstone costs one event).
    """

    __slots__ = ("tag", "queue", "events", "bytes", "form", "sent_watermark")

    ordered = True

    def __init__(self, tag, queue, events, nbytes, form):
        self.tag = tag
        self.queue = queue
        self.form = form
        self.events = self.bytes = 0
        self.sent_watermark = -1
        self.grant(events, nbytes)

    def grant(self, events, nbytes):
        if type(events) is int and events > 0:
            self.events = min(self.events + events, MAX_CREDIT_EVENTS)
        if type(nbytes) is int and nbytes > 0:
            self.bytes = min(self.bytes + nbytes, MAX_CREDIT_BYTES)

    @property
    def ready(self):
        return self.events > 0 and self.bytes > 0 and self.queue.waiting

    def take(self, now, max_events=400, max_bytes=512 * 1024):
        if not (self.events > 0 and self.bytes > 0):
            return []
        entries = self.queue.take(
            min(self.events, max_events), min(self.bytes, max_bytes), now, self.form
        )
        for entry in entries:
            events, nbytes = entry_cost(entry[2], entry[3])
            self.events -= events
            self.bytes -= nbytes
        return entries


def full_or_digest(bodies, light_copies):
    """
    Return the C{form(ref)} an ordered stream sends: the batch when this
    replica holds it (and, with light copies, is designated to send it),
    else its digest form.
    """
    from fit_broker.units import full_copy_senders

    def form(ref):
        held = bodies.get(ref_key(ref))
        if held is None or held[0] != ref[5]:
            return ref_header(ref)
        batch = held[1]
        if light_copies is not None:
            index, replicas, copies = light_copies
            start = full_copy_senders(batch[0], batch[1], replicas, copies)
            if (index - start) % replicas >= copies:
                return digest_form(batch, ref[5])
        return batch

    return form
