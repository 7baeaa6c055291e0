"""
The replica's replicated log: the one place that carries out what the
ordering protocol asks (messages to peers, decided entries, checkpoints,
state to restore) against the broker state machine.

No reactor here: the replica's Twisted service calls it with the clock's
time and gives it a C{send(to, kind, body)} to reach peers, so the
simulation drives the same code.
"""

import msgpack
from twisted.logger import Logger

from fit_broker.broker.ordered import check_value
from fit_broker.errors import ProtocolError
from fit_broker.wire.codec import check_batches

# What peers send each other besides the protocol's own messages.
AGREEMENT = "agreement"
FETCH = "fetch"
FETCHED = "fetched"
PEER_KINDS = frozenset({AGREEMENT, FETCH, FETCHED})

_MAX_FETCH_REFS = 256


def _decode(body):
    try:
        return msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"undecodable peer message: {type(e).__name__}") from None


class ReplicatedLog:
    """
    Ties one replica's ordering protocol (L{fit_broker.interfaces.IOrderingProtocol})
    to its broker state machine.

    @ivar answer: called with C{(token, reply)} for each request the log
        answered (the replica sends the reply on the token's connection).
    @ivar journal: where the protocol's journal records go (an
        L{fit_broker.replica.journal.AgreementJournal}), or C{None} when
        nothing survives a restart.
    """

    log = Logger()

    def __init__(self, orderer, machine, send, answer, journal=None):
        self.orderer = orderer
        self.machine = machine
        self.send = send
        self.answer = answer
        self.journal = journal
        self.counters = {}

    def resume(self, records, now):
        """
        Hand the protocol what its journal kept before a restart, and apply
        what it rebuilds (the state and decided instances, replayed).
        """
        self._carry(self.orderer.resume(records, now), now)
        self.machine.resumed()
        self._answer()

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def pump(self, now):
        """
        Hand the protocol what the state machine wants ordered, and carry
        out its answer.  Called after each client request.
        """
        proposals = self.machine.take_proposals()
        if proposals:
            # announced only once durable where the class says so
            self.machine.sync_ordered_bodies(now)
            self._carry(self.orderer.submit(proposals, now), now)
        self._answer()

    def tick(self, now):
        """
        The clock moved: timeouts of the protocol, of waiting requests, and
        asking peers again for decided batches this replica lacks.
        """
        self._carry(self.orderer.tick(now), now)
        if self.journal is not None:
            self.journal.sync(now)
        self.machine.tick_storage(now)
        self.machine.expire_waiting(now)
        missing = self.machine.missing_to_fetch(now)
        if missing:
            refs = [(ref[1], ref[2], ref[3]) for ref in missing]
            self.send(None, FETCH, msgpack.packb(refs, use_bin_type=True))
            self.count("peer-fetches", len(refs))
        self._answer()

    def received(self, sender, kind, body, now):
        """
        Take one authenticated message from peer C{sender}.  A malformed one
        is counted and dropped.
        """
        try:
            if kind == AGREEMENT:
                self._carry(self.orderer.receive(sender, body, now), now)
            elif kind == FETCH:
                refs = _decode(body)
                if type(refs) is not tuple:
                    raise ProtocolError("a fetch must be an array of references")
                found = self.machine.serve_peer_fetch(refs[:_MAX_FETCH_REFS])
                if found:
                    self.send(sender, FETCHED, msgpack.packb(found, use_bin_type=True))
            elif kind == FETCHED:
                found = _decode(body)
                if type(found) is not tuple or not all(
                    type(item) is tuple and len(item) == 2 and type(item[0]) is str for item in found
                ):
                    raise ProtocolError("fetched batches must be [channel, batch] pairs")
                check_batches(tuple(item[1] for item in found))
                self.machine.peer_fetched(found)
            else:
                raise ProtocolError(f"unknown peer message kind {str(kind)[:40]!r}")
        except ProtocolError as e:
            self.count(f"bad-peer-message:replica-{sender}")
            self.log.debug("dropped a message from replica {sender}: {why}", sender=sender, why=e)
        self._answer()

    def _carry(self, effects, now):
        """
        Carry out C{effects}: restore state first when asked, then apply
        decided entries in order, taking a snapshot after each
        checkpointed instance, then send the messages.
        """
        machine = self.machine
        if effects.journal and self.journal is not None:
            self.journal.append(effects.journal, now)
        if effects.restore is not None:
            instance, state = effects.restore
            try:
                machine.restore_state(state)
            except ValueError as e:
                self.count("bad-restore")
                self.log.error("cannot restore the replicated state of instance {i}: {why}", i=instance, why=e)
        checkpoints = set(effects.checkpoints)
        for entry in effects.decided:
            machine.apply_decided((entry,), now)
            if entry.instance in checkpoints:
                checkpoints.discard(entry.instance)
                self._carry(self.orderer.checkpoint(entry.instance, machine.state_snapshot(), now), now)
        for instance in sorted(checkpoints):
            # a checkpoint of an instance applied before these effects
            if instance == machine.state.instance:
                self._carry(self.orderer.checkpoint(instance, machine.state_snapshot(), now), now)
        if not effects.messages:
            return
        if self.journal is not None and not self.journal.sync(now):
            # what these messages promise could not be made durable: say
            # nothing rather than something a restart could contradict
            self.count("journal-failed-unsent", len(effects.messages))
            return
        for to, message in effects.messages:
            self.send(to, AGREEMENT, message)

    def _answer(self):
        for token, reply in self.machine.take_answers():
            self.answer(token, reply)


def validate(value, now):
    """
    The shape check the protocol applies to every proposed value.
    """
    return check_value(value)
