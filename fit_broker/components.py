"""
Per-channel components chosen by name from configuration.
"""

from fit_broker.errors import UnknownComponent
from fit_broker.ordering import NoOrdering
from fit_broker.qop import CrashFaultTolerant
from fit_broker.voters import FirstCopyVoter

QOP_MODES = {"cft": CrashFaultTolerant()}
VOTERS = {"first-copy": FirstCopyVoter}
ORDERINGS = {"none": NoOrdering}


def lookup(kind, table, name):
    """
    Return C{table[name]}, or raise L{UnknownComponent} naming what exists.
    """
    try:
        return table[name]
    except KeyError:
        raise UnknownComponent(
            f"no {kind} called {name!r}; available: {', '.join(sorted(table))}"
        ) from None
