"""
The syslog adapter as a Twisted service tree.

One L{SyslogBridge} and one publishing session serve every listener: UDP
ports (bound in C{privilegedStartService}, like the stream listeners, so
port 514 works with C{twistd --uid}), TCP and TLS endpoints, and a timer
that logs the counters.
"""

import os
import socket

from OpenSSL import crypto
from twisted.application.internet import TimerService, UDPServer
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from fit_broker.credentials import client_credentials
from fit_broker.errors import ConfigError
from fit_broker.listening import MustListen
from fit_broker.metrics import metrics_service, syslog_families
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.syslog.bridge import SyslogBridge
from fit_broker.syslog.config import (
    ListenerSpec,
    SyslogSettings,
    check_against_cluster,
    parse_udp_endpoint,
    tls_endpoint_as_tcp,
)
from fit_broker.syslog.protocol import (
    MAX_PACKET_SIZE,
    SyslogDatagramProtocol,
    SyslogStreamFactory,
)
from fit_broker.tls import ca_certificates, own_certificate_files, read_pem, trust_root

#: How long a stopping adapter waits for the cluster to acknowledge what
#: it already read.
DRAIN_TIMEOUT = 5.0

#: How many replicas must be linked before the adapter says it is ready.
LINK_TIMEOUT = 30.0


def local_syslog_settings(port=5514):
    """
    Return the settings of the embedded local cluster's adapter: UDP and
    TCP on 127.0.0.1:C{port}, every message to channel C{syslog}, as
    client C{syslog}.
    """
    return SyslogSettings(
        listeners=(
            ListenerSpec(f"udp:{port}:interface=127.0.0.1", "udp"),
            ListenerSpec(f"tcp:{port}:interface=127.0.0.1", "stream"),
        ),
        routing={"default": "syslog"},
        client="syslog",
        path="<local syslog settings>",
    )


def tls_options(spec):
    """
    Return the server TLS options of a L{TlsSpec}: TLS 1.2 or later; client
    certificates checked against C{spec.ca} when given, and required when
    C{spec.require_client_certificate}.

    @raise ConfigError: naming the file that is missing or wrong.
    """
    options = {
        **own_certificate_files(spec.certificate, spec.private_key),
        "raiseMinimumTo": TLSVersion.TLSv1_2,
    }
    if spec.ca is not None:
        ca_pem = read_pem(spec.ca, "the CA certificates")
        if spec.require_client_certificate:
            options["trustRoot"] = trust_root(ca_pem, spec.ca)
        else:
            # A trust root always requires a certificate; asking for one
            # without requiring it takes the older verify/caCerts form.
            options.update(
                verify=True,
                caCerts=[crypto.X509.from_cryptography(c) for c in ca_certificates(ca_pem, spec.ca)],
                requireCertificate=False,
            )
    return CertificateOptions(**options)


class SyslogAdapter(Service):
    """
    Opens the publishing session when started; on stop, closes the
    senders' connections, waits up to L{DRAIN_TIMEOUT} for what was read to
    be acknowledged, counts the rest, and closes the session.

    @ivar bridge: the L{SyslogBridge} every listener feeds.
    @ivar session: the client session, while running.
    """

    log = Logger()

    def __init__(self, cluster, settings, bridge, reactor, keys=None, endpoints=None, open_session=None):
        """
        @param keys: the client's key ring, or C{None} when the cluster's
            channels need none.
        @param endpoints: client endpoints per replica (TLS links), or
            C{None} for the cluster file's plain ones.
        """
        self.cluster = cluster
        self.settings = settings
        self.bridge = bridge
        self.reactor = reactor
        self.keys = keys
        self.endpoints = endpoints
        self.session = None
        self.counter_log = CounterLog(bridge)
        if open_session is None:
            from fit_broker.client.session import open_session
        self._open_session = open_session

    def startService(self):
        super().startService()
        self.session = self._open_session(
            self.cluster,
            self.settings.client,
            self.reactor,
            keys=self.keys,
            endpoints=self.endpoints,
            batch_size=self.settings.batch_size,
        )
        self.bridge.attach(self.session.publisher)
        quorum = max(self.cluster.acks_needed(tag) for tag in self.settings.channels())
        d = self.session.proxy.wait_for_links(quorum, LINK_TIMEOUT)
        d.addCallbacks(
            lambda linked: self.log.info(
                "syslog adapter publishing as {client!r}: {linked} of {total} replicas linked",
                client=self.settings.client,
                linked=linked,
                total=len(self.cluster.replicas),
            ),
            lambda failure: self.log.warn(
                "syslog adapter: the cluster is not reachable yet ({error}); "
                "messages wait in the spool",
                error=failure.value,
            ),
        )

    def stopService(self):
        super().stopService()
        for reader in list(self.bridge.readers):
            reader.close()
        done = Deferred()

        def finish():
            if timer.active():
                timer.cancel()
            if done.called:
                return
            unacked = self.bridge.abandon()
            if unacked:
                self.log.warn(
                    "syslog adapter stopped with {n} event(s) not acknowledged by the cluster",
                    n=unacked,
                )
            self.counter_log("final", force=True)
            if self.session is not None:
                self.session.stop()
                self.session = None
            done.callback(None)

        timer = self.reactor.callLater(DRAIN_TIMEOUT, finish)
        self.reactor.callLater(0, self.bridge.when_drained, finish)
        return done


