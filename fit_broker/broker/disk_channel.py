"""
A disk channel: an unordered channel whose accepted batches live in a
segment log on the replica's disk, so that a restart of every replica loses
no acknowledged publish (under C{fsync = "always"}).

Sans-IO: the channel appends on the caller's thread and never waits for a
disk; syncs are split in three (L{DiskChannel.begin_sync} on the reactor
thread, L{SyncJob.run} anywhere, L{DiskChannel.end_sync} on the reactor
thread again), so an adapter runs the blocking part off the reactor
(L{fit_broker.replica.storage_driver}) and tests run it inline on a
L{FakeStorage} they crash.

Two logs per channel, in two storages:

 - the batch log: one record per accepted wire batch (msgpack), stamped
   with the publisher's timestamp so retention by age needs no decoding;
 - the acknowledgement log: msgpack records C{["s", subscriber, start]}
   (subscribed; its queue holds batches from log index C{start}),
   C{["c", subscriber, start]} (started afresh), C{["u", subscriber]}
   (unsubscribed), C{["a", subscriber, keys]} (acknowledged or otherwise
   done with), and a compacted copy of all that between C{["B"]} and C{["E"]}.

A subscriber's queue after a restart is every batch of the log from its
start that it did not acknowledge; the deduplication memory is rebuilt from
the batches in the log.
"""

import hashlib
from collections import deque
from urllib.parse import quote

import msgpack
from twisted.logger import Logger
from zope.interface import implementer

from fit_broker.broker.channel import DEDUP_WINDOW, Channel, _identity
from fit_broker.broker.queue import OutputQueue
from fit_broker.broker.stream import Stream
from fit_broker.errors import Status
from fit_broker.interfaces import IStorage
from fit_broker.storage import FakeStorage, SegmentLog, StorageError
from fit_broker.units import Reply, batch_bytes, payload_count

#: The batch log of a channel keeps at most this many times its class's
#: C{max_bytes} (each subscriber's queue bound): room for one full queue
#: of every subscriber's backlog and as much again of recent batches that
#: deduplication and late subscribers' acknowledgements still refer to.
LOG_BYTES_FACTOR = 2

#: Segments of a batch log are at most this fraction of its bound, so that
#: retention drops a small part of the log at a time ...
SEGMENTS_PER_LOG = 8
#: ... and never smaller than this, nor larger than the other.
MIN_SEGMENT_BYTES = 1024
MAX_SEGMENT_BYTES = 64 * 1024 * 1024

#: Acknowledgement log segments, and when it is compacted: once it holds
#: more than this and four times what its last compaction wrote.
ACK_SEGMENT_BYTES = 1024 * 1024
ACK_COMPACT_BYTES = 4 * 1024 * 1024

#: Keys per acknowledgement record of a compacted copy.
KEYS_PER_RECORD = 4096

#: Publishes whose replies may wait for a sync on one channel.
MAX_HELD = 100_000

#: Seconds between two attempts to reclaim acknowledged log segments when
#: a drop-newest log is full.
RECLAIM_EVERY = 0.5

#: Statuses of publishes the disk refused.
DISK_FULL = "disk-full"
STORAGE_FAILED = "storage-failed"

_pack = msgpack.Packer(use_bin_type=True).pack


def folder_name(tag):
    """
    Return the folder name of channel C{tag}'s logs: the tag escaped to
    letters, digits, C{-_.} and C{%XX}, with a digest instead of the
    middle of a long tag, behind a prefix that makes C{.} and C{..}
    impossible.
    """
    escaped = quote(tag, safe="-_.")
    if len(escaped) > 160:
        digest = hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        escaped = f"{escaped[:120]}~{digest}"
    return "ch-" + escaped


def log_bounds(qos):
    """
    Return C{(bytes, segment bytes)}: how much a disk channel of class
    C{qos} keeps in its batch log, and the size of its segments.
    """
    limit = qos.max_bytes * LOG_BYTES_FACTOR
    return limit, min(MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, limit // SEGMENTS_PER_LOG))


def storage_refusal(channel, error):
    """
    Return the refusal of a publish on C{channel} that its storage could
    not take: C{disk-full} (retry later, nothing was dropped) or
    C{storage-failed} (the replica must restart).
    """
    if error.full:
        return channel.refuse(
            DISK_FULL,
            f"channel {channel.tag!r}: the replica's disk is full ({error}); "
            "nothing acknowledged was dropped, retry once there is room",
            "disk-full",
        )
    return channel.refuse(
        STORAGE_FAILED,
        f"channel {channel.tag!r}: the replica's storage failed ({error}); "
        "the replica must be restarted to recover its log",
        "storage-failed",
    )


def _unpack(payload):
    return msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=True)


