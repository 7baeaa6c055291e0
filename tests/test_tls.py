"""
Mutual TLS over real sockets on 127.0.0.1: who may connect, and who the
server learns it is talking to.

These tests run Twisted's reactor (trial's TestCase spins it for each test)
and keep every connection inside this module.
"""

import datetime
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from fit_broker import pki
from fit_broker.errors import ConfigError
from fit_broker.tls import client_tls_options, peer_identity, server_tls_options

CLUSTER = "tls.test"
_NOW = datetime.datetime.now(datetime.timezone.utc)
_CA = pki.new_certificate_authority(CLUSTER)
_OTHER_CA = pki.new_certificate_authority(CLUSTER)
REPLICA_0 = pki.issue_replica_certificate(_CA, CLUSTER, 0)
REPLICA_1 = pki.issue_replica_certificate(_CA, CLUSTER, 1)
PROBE = pki.issue_client_certificate(_CA, CLUSTER, "probe")
STRANGER = pki.issue_client_certificate(_OTHER_CA, CLUSTER, "probe")
EXPIRED_PROBE = pki.issue_client_certificate(
    _CA, CLUSTER, "probe", now=_NOW - datetime.timedelta(days=400)
)
EXPIRED_REPLICA = pki.issue_replica_certificate(
    _CA, CLUSTER, 0, now=_NOW - datetime.timedelta(days=400)
)


@implementer(IHandshakeListener)
class _Server(Protocol):
    """
    Tells the client which identity its certificate proved, then waits for
    the client to hang up.
    """

    def __init__(self, seen, lost):
        self.seen = seen
        self.lost = lost

    def handshakeCompleted(self):
        identity = peer_identity(self.transport, CLUSTER)
        self.seen.append(identity)
        self.transport.write(f"hello {identity}\n".encode())

    def connectionLost(self, reason):
        self.lost.callback(None)


@implementer(IHandshakeListener)
class _Client(Protocol):
    """
    Reads one line, then hangs up; records what the server said, who the
    server is, and how the connection ended.
    """

    def __init__(self, done):
        self.done = done
        self.data = b""
        self.server = None

    def handshakeCompleted(self):
        self.server = peer_identity(self.transport)

    def dataReceived(self, data):
        self.data += data
        if self.data.endswith(b"\n"):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback((self.data, self.server, reason))


