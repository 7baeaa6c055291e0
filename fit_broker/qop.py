"""
QoP modes: the fault model a channel is replicated under.
"""

from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IQoPMode


@implementer(IQoPMode)
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
