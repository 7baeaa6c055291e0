"""
Per-channel components chosen by name from configuration.
"""

from fit_broker.ordering import NoOrdering
from fit_broker.qop import ByzantineFaultTolerant, CrashFaultTolerant
from fit_broker.voters import FirstCopyVoter, MatchingCopiesVoter, SignatureVoter

QOP_MODES = {"cft": CrashFaultTolerant(), "bft": ByzantineFaultTolerant()}
VOTERS = {
    "first-copy": FirstCopyVoter,
    "f-plus-one": MatchingCopiesVoter,
    "signature": SignatureVoter,
}
ORDERINGS = {"none": NoOrdering}