class MutualTLSTests(unittest.TestCase):
    """
    A replica's server options against clients holding various certificates.
    """

    timeout = 20

    def exchange(self, server_material, client_creator):
        """
        Serve C{server_material} on 127.0.0.1, connect with C{client_creator},
        and return a Deferred of C{(line received, server identity seen by
        the client, identities the server saw)} once both sides closed.  The
        reason the client's connection ended is kept in C{self.client_end}.
        """
        seen = []
        server_lost = []

        def build_server(addr):
            lost = defer.Deferred()
            server_lost.append(lost)
            return _Server(seen, lost)

        server_factory = ServerFactory()
        server_factory.buildProtocol = build_server
        port = reactor.listenSSL(
            0, server_factory, server_tls_options(*server_material), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)

        client_done = defer.Deferred()
        client_factory = ClientFactory()
        client_factory.buildProtocol = lambda addr: _Client(client_done)
        client_factory.clientConnectionFailed = lambda connector, reason: client_done.errback(
            reason
        )
        reactor.connectSSL("127.0.0.1", port.getHost().port, client_factory, client_creator)

        def both_closed(result):
            data, server, self.client_end = result
            return defer.gatherResults(server_lost).addCallback(lambda _: (data, server, seen))

        return client_done.addCallback(both_closed)

    def assert_refused(self, result, why):
        """
        Check that nothing was exchanged and that the client's connection
        ended with a TLS error mentioning C{why}.
        """
        data, server, seen = result
        self.assertEqual((data, seen), (b"", []))
        self.assertIn(why, str(self.client_end.value))

    @defer.inlineCallbacks
    def test_cluster_client_connects(self):
        """A client with a certificate of the cluster's CA connects, and each side learns who the other is."""
        data, server, seen = yield self.exchange(
            REPLICA_0, client_tls_options(*PROBE, f"replica-0.{CLUSTER}")
        )
        self.assertEqual(data, b"hello probe\n")
        self.assertEqual(server, "replica-0")
        self.assertEqual(seen, ["probe"])

    @defer.inlineCallbacks
    def test_replica_connects_to_replica(self):
        """A replica's certificate serves as a client certificate too."""
        data, server, seen = yield self.exchange(
            REPLICA_0, client_tls_options(*REPLICA_1, f"replica-0.{CLUSTER}")
        )
        self.assertEqual((data, server, seen), (b"hello replica-1\n", "replica-0", ["replica-1"]))

    @defer.inlineCallbacks
    def test_server_checked_by_ip_address(self):
        """A client that knows the replica by its IP address checks the IP in its certificate."""
        data, _, seen = yield self.exchange(REPLICA_0, client_tls_options(*PROBE, "127.0.0.1"))
        self.assertEqual((data, seen), (b"hello probe\n", ["probe"]))

    @defer.inlineCallbacks
    def test_other_ca_refused(self):
        """A client certificate from another CA is refused by the server."""
        result = yield self.exchange(
            REPLICA_0,
            client_tls_options(
                PROBE.ca_pem, STRANGER.cert_pem, STRANGER.key_pem, f"replica-0.{CLUSTER}"
            ),
        )
        self.assert_refused(result, "unknown ca")

    @defer.inlineCallbacks
    def test_expired_client_refused(self):
        """An expired client certificate is refused by the server."""
        result = yield self.exchange(
            REPLICA_0, client_tls_options(*EXPIRED_PROBE, f"replica-0.{CLUSTER}")
        )
        self.assert_refused(result, "certificate expired")

    @defer.inlineCallbacks
    def test_client_without_certificate_refused(self):
        """A client that presents no certificate is refused by the server."""
        anonymous = optionsForClientTLS(
            f"replica-0.{CLUSTER}", trustRoot=Certificate.loadPEM(PROBE.ca_pem)
        )
        result = yield self.exchange(REPLICA_0, anonymous)
        self.assert_refused(result, "certificate required")

    @defer.inlineCallbacks
    def test_expired_server_refused(self):
        """A client refuses a server whose certificate expired."""
        result = yield self.exchange(
            EXPIRED_REPLICA, client_tls_options(*PROBE, f"replica-0.{CLUSTER}")
        )
        self.assert_refused(result, "certificate verify failed")

    @defer.inlineCallbacks
    def test_wrong_hostname_refused(self):
        """A client that meant to reach replica 1 refuses replica 0's certificate."""
        result = yield self.exchange(
            REPLICA_0, client_tls_options(*PROBE, f"replica-1.{CLUSTER}")
        )
        self.assert_refused(result, "DNSMismatch")

    @defer.inlineCallbacks
    def test_server_from_other_ca_refused(self):
        """A client refuses a server whose certificate another CA issued."""
        impostor = pki.issue_replica_certificate(_OTHER_CA, CLUSTER, 0)
        result = yield self.exchange(
            pki.TlsMaterial(PROBE.ca_pem, impostor.cert_pem, impostor.key_pem),
            client_tls_options(*PROBE, f"replica-0.{CLUSTER}"),
        )
        self.assert_refused(result, "certificate verify failed")

    @defer.inlineCallbacks
    def test_material_from_disk(self):
        """Material written by the PKI and loaded back works end to end."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        keys_dir = os.path.join(directory, "keys")
        pki.write_cluster_material(keys_dir, CLUSTER, 1, ["console"], {})
        data, server, seen = yield self.exchange(
            pki.load_tls_material(keys_dir, "replica-0"),
            client_tls_options(*pki.load_tls_material(keys_dir, "console"), f"replica-0.{CLUSTER}"),
        )
        self.assertEqual((data, server, seen), (b"hello console\n", "replica-0", ["console"]))


class PeerIdentityTests(unittest.SynchronousTestCase):
    """
    peer_identity without a TLS peer.
    """

    def test_plain_transport(self):
        """A transport without TLS has no peer identity."""
        self.assertIsNone(peer_identity(StringTransport()))

    def test_no_certificate_yet(self):
        """A transport that has no peer certificate yet has no identity."""

        class Pending:
            def getPeerCertificate(self):
                return None

        class Broken:
            def getPeerCertificate(self):
                raise AttributeError("no TLS connection")

        self.assertIsNone(peer_identity(Pending()))
        self.assertIsNone(peer_identity(Broken()))

    def test_bad_pem(self):
        """Options built from bytes that are not PEM fail with a configuration error."""
        with self.assertRaises(ConfigError):
            server_tls_options(b"junk", REPLICA_0.cert_pem, REPLICA_0.key_pem)
        with self.assertRaises(ConfigError):
            client_tls_options(PROBE.ca_pem, b"junk", b"junk", "replica-0.tls.test")
