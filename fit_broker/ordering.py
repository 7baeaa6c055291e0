"""
The cluster's ordering protocols, as plugins: C{mod-smart} (Byzantine
faults, n >= 3f+1) and C{multi-paxos} (crashes, n >= 2f+1), both run by
L{fit_broker.agreement.engine.Orderer}.

The factories import the engine only when called, so reading a
configuration (which checks names and cluster sizes) stays light.
"""

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IOrderingFactory


@implementer(IPlugin, IOrderingFactory)
@attrs.frozen
class EngineOrdering:
    """
    A named maker of L{fit_broker.agreement.engine.Orderer}s with Byzantine
    or crash quorums.
    """

    name: str
    byzantine: bool

    def check_cluster(self, replicas, faults):
        needed = 3 * faults + 1 if self.byzantine else 2 * faults + 1
        if replicas < needed:
            bound = "3f+1" if self.byzantine else "2f+1"
            raise ConfigError(
                f"{self.name} needs n >= {bound} = {needed} replicas to tolerate {faults} "
                f"{'Byzantine' if self.byzantine else 'crashed'} replica(s), the cluster has {replicas}"
            )

    def __call__(self, index, replicas, faults, crypto, **options):
        from fit_broker.agreement.engine import Orderer

        return Orderer(index, replicas, faults, self.byzantine, crypto, **options)


mod_smart = EngineOrdering("mod-smart", True)
multi_paxos = EngineOrdering("multi-paxos", False)
