"""
QoS classes: urgency levels, ordering, and the persistence bounds of queues.
"""

import attrs
from zope.interface import implementer

from fit_broker.interfaces import IQoSClass

OVERFLOW_POLICIES = ("drop-oldest", "drop-newest")
# What a class's ordering says: no order across publishers ("none"), log order
# within each channel ("channel"), or log order across every "global" channel.
ORDERING_SCOPES = ("none", "channel", "global")
# Where a class keeps what its channels accepted: in memory (lost when every
# replica restarts) or in a log on each replica's disk.
PERSISTENCE = ("memory", "disk")
# When a disk channel's log is made durable: before each publish is
# acknowledged, every fsync_interval milliseconds, or when the OS chooses.
FSYNC_POLICIES = ("always", "interval", "never")


@implementer(IQoSClass)
@attrs.frozen
class QoSClass:
    """
    A named class of service from the control table.

    @ivar capacity: events each subscriber's queue holds; when full, the
        overflow policy discards (and counts) one event per new one.
    @ivar ttl: the longest life an event may have, in seconds, and the one
        publishers give events unless they ask for less.
    @ivar max_bytes: the most bytes (payload and proof) each subscriber's
        queue on a replica holds, so large events cannot exhaust memory
        within C{capacity}; the overflow policy applies when it is reached.
    @ivar persistence: C{"memory"} or C{"disk"} (L{PERSISTENCE}).
    @ivar fsync: for disk channels, when the log is synced (L{FSYNC_POLICIES}).
    @ivar fsync_interval: milliseconds between syncs under C{fsync = "interval"}.
    """

    name: str
    urgency_levels: int = 4
    ordering: str = "none"
    capacity: int = 10_000
    ttl: float = 300.0
    overflow: str = "drop-oldest"
    max_bytes: int = 16 * 1024 * 1024
    persistence: str = "memory"
    fsync: str = "always"
    fsync_interval: float = 50.0

    def effective_ttl(self, requested):
        if requested <= 0 or requested > self.ttl:
            return self.ttl
        return requested
