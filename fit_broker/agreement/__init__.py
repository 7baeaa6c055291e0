"""
Agreement between replicas on an ordered log of values: Mod-SMaRt
(Byzantine) or its crash-tolerant twin, as one sans-IO engine.

See L{fit_broker.agreement.engine} for the protocol and its deviations
from the paper.
"""

from fit_broker.agreement.crypto import ReplicaCrypto
from fit_broker.agreement.effects import Decided, Effects
from fit_broker.agreement.engine import Orderer
from fit_broker.agreement.values import MAX_VALUE_BYTES, value_key

__all__ = ["Decided", "Effects", "MAX_VALUE_BYTES", "Orderer", "ReplicaCrypto", "value_key"]