class CounterLog:
    """
    Logs the bridge's non-zero counters on one line, when they changed
    since the last line (a quiet adapter keeps a quiet log).
    """

    log = Logger(namespace="fit_broker.syslog")

    def __init__(self, bridge):
        self.bridge = bridge
        self.udp_listeners = []
        self._last = None

    def snapshot(self):
        """
        Return the bridge's counters with the kernel's UDP drops added.
        """
        snapshot = self.bridge.snapshot()
        drops = [listener.kernel_drops() for listener in self.udp_listeners]
        known = [d for d in drops if d is not None]
        if known:
            snapshot["udp-kernel-drops"] = sum(known)
        return snapshot

    def __call__(self, when="counters", force=False):
        snapshot = self.snapshot()
        if snapshot == self._last and not force:
            return
        self._last = snapshot
        text = " ".join(f"{k}={v}" for k, v in sorted(snapshot.items()) if v)
        self.log.info(
            "syslog {when}: {text}", when=when, text=text or "nothing yet", counters=snapshot
        )


class SyslogUDPServer(UDPServer):
    """
    A UDP listener with a larger kernel receive buffer, which reports the
    datagrams the kernel dropped because the adapter did not read them in
    time (Linux), so that those too are counted.

    @ivar receive_buffer: the C{SO_RCVBUF} asked for, in bytes (the kernel
        caps it at C{net.core.rmem_max}); 0 keeps the system default.
    """

    log = Logger()

    def __init__(self, *args, receive_buffer=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.receive_buffer = receive_buffer

    def _getPort(self):
        port = super()._getPort()
        if self.receive_buffer:
            handle = port.getHandle()
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            except OSError as e:
                self.log.warn("cannot set the UDP receive buffer: {error}", error=e)
        return port

    def kernel_drops(self):
        """
        Return how many datagrams the kernel dropped on this socket, or
        C{None} where that is unknown.
        """
        if self._port is None:
            return None
        return udp_socket_drops(self._port.getHandle())


def udp_socket_drops(handle):
    """
    Return the kernel's drop count of UDP socket C{handle}, from
    C{/proc/net/udp} or C{udp6} (Linux); C{None} elsewhere.
    """
    try:
        inode = str(os.fstat(handle.fileno()).st_ino)
    except OSError:
        return None
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 12 and fields[9] == inode:
                        return int(fields[12])
        except (OSError, StopIteration, ValueError):
            continue
    return None


def _udp_listener(spec, protocol, reactor, receive_buffer):
    port, interface = parse_udp_endpoint(spec.endpoint)
    return SyslogUDPServer(
        port,
        protocol,
        interface=interface,
        maxPacketSize=MAX_PACKET_SIZE,
        reactor=reactor,
        receive_buffer=receive_buffer,
    )


def _stream_listener(spec, bridge, settings, reactor, where):
    permitted = spec.tls.permitted_peers if spec.tls is not None else ()
    factory = SyslogStreamFactory(
        bridge, reactor, settings.max_size, settings.idle_timeout, permitted, tls=spec.kind == "tls"
    )
    description = spec.endpoint
    if spec.kind == "tls":
        description = tls_endpoint_as_tcp(description)
        factory = TLSMemoryBIOFactory(tls_options(spec.tls), False, factory, clock=reactor)
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: invalid endpoint {spec.endpoint!r}: {e}") from None
    return MustListen(endpoint, factory)


def make_syslog_service(cluster_config, syslog_settings, reactor, keys=None):
    """
    Return the adapter's service tree for C{cluster_config} (a
    L{fit_broker.config.ClusterConfig}) and C{syslog_settings} (a
    L{SyslogSettings}).  The top service has C{bridge} and C{adapter}
    attributes for tests and status.

    @param keys: the adapter client's key ring; C{None} reads its keys and
        TLS certificate from the cluster's keys folder when the cluster
        uses them.

    @raise ConfigError: when the cluster does not let the adapter publish
        where its routing sends events, or a listener is invalid.
    """
    settings = syslog_settings
    check_against_cluster(settings, cluster_config)
    scheme_lookup(cluster_config)
    endpoints = None
    if keys is None:
        # Read the client's keys and certificate now, so that a missing
        # file stops the adapter before it listens.
        keys, endpoints = client_credentials(cluster_config, settings.client, reactor)
    levels = {
        tag: cluster_config.channel(tag).qos.urgency_levels for tag in settings.channels()
    }
    bridge = SyslogBridge(
        settings.router(),
        reactor,
        spool=settings.spool,
        max_size=settings.max_size,
        local_tz=settings.tzinfo(),
        rate_limit=settings.rate_limit,
        max_connections=settings.max_connections,
        urgency_levels=levels,
    )
    top = MultiService()
    top.setName("syslog")
    adapter = SyslogAdapter(cluster_config, settings, bridge, reactor, keys, endpoints)
    adapter.setServiceParent(top)
    for index, spec in enumerate(settings.listeners):
        where = f"{settings.path}: [listeners[{index}]]"
        if spec.kind == "udp":
            listener = _udp_listener(
                spec, SyslogDatagramProtocol(bridge), reactor, settings.udp_receive_buffer
            )
            adapter.counter_log.udp_listeners.append(listener)
        else:
            listener = _stream_listener(spec, bridge, settings, reactor, where)
        listener.setName(spec.endpoint)
        listener.setServiceParent(top)
    stats = TimerService(settings.stats_interval, adapter.counter_log)
    stats.clock = reactor
    stats.setServiceParent(top)
    if settings.metrics is not None:
        metrics_service(
            settings.metrics, reactor, lambda: syslog_families(adapter)
        ).setServiceParent(top)
    top.bridge = bridge
    top.adapter = adapter
    return top
