"""
Links between replicas, for the agreement protocol and for fetching what a
replica missed.

Replica i connects out to every replica j != i on j's ordinary client port,
so each pair has two connections, one per direction: a replica sends only
on its own outgoing links and receives only on incoming ones, which keeps
both ends simple and symmetric.  The outgoing end says hello as
C{Request(0, "hello", options={"replica": i, "cluster": name})}; over TLS
it shows its own replica certificate and checks that j's names replica-j.
The receiving replica (L{fit_broker.replica.protocol}) checks the hello and
hands the connection to L{PeerLinks.accept}; its reply carries a fresh
nonce for the connection.

Every frame after the hello is C{[5, sender, counter, kind, body, mac]}
where C{mac} is HMAC-SHA256, under the key the pair shares
(L{fit_broker.keys.KeyRing.peer_mac_key}), over sender, receiver, the
connection's nonce, counter, kind and body.  Counters rise within a
connection and the nonce changes with each connection, so a frame is
accepted once, on the connection it was made for.  A frame with a bad MAC,
a counter not above the last one, or an unknown kind is counted and
dropped; a second bad frame in a row resets the link.  Without MAC keys (a
cluster with no keys folder, or one written before replicas linked up)
frames carry an empty MAC and links are taken only when TLS proved who the
peer is.

Sending never buffers without limit: while the outgoing connection's buffer
holds more than L{MAX_BUFFERED_BYTES} (or L{MAX_BUFFERED_FRAMES}) a send is
dropped and counted, and a peer that reads nothing for L{STALL_TIMEOUT}
seconds is cut off (it reconnects, and catches up by the agreement
protocol's retransmissions and state transfer).
"""

import hmac
import os
from hashlib import sha256

import msgpack
from twisted.application.service import Service
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from fit_broker import units
from fit_broker.errors import ProtocolError
from fit_broker.keys import replica_identity
from fit_broker.ratelimit import RateLimitedLog, shorten
from fit_broker.reconnect import reconnecting, retry_policy
from fit_broker.units import Reply, Request
from fit_broker.wire.codec import PeerFrame, decode, encode_peer_frame, encode_request
from fit_broker.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder

#: The kinds of frame replicas exchange.
KINDS = frozenset({"agreement", "fetch"})
#: Bytes and frames written to a peer that is not reading, past which sends
#: to it are dropped.
MAX_BUFFERED_BYTES = 16 << 20
MAX_BUFFERED_FRAMES = 65_536
#: Seconds a peer may leave our frames unread before its link is cut.
STALL_TIMEOUT = 30.0
#: Seconds the peer has to answer our hello.
HELLO_TIMEOUT = 10.0
#: A frame's fields besides its body take far less than this.
FRAME_OVERHEAD = 1024
#: The largest body a frame carries: what the receiving replica's framing takes.
MAX_BODY = DEFAULT_MAX_FRAME - FRAME_OVERHEAD
NONCE_SIZE = 16
#: The largest frame a peer sends back on our link: its hello reply.
MAX_REPLY = 64 * 1024
#: Bad frames in a row that reset an incoming link.
BAD_IN_A_ROW = 2
#: Incoming links of one sender that have not yet shown a valid frame; past
#: it the oldest is closed.  A proven link replaces the sender's older ones.
MAX_UNPROVEN = 4

#: Every counter kept per peer, so that all are reported, zeros included.
COUNTERS = (
    "sent", "sent-bytes", "received", "received-bytes",
    "dropped", "dropped-down", "dropped-full", "dropped-oversize",
    "bad-mac", "bad-counter", "bad-kind", "bad-sender", "bad-frame",
    "resets", "stalled", "connects", "disconnects", "refused", "hello-refused",
    "hello-timeouts", "lost-before-hello", "replaced", "handler-errors",
)

_pack = msgpack.Packer(use_bin_type=True).pack


def frame_mac(key, sender, receiver, nonce, counter, kind, body):
    """
    Return the HMAC-SHA256 of a frame under the pair's C{key}.  The header
    is packed with the body's length, so no two frames share MAC input.
    """
    mac = hmac.new(key, _pack((sender, receiver, nonce, counter, kind, len(body))), sha256)
    mac.update(body)
    return mac.digest()


