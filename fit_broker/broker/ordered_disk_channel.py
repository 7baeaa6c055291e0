"""
An ordered channel kept on disk: the batches a replica holds, the entries
the log decided for it and its subscribers' acknowledgements survive a
restart of every replica.

Sans-IO, like L{fit_broker.broker.disk_channel}: two segment logs per
channel, each in its own storage.

 - The body log: one record per batch this replica holds (accepted from a
   publisher, or fetched from a peer and checked against its decided
   digest), stamped with the publisher's timestamp.  Under C{fsync =
   "always"} it is synced before the replica announces that it holds the
   batch, so the 2f+1 announcements the leader waits for before proposing
   it are 2f+1 durable copies.
 - The entry log: C{["e", position, seq, ref, note, queued]} for each
   decided entry applied (what every correct replica applies alike;
   C{queued} false for one caught up on by state transfer, queued for
   nobody), C{["s", client,
   seq]} when a subscriber's queue starts (subscribed, or skipped what
   waited) at sequence number C{seq}, and C{["a", client, [seq...]]} for
   acknowledgements.

The replicated state (positions, sequence numbers, subscribers, the table)
comes back from the agreement journal; decided entries replayed from the
journal that the entry log already holds are not logged twice.  Once the
replay is done (L{OrderedDiskChannel.rebuild}), each subscriber's queue is
every logged entry from its start that it did not acknowledge, so a
subscriber gets every acknowledged publish after a restart of every
replica, and sequence numbers are never reused.
"""

from collections import OrderedDict

import msgpack
from twisted.logger import Logger

from fit_broker.broker.disk_channel import decode_batch, log_bounds, storage_refusal
from fit_broker.broker.ordered import EXPIRED, LOST, NOTE, QUEUED, SEQ, SPAN, STATE, ref_key
from fit_broker.broker.ordered_channel import OrderedChannel
from fit_broker.storage import FakeStorage, SegmentLog, StorageError
from fit_broker.units import batch_digest

_pack = msgpack.Packer(use_bin_type=True).pack

#: Entry log segments: small enough that retention frees space soon after
#: every subscriber acknowledged.
ENTRY_SEGMENT_BYTES = 1024 * 1024


def _unpack(payload):
    return msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True)


