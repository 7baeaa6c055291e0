"""
QoP modes: the fault model a channel is replicated under.

Each mode is a plugin (L{fit_broker.plugins.builtin_qop_modes}): channels
choose it by name, and the module-level instances are what plugins find.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IQoPMode


@implementer(IPlugin, IQoPMode)
class CrashFaultTolerant:
    """
    CFT: replicas never talk to each other; a publish is safe once f+1
    replicas hold it (f crashes cannot lose it) and a subscriber keeps the
    first copy of each event.
    """

    name = "cft"

    def check_cluster(self, replicas, faults):
        if replicas < faults + 1:
            raise ConfigError(
                f"CFT needs at least f+1 = {faults + 1} replicas to tolerate {faults} "
                f"crash(es), the cluster has {replicas}"
            )

    def acks_needed(self, replicas, faults):
        return faults + 1

    def default_voter(self):
        return "first-copy"


@implementer(IPlugin, IQoPMode)
class ByzantineFaultTolerant:
    """
    BFT: up to f replicas may lie.  Needs n >= 3f+1 replicas.

    A publish is acknowledged after 2f+1 replicas accepted it: of those, at
    least f+1 are correct, and any f+1 correct replicas are enough for every
    subscriber to collect f+1 matching copies even if the f faulty ones
    withhold theirs (f+1 acknowledgements could all but one come from liars;
    2f+1 also matches the quorum an ordering protocol needs).  A subscriber's
    voter delivers an event once f+1 replicas sent identical copies, since f
    liars cannot agree on a forgery alone.
    """

    name = "bft"

    def check_cluster(self, replicas, faults):
        if replicas < 3 * faults + 1:
            raise ConfigError(
                f"BFT needs n >= 3f+1 = {3 * faults + 1} replicas to tolerate {faults} "
                f"Byzantine replica(s), the cluster has {replicas}"
            )

    def acks_needed(self, replicas, faults):
        return 2 * faults + 1

    def default_voter(self):
        return "f-plus-one"


cft = CrashFaultTolerant()
bft = ByzantineFaultTolerant()
