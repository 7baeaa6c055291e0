"""
A replica as a Twisted service: the broker state machine behind a listening endpoint.
"""

import os
import resource

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from fit_broker import units
from fit_broker.broker.machine import BrokerStateMachine
from fit_broker.listening import MustListen
from fit_broker.metrics import metrics_service, replica_families
from fit_broker.ratelimit import RateLimitedLog, shorten
from fit_broker.errors import Status
from fit_broker.units import Reply
from fit_broker.replica.protocol import ReplicaFactory
from fit_broker import registry
from fit_broker.agreement.crypto import ReplicaCrypto
from fit_broker.errors import ConfigError
from fit_broker.interfaces import IJournalledOrdering, IOrderingFactory
from fit_broker.replica.replicated_log import PEER_KINDS, ReplicatedLog, validate
from fit_broker.replica.disk_recovery import KINDS as DISK_KINDS, DiskRecovery
from fit_broker.replica.journal import AgreementJournal
from fit_broker.replica.peers import PeerLinks
from fit_broker.replica.storage_driver import DataFolder, StorageDriver
from fit_broker.storage import StorageError
from fit_broker.credentials import replica_peer_tls
from fit_broker.wire.framing import DEFAULT_MAX_FRAME

EXPIRY_INTERVAL = 1.0
# Seconds between two looks at disk channel recoveries (timeouts, retries).
DISK_RECOVERY_TICK = 0.5
# Seconds between two clock ticks of the ordering protocol.
AGREEMENT_TICK = 0.05
LOGGED_REFUSALS = 20
HELLO_TIMEOUT = 10.0
PRE_HELLO_MAX_FRAME = 64 * 1024
MAX_PRE_HELLO = 128
MAX_PER_CLIENT = 32
DESCRIPTOR_MARGIN = 64
DEFAULT_MAX_CONNECTIONS = 1024 - DESCRIPTOR_MARGIN


def connection_limit(margin=DESCRIPTOR_MARGIN, getrlimit=resource.getrlimit):
    """
    Return how many client connections this process can hold: its soft
    descriptor limit less C{margin} for log files, listeners and the like,
    so that accepting never fails for want of a descriptor.
    """
    soft, _ = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        soft = 1 << 20
    return max(1, soft - margin)