class FrameSealer:
    """
    The sending end of one link (sans-IO): numbers and MACs frames.

    @param key: the pair's MAC key, or C{None} (empty MACs; TLS only).
    @param nonce: the receiver's nonce for this connection.
    """

    def __init__(self, sender, receiver, key, nonce):
        self.sender = sender
        self.receiver = receiver
        self.key = key
        self.nonce = nonce
        self.counter = 0

    def seal(self, kind, body):
        """
        Return the encoded frame carrying C{body}.
        """
        self.counter += 1
        mac = b""
        if self.key is not None:
            mac = frame_mac(
                self.key, self.sender, self.receiver, self.nonce, self.counter, kind, body
            )
        return encode_peer_frame(self.sender, self.counter, kind, body, mac)


class FrameChecker:
    """
    The receiving end of one link (sans-IO): which frames to take.

    @param key: the pair's MAC key, or C{None} when TLS proved the sender
        (the MAC is then not looked at).
    @ivar bad_in_a_row: bad frames since the last good one.
    """

    def __init__(self, sender, receiver, key, nonce, kinds=KINDS):
        self.sender = sender
        self.receiver = receiver
        self.key = key
        self.nonce = nonce
        self.kinds = kinds
        self.last = 0
        self.bad_in_a_row = 0

    def check(self, frame):
        """
        Return why L{PeerFrame} C{frame} must be dropped (a counter name),
        or C{None} to take it.
        """
        reason = self._reason(frame)
        self.bad_in_a_row = self.bad_in_a_row + 1 if reason else 0
        return reason

    def _reason(self, frame):
        if frame.sender != self.sender:
            return "bad-sender"
        if self.key is not None:
            expected = frame_mac(
                self.key, self.sender, self.receiver, self.nonce, frame.counter, frame.kind,
                frame.body,
            )
            if not hmac.compare_digest(expected, frame.mac):
                return "bad-mac"
        if frame.counter <= self.last:
            return "bad-counter"
        self.last = frame.counter
        if frame.kind not in self.kinds:
            return "bad-kind"
        return None

    @property
    def should_reset(self):
        return self.bad_in_a_row >= BAD_IN_A_ROW


class IncomingLink:
    """
    The receiving end of a connection a peer opened: gets the frames the
    replica's protocol read after the peer's hello was accepted.

    @ivar proven: a frame passed its MAC (or TLS proved the peer at hello).
    """

    def __init__(self, links, sender, transport, nonce, key):
        self.links = links
        self.sender = sender
        self.transport = transport
        self.nonce = nonce
        self.checker = FrameChecker(sender, links.index, key, nonce, links.kinds)
        self.proven = key is None
        self.closed = False

    @property
    def name(self):
        return replica_identity(self.sender)

    def hello_info(self):
        """
        What the hello reply tells the peer: who answered, and the nonce
        its frames on this connection are MAC'd with.
        """
        links = self.links
        return {"replica": links.index, "cluster": links.config.name, "nonce": self.nonce}

    def frames(self, payloads):
        """
        Handle frame payloads; return why the connection must be reset, or
        C{None}.
        """
        links = self.links
        for payload in payloads:
            if self.closed:
                return None
            try:
                frame = decode(payload)
                if type(frame) is not PeerFrame:
                    raise ProtocolError(f"a {type(frame).__name__} where a replica frame belongs")
            except ProtocolError as e:
                links.count(self.sender, "bad-frame")
                links.count(self.sender, "resets")
                links.warn(self.sender, "bad-frame", "{what}; resetting the link", what=str(e))
                return str(e)
            reason = self.checker.check(frame)
            if reason is not None:
                links.count(self.sender, reason)
                links.warn(
                    self.sender, reason, "dropped a frame ({reason}, counter {counter})",
                    reason=reason, counter=frame.counter,
                )
                if self.checker.should_reset:
                    links.count(self.sender, "resets")
                    return f"{BAD_IN_A_ROW} bad frames in a row"
                continue
            if not self.proven:
                self.proven = True
                links.link_proven(self)
            links.received(self.sender, frame.kind, frame.body, len(payload))
        return None

    def close(self):
        """
        Drop the connection at once (the link was replaced, or we stop).
        """
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    def lost(self):
        """
        The connection ended.
        """
        self.closed = True
        self.links.link_lost(self)


