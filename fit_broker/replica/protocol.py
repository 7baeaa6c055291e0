"""
The replica's end of a client connection.
"""

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from fit_broker import units
from fit_broker.errors import ProtocolError, Status
from fit_broker.ratelimit import shorten
from fit_broker.units import Reply, Request
from fit_broker.wire.codec import decode, encode_delivery, encode_ordered_delivery, encode_reply
from fit_broker.wire.framing import FrameDecoder

SESSION_MAX = 64
CLOSE_GRACE = 5.0


@implementer(IPushProducer)
class ReplicaProtocol(Protocol):
    """
    Frames in, replies and pushed batches out.

    The first request must be a hello naming the client (or, over mutual TLS,
    agreeing with its certificate) and its session: a client's reconnects
    carry the same session id, another process of the same client another.
    Streams (L{fit_broker.broker.stream.Stream}) are credit-based, in events
    and bytes; the transport's write buffer pauses pushing too (this protocol
    is its producer).
    """

    log = Logger()

    def __init__(self, replica):
        self.replica = replica
        self.decoder = FrameDecoder(replica.max_frame)
        self.client = None
        self.session = None
        self.streams = {}
        self._flush_call = None
        self._paused = False
        self._closed = False
        self._refused = False
        self._ready = set()
        # until hello, only small frames: unknown peers cannot make us buffer much
        self.decoder.max_frame = min(replica.max_frame, replica.pre_hello_max_frame)
        self._joined = False
        self._backlog = []
        self._reading_paused = False
        self._hello_timer = None
        self._close_timer = None
        self._peer_link = None

    def connectionMade(self):
        problem = self.replica.connection_opened(self)
        if problem is not None:
            self._closed = self._refused = True
            self.transport.abortConnection()
            return
        self.transport.registerProducer(self, True)
        self._hello_timer = self.replica.clock.callLater(
            self.replica.hello_timeout, self._hello_overdue
        )

    def dataReceived(self, data):
        if self._closed:
            return
        try:
            self._backlog.extend(self._frames(data))
            self._handle_backlog()
        except ProtocolError as e:
            self._reject(str(e))

    def _frames(self, data):
        """
        Split C{data} into frame payloads.  Before hello only small frames
        are taken; a hello may still share a read with a larger frame behind
        it, which is taken once the hello is (the hello is handled first).
        """
        decoder = self.decoder
        try:
            return decoder.feed(data)
        except ProtocolError:
            if self.client is not None:
                raise
            # on error the decoder kept every byte: look again with the full
            # limit, and go on only if the first frame is a small one
            decoder.max_frame = self.replica.max_frame
            payloads = decoder.feed(b"")
            if not payloads or len(payloads[0]) > self.replica.pre_hello_max_frame:
                raise
            return payloads

    def _handle_backlog(self):
        """
        Handle received frames in order until reading is paused because the
        peer does not read our replies; the rest wait for L{resumeProducing}.
        """
        payloads, self._backlog = self._backlog, []
        for position, payload in enumerate(payloads):
            if self._reading_paused:
                self._backlog = payloads[position:]
                return
            if self._peer_link is not None:
                self._peer_frames(payloads[position:])
                return
            message = decode(payload)
            if type(message) is not Request:
                raise ProtocolError("clients may only send requests")
            self._request(message)
            if self._closed:
                return
            if not self._joined:
                if self.client is None:
                    self.decoder.max_frame = min(
                        self.replica.max_frame, self.replica.pre_hello_max_frame
                    )
                else:
                    self._said_hello()

    def _said_hello(self):
        """
        The hello was accepted: lift the small frame limit and stop the clock.
        """
        self._joined = True
        self.decoder.max_frame = self.replica.max_frame
        self.replica.client_joined(self, self.client)
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None

    def _hello_overdue(self):
        self._hello_timer = None
        if self.client is not None:
            return
        if not self._closed:
            self.replica.hello_overdue(self)
        self._closed = self._refused = True
        self.transport.abortConnection()

    def evict(self, why):
        """
        Close this connection at once, without a word (it has not said hello).
        """
        self._closed = self._refused = True
        self.transport.abortConnection()

    def hang_up(self):
        """
        Close once what was written is sent.  Under TLS a registered
        producer holds the connection open until it unregisters, so this
        protocol unregisters first.
        """
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            pass  # none registered (a test transport says so loudly)
        self.transport.loseConnection()

    def peer(self):
        """
        Who is at the other end, for logs: the client name once known.
        """
        return self._peer()

    def _reject(self, reason):
        """
        Count a malformed frame, tell the peer why, and hang up (at once if
        it does not read what is left within L{CLOSE_GRACE} seconds).
        """
        self.replica.count("bad-frame")
        self.replica.warnings.warn(
            "bad-frame", "dropping connection from {peer}: {reason}", peer=self._peer(), reason=reason
        )
        self.transport.write(encode_reply(Reply(0, Status.BAD_REQUEST, shorten(reason))))
        self._closed = self._refused = True
        self.hang_up()
        if self._close_timer is None:
            self._close_timer = self.replica.clock.callLater(
                CLOSE_GRACE, self.transport.abortConnection
            )

    def _peer(self):
        return self.client or str(self.transport.getPeer())

    def _request(self, request):
        method = request.method
        if self.client is None:
            if method != units.HELLO:
                raise ProtocolError("the first request must be a hello")
            self._hello(request)
            return
        tag = request.channel
        if method == units.CREDIT:
            stream = self.streams.get(tag)
            if stream is not None:
                stream.grant(request.count, request.options.get("bytes"))
                self.schedule_flush(tag)
            return
        if method == units.SUBSCRIBE and request.options.get("stream"):
            problem = self.replica.claim_stream(
                tag, self, bool(request.options.get("takeover", False))
            )
            if problem is not None:
                if request.seq:
                    self.transport.write(
                        encode_reply(Reply(request.seq, Status.BUSY, problem, channel=tag))
                    )
                return
        reply = self.replica.handle(self.client, request, self)
        if reply is not None:
            self.answered(request, reply)

    def answered(self, request, reply):
        """
        Send the reply to C{request}, now or once the replicated log
        answered it, and open or close the stream it asked for.
        """
        if self._closed:
            return
        method = request.method
        tag = request.channel
        if request.seq:
            self.transport.write(encode_reply(reply))
        if not reply.ok:
            if method == units.SUBSCRIBE:
                self.replica.release_stream(tag, self)
            return
        if method == units.SUBSCRIBE and request.options.get("stream"):
            credit = request.options.get("credit", 0)
            credit_bytes = request.options.get("credit_bytes", 0)
            self.streams[tag] = self.replica.broker.open_stream(
                tag, self.client, credit, credit_bytes
            )
            self.schedule_flush(tag)
        elif method == units.UNSUBSCRIBE:
            self.drop_stream(tag)

    def notify(self, text, tag=""):
        """
        Tell the client something that answers no request of its own.
        """
        if not self._closed:
            self.transport.write(encode_reply(Reply(0, Status.BUSY, text, channel=tag)))

    def drop_stream(self, tag):
        """
        Stop pushing C{tag} on this connection (unsubscribed, or taken over
        by another connection of the same client).
        """
        self.streams.pop(tag, None)
        self.replica.release_stream(tag, self)

    def _hello(self, request):
        if "replica" in request.options:
            self._peer_hello(request)
            return
        name = request.options.get("client")
        problem = self.replica.admit(name, self.transport)
        if problem:
            self.replica.count("refused-hello")
            self.replica.warnings.warn(
                "refused-hello", "refusing client {name!r}: {problem}",
                name=shorten(name if type(name) is str else repr(name)), problem=problem,
            )
            self.transport.write(encode_reply(Reply(request.seq, Status.UNAUTHORIZED, problem)))
            self._closed = self._refused = True
            self.hang_up()
            return
        self.client = name
        session = request.options.get("session")
        if type(session) is str and 0 < len(session) <= SESSION_MAX:
            self.session = session
        self.transport.write(
            encode_reply(Reply(request.seq, Status.OK, info=self.replica.describe()))
        )

    def _peer_hello(self, request):
        """
        Another replica says hello: once its links (L{PeerLinks.accept})
        check it, this connection carries its frames to them, not requests.
        """
        peers = getattr(self.replica, "peers", None)
        identify = self.replica.identify
        if peers is None:
            problem, link = f"replica {self.replica.index} takes no links from replicas", None
        else:
            proven = identify(self.transport) if identify is not None else None
            problem, link = peers.accept(
                request.options, self.transport, proven, identify is not None
            )
        if problem:
            self.replica.count("refused-replica-hello")
            self.replica.warnings.warn(
                "refused-replica-hello", "refusing a link from {peer}: {problem}",
                peer=str(self.transport.getPeer()), problem=problem,
            )
            self.transport.write(encode_reply(Reply(request.seq, Status.UNAUTHORIZED, problem)))
            self._closed = self._refused = True
            self.hang_up()
            return
        self._peer_link = link
        self.client = link.name
        self.transport.write(encode_reply(Reply(request.seq, Status.OK, info=link.hello_info())))

    def _peer_frames(self, payloads):
        """
        Hand a peer's frames to its link; reset the connection when it says so.
        """
        if self._peer_link.frames(payloads) is not None and not self._closed:
            self._closed = self._refused = True
            self.transport.abortConnection()

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
        now = replica.clock.seconds()
        ready, self._ready = self._ready, set()
        streams = self.streams
        write = self.transport.write
        for tag in ready:
            stream = streams.get(tag)
            if stream is None:
                continue
            batches = stream.take(now)
            if stream.ordered:
                watermark = stream.queue.watermark(replica.broker.state.position)
                if batches or watermark > stream.sent_watermark:
                    stream.sent_watermark = watermark
                    write(encode_ordered_delivery(tag, batches, watermark))
            elif batches:
                write(encode_delivery(tag, batches))
            if batches and stream.ready:
                self._ready.add(tag)
        if self._ready:
            self._flush_call = replica.clock.callLater(0, self._flush)

    def pauseProducing(self):
        self._paused = True
        self._pause_reading()

    def _reader(self):
        """
        The transport that reads the socket: below TLS when TLS wraps us.
        """
        transport = self.transport
        while isinstance(transport, ProtocolWrapper):
            transport = transport.transport
        return transport

    def _pause_reading(self):
        """
        Our replies are not being read: read no more requests until they are,
        so that a peer cannot make the write buffer grow without bound.
        """
        if not self._reading_paused and not self._closed:
            self._reading_paused = True
            self.replica.count("reading-paused")
            self._reader().pauseProducing()

    def _resume_reading(self):
        if not self._reading_paused or self._closed:
            return
        self._reading_paused = False
        try:
            self._handle_backlog()
        except ProtocolError as e:
            self._reject(str(e))
            return
        if not self._reading_paused and not self._closed:
            self._reader().resumeProducing()

    def resumeProducing(self):
        self._paused = False
        for tag in self.streams:
            self.schedule_flush(tag)
        self._resume_reading()

    def stopProducing(self):
        self._closed = True

    def connectionLost(self, reason):
        if self._peer_link is not None:
            self._peer_link.lost()
        if self.client is None and not self._refused:
            self.replica.link_failed(str(self.transport.getPeer()), reason.getErrorMessage())
        self._closed = True
        self.replica.connection_closed(self)
        for timer in (self._hello_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._hello_timer = self._close_timer = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        for tag in list(self.streams):
            self.drop_stream(tag)


class ReplicaFactory(Factory):
    noisy = False

    def __init__(self, replica):
        self.replica = replica

    def buildProtocol(self, addr):
        return ReplicaProtocol(self.replica)
