"""
Publishing events into channels.
"""

import math
from collections import deque

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure

from fit_broker import units
from fit_broker.errors import FitBrokerError, RequestFailed
from fit_broker.units import Request, pack_contents

BATCH_SIZE = 100
MAX_IN_FLIGHT = 64


class Publisher:
    """
    Publishes events, batching what is published in one reactor turn.

    Contents published in one reactor turn to one channel with one urgency
    and TTL travel as one batch (up to C{batch_size} events).  A publish is
    acknowledged once the channel's mode says enough replicas accepted it
    (CFT: f+1, so f crashes cannot lose it).  Event ids start from the clock
    in microseconds and increase by one per event, so a restarted publisher
    continues above its earlier ids, and a retried batch keeps its ids and is
    recognised as a duplicate everywhere.

    A retry must resend the very same batch: replicas never decode payloads,
    so they recognise a batch by its id range and digest, and refuse one
    whose ids overlap a different batch already accepted from this publisher
    (C{overlapping-ids}).  Re-batching unacknowledged events under their old
    ids after a restart is therefore refused, never delivered twice.

    @ivar max_in_flight: batches sent and not yet acknowledged at most;
        beyond it batches wait here, which slows the application's Deferreds.
    """

    def __init__(self, proxy, clock, schemes, keys=None, batch_size=BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT):
        self.proxy = proxy
        self.config = proxy.config
        self.client = proxy.client
        self.clock = clock
        self.schemes = schemes
        self.keys = keys
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self._next_id = int(clock.seconds() * 1_000_000)
        self._open = {}
        self._flush_call = None
        self._waiting = deque()
        self._in_flight = 0
        # ordered channels: tag -> the highest log position f+1 replicas
        # reported for this publisher's batches
        self.positions = {}

    def _channel(self, tag):
        return self.config.authorised(tag, self.client, publish=True)

    def register(self, tag):
        """
        Tell the replicas this client will publish on C{tag}.
        """
        try:
            self._channel(tag)
        except FitBrokerError:
            return fail()
        request = Request(self.proxy.next_seq(), units.REGISTER, tag)
        return self.proxy.invoke(request, self.config.acks_needed(tag), retry=False)

    def publish(self, tag, content, urgency=0, ttl=0.0):
        """
        Publish one event; the Deferred fires with its event id once acknowledged.
        """
        d = self.publish_many(tag, [content], urgency, ttl)
        d.addCallback(lambda ids: ids[0])
        return d

    def publish_many(self, tag, contents, urgency=0, ttl=0.0):
        """
        Publish one event per item of C{contents} (bytes); the Deferred fires
        with their event ids once all are acknowledged.
        """
        try:
            spec = self._channel(tag)
        except FitBrokerError:
            return fail()
        if not 0 <= urgency < spec.qos.urgency_levels:
            return fail(
                RequestFailed(
                    "bad-request",
                    f"urgency {urgency} outside 0..{spec.qos.urgency_levels - 1} of channel {tag!r}",
                )
            )
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl >= 0):
            return fail(
                RequestFailed(
                    "bad-request",
                    f"TTL {ttl!r}: expected 0 (the channel's) or a positive number of seconds",
                )
            )
        ttl = spec.qos.effective_ttl(ttl)
        key = (tag, urgency, ttl)
        waiters = []
        position = 0
        while position < len(contents):
            pending = self._open.get(key)
            if pending is None:
                pending = self._open[key] = ([], [])
            room = self.batch_size - len(pending[0])
            chunk = contents[position : position + room]
            pending[0].extend(chunk)
            position += len(chunk)
            d = Deferred()
            pending[1].append((d, len(pending[0]) - len(chunk), len(chunk)))
            waiters.append(d)
            if len(pending[0]) >= self.batch_size:
                self._close(key)
        if self._open and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush_all)
        if len(waiters) == 1:
            # the common case, one batch: its Deferred fires with the ids
            return waiters[0]
        result = DeferredList(waiters, fireOnOneErrback=True, consumeErrors=True)
        result.addCallbacks(
            lambda results: [i for _, chunk_ids in results for i in chunk_ids],
            lambda f: f.value.subFailure,
        )
        return result

    def _flush_all(self):
        self._flush_call = None
        for key in list(self._open):
            self._close(key)

    def _close(self, key):
        """
        Seal the open batch of C{key}: give it its ids, protect it, send it.
        """
        contents, waiters = self._open.pop(key)
        tag, urgency, ttl = key
        first = self._next_id
        self._next_id += len(contents)
        batch = (
            self.client,
            first,
            self.clock.seconds(),
            ttl,
            urgency,
            pack_contents(contents),
            b"",
        )
        scheme = self.schemes(self.config.channels[tag].scheme)
        batch = scheme.protect(self.keys, tag, batch)
        chunks = [(d, list(range(first + offset, first + offset + n))) for d, offset, n in waiters]
        self._waiting.append((tag, batch, chunks))
        self._send_waiting()

    def _send_waiting(self):
        while self._waiting and self._in_flight < self.max_in_flight:
            tag, batch, chunks = self._waiting.popleft()
            self._in_flight += 1
            request = Request(self.proxy.next_seq(), units.PUBLISH, tag, 0, (batch,))
            quorum = self.config.acks_needed(tag)
            expired = {}
            positions = {}
            d = self.proxy.invoke(
                request, quorum,
                observe=lambda index, reply: self._observe(expired, index, reply, positions),
            )
            d.addCallback(self._check_expired, expired, quorum)
            d.addCallback(self._agreed_position, tag, positions)
            d.addBoth(self._acknowledged, chunks)

    def _observe(self, expired, index, reply, positions=None):
        """
        Note which replicas discarded events of the batch as expired on
        arrival: they still answer ok (a retry must not be refused), so only
        their reply's C{info} tells.  On ordered channels, note the log
        position each replica answered.
        """
        info = reply.info if isinstance(reply.info, dict) else {}
        position = info.get("position")
        if positions is not None and reply.ok and type(position) is int:
            positions[index] = position
        count = info.get("expired")
        if isinstance(count, int) and count > 0:
            expired[index] = count
            self.proxy.count(f"expired-on-arrival:replica-{index}")

    def _check_expired(self, reply, expired, quorum):
        """
        Fail a publish that a quorum of replicas acknowledged but discarded
        as expired: nothing of it will be delivered, most likely because
        this host's clock is behind the replicas'.
        """
        if len(expired) >= quorum:
            count = sorted(expired.values())[-quorum]
            raise RequestFailed(
                "expired",
                f"{count} event(s) were already past their TTL at a quorum of replicas; "
                "is this host's clock right?",
            )
        return reply

    def _agreed_position(self, reply, tag, positions):
        """
        Keep the position that f+1 replicas answered alike: at least one of
        them is correct, so a lying replica cannot make it up.
        """
        counts = {}
        for position in positions.values():
            counts[position] = counts.get(position, 0) + 1
        agreed = [p for p, n in counts.items() if n >= self.config.faults + 1]
        if agreed:
            self.positions[tag] = max(self.positions.get(tag, 0), max(agreed))
        return reply

    def _acknowledged(self, result, chunks):
        self._in_flight -= 1
        for waiter, ids in chunks:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(ids)
        self._send_waiting()

    @property
    def idle(self):
        return not self._open and not self._waiting and self._in_flight == 0
