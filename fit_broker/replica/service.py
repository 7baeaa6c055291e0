"""
A replica as a Twisted service: the broker service behind a listening endpoint.
"""

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from fit_broker import units
from fit_broker.broker.service import BrokerService
from fit_broker.listening import MustListen
from fit_broker.metrics import metrics_service, replica_families
from fit_broker.errors import Status
from fit_broker.units import Reply
from fit_broker.replica.protocol import ReplicaFactory
from fit_broker.wire.framing import DEFAULT_MAX_FRAME

EXPIRY_INTERVAL = 1.0
LOGGED_REFUSALS = 20


class Replica:
    """
    The state one replica process shares among its client connections.
    """

    log = Logger()

    def __init__(self, config, index, clock, schemes, keys=None, identify=None):
        """
        @param identify: a callable from transport to the client name its TLS
            certificate proves, or C{None} when links are not authenticated.
        """
        self.config = config
        self.index = index
        self.clock = clock
        self.keys = keys
        self.identify = identify
        self.max_frame = DEFAULT_MAX_FRAME
        self.started = clock.seconds()
        self.broker = BrokerService(config, schemes, keys, replica_index=index)
        self.broker.on_ready = self._ready
        self.streams = {}
        self.counters = {}

    def count(self, reason):
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def admit(self, name, transport):
        """
        Return why client C{name} may not connect, or C{None}.
        """
        if type(name) is not str or name not in self.config.clients:
            return f"unknown client {name!r}: the control table does not name it"
        if self.identify is not None:
            proven = self.identify(transport)
            if proven != name:
                return f"client says it is {name!r} but its certificate says {proven!r}"
        return None

    def describe(self):
        return {"replica": self.index, "cluster": self.config.name}

    def handle(self, client, request):
        if request.method == units.STATUS:
            return Reply(request.seq, Status.OK, info=self.snapshot())
        reply = self.broker.handle(client, request, self.clock.seconds())
        if not reply.ok:
            self.refused(client, request, reply)
        elif reply.info.get("expired"):
            self.refused(
                client,
                request,
                Reply(reply.seq, "expired", f"dropped {reply.info['expired']} event(s) already past their TTL"),
            )
        return reply

    def refused(self, client, request, reply):
        """
        Log why a request was refused: every time for the first few of each
        status, then one in a thousand, so that a flood cannot flood the log
        (the broker's counters keep the exact numbers).
        """
        seen = self.counters.get(f"refused:{reply.status}", 0) + 1
        self.counters[f"refused:{reply.status}"] = seen
        if seen <= LOGGED_REFUSALS or seen % 1000 == 0:
            self.log.warn(
                "refused {method} on {channel!r} from {client!r}: {status}: {text} "
                "({seen} so far)",
                method=request.method,
                channel=request.channel,
                client=client,
                status=reply.status,
                text=reply.text,
                seen=seen,
            )

    def link_failed(self, peer, reason):
        """
        Count and log a connection that ended before the client said who it
        is, such as a TLS handshake refused for a certificate of another CA.
        """
        self.count("closed-before-hello")
        self.log.warn("connection from {peer} ended before hello: {reason}", peer=peer, reason=reason)

    def add_stream(self, tag, protocol):
        self.streams.setdefault(tag, set()).add(protocol)

    def remove_stream(self, tag, protocol):
        streams = self.streams.get(tag)
        if streams is not None:
            streams.discard(protocol)

    def _ready(self, tag):
        for protocol in self.streams.get(tag, ()):
            protocol.schedule_flush(tag)

    def expire(self):
        self.broker.expire(self.clock.seconds())

    def snapshot(self):
        return {
            "connections": dict(self.counters),
            **self.broker.snapshot(),
            "started": self.started,
            "now": self.clock.seconds(),
        }


def make_replica_service(
    config, index, reactor, schemes, keys=None, endpoint=None, identify=None, tls_options=None,
    metrics=None,
):
    """
    Return a service running replica C{index} of C{config}.

    @param endpoint: a server endpoint to use instead of the configured one.
    @param tls_options: when given, every connection runs mutual TLS with
        them, and C{identify} reads the client's name from its certificate.
    @param metrics: a server endpoint string to serve Prometheus metrics
        on instead of the configured one (C{[[replicas]] metrics}).
    """
    replica = Replica(config, index, reactor, schemes, keys, identify)
    top = MultiService()
    top.setName(f"replica-{index}")
    if endpoint is None:
        endpoint = serverFromString(reactor, config.replicas[index].listen)
    factory = ReplicaFactory(replica)
    if tls_options is not None:
        factory = TLSMemoryBIOFactory(tls_options, False, factory)
    listener = MustListen(endpoint, factory)
    listener.setServiceParent(top)
    expiry = TimerService(EXPIRY_INTERVAL, replica.expire)
    expiry.clock = reactor
    expiry.setServiceParent(top)
    metrics = metrics or config.replicas[index].metrics
    if metrics is not None:
        metrics_service(metrics, reactor, lambda: replica_families(replica)).setServiceParent(top)
    top.replica = replica
    return top