def decode_batch(payload):
    """
    Return the wire batch a log record holds, or C{None} when it is not one.
    """
    try:
        batch = _unpack(payload)
    except Exception:
        return None
    if type(batch) is not tuple or len(batch) != 7:
        return None
    publisher, first_id, timestamp, ttl, urgency, body, proof = batch
    if not (
        type(publisher) is str and type(first_id) is int and type(urgency) is int
        and type(timestamp) in (int, float) and type(ttl) in (int, float)
        and type(body) is bytes and type(proof) is bytes
    ):
        return None
    return batch


@implementer(IStorage)
class SyncLater:
    """
    An L{IStorage} whose L{sync} only notes the file: L{take} hands the
    names to whoever makes them durable for real (on another thread), so
    the segment log's own bookkeeping never waits for a disk.
    """

    def __init__(self, storage):
        self.storage = storage
        self.pending = set()

    def __repr__(self):
        return repr(self.storage)

    def files(self):
        return self.storage.files()

    def append(self, name, data):
        self.storage.append(name, data)

    def sync(self, name):
        self.pending.add(name)

    def read(self, name, offset, size):
        return self.storage.read(name, offset, size)

    def size(self, name):
        return self.storage.size(name)

    def truncate(self, name, size):
        self.storage.truncate(name, size)

    def delete(self, name):
        self.pending.discard(name)
        self.storage.delete(name)

    def close(self):
        self.storage.close()

    def take(self):
        names, self.pending = self.pending, set()
        return sorted(names)


class SyncJob:
    """
    One group commit of a channel: the files to sync, and the log indexes
    that are durable once they are.
    """

    __slots__ = ("files", "log_end", "ack_end")

    def __init__(self, files, log_end, ack_end):
        self.files = files
        self.log_end = log_end
        self.ack_end = ack_end

    def run(self):
        """
        Sync every file (blocking: call it off the reactor thread).

        @raise StorageError: a sync failed; what is on disk is unknown.
        """
        for storage, name in self.files:
            storage.sync(name)


class Replay:
    """
    A subscriber's replay from a time: the batch log's records up to where
    the log ended when it was asked for, read in order as the subscriber's
    queue and credit make room, of which those stamped at or after
    C{since} (the publishers' timestamps, the same at every replica) are
    queued again.

    @ivar records: the log's iterator of C{(index, timestamp, payload)}.
    @ivar next_index: the log index expected next (a jump is what retention
        dropped meanwhile).
    @ivar held: an entry read that did not fit yet, or C{None}.
    """

    __slots__ = ("since", "end", "records", "next_index", "held", "queued")

    def __init__(self, since, first, end, records):
        self.since = since
        self.end = end
        self.records = records
        self.next_index = first
        self.held = None
        self.queued = 0


class DiskStream(Stream):
    """
    A stream of a disk channel: before each delivery frame, a replay under
    way tops the queue up to the credit the subscriber gave, so that a
    replay never holds more than that beyond the queue's own bounds.
    """

    __slots__ = ("channel", "client")

    def __init__(self, channel, client, queue, events, nbytes):
        super().__init__(channel.tag, queue, events, nbytes)
        self.channel = channel
        self.client = client

    @property
    def ready(self):
        return self.events > 0 and self.bytes > 0 and (
            self.queue.size > 0 or self.client in self.channel.replays
        )

    def take(self, now):
        if self.events > 0 and self.bytes > 0 and self.client in self.channel.replays:
            self.channel.feed(self.client, now, self.events, self.bytes)
        return super().take(now)