@implementer(IPushProducer)
class OutgoingLink(Protocol):
    """
    The sending end of our connection to peer C{peer}: says hello, then
    writes frames.  It is its transport's producer, to learn when the peer
    stops reading and bound what is written meanwhile.
    """

    def __init__(self, links, peer):
        self.links = links
        self.peer = peer
        self.decoder = FrameDecoder(MAX_REPLY)
        self.sealer = None
        self.paused_since = None
        self.pending_bytes = 0
        self.pending_frames = 0
        self._closed = False
        self._aborted = False
        self._timer = None

    def connectionMade(self):
        links = self.links
        links.connected.add(self)
        self.transport.registerProducer(self, True)
        self.transport.write(
            encode_request(
                Request(
                    0, units.HELLO, options={"replica": links.index, "cluster": links.config.name}
                )
            )
        )
        self._timer = links.reactor.callLater(links.hello_timeout, self._hello_overdue)

    def _hello_overdue(self):
        self._timer = None
        if self.sealer is None:
            self._fail(
                "hello-timeouts", "no answer to our hello within {timeout:g} s; reconnecting",
                timeout=self.links.hello_timeout,
            )

    def dataReceived(self, data):
        if self._closed:
            return
        try:
            for payload in self.decoder.feed(data):
                message = decode(payload)
                if type(message) is not Reply:
                    raise ProtocolError(f"a {type(message).__name__} on our link to it")
                if self.sealer is None:
                    self._hello_reply(message)
                elif not message.ok:
                    self.links.warn(
                        self.peer, "peer-error", "it reports: {text}", text=message.text
                    )
                else:
                    raise ProtocolError("a reply after the hello")
                if self._closed:
                    return
        except ProtocolError as e:
            self._fail("bad-frame", "it sent {what}; reconnecting", what=str(e))

    def _hello_reply(self, reply):
        links = self.links
        if reply.seq != 0:
            raise ProtocolError(f"a reply to request {reply.seq} before answering the hello")
        if not reply.ok:
            links.count(self.peer, "refused")
            links.warn(self.peer, "refused", "it refused our hello: {text}", text=reply.text)
            self._close()
            return
        nonce = reply.info.get("nonce")
        if reply.info.get("replica") != self.peer:
            raise ProtocolError(f"a hello reply as replica {shorten(reply.info.get('replica'))!r}")
        if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
            raise ProtocolError(f"a hello reply without a {NONCE_SIZE}-byte nonce")
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.sealer = FrameSealer(links.index, self.peer, links.mac_key(self.peer), nonce)
        links.link_up(self)

    def _fail(self, reason, text, **fields):
        self.links.count(self.peer, reason)
        self.links.warn(self.peer, reason, text, **fields)
        self._close()

    def _close(self):
        """
        Drop the connection at once.  Under TLS a registered producer would
        hold a gentle close open, so it unregisters first.
        """
        self._closed = self._aborted = True
        self.transport.unregisterProducer()
        self.transport.abortConnection()

    def send(self, kind, body):
        """
        Write a frame, unless the peer left too much unread; return whether
        it was written.
        """
        links = self.links
        if self._closed:
            return links.drop(self.peer, "dropped-down")
        if self.paused_since is not None and (
            self.pending_bytes + len(body) + FRAME_OVERHEAD > links.max_buffered_bytes
            or self.pending_frames >= links.max_buffered_frames
        ):
            links.drop(self.peer, "dropped-full")
            if links.reactor.seconds() - self.paused_since > links.stall_timeout:
                self._fail(
                    "stalled", "it read nothing for {timeout:g} s; cutting the link",
                    timeout=links.stall_timeout,
                )
            return False
        frame = self.sealer.seal(kind, body)
        self.transport.write(frame)
        if self.paused_since is not None:
            self.pending_bytes += len(frame)
            self.pending_frames += 1
        links.count(self.peer, "sent")
        links.count(self.peer, "sent-bytes", len(frame))
        return True

    def pauseProducing(self):
        if self.paused_since is None:
            self.paused_since = self.links.reactor.seconds()

    def resumeProducing(self):
        self.paused_since = None
        self.pending_bytes = self.pending_frames = 0

    def stopProducing(self):
        self._closed = True

    def connectionLost(self, reason):
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        links = self.links
        links.connected.discard(self)
        if self.sealer is None and not self._aborted:
            # a TLS handshake refused (the peer's certificate does not name
            # it), or a peer that hung up on our hello
            links.count(self.peer, "lost-before-hello")
            links.warn(
                self.peer, "lost-before-hello", "connection lost before our hello was answered: "
                "{reason}", reason=reason.getErrorMessage(),
            )
        links.link_down(self)


class _OutgoingFactory(Factory):
    noisy = False

    def __init__(self, links, peer):
        self.links = links
        self.peer = peer

    def buildProtocol(self, addr):
        return OutgoingLink(self.links, self.peer)


