"""
Twisted protocols of the syslog adapter: they only move bytes.

UDP datagrams go to the bridge whole (RFC 5426: one message each); TCP and
TLS connections go through an L{OctetOrLineFramer} (RFC 6587, decided per
frame) and hand the bridge the frames of each read.  Parsing, routing,
spooling, rate limits and the connection cap live in the sans-IO objects.
"""

import fnmatch

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from fit_broker.syslog.framing import DEFAULT_MAX_SIZE, OctetOrLineFramer

#: What C{listenUDP} must be given: its default, 8192, silently truncates.
MAX_PACKET_SIZE = 65535


def describe_address(address):
    """
    Return C{(source, host)} for a Twisted address or a C{(host, port)}
    tuple: C{"192.0.2.7:514"} or C{"[2001:db8::7]:514"} and the bare host;
    C{(None, None)} when it has no IP address (a Unix socket).
    """
    if isinstance(address, tuple):
        host, port = address[0], address[1]
    else:
        host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str):
        return None, None
    if ":" in host:
        return f"[{host}]:{port}", host
    return f"{host}:{port}", host


class SyslogDatagramProtocol(DatagramProtocol):
    """
    Receives syslog over UDP; listen with C{maxPacketSize=MAX_PACKET_SIZE}.
    """

    noisy = False

    def __init__(self, bridge):
        self.bridge = bridge

    def datagramReceived(self, datagram, addr):
        source, host = describe_address(addr)
        self.bridge.receive_datagram(datagram, source, host)


@implementer(IHandshakeListener)
class SyslogStreamProtocol(Protocol):
    """
    One TCP or TLS connection of a syslog sender.

    Reading stops while any pause reason holds (the spool is full, or this
    sender went over its rate), so the sender's own buffers take the load.
    """

    log = Logger()

    def __init__(self, factory):
        self.factory = factory
        self.bridge = factory.bridge
        self.framer = OctetOrLineFramer(factory.max_size)
        self.source = self.host = None
        self.admitted = False
        self.handshake_done = False
        self._pauses = set()
        self._idle_call = None
        self._open = False

    def connectionMade(self):
        self.source, self.host = describe_address(self.transport.getPeer())
        if not self.bridge.add_reader(self):
            self.transport.abortConnection()
            return
        self.admitted = self._open = True
        self._arm_idle_timer()

    def dataReceived(self, data):
        if not self.admitted:
            return
        if self._idle_call is not None:
            self._idle_call.reset(self.factory.idle_timeout)
        frames = self.framer.feed(data)
        if frames:
            self.bridge.receive_frames(frames, self.source, self.host, self)

    def connectionLost(self, reason):
        self._open = False
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if not self.admitted:
            return
        if self.factory.tls and not self.handshake_done:
            self.bridge.count("tls-handshake-failed")
        frames = self.framer.end()
        if frames:
            self.bridge.receive_frames(frames, self.source, self.host, self)
        self.bridge.remove_reader(self)

    def handshakeCompleted(self):
        """
        TLS only: refuse a client certificate outside the permitted peers.
        """
        self.handshake_done = True
        patterns = self.factory.permitted_peers
        if not patterns or not self.admitted:
            return
        names = certificate_names(self.transport)
        if any(fnmatch.fnmatchcase(name, p) for name in names for p in patterns):
            return
        self.bridge.count("tls-peer-refused")
        self.log.warn(
            "syslog sender {source} refused: certificate names {names} match no permitted peer",
            source=self.source,
            names=sorted(names) or "nothing",
        )
        self.admitted = False
        self.bridge.remove_reader(self)
        self.transport.abortConnection()

    # Reader, for the bridge.

    def pause_reading(self, reason):
        if not self._pauses and self._open:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def resume_reading(self, reason):
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses and self._open:
            self.transport.resumeProducing()

    def close(self):
        """
        Close the connection (the adapter is stopping).
        """
        if self._open:
            self.transport.loseConnection()

    def _arm_idle_timer(self):
        timeout = self.factory.idle_timeout
        if timeout:
            self._idle_call = self.factory.clock.callLater(timeout, self._idle)

    def _idle(self):
        self._idle_call = None
        self.bridge.count("idle-closed")
        self.transport.loseConnection()


class SyslogStreamFactory(Factory):
    """
    Builds L{SyslogStreamProtocol}s for one TCP or TLS listener.

    @ivar permitted_peers: lower-case globs a TLS client certificate's DNS
        names or common name must match; empty accepts any.
    """

    protocol = SyslogStreamProtocol
    noisy = False

    def __init__(
        self, bridge, clock, max_size=DEFAULT_MAX_SIZE, idle_timeout=0.0, permitted_peers=(), tls=False
    ):
        """
        @param tls: the connections run TLS (their handshake failures are
            counted).
        """
        self.bridge = bridge
        self.clock = clock
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.permitted_peers = tuple(permitted_peers)
        self.tls = tls

    def buildProtocol(self, addr):
        return self.protocol(self)


def certificate_names(transport):
    """
    Return the lower-case DNS names and common names of the peer's
    certificate on C{transport}; empty without one.
    """
    try:
        certificate = transport.getPeerCertificate()
    except Exception:
        return set()
    if certificate is None:
        return set()
    certificate = certificate.to_cryptography()
    names = set()
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.update(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attribute.value, str):
            names.add(attribute.value.lower())
    return names
