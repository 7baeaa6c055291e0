"""
EXAMPLE: the 'cft-all' QoP mode.

It shows the shape of a drop-in QoP mode: a module-level instance providing
C{IPlugin} and C{IQoPMode}.  It is CFT that tells a publisher its events are
safe only once every replica holds them: slower (the slowest replica sets
the pace, and one replica down stops publishing), but nothing acknowledged
is lost unless every replica's disk is.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IQoPMode


@implementer(IPlugin, IQoPMode)
class CrashFaultTolerantAll:
    name = "cft-all"

    def check_cluster(self, replicas, faults):
        if replicas < faults + 1:
            raise ConfigError(f"cft-all needs at least f+1 = {faults + 1} replicas, the cluster has {replicas}")

    def acks_needed(self, replicas, faults):
        return replicas

    def default_voter(self):
        return "first-copy"


cft_all = CrashFaultTolerantAll()