class Replica:
    """
    The state one replica process shares among its client connections.
    """

    log = Logger()

    def __init__(
        self,
        config,
        index,
        clock,
        schemes,
        keys=None,
        identify=None,
        hello_timeout=HELLO_TIMEOUT,
        max_connections=DEFAULT_MAX_CONNECTIONS,
        max_pre_hello=MAX_PRE_HELLO,
        max_per_client=MAX_PER_CLIENT,
        storage=None,
    ):
        """
        @param storage: a callable from a disk channel's tag to its two
            storages (L{DataFolder}), or C{None} to keep disk channels in
            memory.
        @param identify: a callable from transport to the client name its TLS
            certificate proves, or C{None} when links are not authenticated.
        @param hello_timeout: seconds a connection may take to complete its
            hello (TLS handshake included) before it is closed.
        @param max_connections: connections held at once; more are refused
            as they arrive (see L{connection_limit}).
        @param max_pre_hello: connections that have not said hello yet; past
            it the oldest of them is closed, so idle sockets cannot lock out
            a client that says hello promptly.
        @param max_per_client: connections one client name may hold.
        """
        self.config = config
        self.index = index
        self.clock = clock
        self.keys = keys
        self.identify = identify
        self.max_frame = DEFAULT_MAX_FRAME
        self.started = clock.seconds()
        self.broker = BrokerStateMachine(config, schemes, keys, replica_index=index, storage=storage)
        # runs the disk channels' syncs (L{StorageDriver}), when there are any
        self.storage_driver = None
        self.broker.on_ready = self._ready
        self.streams = {}
        self.counters = {}
        self.hello_timeout = hello_timeout
        self.pre_hello_max_frame = PRE_HELLO_MAX_FRAME
        self.max_connections = max_connections
        self.max_pre_hello = max_pre_hello
        self.max_per_client = max_per_client
        self.connections = set()
        self.pre_hello = {}
        self.joined = {}
        self.per_client = {}
        self.warnings = RateLimitedLog(self.log, clock)
        self.replicated_log = None
        # recovers disk channels from peers and serves theirs (L{DiskRecovery})
        self.disk_recovery = None
        self._waiting = {}
        self._pump_call = None

    def count(self, reason):
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def admit(self, name, transport):
        """
        Return why client C{name} may not connect, or C{None}.
        """
        if type(name) is not str or name not in self.config.clients:
            return f"unknown client {shorten(name)!r}: the control table does not name it"
        if self.per_client.get(name, 0) >= self.max_per_client:
            self.count("refused-client-limit")
            return f"client {name!r} already holds {self.max_per_client} connections, the most allowed"
        if self.identify is not None:
            proven = self.identify(transport)
            if proven != name:
                return f"client says it is {name!r} but its certificate says {proven!r}"
        return None

    def describe(self):
        """
        What a client learns in the hello reply: who answered, and this
        replica's clock, so a client whose clock is far off can say so.
        """
        return {"replica": self.index, "cluster": self.config.name, "now": self.clock.seconds()}

    def attach_log(self, orderer, send, journal=None):
        """
        Run the cluster's ordering protocol here: C{send(to, kind, body)}
        reaches peers (C{to} C{None}: all of them); C{journal} keeps what
        it must not forget (L{fit_broker.replica.journal.AgreementJournal}).
        """
        self.replicated_log = ReplicatedLog(orderer, self.broker, send, self._answer, journal)
        self._waiting = {}
        self.broker.table_problem = (
            None if self.keys is not None
            else "the replicas hold no keys to check administrators' signatures (set [cluster] keys_dir)"
        )

    def _pump_soon(self):
        """
        Hand what waits for the log to the protocol at the end of this
        reactor turn: every request read in one turn shares one
        announcement to the peers.
        """
        if self._pump_call is None:
            self._pump_call = self.clock.callLater(0, self._pump)

    def _pump(self):
        self._pump_call = None
        if self.replicated_log is not None:
            self.replicated_log.pump(self.clock.seconds())

    def peer_message(self, sender, kind, body):
        if kind in DISK_KINDS:
            if self.disk_recovery is not None:
                self.disk_recovery.received(sender, kind, body, self.clock.seconds())
            return
        if self.replicated_log is not None:
            self.replicated_log.received(sender, kind, body, self.clock.seconds())

    def tick(self):
        if self.replicated_log is not None:
            self.replicated_log.tick(self.clock.seconds())

    def disk_tick(self):
        if self.disk_recovery is not None:
            self.disk_recovery.tick(self.clock.seconds())

    def _recovered(self, tag):
        """
        Batches recovered from peers were logged and queued on C{tag}.
        """
        self._ready(tag)
        if self.storage_driver is not None:
            self.storage_driver.kick()

    def _answer(self, token, reply):
        waiting = self._waiting.pop(token, None)
        if waiting is None:
            return
        protocol, request = waiting
        if not reply.ok:
            self.refused(protocol.client, request, reply)
        protocol.answered(request, reply)

    def handle(self, client, request, protocol=None):
        """
        Return the reply to C{request}, or C{None} when it waits for the
        replicated log: C{protocol.answered} gets it then.
        """
        if request.method == units.STATUS:
            return Reply(request.seq, Status.OK, info=self.snapshot(client))
        log = self.replicated_log
        driver = self.storage_driver
        if log is None and driver is None:
            reply = self.broker.handle(client, request, self.clock.seconds())
        else:
            token = object()
            reply = self.broker.handle(client, request, self.clock.seconds(), token)
            if driver is not None:
                driver.kick()
            if reply is None:
                self._waiting[token] = (protocol, request)
                if log is not None:
                    self._pump_soon()
                return None
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

    def connection_opened(self, protocol):
        """
        Account for a new connection; return why it must be refused at
        once, or C{None}.  Makes room among the connections that have not
        said hello yet by closing the oldest of them.
        """
        if len(self.connections) >= self.max_connections:
            self.count("refused-connection-limit")
            self.warnings.warn(
                "connection-limit",
                "refusing connection from {peer}: {limit} connections open, the most allowed",
                peer=protocol.peer(),
                limit=self.max_connections,
            )
            return f"replica {self.index} holds {self.max_connections} connections, the most allowed"
        if len(self.pre_hello) >= self.max_pre_hello:
            oldest = next(iter(self.pre_hello))
            self.pre_hello.pop(oldest)
            self.count("evicted-before-hello")
            self.warnings.warn(
                "evicted-before-hello",
                "closing connection from {peer}: {limit} connections are waiting for "
                "their hello and it is the oldest",
                peer=oldest.peer(),
                limit=self.max_pre_hello,
            )
            oldest.evict("too many connections waiting for their hello")
        self.connections.add(protocol)
        self.pre_hello[protocol] = None
        return None

    def client_joined(self, protocol, name):
        """
        Note that C{protocol}'s hello as C{name} was accepted.
        """
        if protocol in self.connections and protocol not in self.joined:
            self.pre_hello.pop(protocol, None)
            self.joined[protocol] = name
            self.per_client[name] = self.per_client.get(name, 0) + 1

    def connection_closed(self, protocol):
        """
        Forget a connection that ended.
        """
        self.connections.discard(protocol)
        self.pre_hello.pop(protocol, None)
        name = self.joined.pop(protocol, None)
        if name is not None:
            left = self.per_client[name] - 1
            if left:
                self.per_client[name] = left
            else:
                del self.per_client[name]

    def hello_overdue(self, protocol):
        """
        Count and log a connection closed for not completing its hello in time.
        """
        self.count("hello-timeout")
        self.warnings.warn(
            "hello-timeout",
            "closing connection from {peer}: no hello within {timeout:g} s",
            peer=protocol.peer(),
            timeout=self.hello_timeout,
        )

    def link_failed(self, peer, reason):
        """
        Count and log a connection that ended before the client said who it
        is, such as a TLS handshake refused for a certificate of another CA.
        """
        self.count("closed-before-hello")
        self.warnings.warn(
            "closed-before-hello",
            "connection from {peer} ended before hello: {reason}",
            peer=peer,
            reason=reason,
        )

    def claim_stream(self, tag, protocol, takeover=False):
        """
        Make C{protocol} the one connection that streams C{tag} to its
        client, or return why not.  A client's own reconnect (same session)
        replaces its old link; another process of the same client is refused
        unless it asks to take over, since two consumers would split the
        events between them unpredictably.
        """
        holders = self.streams.setdefault(tag, {})
        client = protocol.client
        current = holders.get(client)
        if current is not None and current is not protocol:
            same_session = current.session is not None and current.session == protocol.session
            if not (same_session or takeover):
                self.count("refused-second-subscriber")
                return (
                    f"client {client!r} is already subscribed to {tag!r} on another connection; "
                    "one subscriber per client and channel (take over to replace it)"
                )
            self.count("stream-replaced" if same_session else "stream-taken-over")
            current.drop_stream(tag)
            if not same_session:
                current.notify(f"the subscription to {tag!r} was taken over by another connection", tag)
        holders[client] = protocol
        return None

    def release_stream(self, tag, protocol):
        holders = self.streams.get(tag)
        if holders is not None and holders.get(protocol.client) is protocol:
            del holders[protocol.client]

    def _ready(self, tag):
        holders = self.streams.get(tag)
        if holders:
            for protocol in holders.values():
                protocol.schedule_flush(tag)

    def expire(self):
        self.broker.expire(self.clock.seconds())
        if self.storage_driver is not None:
            self.storage_driver.kick()

    def snapshot(self, client=None):
        """
        Counters for C{client}: everything for an administrator (or when
        C{client} is C{None}), else its own channels and queues only.
        """
        clock = {"started": self.started, "now": self.clock.seconds()}
        if client is None or self.config.is_admin(client):
            full = {"connections": dict(self.counters), **self.broker.snapshot(), **clock}
            if self.replicated_log is not None:
                full["agreement"] = {
                    **self.replicated_log.orderer.status(),
                    "position": self.broker.state.position,
                    "log_counters": dict(self.replicated_log.counters),
                }
                if self.peers is not None:
                    full["agreement"]["links"] = self.peers.status()
                journal = self.replicated_log.journal
                if journal is not None:
                    full["agreement"]["journal"] = journal.stats()
            if self.disk_recovery is not None:
                full["disk_recovery"] = self.disk_recovery.status()
            return full
        return {**self.broker.snapshot(client), **clock}


