"""
Publishing events into channels.
"""

from collections import deque

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure

from fit_broker import units
from fit_broker.errors import FitBrokerError, RequestFailed
from fit_broker.units import Request

BATCH_SIZE = 100
MAX_IN_FLIGHT = 64


class Publisher:
    """
    Publishes events, batching what is published in one reactor turn.

    A publish is acknowledged once the channel's mode says enough replicas
    accepted it (CFT: f+1, so f crashes cannot lose it).  Event ids start
    from the clock in microseconds and increase by one per event, so a
    restarted publisher continues above its earlier ids and a retry with the
    same ids is recognised as a duplicate everywhere.

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

    def _channel(self, tag):
        spec = self.config.channel(tag)
        if spec is None:
            raise RequestFailed("unknown-channel", f"no channel {tag!r} in {self.config.path}")
        if not spec.may_publish(self.client):
            raise RequestFailed(
                "unauthorized",
                f"client {self.client!r} may not publish to channel {tag!r} "
                f"(control table in {self.config.path})",
            )
        return spec

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
        ttl = spec.qos.effective_ttl(ttl)
        now = self.clock.seconds()
        first = self._next_id
        self._next_id += len(contents)
        client = self.client
        events = [
            (client, first + i, now, ttl, urgency, content, b"")
            for i, content in enumerate(contents)
        ]
        ids = list(range(first, first + len(contents)))
        pieces = []
        position = 0
        while position < len(events):
            batch = self._open.get(tag)
            if batch is None:
                batch = self._open[tag] = ([], [])
            room = self.batch_size - len(batch[0])
            batch[0].extend(events[position : position + room])
            position += room
            d = Deferred()
            batch[1].append(d)
            pieces.append(d)
            if len(batch[0]) >= self.batch_size:
                self._close(tag)
        if tag in self._open and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush_all)
        result = DeferredList(pieces, fireOnOneErrback=True, consumeErrors=True)
        result.addCallbacks(lambda _: ids, lambda f: f.value.subFailure)
        return result

    def _flush_all(self):
        self._flush_call = None
        for tag in list(self._open):
            self._close(tag)

    def _close(self, tag):
        events, waiters = self._open.pop(tag)
        spec = self.config.channels[tag]
        scheme = self.schemes(spec.scheme)
        events, proof = scheme.protect(self.keys, tag, events)
        options = {"proof": proof} if proof else {}
        self._waiting.append((tag, tuple(events), options, waiters))
        self._send_waiting()

    def _send_waiting(self):
        while self._waiting and self._in_flight < self.max_in_flight:
            tag, events, options, waiters = self._waiting.popleft()
            self._in_flight += 1
            request = Request(self.proxy.next_seq(), units.PUBLISH, tag, 0, events, options)
            d = self.proxy.invoke(request, self.config.acks_needed(tag))
            d.addBoth(self._acknowledged, waiters)

    def _acknowledged(self, result, waiters):
        self._in_flight -= 1
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        self._send_waiting()

    @property
    def idle(self):
        return not self._open and not self._waiting and self._in_flight == 0
