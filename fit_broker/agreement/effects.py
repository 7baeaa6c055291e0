"""
What the agreement engine asks its caller to do after each call.
"""

import attrs


@attrs.frozen
class Decided:
    """
    One decided instance: C{values} (value tuples) to apply in this order,
    with the timestamp the leader proposed them at (never smaller than the
    previous instance's).  C{transferred} when this replica learned it
    from its peers' state transfer, catching up on what it missed.
    """

    instance: int
    timestamp: float
    values: tuple
    # how this replica learned it, not what was decided: not compared
    transferred: bool = attrs.field(default=False, eq=False)


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
    @ivar journal: C{(base, record)} pairs (bytes records, in order) to
        append to the replica's journal, durable before any of C{messages}
        leaves: a vote sent and then forgotten in a crash could be cast
        again differently.  A C{base} record holds everything still needed
        (a stable checkpoint and what follows it), so what precedes it may
        be dropped once it is durable.
    """

    messages: tuple = ()
    decided: tuple = ()
    restore: tuple | None = None
    checkpoints: tuple = ()
    journal: tuple = ()

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
        return Effects(
            self.messages + other.messages, decided, restore, checkpoints,
            self.journal + other.journal,
        )

    def __bool__(self):
        return bool(
            self.messages or self.decided or self.restore is not None or self.checkpoints
            or self.journal
        )


NOTHING = Effects()
