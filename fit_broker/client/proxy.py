"""
L2, client side: the service proxy that talks to every replica at once.
"""

import os
from collections import Counter, OrderedDict

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from fit_broker import units
from fit_broker.errors import NoQuorum, ProtocolError, RequestFailed
from fit_broker.ratelimit import RateLimitedLog, shorten
from fit_broker.reconnect import reconnecting, retry_policy
from fit_broker.units import Delivery, OrderedDelivery, Reply, Request
from fit_broker.wire.codec import decode, encode_request
from fit_broker.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder

DEFAULT_TIMEOUT = 30.0
MAX_UNANSWERED = 4096


class _BadLink(Exception):
    """
    A replica sent something no correct replica sends.
    """

    def __init__(self, reason, text):
        super().__init__(text)
        self.reason = reason
        self.text = text


class ReplicaLink(Protocol):
    """
    The client's connection to one replica: says hello, then moves frames.

    Replicas may be faulty or hostile: whatever one sends that a correct
    replica would not (a request, a delivery or a stray reply before the
    hello is answered, bytes that do not decode, something that breaks while
    being handled) is counted, logged within a rate and answered by hanging
    up; the proxy's service reconnects with backoff.
    """

    log = Logger()

    def __init__(self, proxy, index):
        self.proxy = proxy
        self.index = index
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.ready = False
        self._answered = False
        self._hello_sent = proxy.reactor.seconds()
        self._reset = False

    def connectionMade(self):
        self._hello_sent = self.proxy.reactor.seconds()
        self.transport.write(
            encode_request(
                Request(
                    0,
                    units.HELLO,
                    options={"client": self.proxy.client, "session": self.proxy.session},
                )
            )
        )

    def dataReceived(self, data):
        if self._reset:
            return
        try:
            for payload in self.decoder.feed(data):
                message = decode(payload)
                kind = type(message)
                if kind is Request:
                    raise _BadLink("request-from-replica", f"a {shorten(message.method, 40)!r} request")
                if not self.ready:
                    if kind is Delivery or kind is OrderedDelivery:
                        raise _BadLink("delivery-before-hello", "a delivery before answering the hello")
                    self._hello_reply(message)
                elif kind is Delivery or kind is OrderedDelivery:
                    self.proxy.delivery_received(self.index, message)
                else:
                    self.proxy.reply_received(self.index, message)
                if self._reset:
                    return
        except ProtocolError as e:
            self._fail("bad-frame", f"a bad frame: {e}")
        except _BadLink as e:
            self._fail(e.reason, e.text)
        except Exception as e:
            self._fail("handling-error", f"a frame that failed in handling: {type(e).__name__}: {e}")

    def _fail(self, reason, text):
        """
        Count and log what the replica did, and hang up.
        """
        self.proxy.count(f"{reason}:replica-{self.index}")
        self.proxy.warnings.warn(
            f"{reason}:replica-{self.index}",
            "replica {index} sent {what}; reconnecting",
            index=self.index,
            what=text,
        )
        self._reset = True
        if self.ready:
            self.ready = False
            self.proxy.link_down(self.index, self)
        elif not self._answered:
            self._answered = True
            self.proxy.connect_failed(self.index, f"bad hello reply: {text}")
        self.transport.loseConnection()

    def _hello_reply(self, reply):
        if reply.seq != 0:
            raise _BadLink("bad-hello", f"a reply to request {reply.seq} before answering the hello")
        if reply.ok:
            claimed = reply.info.get("replica", self.index)
            if claimed != self.index:
                raise _BadLink("bad-hello", f"a hello reply as replica {shorten(claimed)!r}")
            self._answered = True
            self.ready = True
            self.proxy.clock_seen(self.index, reply.info.get("now"), self._hello_sent)
            self.proxy.link_up(self.index, self)
        else:
            self._answered = True
            self.proxy.link_refused(self.index, reply.text)
            self._reset = True
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.ready:
            self.ready = False
            self.proxy.link_down(self.index, self)
        elif not self._answered:
            self._answered = True
            self.proxy.connect_failed(
                self.index, f"connection lost before hello: {reason.getErrorMessage()}"
            )


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """
    A client endpoint that tells the proxy when a connection attempt fails,
    so that waiting for links can give up once enough replicas refuse.
    """

    def __init__(self, endpoint, proxy, index):
        self.endpoint = endpoint
        self.proxy = proxy
        self.index = index

    def connect(self, factory):
        def failed(failure):
            self.proxy.connect_failed(self.index, failure.getErrorMessage())
            return failure

        return self.endpoint.connect(factory).addErrback(failed)


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, proxy, index):
        self.proxy = proxy
        self.index = index

    def buildProtocol(self, addr):
        return ReplicaLink(self.proxy, self.index)


class _Pending:
    __slots__ = (
        "request", "frame", "deferred", "quorum", "oks", "errors", "timer", "done", "observe"
    )

    def __init__(self, request, frame, quorum, observe=None):
        self.observe = observe
        self.request = request
        self.frame = frame
        self.deferred = Deferred()
        self.quorum = quorum
        self.oks = []
        self.errors = {}
        self.timer = None
        self.done = False


