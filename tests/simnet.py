"""
A whole cluster in one process: replicas and clients joined by in-memory
transports, driven by a fake clock.  Deterministic and fast.
"""

import tomllib

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock, LoopingCall
from twisted.test import iosim
from zope.interface import implementer

from fit_broker import registry
from fit_broker.agreement.crypto import generate as crypto_generate
from fit_broker.client.session import open_session
from fit_broker.interfaces import IOrderingFactory
from fit_broker.replica.replicated_log import validate
from fit_broker.keys import generate_keyrings, replica_identity
from fit_broker.config import parse_config
from fit_broker.init import cluster_toml
from fit_broker.replica.journal import AgreementJournal
from fit_broker.replica.protocol import ReplicaProtocol
from fit_broker.replica.service import AGREEMENT_TICK, Replica, runs_orderer
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.storage import FakeStorage
from tests.byzantine import ByzantineReplicaProtocol


def cluster_config(
    channels=("events",), replicas=4, faults=1, clients=("probe", "console"), qop="cft",
    scheme="si", voter=None, keys_dir=None, admins=(), **qos
):
    """
    Return a L{ClusterConfig} for tests: C{channels} each with class C{qos},
    written by L{cluster_toml} as C{fitbroker init} would.
    """
    text = cluster_toml(
        "sim", faults, [7600 + i for i in range(replicas)], list(clients),
        [(tag, tag, "test", qop, scheme, clients, clients, voter) for tag in channels],
        keys_dir=keys_dir, tls=False, admins=list(admins),
        classes={"test": dict({"capacity": 1000, "ttl": 60}, **qos)},
    )
    return parse_config("<sim>", tomllib.loads(text))


@implementer(IStreamClientEndpoint)
class _SimEndpoint:
    def __init__(self, net, index):
        self.net = net
        self.index = index

    def connect(self, factory):
        if self.index in self.net.down:
            return fail(ConnectionRefusedError("replica down"))
        client = factory.buildProtocol(None)
        behaviour = self.net.faulty.get(self.index)
        if behaviour is None:
            server = ReplicaProtocol(self.net.replicas[self.index])
        else:
            server = ByzantineReplicaProtocol(self.net.replicas[self.index], behaviour)
        client_transport = iosim.FakeTransport(client, isServer=False)
        server_transport = iosim.FakeTransport(server, isServer=True)
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
        self.net.pumps.append((self.index, pump))
        return succeed(client)