class DiskChannel(Channel):
    """
    An unordered channel whose accepted batches and subscribers'
    acknowledgements are kept in logs (see the module docstring).

    A publish is admitted as on any channel, then appended to the batch
    log, then queued.  Under C{fsync = "always"} its reply waits (L{hold})
    until a sync covers it; under C{"interval"} a sync comes at most
    C{fsync_interval} ms after the oldest unsynced append; under
    C{"never"} only when a segment is full.

    @ivar log: the batch L{SegmentLog}.
    @ivar acks: the acknowledgement L{SegmentLog}.
    @ivar durable: C{(batch log index, ack log index)} below which every
        record is known synced.
    @ivar failed: the L{StorageError} that stopped this channel's logs (a
        failed sync), or C{None}; the replica must restart to recover.
    """

    logger = Logger()

    def __init__(
        self, spec, scheme, keys=None, max_clock_skew=300.0, dedup_window=DEDUP_WINDOW,
        light_copies=None, storage=None,
    ):
        """
        @param storage: C{(IStorage for batches, IStorage for
            acknowledgements)}, two different folders; by default two
            L{FakeStorage}s (kept in memory only).
        """
        super().__init__(spec, scheme, keys, max_clock_skew, dedup_window, light_copies)
        if storage is None:
            storage = (FakeStorage(), FakeStorage())
        qos = spec.qos
        self.fsync = qos.fsync
        interval = qos.fsync_interval / 1000.0
        self.log_limit, segment = log_bounds(qos)
        self.drop_oldest = qos.overflow == "drop-oldest"
        self._stores = (SyncLater(storage[0]), SyncLater(storage[1]))
        self.log = SegmentLog(
            self._stores[0], segment_bytes=segment, fsync=self.fsync, interval=interval,
            max_age=qos.ttl,
        )
        self.acks = SegmentLog(
            self._stores[1], segment_bytes=ACK_SEGMENT_BYTES, fsync=self.fsync, interval=interval,
        )
        self.held = deque()
        self.syncing = None
        self.failed = None
        self._keys = {}  # log index -> (publisher, first_id), in index order
        self._where = {}  # (publisher, first_id) -> log index
        self._starts = {}  # subscriber -> the log index its queue starts at
        self._compacted_bytes = 0
        # the ack log indexes [from, end) of a compacted copy not yet durable
        self._compacted_from = self._compacted_end = None
        self._last_reclaim = None
        self._now = 0.0  # the latest time a caller gave
        self.replays = {}  # subscriber -> its Replay under way
        # what recovery from peers says while it runs (a dict), else None
        self.recovering = None
        # batch log records the last recovery found damaged and cut
        self.lost_records = 0
        for name in ("recovered", "recovery-cut", "recovery-lost", "recovery-undecodable",
                     "log-overflow", "log-expired-batches", "refused:log-full", "refused:disk-full",
                     "refused:storage-failed", "ack-log-failed", "replays", "replayed",
                     "replay-expired", "replay-gone", "replay-failed", "recovered-from-peers",
                     "fetch-while-recovering"):
            self.counters.setdefault(name, 0)
        self._recover()
        self.durable = (self.log.next_index, self.acks.next_index)

    # -- recovery

    def _recover(self):
        """
        Open both logs (cutting torn tails) and rebuild the subscribers,
        their queues and the deduplication memory from them.
        """
        for what, log in (("batch", self.log), ("acknowledgement", self.acks)):
            recovery = log.recover()
            for damage in recovery.damage:
                reason = "recovery-cut" if damage.tail else "recovery-lost"
                if what == "batch":
                    self.count(reason, damage.records)
                    self.lost_records += damage.records
                self.logger.warn(
                    "disk channel {tag!r}: {what} log: {damage}",
                    tag=self.tag, what=what, damage=damage.describe(),
                )
        starts, acked = self._read_acks()
        end = self.log.next_index
        self._starts = {sub: min(start, end) for sub, start in starts.items()}
        qos = self.spec.qos
        pending = {sub: [] for sub in self._starts}
        for sub in self._starts:
            self.queues[sub] = self.new_queue()
        recovered = 0
        for index, _, payload in self.log.read_from(self.log.first_index):
            batch = decode_batch(payload)
            count = payload_count(batch[5]) if batch is not None else 0
            if not count or not 0 <= batch[4] < qos.urgency_levels:
                self.count("recovery-undecodable")
                continue
            key = (batch[0], batch[1])
            if key in self._where:
                continue  # the same batch twice: queued once
            ranges = self._ranges(batch[0])
            digest = _identity(batch)
            if ranges.check(batch[1], count, digest) == "new":
                ranges.add(batch[1], count, digest)
            self._keys[index] = key
            self._where[key] = index
            entry = (count, self._outgoing(batch), batch, batch_bytes(batch))
            recovered += count
            for sub, start in self._starts.items():
                if index >= start and key not in acked.get(sub, ()):
                    pending[sub].append(entry)
        self.count("recovered", recovered)
        for sub, entries in pending.items():
            self.queues[sub].extend(entries)
        if recovered or self._starts:
            self.logger.info(
                "disk channel {tag!r}: recovered {events} events in {records} batches,"
                " {subscribers} subscribers",
                tag=self.tag, events=recovered, records=len(self._keys),
                subscribers=len(self._starts),
            )

    def _read_acks(self):
        """
        Return C{(starts, acked)} as the acknowledgement log says:
        subscriber -> start index, subscriber -> set of keys done with.
        """
        state = ({}, {})
        staged = None
        for _, _, payload in self.acks.read_from(self.acks.first_index):
            try:
                record = _unpack(payload)
                kind = record[0]
            except Exception:
                continue
            if kind == "B":
                staged = ({}, {})
                continue
            if kind == "E":
                if staged is not None:
                    state, staged = staged, None
                continue
            starts, acked = staged if staged is not None else state
            try:
                if kind in ("s", "c"):
                    starts[record[1]] = int(record[2])
                    acked[record[1]] = set()
                elif kind == "u":
                    starts.pop(record[1], None)
                    acked.pop(record[1], None)
                elif kind == "a" and record[1] in starts:
                    acked[record[1]].update(tuple(key) for key in record[2])
            except (IndexError, TypeError, ValueError):
                continue
        return state

    def new_queue(self):
        qos = self.spec.qos
        return OutputQueue(qos.capacity, qos.urgency_levels, qos.overflow, qos.max_bytes)

    # -- recovery from peers (L{fit_broker.replica.disk_recovery})

    def holds(self, key):
        """
        Whether the batch log holds the batch C{(publisher, first_id)}.
        """
        return key in self._where

    def read_batches(self, cursor, max_batches, max_bytes):
        """
        Return C{(batches, next_cursor, end)}: the batches the log holds
        from index C{cursor} on (the first one held, when older), at most
        C{max_batches} of them and C{max_bytes} of records (one, whatever
        its size); C{end} says C{next_cursor} reached the end of the log as
        of this call.  A peer recovering this channel reads it page by page.

        @raise StorageError: a record is damaged since the log was opened.
        """
        log = self.log
        end = log.next_index
        start = max(cursor, log.first_index)
        batches = []
        size = 0
        next_cursor = start
        for index, _, payload in log.read_from(start, end):
            if batches and (len(batches) >= max_batches or size + len(payload) > max_bytes):
                break
            next_cursor = index + 1
            batch = decode_batch(payload)
            if batch is not None:
                batches.append(batch)
                size += len(payload)
        else:
            next_cursor = max(next_cursor, end)
        return batches, next_cursor, next_cursor >= end

    def add_recovered(self, batch, now):
        """
        Take C{batch}, a batch the log lost that peers sent back (as many
        matching copies as the channel's fault model asks): append it to
        the log, unless the log holds it, it expired, or this publisher's
        ids say it is a duplicate or overlaps another batch.  It is not
        queued for the subscribers, and is logged as done with for those
        subscribed now: this replica forgot what they acknowledged, and
        sending them again what they had would deliver it twice where the
        first copy wins; the replicas that kept their logs serve what they
        still need.  Return what became of
        it: C{"recovered"}, C{"held"}, C{"expired"}, C{"duplicate"},
        C{"conflict"}, C{"bad"} or C{"failed"} (the log refused it).
        """
        self._now = now
        qos = self.spec.qos
        count = payload_count(batch[5])
        if not count or not 0 <= batch[4] < qos.urgency_levels or not self.spec.may_publish(batch[0]):
            return "bad"
        key = (batch[0], batch[1])
        if key in self._where:
            return "held"
        if not batch[2] + batch[3] > now:
            return "expired"
        if self.failed is not None:
            return "failed"
        ranges = self._ranges(batch[0])
        digest = _identity(batch)
        verdict = ranges.check(batch[1], count, digest)
        if verdict in ("duplicate", "conflict"):
            return verdict  # dropped by retention since, or another batch holds these ids
        try:
            index = self.log.append(_pack(list(batch)), now, timestamp=batch[2])
        except StorageError as e:
            self.logger.warn(
                "disk channel {tag!r}: a batch recovered from peers: {error}", tag=self.tag, error=str(e),
            )
            return "failed"
        if verdict == "new":
            ranges.add(batch[1], count, digest)
        self._keys[index] = key
        self._where[key] = index
        for client in self._starts:
            self._record(["a", client, [list(key)]])
        self.count("recovered-from-peers", count)
        return "recovered"

    # -- accepting

    def _refusal(self, error):
        return storage_refusal(self, error)

    def apply(self, client, checked, now):
        """
        Append admitted batches to the log, then to every subscriber's
        queue.  A batch the log refuses (full disk, failed storage) refuses
        the rest of the request; the batches before it stay accepted.
        """
        self._now = now
        if self.failed is not None:
            raise self._refusal(self.failed)
        if not self.drop_oldest:
            self._check_room(checked, now)
        ranges = self._ranges(client)
        fresh = []
        duplicates = expired = 0
        several = len(checked) > 1
        failure = None
        for count, batch, digest, verdict in checked:
            first_id = batch[1]
            if several:
                verdict = ranges.check(first_id, count, digest)
                if verdict == "conflict":
                    failure = self._overlap(len(fresh), client, first_id, count)
                    break
            if verdict != "new":
                duplicates += count
            elif not batch[2] + batch[3] > now:
                expired += count
            else:
                try:
                    index = self.log.append(_pack(list(batch)), now, timestamp=batch[2])
                except StorageError as e:
                    failure = self._refusal(e)
                    break
                ranges.add(first_id, count, digest)
                key = (batch[0], first_id)
                self._keys[index] = key
                self._where[key] = index
                fresh.append((count, self._outgoing(batch), batch, batch_bytes(batch)))
        self._applied(client, fresh, duplicates, expired)
        if failure is not None:
            raise failure
        return fresh

    def _check_room(self, checked, now):
        """
        Under drop-newest, refuse a publish the log has no room for, after
        reclaiming what no subscriber needs any more.
        """
        incoming = sum(batch_bytes(batch) for _, batch, _, verdict in checked if verdict == "new")
        if self.log.size_bytes + incoming <= self.log_limit:
            return
        if self._last_reclaim is None or now - self._last_reclaim >= RECLAIM_EVERY:
            self._last_reclaim = now
            self._trim(now, room=incoming)
        if self.log.size_bytes + incoming > self.log_limit:
            raise self.refuse(
                Status.QUEUE_FULL,
                f"channel {self.tag!r} is full: its log holds {self.log.size_bytes} bytes, "
                f"the most is {self.log_limit} ({LOG_BYTES_FACTOR} x max_bytes) and the class "
                "drops the newest; retry once subscribers catch up or events expire",
                "log-full",
            )

    # -- group commit

    def must_wait(self):
        """
        Whether a publish answered now must wait for a sync: under
        C{"always"}, while anything appended is not known synced.
        """
        return self.fsync == "always" and (
            self.durable[0] < self.log.next_index or self.durable[1] < self.acks.next_index
        )

    def hold(self, token, reply):
        """
        Keep C{reply} until a sync covers everything appended so far;
        return C{False} (and keep nothing) when too many already wait.
        """
        if len(self.held) >= MAX_HELD:
            return False
        self.held.append((self.log.next_index, self.acks.next_index, token, reply))
        return True

    def sync_due(self, now):
        """
        Whether a sync should start now under this channel's policy.
        """
        if self.syncing is not None or self.failed is not None:
            return False
        if self._stores[0].pending or self._stores[1].pending:
            return True  # a segment rolled: its file waits for its sync
        if self.fsync == "never":
            return False
        return any(
            deadline is not None and deadline <= now
            for deadline in (self.log.sync_deadline, self.acks.sync_deadline)
        )

    def next_sync_at(self):
        """
        When the policy wants the next sync (C{None}: not before more
        appends, or one runs already).
        """
        if self.syncing is not None or self.failed is not None or self.fsync == "never":
            return None
        deadlines = [d for d in (self.log.sync_deadline, self.acks.sync_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    def begin_sync(self, now):
        """
        Start a group commit of everything appended so far; return its
        L{SyncJob} (run it, then L{end_sync}), or C{None} when nothing
        waits.
        """
        if self.syncing is not None or self.failed is not None:
            return None
        if self.fsync != "never":
            self.log.sync(now)
            self.acks.sync(now)
        files = [(store.storage, name) for store in self._stores for name in store.take()]
        if not files:
            self.durable = (self.log.next_index, self.acks.next_index)
            return None
        self.syncing = SyncJob(files, self.log.next_index, self.acks.next_index)
        return self.syncing

    def end_sync(self, job, error=None):
        """
        Note that C{job} ran (or failed with C{error}); return the
        C{(token, reply)} pairs of the publishes it answered.  C{job}
        C{None} answers what earlier syncs covered.
        """
        if self.syncing is job:
            self.syncing = None
        released = []
        if error is not None:
            if not isinstance(error, StorageError):
                error = StorageError(f"sync failed: {error}")
            error.full = False
            self.failed = self.log.failed = self.acks.failed = error
            self.logger.error(
                "disk channel {tag!r}: {error}; publishes are refused until the replica restarts",
                tag=self.tag, error=str(error),
            )
            while self.held:
                _, _, token, reply = self.held.popleft()
                self.count("refused:storage-failed")
                released.append((token, Reply(
                    reply.seq, STORAGE_FAILED,
                    f"channel {self.tag!r}: the replica could not sync its log ({error})",
                    channel=self.tag,
                )))
            return released
        if job is not None:
            self.durable = (max(self.durable[0], job.log_end), max(self.durable[1], job.ack_end))
        log_end, ack_end = self.durable
        held = self.held
        while held and held[0][0] <= log_end and held[0][1] <= ack_end:
            released.append(held.popleft()[2:])
        return released

    def sync_now(self, now):
        """
        Run a whole group commit on this thread (tests, shutdown); return
        the C{(token, reply)} pairs it answered.
        """
        job = self.begin_sync(now)
        if job is None:
            return self.end_sync(None)
        try:
            job.run()
        except StorageError as e:
            return self.end_sync(job, e)
        return self.end_sync(job)

    def close(self, now):
        """
        Sync what is pending and release the files; return the answers.
        """
        answers = [] if self.syncing is not None else self.sync_now(now)
        for store in self._stores:
            try:
                store.close()
            except StorageError:
                pass
        return answers

    # -- subscribers

    def _record(self, record, durable=False):
        """
        Append C{record} to the acknowledgement log; return the error.
        With C{durable}, ask for a sync whatever the policy: losing a
        subscription loses its whole queue, and subscriptions are rare.
        """
        if self.failed is not None:
            return self.failed
        try:
            self.acks.append(_pack(record), self._now)
            if durable:
                self.acks.sync(self._now)
        except StorageError as e:
            self.count("ack-log-failed")
            return e
        return None

    def subscribe(self, client, resume):
        if not resume:
            self.replays.pop(client, None)
        had = client in self.queues
        queue, skipped = super().subscribe(client, resume)
        start = self.log.next_index
        if not had:
            error = self._record(["s", client, start], durable=True)
            if error is not None:
                self.queues.pop(client, None)
                raise self._refusal(error)
            self._starts[client] = start
        elif not resume:
            self._starts[client] = start
            self._record(["c", client, start], durable=True)
        return queue, skipped

    def unsubscribe(self, client):
        queue = super().unsubscribe(client)
        self.replays.pop(client, None)
        if queue is not None:
            self._starts.pop(client, None)
            self._record(["u", client], durable=True)
        return queue

    def acknowledge(self, client, keys, delivered=True):
        """
        C{client} is done with C{keys} (see L{OutputQueue.ack}): forget
        them in its queue and record that, so a restart does not resend
        them.
        """
        queue = self.queues.get(client)
        if queue is None:
            return 0
        acked = queue.ack(keys, delivered)
        if keys:
            self._record(["a", client, [list(key) for key in keys]])
        return acked

    def take(self, client, count, now):
        if client in self.replays:
            self.feed(client, now, count, None)
        batches = super().take(client, count, now)
        if batches:
            self._record(["a", client, [[b[0], b[1]] for b in batches]])
        return batches

    def open_stream(self, client, events, nbytes):
        queue = self.queue_of(client)
        queue.requeue_unacked()
        return DiskStream(self, client, queue, events, nbytes)

    def lookup(self, client, key):
        """
        Return the full batch of C{key} for C{client}'s fetch, as on any
        channel: while the log is being recovered, a batch it lacks is not
        answered (and counted), never made up.
        """
        batch = super().lookup(client, key)
        if batch is None and self.recovering is not None:
            self.count("fetch-while-recovering")
        return batch

    # -- replay from a time

    def replay(self, client, since, now):
        """
        Queue again for C{client} every batch of the log stamped at or after
        C{since} (even those it acknowledged), in log order, as its queue
        and credit make room (L{feed}); return what the reply says of it.

        Every correct replica replays the same batches: the filter is each
        batch's own timestamp, not when this replica received it.  Batches
        appended from now on reach the queue as usual; a replica restarted
        before its replay ended does not resume it.
        """
        queue = self.queue_of(client)
        if self.recovering is not None:
            raise self.refuse(
                Status.BUSY,
                f"channel {self.tag!r}: this replica is recovering its log from its peers and "
                "cannot replay it yet; retry once it is done",
                "replay-while-recovering",
            )
        self._now = now
        first, end = self.log.first_index, self.log.next_index
        # acknowledgements that came before their batch stop it from being
        # queued; the subscriber now asks for such batches again
        queue.forget_acked_ahead()
        self.replays[client] = Replay(since, first, end, self.log.read_from(first, end))
        self.count("replays")
        self.logger.info(
            "disk channel {tag!r}: replaying to {client!r} from {since} (log records {first}..{end})",
            tag=self.tag, client=client, since=since, first=first, end=end,
        )
        return {"from": since, "records": end - first}

    def feed(self, client, now, events=None, nbytes=None):
        """
        Read C{client}'s replay on until its queue holds C{events} events
        or C{nbytes} bytes (its credit; at most the queue's bounds), or the
        replay ends; return the events queued.  A record that does not fit
        waits for the next call; one always goes into an empty queue.
        """
        replay = self.replays.get(client)
        queue = self.queues.get(client)
        if replay is None or queue is None:
            self.replays.pop(client, None)
            return 0
        while True:
            queued, done = self._feed_step(client, replay, queue, now, events, nbytes)
            if done:
                self.replays.pop(client, None)
                self.logger.info(
                    "disk channel {tag!r}: replay to {client!r} done: {events} events queued again",
                    tag=self.tag, client=client, events=replay.queued,
                )
                return queued
            if queued or queue.size:
                return queued
            # what was read was dropped on the way in (acknowledged meanwhile):
            # read on, or the stream would wait for credit that never comes

    def _feed_step(self, client, replay, queue, now, events, nbytes):
        """
        One pass of L{feed}: return C{(events queued, whether the replay
        ended)}.
        """
        qos = self.spec.qos
        max_events = qos.capacity if events is None else min(events, qos.capacity)
        max_bytes = queue.max_bytes if nbytes is None else min(nbytes, queue.max_bytes)
        added = []
        waiting, waiting_bytes = queue.size, queue.bytes
        done = False
        while True:
            entry, replay.held = replay.held, None
            if entry is None:
                try:
                    item = next(replay.records, None)
                except StorageError as e:
                    self.count("replay-failed")
                    self.logger.warn(
                        "disk channel {tag!r}: replay to {client!r} stopped: {error}",
                        tag=self.tag, client=client, error=str(e),
                    )
                    done = True
                    break
                if item is None:
                    if replay.end > replay.next_index:
                        self.count("replay-gone", replay.end - replay.next_index)
                        replay.next_index = replay.end
                    done = True
                    break
                index, timestamp, payload = item
                if index > replay.next_index:
                    self.count("replay-gone", index - replay.next_index)
                replay.next_index = index + 1
                if timestamp < replay.since:
                    continue
                batch = decode_batch(payload)
                count = payload_count(batch[5]) if batch is not None else 0
                if not count or not 0 <= batch[4] < qos.urgency_levels:
                    continue
                if not batch[2] + batch[3] > now:
                    self.count("replay-expired", count)
                    continue
                if queue.lookup((batch[0], batch[1])) is not None:
                    continue  # it waits or was sent: it comes anyway
                entry = (count, self._outgoing(batch), batch, batch_bytes(batch))
            if waiting and (waiting + entry[0] > max_events or waiting_bytes + entry[3] > max_bytes):
                replay.held = entry
                break
            added.append(entry)
            waiting += entry[0]
            waiting_bytes += entry[3]
        before = queue.counters["enqueued"]
        queue.extend(added)
        queued = queue.counters["enqueued"] - before
        replay.queued += queued
        self.count("replayed", queued)
        return queued, done

    # -- retention

    def expire(self, now):
        """
        Expire queued batches, drop log segments past the TTL or the size
        bound, and compact the acknowledgement log once it has grown.
        """
        super().expire(now)
        self._now = now
        if self.syncing is None and self.failed is None:
            self._trim(now)
            self._compact(now)

    def _forget_range(self, first, end):
        keys = []
        for index in range(first, end):
            key = self._keys.pop(index, None)
            if key is not None:
                self._where.pop(key, None)
                keys.append(key)
        return keys

    def _floor(self):
        """
        Return the lowest log index a subscriber's queue still holds (the
        end of the log when none).
        """
        queues = list(self.queues.values())
        for index, key in self._keys.items():
            for queue in queues:
                if queue.lookup(key) is not None:
                    return index
        return self.log.next_index

    def _trim(self, now, room=0):
        """
        Retention: segments whose events all expired go first; then, while
        the log is over its bound (less C{room} bytes), segments no
        subscriber still needs; then (drop-oldest only) the oldest
        segments, whose batches leave every queue counted as overflowed.
        """
        if self.syncing is not None:
            return
        log = self.log
        try:
            log.max_bytes = None
            trimmed = log.trim(now)
            self._forget_range(trimmed.first_index, trimmed.end_index)
            self.count("log-expired-batches", trimmed.expired)
            limit = max(0, self.log_limit - room)
            if log.size_bytes <= limit:
                return
            log.max_bytes = limit
            trimmed = log.trim(now, keep_after_index=self._floor() - 1)
            self._forget_range(trimmed.first_index, trimmed.end_index)
            if not self.drop_oldest or log.size_bytes <= limit:
                return
            trimmed = log.trim(now)
            keys = self._forget_range(trimmed.first_index, trimmed.end_index)
            dropped = 0
            for queue in self.queues.values():
                gone = queue.ack(keys, delivered=False)
                queue.counters["dropped-by-voter"] -= gone
                queue.counters["overflowed"] += gone
                dropped += gone
            self.count("log-overflow", dropped)
        except StorageError as e:
            self.logger.warn("disk channel {tag!r}: retention: {error}", tag=self.tag, error=str(e))
        finally:
            log.max_bytes = None

    def _compact(self, now):
        """
        Rewrite what the acknowledgement log says in a few records at its
        end, and drop the segments before them once those are synced.
        """
        acks = self.acks
        if self._compacted_from is not None:
            if self.durable[1] >= self._compacted_end:
                acks.max_bytes = 0
                try:
                    acks.trim(now, keep_after_index=self._compacted_from - 1)
                except StorageError as e:
                    self.logger.warn("disk channel {tag!r}: compaction: {error}", tag=self.tag, error=str(e))
                finally:
                    acks.max_bytes = None
                self._compacted_from = None
            return
        if acks.size_bytes <= max(ACK_COMPACT_BYTES, 4 * self._compacted_bytes):
            return
        before = acks.size_bytes
        start = acks.next_index
        records = [["B"]]
        for sub, first in self._starts.items():
            records.append(["s", sub, first])
            queue = self.queues.get(sub)
            done = [
                [key[0], key[1]] for index, key in self._keys.items()
                if index >= first and (queue is None or queue.lookup(key) is None)
            ]
            for k in range(0, len(done), KEYS_PER_RECORD):
                records.append(["a", sub, done[k : k + KEYS_PER_RECORD]])
        records.append(["E"])
        size = acks.size_bytes
        for record in records:
            if self._record(record) is not None:
                return  # an incomplete copy is ignored by recovery
        self._compacted_bytes = acks.size_bytes - size
        self._compacted_from = start
        self._compacted_end = acks.next_index
        acks.sync(now)  # whatever the policy: the old records go once this is synced
        self.logger.info(
            "disk channel {tag!r}: compacted its acknowledgement log from {before} to {after} bytes",
            tag=self.tag, before=before, after=self._compacted_bytes,
        )

    # -- status

    def snapshot(self, subscriber=None):
        view = super().snapshot(subscriber)
        view["recovering"] = self.recovering is not None
        view["disk"] = {
            "fsync": self.fsync,
            "log": self.log.stats(),
            "acks": self.acks.stats(),
            "limit_bytes": self.log_limit,
            "held": len(self.held),
            "failed": None if self.failed is None else str(self.failed),
            "replaying": sorted(
                name for name in self.replays if subscriber is None or name == subscriber
            ),
            "recovery": None if self.recovering is None else dict(self.recovering),
        }
        return view
