"""
What the agreement engine asks its caller to do after each call.
"""

import attrs


@attrs.frozen
class Decided:
    """
    One decided instance: C{values} (value tuples) to apply in this order,
    with the timestamp the leader proposed them at (never smaller than the
    previous instance's).
    """

    instance: int
    timestamp: float
    values: tuple


@attrs.frozen
class Effects:
    """
    The outcome of one call into an L{Orderer}.

    @ivar messages: C{(to, bytes)} pairs to send, C{to} a replica index or
        C{None} for every other replica.
    @ivar decided: L{Decided} instances in instance order.
    @ivar restore: C{None}, or C{(instance, state_bytes)}: the application
        must replace its state with C{state_bytes} (its snapshot after
        C{instance}) before it applies C{decided}.
    @ivar checkpoints: instances after whose application the application
        calls C{Orderer.checkpoint(instance, state_bytes, now)}.
    """

    messages: tuple = ()
    decided: tuple = ()
    restore: tuple | None = None
    checkpoints: tuple = ()

    def merge(self, other):
        """
        Return the effects of C{self} followed by C{other}.  A restore in
        C{other} supersedes what C{self} decided before it.
        """
        if other.restore is not None:
            decided = other.decided
            restore = other.restore
            checkpoints = other.checkpoints
        else:
            decided = self.decided + other.decided
            restore = self.restore
            checkpoints = self.checkpoints + other.checkpoints
        return Effects(self.messages + other.messages, decided, restore, checkpoints)

    def __bool__(self):
        return bool(self.messages or self.decided or self.restore is not None or self.checkpoints)


NOTHING = Effects()
