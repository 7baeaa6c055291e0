"""
The replica's end of a client connection.
"""

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from fit_broker import units
from fit_broker.errors import ProtocolError, Status
from fit_broker.units import Reply, Request, credit_cost
from fit_broker.wire.codec import decode, encode_delivery, encode_reply
from fit_broker.wire.framing import FrameDecoder

DELIVERY_EVENTS = 400


@implementer(IPushProducer)
class ReplicaProtocol(Protocol):
    """
    Frames in, replies and pushed batches out.

    The first request must be a hello naming the client (or, over mutual TLS,
    agreeing with its certificate).  Streams are credit-based: a subscriber
    grants credits per channel and the replica pushes no more events than
    that, so a slow console slows only its own stream.  The transport's
    write buffer pauses pushing too (this protocol is its producer).
    """

    log = Logger()

    def __init__(self, replica):
        self.replica = replica
        self.decoder = FrameDecoder(replica.max_frame)
        self.client = None
        self.credits = {}
        self._flush_call = None
        self._paused = False
        self._closed = False
        self._refused = False
        self._ready = set()

    def connectionMade(self):
        self.transport.registerProducer(self, True)

    def dataReceived(self, data):
        if self._closed:
            return
        try:
            payloads = self.decoder.feed(data)
            for payload in payloads:
                message = decode(payload)
                if type(message) is not Request:
                    raise ProtocolError("clients may only send requests")
                self._request(message)
                if self._closed:
                    return
        except ProtocolError as e:
            self._reject(str(e))

    def _reject(self, reason):
        """
        Count a malformed frame, tell the peer why, and hang up.
        """
        self.replica.count("bad-frame")
        self.log.warn("dropping connection from {peer}: {reason}", peer=self._peer(), reason=reason)
        self.transport.write(encode_reply(Reply(0, Status.BAD_REQUEST, reason)))
        self._closed = self._refused = True
        self.transport.loseConnection()

    def _peer(self):
        return self.client or str(self.transport.getPeer())

    def _request(self, request):
        method = request.method
        if self.client is None:
            if method != units.HELLO:
                raise ProtocolError("the first request must be a hello")
            self._hello(request)
            return
        if method == units.CREDIT:
            if request.count > 0 and request.channel in self.credits:
                self.credits[request.channel] += request.count
                self.schedule_flush(request.channel)
            return
        reply = self.replica.handle(self.client, request)
        if request.seq:
            self.transport.write(encode_reply(reply))
        if not reply.ok:
            return
        if method == units.SUBSCRIBE and request.options.get("stream"):
            credit = request.options.get("credit", 0)
            if type(credit) is not int or credit < 0:
                credit = 0
            self.credits[request.channel] = credit
            self.replica.add_stream(request.channel, self)
            self.schedule_flush(request.channel)
        elif method == units.UNSUBSCRIBE:
            self.credits.pop(request.channel, None)
            self.replica.remove_stream(request.channel, self)

    def _hello(self, request):
        name = request.options.get("client")
        problem = self.replica.admit(name, self.transport)
        if problem:
            self.replica.count("refused-hello")
            self.log.warn("refusing client {name!r}: {problem}", name=name, problem=problem)
            self.transport.write(encode_reply(Reply(request.seq, Status.UNAUTHORIZED, problem)))
            self._closed = self._refused = True
            self.transport.loseConnection()
            return
        self.client = name
        self.transport.write(
            encode_reply(Reply(request.seq, Status.OK, info=self.replica.describe()))
        )

    def schedule_flush(self, tag):
        """
        Note that channel C{tag} may have events to push, and push in the
        next reactor turn, so that one turn's publishes leave together and
        only channels with news are looked at.
        """
        self._ready.add(tag)
        if self._flush_call is None and not self._paused and not self._closed:
            self._flush_call = self.replica.clock.callLater(0, self._flush)

    def _flush(self):
        self._flush_call = None
        if self._paused or self._closed:
            return
        replica = self.replica
        broker = replica.broker
        now = replica.clock.seconds()
        ready, self._ready = self._ready, set()
        credits = self.credits
        for tag in ready:
            credit = credits.get(tag, 0)
            if credit <= 0:
                continue
            batches = broker.take(tag, self.client, min(credit, DELIVERY_EVENTS), now)
            if not batches:
                continue
            self.transport.write(encode_delivery(tag, batches))
            credit -= sum(map(credit_cost, batches))
            credits[tag] = credit
            if credit > 0 and broker.waiting(tag, self.client):
                self._ready.add(tag)
        if self._ready:
            self._flush_call = replica.clock.callLater(0, self._flush)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        for tag in self.credits:
            self.schedule_flush(tag)

    def stopProducing(self):
        self._closed = True

    def connectionLost(self, reason):
        if self.client is None and not self._refused:
            self.replica.link_failed(str(self.transport.getPeer()), reason.getErrorMessage())
        self._closed = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for tag in self.credits:
            self.replica.remove_stream(tag, self)
        self.credits.clear()


class ReplicaFactory(Factory):
    noisy = False

    def __init__(self, replica):
        self.replica = replica

    def buildProtocol(self, addr):
        return ReplicaProtocol(self.replica)