class OrderedDiskChannel(OrderedChannel):
    """
    An ordered channel whose bodies, decided entries and acknowledgements
    are logged (see the module docstring).

    @ivar failed: the L{StorageError} that stopped the body log, or
        C{None}: publishes are then refused until the replica restarts.
    """

    logger = Logger()

    def __init__(self, spec, scheme, keys=None, max_clock_skew=300.0, light_copies=None,
                 max_body_bytes=None, storage=None):
        """
        @param storage: C{(IStorage for bodies, IStorage for entries)}; by
            default two L{FakeStorage}s (kept in memory only).
        """
        super().__init__(spec, scheme, keys, max_clock_skew, light_copies, max_body_bytes)
        if storage is None:
            storage = (FakeStorage(), FakeStorage())
        qos = spec.qos
        self.fsync = qos.fsync
        interval = qos.fsync_interval / 1000.0
        self.log_limit, segment = log_bounds(qos)
        self.storages = storage
        self.body_log = SegmentLog(
            storage[0], segment_bytes=segment, fsync=self.fsync, interval=interval,
            max_bytes=self.log_limit, max_age=qos.ttl + max_clock_skew,
        )
        self.entry_log = SegmentLog(
            storage[1], segment_bytes=ENTRY_SEGMENT_BYTES, fsync=self.fsync, interval=interval,
            max_bytes=0,
        )
        self.failed = None
        self._body_error = None  # what the body log refused during an admission
        self._now = 0.0  # the latest time a caller gave
        self.logged_seq = 0  # the highest sequence number the entry log holds
        self._entries = OrderedDict()  # seq -> (index, position, ref, note), in seq order
        self._starts = {}  # client -> the first seq its queue may hold
        self._acked = {}  # client -> seqs acknowledged, among the entries held
        self._trim_due = 0.0
        for name in ("recovered", "recovery-cut", "recovery-lost", "log-overflow",
                     "refused:disk-full", "refused:storage-failed", "entry-log-failed",
                     "body-log-failed", "replays", "replayed"):
            self.counters.setdefault(name, 0)
        self._recover()

    # -- recovery

    def _recover(self):
        for what, log in (("body", self.body_log), ("entry", self.entry_log)):
            recovery = log.recover()
            for damage in recovery.damage:
                self.count("recovery-cut" if damage.tail else "recovery-lost", damage.records)
                self.logger.warn(
                    "ordered disk channel {tag!r}: {what} log: {damage}",
                    tag=self.tag, what=what, damage=damage.describe(),
                )
        for _, _, payload in self.body_log.read_from(self.body_log.first_index):
            batch = decode_batch(payload)
            if batch is not None:
                OrderedChannel.keep(self, batch, batch_digest(batch))
        for index, _, payload in self.entry_log.read_from(self.entry_log.first_index):
            try:
                record = _unpack(payload)
                kind = record[0]
                if kind == "e":
                    _, position, seq, ref, note, queued = record
                    self._entries[seq] = (index, position, ref, note, queued)
                    self.logged_seq = max(self.logged_seq, seq)
                elif kind == "s":
                    self._starts[record[1]] = record[2]
                    self._acked[record[1]] = set()
                elif kind == "a":
                    self._acked.setdefault(record[1], set()).update(record[2])
            except Exception:
                self.count("recovery-undecodable")
        if self._entries:
            self.count("recovered", len(self._entries))
            self.logger.info(
                "ordered disk channel {tag!r}: recovered {entries} entries up to seq {seq}, "
                "{bodies} batches", tag=self.tag, entries=len(self._entries), seq=self.logged_seq,
                bodies=len(self.bodies),
            )

    def rebuild(self):
        """
        After the agreement journal was replayed: make each subscriber's
        queue every logged entry from its start that it did not acknowledge.
        """
        first = next(iter(self._entries), self.logged_seq + 1)
        for client in list(self.queues):
            queue = self.queues[client] = self.new_queue()
            start = self._starts.get(client, 0)
            queue.floor = max(start, first)
            acked = self._acked.get(client, ())
            for seq, (_, position, ref, note, queued) in self._entries.items():
                if queued and seq >= start and seq not in acked:
                    queue.append(position, seq, ref, note)

    # -- storage errors

    def _refusal(self, error):
        return storage_refusal(self, error)

    def _record(self, record, now):
        try:
            return self.entry_log.append(_pack(record), now)
        except StorageError as e:
            self.count("entry-log-failed")
            self.logger.warn("ordered disk channel {tag!r}: entry log: {why}", tag=self.tag, why=e)
            return None

    # -- before the log

    def admit_refs(self, client, batches, now):
        """
        Admit a publish, its bodies logged; a body the log refuses (a full
        disk, failed storage) refuses the publish, so it is never announced.
        """
        if self.failed is not None:
            raise self._refusal(self.failed)
        self._now = now
        self._body_error = None
        refs = super().admit_refs(client, batches, now)
        if self._body_error is not None:
            raise self._refusal(self._body_error)
        return refs

    def keep(self, batch, digest):
        """
        Hold C{batch}, logging it first.  A body the log refuses is still
        held in memory (a batch fetched from a peer serves subscribers
        anyway); an admission then refuses its publish.
        """
        key = (batch[0], batch[1])
        if key not in self.bodies and self.failed is None:
            try:
                self.body_log.append(_pack(list(batch)), self._now, timestamp=batch[2])
            except StorageError as e:
                self.count("body-log-failed")
                self._body_error = e
                if not e.full:
                    self.failed = e
        super().keep(batch, digest)

    def sync_bodies(self, now):
        """
        Make the bodies appended so far durable when the class says so
        before they are announced (C{"always"}); under other policies,
        when their deadline came.  Return how many records were synced.
        """
        self._now = now
        if self.failed is not None:
            return 0
        try:
            if self.fsync == "always":
                return self.body_log.sync(now)
            return self.body_log.tick(now)
        except StorageError as e:
            self.failed = e
            self.logger.error("ordered disk channel {tag!r}: body log sync failed: {why}", tag=self.tag, why=e)
            return 0

    def tick(self, now):
        """
        Sync the entry log when its policy says (an entry lost in a crash
        comes back from the agreement journal, an acknowledgement lost only
        sends its batch again) and drop what nobody needs any more.
        """
        self._now = now
        try:
            self.entry_log.tick(now)
        except StorageError as e:
            self.count("entry-log-failed")
            self.logger.warn("ordered disk channel {tag!r}: entry log sync: {why}", tag=self.tag, why=e)
        self.sync_bodies(now)
        if now >= self._trim_due:
            self._trim_due = now + 1.0
            self._trim(now)

    # -- after the log

    def apply(self, ref, position, seq, decided_at, queued=True):
        if seq <= self.logged_seq:
            # replayed from the agreement journal: the entry log holds it,
            # and rebuild() queues it
            return
        acked_ahead = super().apply(ref, position, seq, decided_at, queued)
        note = "" if ref[6] + ref[7] > decided_at else EXPIRED
        index = self._record(["e", position, seq, list(ref), note, queued], self._now or decided_at)
        self.logged_seq = seq
        if index is not None:
            self._entries[seq] = (index, position, ref, note, queued)
        for client in acked_ahead:
            self._acked.setdefault(client, set()).add(seq)
            self._record(["a", client, [seq]], self._now)
        return acked_ahead

    def subscribed(self, client, next_seq):
        super().subscribed(client, next_seq)
        self._start(client, next_seq)

    def subscribe(self, client, resume):
        skipping = client in self.queues and not resume
        queue, skipped = super().subscribe(client, resume)
        if skipping:
            self._start(client, self.logged_seq + 1)
        return queue, skipped

    def _start(self, client, seq):
        if self._starts.get(client) == seq:
            return  # replayed from the agreement journal
        self._starts[client] = seq
        self._acked[client] = set()
        self._record(["s", client, seq], self._now)

    def unsubscribe(self, client):
        self._starts.pop(client, None)
        self._acked.pop(client, None)
        return super().unsubscribe(client)

    def acknowledge(self, client, keys, delivered=True):
        """
        C{client} is done with the batches of C{keys}: log their sequence
        numbers, then forget them from its queue.
        """
        queue = self.queues.get(client)
        if queue is None:
            return 0
        seqs = []
        index = queue._index
        for key in keys:
            entry = index.get(key)
            # a lost tombstone's span is the subscriber's claim, and names no logged entry
            if entry is not None and entry[NOTE] != LOST:
                seqs.extend(range(entry[SEQ], entry[SEQ] + entry[SPAN]))
        if seqs:
            self._acked.setdefault(client, set()).update(seqs)
            self._record(["a", client, seqs], self._now)
        return queue.ack(keys, delivered)

    # -- replay

    def replay(self, client, position=None, since=None):
        """
        Queue again for C{client} the logged entries from log position
        C{position}, or from the first entry stamped at or after C{since}
        (a publisher's timestamp), that its queue does not hold: within
        retention, acknowledged or not.  Return what was queued.
        """
        queue = self.queue_of(client)
        if since is not None:
            position = None
            for _, entry_position, ref, _, _ in self._entries.values():
                if ref[6] >= since:
                    position = entry_position
                    break
            if position is None:
                return {"from": since, "position": None, "entries": 0}
        wanted = [
            (seq, item) for seq, item in self._entries.items()
            if item[1] >= position and not queue.holds(ref_key(item[2]))
        ]
        if not wanted:
            return {"from": since if since is not None else position, "position": position, "entries": 0}
        fresh = self.new_queue()
        acked = self._acked.get(client, set())
        for seq, (_, entry_position, ref, note, queued) in self._entries.items():
            if entry_position >= position or (queued and seq >= self._starts.get(client, 0) and seq not in acked):
                fresh.append(entry_position, seq, ref, note)
        floors = [f for f in (queue.floor, fresh.entries[0][SEQ] if fresh.entries else None) if f is not None]
        fresh.floor = min(floors) if floors else None
        self.queues[client] = fresh
        self.count("replays")
        self.count("replayed", len(wanted))
        return {"from": since if since is not None else position, "position": position, "entries": len(wanted)}

    # -- retention

    def _floor(self):
        """
        The lowest sequence number a subscriber still needs, or C{None}.
        """
        floor = None
        for queue in self.queues.values():
            for entry in queue._unacked.values():
                if floor is None or entry[SEQ] < floor:
                    floor = entry[SEQ]
            for entry in queue.entries:
                if entry[STATE] == QUEUED:
                    if floor is None or entry[SEQ] < floor:
                        floor = entry[SEQ]
                    break
        return floor

    def _trim(self, now):
        if self.failed is not None:
            return
        try:
            self.body_log.trim(now)
        except StorageError as e:
            self.count("body-log-failed")
            self.logger.warn("ordered disk channel {tag!r}: body log trim: {why}", tag=self.tag, why=e)
        floor = self._floor()
        if floor is None:
            floor = self.logged_seq + 1
        keep_after = None
        for seq, item in self._entries.items():
            if seq >= floor:
                keep_after = item[0] - 1
                break
        if keep_after is None:
            keep_after = self.entry_log.next_index - 1
        try:
            if self.entry_log.size_bytes > self.log_limit:
                # past the bound, the oldest entries go even if needed
                self.entry_log.max_bytes = self.log_limit
                trimmed = self.entry_log.trim(now)
                self.entry_log.max_bytes = 0
                if trimmed.records:
                    self.count("log-overflow", trimmed.records)
            self.entry_log.trim(now, keep_after_index=keep_after)
        except StorageError as e:
            self.count("entry-log-failed")
            self.logger.warn("ordered disk channel {tag!r}: entry log trim: {why}", tag=self.tag, why=e)
            return
        first = self.entry_log.first_index
        while self._entries:
            seq, item = next(iter(self._entries.items()))
            if item[0] >= first:
                break
            del self._entries[seq]
        for acked in self._acked.values():
            if self._entries:
                lowest = next(iter(self._entries))
                acked.difference_update([s for s in acked if s < lowest])
            else:
                acked.clear()

    def close(self, now):
        for log in (self.body_log, self.entry_log):
            try:
                log.close(now)
            except StorageError:
                pass
        for storage in self.storages:
            storage.close()

    def snapshot(self, subscriber=None):
        info = super().snapshot(subscriber)
        info["disk"] = {
            "bodies": self.body_log.stats(),
            "entries": self.entry_log.stats(),
            "logged_seq": self.logged_seq,
            "failed": str(self.failed) if self.failed is not None else None,
        }
        return info
