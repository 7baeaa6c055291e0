"""
L2, client side: the service proxy that talks to every replica at once.
"""

from collections import Counter, OrderedDict

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from fit_broker import units
from fit_broker.errors import NoQuorum, ProtocolError, RequestFailed
from fit_broker.units import Delivery, Reply, Request
from fit_broker.wire.codec import decode, encode_request
from fit_broker.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder

DEFAULT_TIMEOUT = 30.0
MAX_UNANSWERED = 4096


class ReplicaLink(Protocol):
    """
    The client's connection to one replica: says hello, then moves frames.
    """

    log = Logger()

    def __init__(self, proxy, index):
        self.proxy = proxy
        self.index = index
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.ready = False

    def connectionMade(self):
        self.transport.write(
            encode_request(Request(0, units.HELLO, options={"client": self.proxy.client}))
        )

    def dataReceived(self, data):
        try:
            for payload in self.decoder.feed(data):
                message = decode(payload)
                if type(message) is Delivery:
                    self.proxy.delivery_received(self.index, message)
                elif not self.ready:
                    self._hello_reply(message)
                else:
                    self.proxy.reply_received(self.index, message)
        except ProtocolError as e:
            self.proxy.count(f"bad-frame:replica-{self.index}")
            self.log.warn("replica {index} sent a bad frame: {e}", index=self.index, e=e)
            self.transport.loseConnection()

    def _hello_reply(self, reply):
        if reply.ok:
            self.ready = True
            self.proxy.link_up(self.index, self)
        else:
            self.proxy.link_refused(self.index, reply.text)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.ready:
            self.ready = False
            self.proxy.link_down(self.index, self)


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
    @ivar on_delivery: callable taking C{(replica index, Delivery)}.
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
        self.counters = {}
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
        policy = backoffPolicy(initialDelay=0.1, maxDelay=5.0, factor=2.0)
        for index, endpoint in enumerate(self._endpoints):
            service = ClientService(
                endpoint, _LinkFactory(self, index), retryPolicy=policy, clock=self.reactor
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
        with L{NoQuorum} after C{timeout} seconds saying what was tried.
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
        return d

    def _reachability(self, count):
        where = ", ".join(spec.connect for spec in self.config.replicas)
        text = f"{len(self.links)} of {self.replicas} replicas reachable, {count} needed ({where})"
        if self.refusals:
            text += "; refused: " + "; ".join(
                f"replica {index}: {why}" for index, why in sorted(self.refusals.items())
            )
        elif not self.links:
            text += "; is the cluster running?"
        return text

    def link_up(self, index, link):
        self.links[index] = link
        self.refusals.pop(index, None)
        for waiter in list(self._ready_waiters):
            if len(self.links) >= waiter[0]:
                self._ready_waiters.remove(waiter)
                waiter[2].cancel()
                waiter[1].callback(len(self.links))
        unanswered = self._unanswered[index]
        if unanswered:
            link.transport.writeSequence([p.frame for p in unanswered.values()])
        for hook in self.on_link_up:
            hook(index)

    def link_down(self, index, link):
        if self.links.get(index) is link:
            del self.links[index]

    def link_refused(self, index, text):
        self.refusals[index] = text
        self.count("refused-hello")
        for pending in list(self._unanswered[index].values()):
            self._record(index, pending, Reply(pending.request.seq, "unauthorized", text))

    def send(self, index, request):
        """
        Send C{request} to one replica if it is connected, expecting nothing back.
        """
        link = self.links.get(index)
        if link is not None:
            link.transport.write(encode_request(request))

    def invoke(self, request, quorum, timeout=None, retry=True, observe=None):
        """
        Send C{request} to every replica; return a Deferred firing with the
        first ok L{Reply} once C{quorum} replicas answered ok.

        @param retry: keep the request for replicas that cannot be reached
            now and send it when they reconnect.
        @param observe: called with C{(replica index, reply)} for every ok
            reply, also those that arrive after the request was decided.
        """
        frame = encode_request(request)
        pending = _Pending(request, frame, quorum, observe)
        for index in range(self.replicas):
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
                self.log.warn("replica {index} reports: {text}", index=index, text=reply.text)
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
