"""
A whole cluster in one process: replicas and clients joined by in-memory
transports, driven by a fake clock.  Deterministic and fast.
"""

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from fit_broker.client.session import open_session
from fit_broker.config import parse_config
from fit_broker.replica.protocol import ReplicaProtocol
from fit_broker.replica.service import Replica
from fit_broker.schemes.registry import scheme_lookup


def cluster_config(channels=("events",), replicas=4, faults=1, clients=("probe", "console"), **qos):
    """
    Return a L{ClusterConfig} for tests: C{channels} each with class C{qos}.
    """
    data = {
        "cluster": {"name": "sim", "faults": faults, "default_client": clients[0]},
        "replicas": [
            {"listen": f"tcp:{7600 + i}", "connect": f"tcp:127.0.0.1:{7600 + i}"}
            for i in range(replicas)
        ],
        "clients": {name: {} for name in clients},
        "classes": {"test": dict({"capacity": 1000, "ttl": 60}, **qos)},
        "channels": [
            {
                "tag": tag,
                "class": "test",
                "publishers": list(clients),
                "subscribers": list(clients),
            }
            for tag in channels
        ],
    }
    return parse_config("<sim>", data)


@implementer(IStreamClientEndpoint)
class _SimEndpoint:
    def __init__(self, net, index):
        self.net = net
        self.index = index

    def connect(self, factory):
        if self.index in self.net.down:
            return fail(ConnectionRefusedError("replica down"))
        client = factory.buildProtocol(None)
        server = ReplicaProtocol(self.net.replicas[self.index])
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

    def __init__(self, config, clock=None):
        self.config = config
        self.clock = clock or Clock()
        self.clock.advance(1_800_000_000)
        self.schemes = scheme_lookup(config)
        self.replicas = [
            Replica(config, i, self.clock, self.schemes) for i in range(len(config.replicas))
        ]
        self.pumps = []
        self.down = set()
        self.paused = set()

    def client(self, name, **options):
        endpoints = [_SimEndpoint(self, i) for i in range(len(self.replicas))]
        session = open_session(self.config, name, self.clock, endpoints=endpoints, **options)
        self.run()
        return session

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

    def kill(self, index):
        """
        Crash replica C{index}: its connections drop and it refuses new ones.
        """
        self.down.add(index)
        for i, pump in list(self.pumps):
            if i == index:
                pump.serverIO.loseConnection()
                pump.clientIO.loseConnection()
                pump.pump(advanceClock=False)
                self.pumps.remove((i, pump))
        self.paused.discard(index)
        # a restarted replica remembers nothing of memory channels
        self.replicas[index] = Replica(
            self.config, index, self.clock, self.schemes
        )

    def restart(self, index):
        self.down.discard(index)