class ServiceProxy:
    """
    Sends every request to all replicas and combines their replies.

    A request succeeds once C{quorum} replicas answered ok, and fails as soon
    as so many answered with errors that the quorum cannot be reached, or
    when the timeout passes first.  Requests that a replica has not answered
    are kept for it (within a bound) and sent again when it reconnects, so a
    replica that was down catches up on what it missed.

    @ivar on_link_up: callables taking a replica index, run when a link to
        that replica is (again) ready.
    @ivar on_delivery: callable taking C{(replica index, Delivery or
        OrderedDelivery)}.
    """

    log = Logger()

    def __init__(self, config, client, reactor, endpoints=None, timeout=DEFAULT_TIMEOUT):
        """
        @param endpoints: client endpoints to use instead of the configured
            endpoint strings (TLS links, tests).
        """
        self.config = config
        self.client = client
        self.reactor = reactor
        self.timeout = timeout
        self.replicas = len(config.replicas)
        self.links = {}
        self.refusals = {}
        self.unreachable = {}
        self.clock_offsets = {}
        self.counters = {}
        self.session = os.urandom(8).hex()
        self.warnings = RateLimitedLog(self.log, reactor)
        self.on_link_up = []
        self.on_delivery = lambda index, delivery: None
        self._unanswered = {index: OrderedDict() for index in range(self.replicas)}
        self._seq = 0
        self._services = []
        self._endpoints = endpoints or [
            clientFromString(reactor, spec.connect) for spec in config.replicas
        ]
        self._ready_waiters = []

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def start(self):
        policy = retry_policy()
        for index, endpoint in enumerate(self._endpoints):
            service = reconnecting(
                _ReportingEndpoint(endpoint, self, index),
                _LinkFactory(self, index),
                self.reactor,
                policy,
            )
            service.startService()
            self._services.append(service)

    def stop(self):
        for service in self._services:
            service.stopService()
        self._services = []

    def next_seq(self):
        self._seq += 1
        return self._seq

    def wait_for_links(self, count, timeout):
        """
        Return a Deferred that fires once C{count} links are ready, or fails
        with L{NoQuorum} saying what was tried: after C{timeout} seconds, or
        as soon as so many replicas refused or failed their latest
        connection attempt that C{count} cannot be reached.
        """
        d = Deferred()
        if len(self.links) >= count:
            d.callback(len(self.links))
            return d
        waiter = [count, d, None]

        def expired():
            self._ready_waiters.remove(waiter)
            d.errback(NoQuorum(self._reachability(count)))

        waiter[2] = self.reactor.callLater(timeout, expired)
        self._ready_waiters.append(waiter)
        self._check_hopeless()
        return d

    def _failed_replicas(self):
        """
        Replicas that are not linked and whose latest attempt failed or was refused.
        """
        return {
            index
            for index in list(self.unreachable) + list(self.refusals)
            if index not in self.links
        }

    def _check_hopeless(self):
        """
        Fail the waiters whose count of links can no longer be reached.
        """
        failed = len(self._failed_replicas())
        for waiter in list(self._ready_waiters):
            if failed >= self.replicas - waiter[0] + 1:
                self._ready_waiters.remove(waiter)
                waiter[2].cancel()
                waiter[1].errback(NoQuorum(self._reachability(waiter[0])))

    def connect_failed(self, index, why):
        """
        Note that the latest attempt to reach replica C{index} failed.
        """
        self.count(f"connect-failed:replica-{index}")
        self.unreachable[index] = shorten(why)
        self._check_hopeless()

    def _reachability(self, count):
        where = ", ".join(spec.connect for spec in self.config.replicas)
        text = f"{len(self.links)} of {self.replicas} replicas reachable, {count} needed ({where})"
        if self.refusals:
            text += "; refused: " + "; ".join(
                f"replica {index}: {why}" for index, why in sorted(self.refusals.items())
            )
        unreachable = {i: why for i, why in self.unreachable.items() if i not in self.refusals}
        if unreachable:
            text += "; unreachable: " + "; ".join(
                f"replica {index} at {self.config.replicas[index].connect}: {why}"
                for index, why in sorted(unreachable.items())
            )
        if not self.links and not self.refusals:
            text += "; is the cluster running?"
        return text

    def clock_seen(self, index, replica_now, sent):
        """
        Note replica C{index}'s clock as its hello reply gave it, against
        ours halfway through the round trip since C{sent}.
        """
        if type(replica_now) not in (int, float) or replica_now != replica_now:
            return
        now = self.reactor.seconds()
        offset = replica_now - (sent + now) / 2
        if abs(offset) < 1e9:
            self.clock_offsets[index] = offset

    def clock_offset(self):
        """
        Return how far the replicas' clocks are ahead of ours (the median of
        what their hellos said, so f liars cannot move it far), or C{None}.
        """
        offsets = sorted(self.clock_offsets.values())
        if not offsets:
            return None
        return offsets[len(offsets) // 2]

    def link_up(self, index, link):
        self.links[index] = link
        self.refusals.pop(index, None)
        self.unreachable.pop(index, None)
        # what the link missed goes first: a waiter woken below may invoke,
        # and its request must be written on this link once, not again here
        unanswered = self._unanswered[index]
        if unanswered:
            link.transport.writeSequence([p.frame for p in unanswered.values()])
        for waiter in list(self._ready_waiters):
            if len(self.links) >= waiter[0]:
                self._ready_waiters.remove(waiter)
                waiter[2].cancel()
                waiter[1].callback(len(self.links))
        for hook in self.on_link_up:
            hook(index)

    def link_down(self, index, link):
        if self.links.get(index) is link:
            del self.links[index]

    def link_refused(self, index, text):
        text = shorten(text)
        self.refusals[index] = text
        self.count("refused-hello")
        self.warnings.warn(
            f"refused-hello:replica-{index}",
            "replica {index} refused our hello: {text}",
            index=index,
            text=text,
        )
        self._check_hopeless()
        for pending in list(self._unanswered[index].values()):
            self._record(index, pending, Reply(pending.request.seq, "unauthorized", text))

    def send(self, index, request):
        """
        Send C{request} to one replica if it is connected, expecting nothing back.
        """
        link = self.links.get(index)
        if link is not None:
            link.transport.write(encode_request(request))

    def invoke(self, request, quorum, timeout=None, retry=True, observe=None, only=None):
        """
        Send C{request} to every replica; return a Deferred firing with the
        first ok L{Reply} once C{quorum} replicas answered ok.

        @param retry: keep the request for replicas that cannot be reached
            now and send it when they reconnect.
        @param observe: called with C{(replica index, reply)} for every ok
            reply, also those that arrive after the request was decided.
        @param only: the replica indexes to ask, or C{None} for all.
        """
        frame = encode_request(request)
        pending = _Pending(request, frame, quorum, observe)
        for index in range(self.replicas):
            if only is not None and index not in only:
                pending.errors[index] = Reply(request.seq, "not-asked", "not asked")
                continue
            link = self.links.get(index)
            if link is None and not retry:
                continue
            if index in self.refusals and link is None:
                pending.errors[index] = Reply(request.seq, "unauthorized", self.refusals[index])
                continue
            unanswered = self._unanswered[index]
            unanswered[request.seq] = pending
            if len(unanswered) > MAX_UNANSWERED:
                self._shed(index)
            if link is not None:
                link.transport.write(frame)
        pending.timer = self.reactor.callLater(
            self.timeout if timeout is None else timeout, self._timed_out, pending
        )
        self._check(pending)
        return pending.deferred

    def _shed(self, index):
        """
        Drop the oldest decided requests kept for an unreachable replica.
        """
        unanswered = self._unanswered[index]
        for seq, pending in list(unanswered.items()):
            if len(unanswered) <= MAX_UNANSWERED:
                break
            if pending.done:
                del unanswered[seq]
                self.count(f"not-sent:replica-{index}")

    def reply_received(self, index, reply):
        pending = self._unanswered[index].pop(reply.seq, None)
        if pending is None:
            if reply.seq == 0 and not reply.ok:
                self.count(f"error-report:replica-{index}")
                self.warnings.warn(
                    f"error-report:replica-{index}",
                    "replica {index} reports: {text}",
                    index=index,
                    text=reply.text,
                )
                return
            self.count("unexpected-reply")
            return
        self._record(index, pending, reply)

    def _record(self, index, pending, reply):
        self._unanswered[index].pop(pending.request.seq, None)
        if reply.ok:
            pending.oks.append((index, reply))
            if pending.observe is not None:
                pending.observe(index, reply)
        else:
            pending.errors[index] = reply
        self._check(pending)

    def _check(self, pending):
        if pending.done:
            return
        if len(pending.oks) >= pending.quorum:
            self._finish(pending)
            pending.deferred.callback(pending.oks[0][1])
        elif self.replicas - len(pending.errors) < pending.quorum:
            self._finish(pending)
            (status, text), _ = Counter(
                (r.status, r.text) for r in pending.errors.values()
            ).most_common(1)[0]
            pending.deferred.errback(RequestFailed(status, text))

    def _finish(self, pending):
        pending.done = True
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()

    def _timed_out(self, pending):
        if pending.done:
            return
        pending.done = True
        answered = len(pending.oks) + len(pending.errors)
        pending.deferred.errback(
            NoQuorum(
                f"{pending.request.method} on {pending.request.channel!r}: "
                f"{len(pending.oks)} of {pending.quorum} acknowledgements needed, "
                f"{answered} of {self.replicas} replicas answered; "
                + self._reachability(pending.quorum)
            )
        )

    def delivery_received(self, index, delivery):
        self.on_delivery(index, delivery)