def make_replica_service(
    config,
    index,
    reactor,
    schemes,
    keys=None,
    endpoint=None,
    identify=None,
    tls_options=None,
    max_connections=None,
    metrics=None,
    on_peer_message=None,
    peer_endpoints=None,
    **limits,
):
    """
    Return a service running replica C{index} of C{config}.

    @param endpoint: a server endpoint to use instead of the configured one.
    @param tls_options: when given, every connection runs mutual TLS with
        them, and C{identify} reads the client's name from its certificate.
    @param max_connections: connections held at once; by default what the
        process's descriptor limit allows (L{connection_limit}).
    @param metrics: a server endpoint string to serve Prometheus metrics
        on instead of the configured one (C{[[replicas]] metrics}).
    @param on_peer_message: when given, the replica also links with the
        other replicas (L{PeerLinks}, as C{top.peers}) and this is called
        with C{(sender index, kind, body)} for each frame they send.
    @param limits: C{hello_timeout}, C{max_pre_hello}, C{max_per_client}
        for L{Replica}.
    """
    if max_connections is None:
        max_connections = connection_limit()
    storage = None
    if any(qos.persistence == "disk" for qos in config.classes.values()):
        storage = DataFolder(config.data_folder(index))
        # channels whose folder is new: recovered from peers if this replica ran before
        fresh = {tag for tag in config.channels if not os.path.isdir(storage.channel_folder(tag))}
    replica = Replica(
        config, index, reactor, schemes, keys, identify, max_connections=max_connections,
        storage=storage, **limits
    )
    top = MultiService()
    top.setName(f"replica-{index}")
    if storage is not None:
        replica.storage_driver = StorageDriver(replica.broker, reactor, replica._answer)
        replica.storage_driver.setServiceParent(top)
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
    top.peers = replica.peers = None
    orderer = None
    journal = None
    # asked once: the first call notes that this replica has now run here
    ran_before = (storage is not None or runs_orderer(config, keys)) and started_before(config, index)
    if runs_orderer(config, keys):
        journal = open_journal(config, index, reactor.seconds())
        orderer = make_orderer(
            config, index, keys, recovering=ran_before and journal.fresh, journal=True
        )
        if not IJournalledOrdering.providedBy(orderer):
            journal.close(reactor.seconds())
            journal = None
        else:
            JournalCloser(journal, reactor, replica.broker).setServiceParent(top)
    if orderer is None:
        replica.broker.table_problem = config.orderer_problem or (
            "the replicas run no ordering protocol: name administrators in [cluster] admins "
            "and give the replicas their keys (fitbroker init)"
        )
    linked = orderer is not None or storage is not None
    if linked and on_peer_message is None:
        on_peer_message = replica.peer_message
    if on_peer_message is not None:
        top.peers = replica.peers = PeerLinks(
            index, config, reactor, keys, replica_peer_tls(config, index), on_peer_message,
            kinds=PEER_KINDS | DISK_KINDS, **({"endpoints": peer_endpoints} if peer_endpoints else {}),
            trust_network=linked and keys is None and config.keys_dir is None,
        )
        top.peers.setServiceParent(top)
    if storage is not None and top.peers is not None:
        start_disk_recovery(replica, top, fresh, ran_before, reactor)
    if orderer is not None:
        peers = top.peers

        def send(to, kind, body):
            if to is None:
                peers.broadcast(kind, body)
            else:
                peers.send(to, kind, body)

        replica.attach_log(orderer, send, journal)
        if journal is not None and journal.records:
            records, journal.records = journal.records, ()
            try:
                replica.replicated_log.resume(records, reactor.seconds())
            except ValueError as e:
                raise ConfigError(
                    f"{journal.storage}: the agreement journal holds what this version cannot "
                    f"read ({e}); move it away to have the replica recover from its peers"
                ) from None
        else:
            replica.broker.resumed()
        ticks = TimerService(AGREEMENT_TICK, replica.tick)
        ticks.clock = reactor
        ticks.setServiceParent(top)
    return top