class PeerLinks(Service):
    """
    Replica C{index}'s links with every other replica of C{config}.

    @param keys: the replica's L{fit_broker.keys.KeyRing} (its
        C{peer_mac_key}s), or C{None} for a cluster without keys.
    @param tls: with TLS on, a callable from a replica index to the client
        TLS options that connect to it (see
        L{fit_broker.credentials.replica_peer_tls}); else C{None}.
    @param on_message: called with C{(sender index, kind, body)} for each
        frame that passed its checks.
    @param endpoints: replica index -> client endpoint, instead of the
        configured ones (tests); TLS, when on, still wraps them.

    @ivar up: indexes of the peers our outgoing link to is ready.
    @ivar incoming: indexes of the peers with a proven link to us.
    @ivar counters: peer index -> counter name (L{COUNTERS}) -> number.
    @param trust_network: link without MAC keys or TLS (a crash-tolerant
        trial cluster without keys): anyone on the network could then speak
        for a replica, which a warning says at start.

    @ivar unauthenticated: peers whose links are off: no MAC key for them
        and TLS is off, so nothing would prove who is at the other end.
    @ivar connected: our outgoing connections, whether or not their hello
        was answered.
    """

    log = Logger()

    def __init__(
        self,
        index,
        config,
        reactor,
        keys,
        tls,
        on_message,
        *,
        kinds=KINDS,
        endpoints=None,
        policy=None,
        max_buffered_bytes=MAX_BUFFERED_BYTES,
        max_buffered_frames=MAX_BUFFERED_FRAMES,
        stall_timeout=STALL_TIMEOUT,
        hello_timeout=HELLO_TIMEOUT,
        trust_network=False,
    ):
        self.index = index
        self.config = config
        self.reactor = reactor
        self.keys = keys
        self.tls = tls
        self.on_message = on_message
        self.kinds = frozenset(kinds)
        self.replicas = len(config.replicas)
        self.peers = [j for j in range(self.replicas) if j != index]
        self.policy = policy or retry_policy()
        self.max_buffered_bytes = max_buffered_bytes
        self.max_buffered_frames = max_buffered_frames
        self.stall_timeout = stall_timeout
        self.hello_timeout = hello_timeout
        self.counters = {j: dict.fromkeys(COUNTERS, 0) for j in self.peers}
        self.up = set()
        self.incoming = set()
        self.trust_network = trust_network
        self.unauthenticated = frozenset(
            j for j in self.peers if tls is None and self.mac_key(j) is None and not trust_network
        )
        self.warnings = RateLimitedLog(self.log, reactor)
        self._endpoints = endpoints
        self._outgoing = {}
        self._links_in = {j: [] for j in self.peers}
        self._services = {}
        self.connected = set()

    def mac_key(self, peer):
        """
        Return the key of our link with C{peer}, or C{None}.
        """
        return None if self.keys is None else self.keys.peer_mac_key(peer)

    def count(self, peer, name, n=1):
        self.counters[peer][name] += n

    def warn(self, peer, reason, format, /, **fields):
        self.warnings.warn(
            f"{reason}:replica-{peer}", "replica {index} link with replica {link_peer}: " + format,
            index=self.index, link_peer=peer, **fields,
        )

    def drop(self, peer, reason):
        """
        Count a frame not sent to C{peer}; return C{False}.
        """
        self.counters[peer]["dropped"] += 1
        self.counters[peer][reason] += 1
        return False

    # Sending.

    def _check(self, kind, body):
        if kind not in self.kinds:
            raise ValueError(f"unknown frame kind {kind!r}: expected one of {sorted(self.kinds)}")
        if type(body) is not bytes:
            raise ValueError(f"a frame's body must be bytes, got {type(body).__name__}")

    def send(self, to, kind, body):
        """
        Send C{body} as a frame of C{kind} to replica C{to}; return whether
        it was written (a frame to a peer that is down or not reading is
        dropped and counted).

        @raise ValueError: for a replica that is not a peer, an unknown
            kind, or a body that is not bytes.
        """
        if to not in self.counters:
            raise ValueError(
                f"replica {to!r} is not a peer of replica {self.index} "
                f"(expected one of {self.peers})"
            )
        self._check(kind, body)
        if len(body) > MAX_BODY:
            return self.drop(to, "dropped-oversize")
        link = self._outgoing.get(to)
        if link is None:
            return self.drop(to, "dropped-down")
        return link.send(kind, body)

    def broadcast(self, kind, body):
        """
        Send C{body} to every other replica; return how many frames were written.
        """
        self._check(kind, body)
        return sum(self.send(j, kind, body) for j in self.peers)

    def link_up(self, link):
        old = self._outgoing.get(link.peer)
        self._outgoing[link.peer] = link
        self.up.add(link.peer)
        self.count(link.peer, "connects")
        if old is not None and old is not link:
            old._close()

    def link_down(self, link):
        if self._outgoing.get(link.peer) is link:
            del self._outgoing[link.peer]
            self.up.discard(link.peer)
            self.count(link.peer, "disconnects")

    # Receiving.

    def accept(self, options, transport, proven=None, tls=False):
        """
        Decide on a peer's hello; return C{(problem, None)} to refuse it, or
        C{(None, IncomingLink)} whose C{frames} then get every frame.

        @param options: the hello's options.
        @param proven: the identity the peer's TLS certificate proves.
        @param tls: whether the connection runs TLS (C{proven} is then checked).
        """
        sender = options.get("replica")
        cluster = options.get("cluster")
        problem = None
        if type(sender) is not int or not 0 <= sender < self.replicas:
            problem = f"replica index {shorten(sender)!r}: expected 0 to {self.replicas - 1}"
        elif sender == self.index:
            problem = f"a hello as replica {sender}, which is this replica"
        elif cluster != self.config.name:
            problem = f"a hello for cluster {shorten(cluster)!r}; this is {self.config.name!r}"
        elif tls and proven != replica_identity(sender):
            problem = (
                f"a hello as {replica_identity(sender)} "
                f"but its certificate says {shorten(proven)!r}"
            )
        elif sender in self.unauthenticated:
            problem = (
                "links between replicas need MAC keys (the keys folder) or TLS; neither is set"
            )
        elif not self.running:
            problem = f"replica {self.index} takes no links now"
        if problem is not None:
            if sender in self.counters:
                self.count(sender, "hello-refused")
            return problem, None
        key = self.mac_key(sender)
        link = IncomingLink(self, sender, transport, os.urandom(NONCE_SIZE), key)
        links = self._links_in[sender]
        links.append(link)
        unproven = [other for other in links if not other.proven]
        while len(unproven) > MAX_UNPROVEN:
            unproven.pop(0).close()
        if link.proven:
            self.link_proven(link)
        return None, link

    def link_proven(self, link):
        """
        C{link} showed it comes from its sender: it replaces the sender's
        older links (a half-open one left by a restart, say).
        """
        for other in list(self._links_in[link.sender]):
            if other is not link:
                self.count(link.sender, "replaced")
                other.close()
        self.incoming.add(link.sender)

    def link_lost(self, link):
        links = self._links_in[link.sender]
        if link in links:
            links.remove(link)
        if not any(other.proven for other in links):
            self.incoming.discard(link.sender)

    def received(self, sender, kind, body, size):
        """
        Count a frame that passed its checks and hand it on.
        """
        self.count(sender, "received")
        self.count(sender, "received-bytes", size)
        try:
            self.on_message(sender, kind, body)
        except Exception as e:
            self.count(sender, "handler-errors")
            self.warn(
                sender, "handler-error", "handling a {kind!r} frame failed: {error}",
                kind=kind, error=f"{type(e).__name__}: {e}",
            )

    # The service.

    def _endpoint(self, peer):
        if self._endpoints is not None:
            endpoint = self._endpoints[peer]
        else:
            endpoint = clientFromString(self.reactor, self.config.replicas[peer].connect)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls(peer), endpoint)
        return endpoint

    def startService(self):
        super().startService()
        if self.unauthenticated:
            self.log.error(
                "replica {index}: links with replicas {peers} are off: the cluster has no MAC "
                "keys for them (no keys folder, or one from before replicas linked up: run "
                "`fitbroker init` on it again) and TLS is off, so nothing would prove who "
                "sends",
                index=self.index,
                peers=sorted(self.unauthenticated),
            )
        elif self.trust_network and self.tls is None and self.keys is None:
            self.log.warn(
                "replica {index}: links between replicas are not authenticated (no keys "
                "folder, TLS off): fine for a trial on one host; run `fitbroker init` for a "
                "cluster that resists attackers",
                index=self.index,
            )
        for peer in self.peers:
            if peer in self.unauthenticated:
                continue
            service = reconnecting(
                self._endpoint(peer), _OutgoingFactory(self, peer), self.reactor, self.policy
            )
            service.startService()
            self._services[peer] = service

    def stopService(self):
        super().stopService()
        services, self._services = list(self._services.values()), {}
        for link in list(self.connected):
            link._close()
        stopped = [service.stopService() for service in services]
        for links in self._links_in.values():
            for link in list(links):
                link.close()
        return DeferredList(stopped)

    def status(self):
        """
        What the replica's status shows of its links.
        """
        return {
            "up": sorted(self.up),
            "incoming": sorted(self.incoming),
            "peers": {str(j): dict(counters) for j, counters in self.counters.items()},
        }
