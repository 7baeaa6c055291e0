"""
EXAMPLE: the 'sequencer' ordering protocol.

It shows the shape of a drop-in ordering protocol: a module-level factory
providing C{IPlugin} and C{IOrderingFactory}, which makes one protocol
object per replica, fed client proposals, peer messages and clock ticks,
answering with effects (L{fit_broker.agreement.effects.Effects}).

Replica 0 is the sequencer: it decides what it is given in arrival order
and tells the others.  It tolerates no fault at all (if replica 0 stops,
nothing is ordered), so it only suits a trial: the built-in C{mod-smart}
and C{multi-paxos} are the protocols to run.
"""

import msgpack
from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.agreement.effects import NOTHING, Decided, Effects
from fit_broker.errors import ConfigError
from fit_broker.interfaces import IOrderingFactory, IOrderingProtocol


@implementer(IOrderingProtocol)
class Sequencer:
    name = "sequencer"

    def __init__(self, index, replicas, faults, crypto, **options):
        self.index = index
        self.instance = 0
        self.counters = {"decided": 0, "out-of-order": 0}

    def submit(self, values, now):
        if self.index != 0 or not values:
            return NOTHING  # publishers send to every replica: replica 0 has them too
        self.instance += 1
        self.counters["decided"] += 1
        decided = Decided(self.instance, now, tuple(values))
        message = msgpack.packb((decided.instance, decided.timestamp, decided.values))
        return Effects(messages=((None, message),), decided=(decided,))

    def receive(self, sender, message, now):
        if sender != 0:
            return NOTHING
        try:
            instance, timestamp, values = msgpack.unpackb(message, use_list=False)
        except Exception:
            return NOTHING
        if instance != self.instance + 1:
            self.counters["out-of-order"] += 1
            return NOTHING
        self.instance = instance
        self.counters["decided"] += 1
        return Effects(decided=(Decided(instance, timestamp, values),))

    def tick(self, now):
        return NOTHING

    def checkpoint(self, instance, state, now):
        return NOTHING

    def status(self):
        return {"leader": 0, "decided": self.instance, **self.counters}


@implementer(IPlugin, IOrderingFactory)
class SequencerFactory:
    name = "sequencer"
    byzantine = False

    def check_cluster(self, replicas, faults):
        if faults:
            raise ConfigError("sequencer tolerates no fault: set faults = 0")

    def __call__(self, index, replicas, faults, crypto, **options):
        return Sequencer(index, replicas, faults, crypto, **options)


sequencer = SequencerFactory()