def start_disk_recovery(replica, top, fresh, ran_before, reactor):
    """
    Serve disk channels' logs to peers, and recover from them the channels
    that lost theirs: new folders (C{fresh}) of a replica that ran before,
    and logs whose recovery cut records.
    """
    peers = top.peers
    config = replica.config
    recovery = replica.disk_recovery = DiskRecovery(
        replica.index, len(config.replicas), config.faults, replica.broker.channels,
        peers.send, replica._recovered, peers.unauthenticated,
    )
    needed = DiskRecovery.needed(replica.broker.disk_channels(), fresh, ran_before)
    recovery.begin(needed, reactor.seconds())
    ticks = TimerService(DISK_RECOVERY_TICK, replica.disk_tick)
    ticks.clock = reactor
    ticks.setServiceParent(top)


def open_journal(config, index, now):
    """
    Open replica C{index}'s agreement journal in its data folder.

    @raise ConfigError: in one line, when the folder cannot be used.
    """
    try:
        return AgreementJournal.in_folder(config.data_folder(index), now)
    except StorageError as e:
        raise ConfigError(f"{config.path}: replica {index}: agreement journal: {e}") from None


class JournalCloser(Service):
    """
    Syncs and closes the agreement journal, and the logs of ordered disk
    channels, when the replica stops.
    """

    def __init__(self, journal, reactor, broker):
        self.journal = journal
        self.reactor = reactor
        self.broker = broker

    def stopService(self):
        super().stopService()
        now = self.reactor.seconds()
        self.broker.close_ordered(now)
        self.journal.close(now)