class SimNet:
    """
    Replicas of C{config} and the links clients open to them.

    @ivar paused: replicas whose links carry nothing until resumed (SIGSTOP).
    @ivar down: replicas that refuse connections (killed).
    """

    def __init__(self, config, clock=None, faulty=None, keys=False, liars=None, orderer_options=None,
                 journals=False, disks=False):
        """
        @param faulty: replica index -> a Byzantine behaviour (see
            L{tests.byzantine}) that rewrites what that replica sends.
        @param keys: generate key rings for every party (HA, PKS, PKE).
        @param liars: replica index -> a L{Replica} subclass whose broker
            logic lies (see L{tests.byzantine.AcksWithoutStoring}).
        @param journals: give each replica an agreement journal on a
            L{FakeStorage} that outlives its restarts (L{kill} may make it
            lose what was not synced).
        @param disks: give each replica's disk channels L{FakeStorage}s
            that outlive its restarts, as L{kill} does for journals.
        """
        self.liars = dict(liars or {})
        self.orderer_options = dict(orderer_options or {})
        self.config = config
        self.clock = clock or Clock()
        self.clock.advance(1_800_000_000)
        self.schemes = scheme_lookup(config)
        self.faulty = dict(faulty or {})
        self.keyrings = {}
        if keys:
            self.keyrings = generate_keyrings(
                len(config.replicas),
                sorted(config.clients),
                {tag: sorted(spec.publishers | spec.subscribers) for tag, spec in config.channels.items()},
            )
        self.pumps = []
        self.down = set()
        self.paused = set()
        self.peer_delay = 0.0
        self.restarted = set()
        self.held = []
        self.journals = {i: FakeStorage() for i in range(len(config.replicas))} if journals else None
        self.disks = {i: {} for i in range(len(config.replicas))} if disks else None
        self.cryptos = crypto_generate(len(config.replicas)) if runs_orderer(config) else None
        self.replicas = [self._replica(i) for i in range(len(config.replicas))]
        if self.cryptos is not None:
            self._ticks = LoopingCall(self._tick)
            self._ticks.clock = self.clock
            self._ticks.start(AGREEMENT_TICK, now=False)

    def _replica(self, index):
        storage = None
        if self.disks is not None:
            folders = self.disks[index]

            def storage(tag):
                return folders.setdefault(tag, (FakeStorage(), FakeStorage()))

        replica = self.liars.get(index, Replica)(
            self.config, index, self.clock, self.schemes, self.keyrings.get(replica_identity(index)),
            storage=storage,
        )
        if index in self.faulty or index in self.liars:
            # a Byzantine replica holds every batch and may send any of them in full
            for channel in replica.broker.channels.values():
                channel.light_copies = None
        if self.cryptos is not None:
            factory = registry.find(IOrderingFactory, self.config.orderer)
            journal = None
            recovering = index in self.restarted
            if self.journals is not None:
                journal = AgreementJournal(self.journals[index], self.clock.seconds(), existed=recovering)
                recovering = recovering and journal.fresh
            orderer = factory(
                index, len(self.config.replicas), self.config.faults, self.cryptos[index],
                **{
                    "validate": validate, "clock_skew": self.config.max_clock_skew,
                    "recovering": recovering,
                    "leader_timeout": self.config.leader_timeout,
                    "checkpoint_interval": self.config.checkpoint_interval,
                    "journal": journal is not None,
                    **self.orderer_options,
                },
            )
            replica.attach_log(
                orderer, lambda to, kind, body: self._peer_send(index, to, kind, body), journal
            )
            if journal is not None and journal.records:
                replica.replicated_log.resume(journal.records, self.clock.seconds())
            else:
                replica.broker.resumed()
        return replica

    def _peer_send(self, sender, to, kind, body):
        targets = [to] if to is not None else [j for j in range(len(self.config.replicas)) if j != sender]
        for target in targets:
            self.clock.callLater(self.peer_delay, self._peer_deliver, sender, target, kind, body)

    def _peer_deliver(self, sender, to, kind, body):
        if sender in self.down or to in self.down:
            return
        if sender in self.paused or to in self.paused:
            self.held.append((sender, to, kind, body))
            return
        self.replicas[to].peer_message(sender, kind, body)

    def _tick(self):
        for index, replica in enumerate(self.replicas):
            if index not in self.down and index not in self.paused:
                replica.tick()
        if self.held and not self.paused:
            held, self.held = self.held, []
            for message in held:
                self._peer_deliver(*message)

    def client(self, name, **options):
        endpoints = [_SimEndpoint(self, i) for i in range(len(self.replicas))]
        session = open_session(
            self.config, name, self.clock, keys=self.keyrings.get(name), endpoints=endpoints, **options
        )
        self.run()
        return session

    def crash_client(self, session):
        """
        Kill a client process: its connections close and it runs no more.
        """
        session.proxy.on_link_up.clear()
        session.proxy.on_delivery = lambda index, delivery: None
        session.subscriber.stop()
        for link in list(self.pumps):
            pump = link[1]
            if pump.client.proxy is session.proxy:
                pump.clientIO.loseConnection()
                pump.serverIO.loseConnection()
                for _ in range(100):
                    if not pump.pump(advanceClock=False):
                        break
                self.pumps.remove(link)
        session.proxy.stop()
        self.run()

    def run(self, seconds=0.0, steps=200):
        """
        Move bytes and fire timers until nothing moves, then let C{seconds} pass.
        """
        for _ in range(steps):
            due = self._due()
            self.clock.advance(0)
            moved = False
            for index, pump in list(self.pumps):
                if index in self.paused:
                    continue
                moved |= bool(pump.pump(advanceClock=False))
            if not moved and not due:
                break
        if seconds:
            remaining = seconds
            while remaining > 0:
                step = min(0.1, remaining)
                self.clock.advance(step)
                remaining -= step
                self.run(steps=steps)

    def _due(self):
        now = self.clock.seconds()
        return any(call.getTime() <= now for call in self.clock.getDelayedCalls())

    def kill(self, index, power_loss=False):
        """
        Crash replica C{index}: its connections drop and it refuses new ones.
        With C{power_loss}, its journal keeps only what was synced.
        """
        if power_loss and self.journals is not None:
            self.journals[index].crash()
        if power_loss and self.disks is not None:
            for storages in self.disks[index].values():
                for storage in storages:
                    storage.crash()
        self.down.add(index)
        for i, pump in list(self.pumps):
            if i == index:
                pump.serverIO.loseConnection()
                pump.clientIO.loseConnection()
                pump.pump(advanceClock=False)
                self.pumps.remove((i, pump))
        self.paused.discard(index)
        # a restarted replica remembers nothing of memory channels, nor its votes
        self.restarted.add(index)
        self.replicas[index] = self._replica(index)

    def restart(self, index):
        self.down.discard(index)


def drop_link(net, session, index):
    """
    Cut C{session}'s connection to replica C{index} from the client's side
    (a lost TCP link); the client reconnects with backoff.
    """
    for i, pump in net.pumps:
        if i == index and pump.client.proxy is session.proxy and not pump.clientIO.disconnecting:
            pump.clientIO.loseConnection()


def prune_links(net):
    """Forget the pumps of links closed on both sides, so that runs stay fast."""
    net.pumps = [
        (i, pump) for i, pump in net.pumps
        if not (pump.clientIO.disconnected and pump.serverIO.disconnected)
    ]