def runs_orderer(config, keys=None):
    """
    Whether the replicas of C{config} run the ordering protocol: when a
    channel is ordered, or administrators may change the control table and
    the replicas hold what the protocol needs, and the cluster can run one.
    """
    if config.orderer is None:
        return False
    if any(spec.qos.ordering != "none" for spec in config.channels.values()):
        return True
    if not config.admins or keys is None:
        return False
    return keys.replica_signing_key is not None or not registry.find(
        IOrderingFactory, config.orderer
    ).byzantine


def started_before(config, index):
    """
    Return whether replica C{index} of this cluster file ran on this host
    before, and note that it has now.  A replica that ran before and finds
    no agreement journal (its data folder was lost) may have voted and
    forgotten, so its protocol starts recovering; one that cannot tell is
    assumed to have.
    """
    import hashlib

    from fit_broker.state_home import state_home

    digest = hashlib.sha256(os.path.abspath(config.path).encode()).hexdigest()[:16]
    folder = os.path.join(state_home(), "replicas")
    marker = os.path.join(folder, f"{digest}-replica-{index}.started")
    existed = os.path.exists(marker)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(marker, "a"):
            pass
    except OSError:
        return True
    return existed


def make_orderer(config, index, keys, recovering=False, journal=False):
    """
    Return replica C{index}'s ordering protocol, signing with its key when
    the protocol is Byzantine.
    """
    factory = registry.find(IOrderingFactory, config.orderer)
    crypto = None
    if keys is not None and keys.replica_signing_key is not None:
        crypto = ReplicaCrypto(
            index,
            keys.replica_signing_key,
            {j: keys.replica_verify_key(j) for j in range(len(config.replicas))},
        )
    elif factory.byzantine:
        raise ConfigError(
            f"{config.path}: replica {index} has no signing key for {config.orderer}: "
            "run fitbroker init again to add the replicas' keys"
        )
    return factory(
        index, len(config.replicas), config.faults, crypto,
        validate=validate, clock_skew=config.max_clock_skew, recovering=recovering,
        leader_timeout=config.leader_timeout, checkpoint_interval=config.checkpoint_interval,
        journal=journal,
    )
