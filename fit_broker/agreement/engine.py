"""
The agreement engine: Mod-SMaRt, sans-IO, one object per replica.

Mod-SMaRt is the protocol of BFT-SMaRt, described in J. Sousa and A.
Bessani, "From Byzantine Consensus to BFT State Machine Replication: A
Latency-Optimal Transformation", EDCC 2012.  Replicas decide one instance
at a time; each instance decides a whole batch of values.  In regency
(view) r the leader is replica r mod n; it PROPOSEs a batch, replicas
WRITE its digest, then ACCEPT it once 2f+1 WRITEs match, and decide once
2f+1 ACCEPTs match.  A replica that waits too long asks for a new regency
with STOP; when 2f+1 asked, every replica sends the new leader a signed
STOPDATA (its last decision and what it may have accepted since), and the
new leader SYNCs everyone on the instance to finish and its value.

With C{byzantine=False} the same engine runs crash-tolerant
("multi-paxos"): n >= 2f+1, majority quorums, no WRITE phase (a replica
ACCEPTs the leader's proposal directly), no signatures; the STOPDATA
reports the proposal a replica accepted and the new leader re-proposes the
one of the highest regency, as Paxos does.

Deviations from the paper, all decided for this implementation:

 - Quorums are ceil((n+f+1)/2) (2f+1 when n = 3f+1) so that any n is safe;
   majorities in crash mode.
 - WRITEs are signed, and a replica keeps 2f+1 signed WRITEs as a write
   certificate (PBFT's prepared certificate).  STOPDATA reports the write
   certificate of the highest regency for the next instance, and the new
   leader must re-propose the value of the highest-regency valid one
   (else it may propose a fresh batch).  The paper's collect/sound
   predicates over unsigned write sets give the same guarantee; a
   certificate makes the SYNC checkable by everyone with one rule.
 - ACCEPTs are signed too, so 2f+1 of them (the decision certificate) prove
   a decision to anyone: the new leader proves the last decided instance,
   and state transfer accepts an entry only with its certificate.
 - Signatures are checked lazily: a quorum of matching votes (links are
   already MAC'd, so senders are known) triggers checking that quorum's
   signatures; a bad one is counted and its sender ignored for that vote.
 - The value is a batch of values each announced beforehand (HAVE): a
   leader proposes a value only once 2f+1 replicas announced it (f+1 in
   crash mode), and a replica votes for a proposal only once each value was
   announced by f+1 replicas or itself (the availability rule for values
   that are references to data held elsewhere).
 - A replica that changed regency ignores every message of older ones, so
   the old regency never runs beside the change; a replica that missed a
   change learns it from a valid SYNC or a decision certificate of a later
   regency, and peers help it by re-sending their STOP and SYNC.
 - Proposal timestamps never go backwards and must be within C{clock_skew}
   of each voter's clock; a value forced by a certificate skips these and
   the application's checks (it was checked when first proposed).
 - Replicas broadcast a STATUS (regency, last decided) periodically, so a
   replica that missed decisions in an idle cluster notices and asks for
   state; lost messages are re-sent on timers.
 - Checkpoints are PBFT-style: replicas sign the digest of their state
   every C{checkpoint_interval} instances and 2f+1 matching signatures make
   it stable; the decided log is truncated below it.
 - In crash mode, state transfer trusts a single reply (crash faults do not
   lie): requiring f+1 matching replies would block a replica whose only
   live peer is the one that decided without it.
 - A replica restarted without its engine's memory (C{recovering=True})
   casts no vote and sends no STOPDATA until 2f+1 others told it their
   last decided instance L and it has caught up past the highest L + 2:
   it may have voted up to there and forgotten what, which would break even
   the crash-tolerant variant (Viewstamped Replication's recovery rule, in
   Mod-SMaRt's terms).  When every other replica reports that it restarted
   without memory too, at instance 0, nobody holds a vote any more and the
   log starts afresh (a whole cluster restarted, its ordering state in
   memory only); such a replica goes on saying it restarted until it
   decides, so the others follow.
 - Decided values' keys are remembered for C{pool_limit_values} keys, and a
   checkpoint transferred to a lagging replica comes with the keys decided
   before it (checked against the checkpoint's certified hash chain, which
   is why a proposal's digest is computed over its values' keys), so a
   replica that restored a checkpoint never proposes or votes for a value
   decided before it.
 - Quorums may be formed from messages a replica buffered while it was one
   or two instances or regencies behind (bounded per sender in count and
   bytes); anything further ahead is dropped and only hints that the
   sender is ahead.
"""

import hashlib
from collections import OrderedDict, deque

import msgpack
from zope.interface import implementer

from fit_broker.agreement import messages as M
from fit_broker.agreement.effects import NOTHING, Decided, Effects
from fit_broker.agreement.values import MAX_VALUE_BYTES, check_value, decode_value, encode_value
from fit_broker.interfaces import IJournalledOrdering

_sha256 = hashlib.sha256
_pack = msgpack.Packer(use_bin_type=True).pack

# Journal record kinds (see Orderer.resume).
J_STABLE = "stable"  # instance, chain, state, certificate, history
J_DECIDED = "decided"  # instance, regency, timestamp, data, certificate
J_REGENCY = "regency"  # regency entered
J_VOTED = "voted"  # instance, regency this replica voted in
J_WRITTEN = "wc"  # instance, regency, digest, timestamp, data, write certificate

STATE_REPLY_BYTES = 4 << 20
"""Decided entries in one state-transfer reply stop past this many bytes."""

REGENCY_WINDOW = 16
"""STOPs and SYNCs for regencies further ahead than this are dropped."""

FUTURE_INSTANCES = 2
FUTURE_REGENCIES = 2
BUFFER_MESSAGES = 32
CHECKPOINT_VOTES_PER_PEER = 4
MAX_TIMEOUT_DOUBLINGS = 6


class _Slot:
    """
    What this replica knows of the instance it is deciding, in its regency.
    """

    __slots__ = (
        "instance", "regency", "proposed", "digest", "timestamp", "values", "data", "keys",
        "pending", "missing", "forced", "wrote", "accepted", "writes", "accepts", "write_ok",
        "accept_ok", "bad", "wc", "propose_msg", "write_msg", "accept_msg",
    )

    def __init__(self, instance, regency):
        self.instance = instance
        self.regency = regency
        self.proposed = False  # a proposal (or SYNC) for this slot was taken
        self.digest = None  # the proposal this replica voted for
        self.timestamp = None
        self.values = None
        self.data = None
        self.keys = None
        self.pending = None  # (digest, timestamp, data, values, keys) held back by the holding rule
        self.missing = None
        self.forced = False
        self.wrote = False
        self.accepted = False
        self.writes = {}  # digest -> {sender: signature}
        self.accepts = {}
        self.write_ok = set()  # senders whose WRITE signature was checked
        self.accept_ok = set()
        self.bad = set()  # senders whose signature failed in this slot
        self.wc = None  # (digest, certificate) once 2f+1 valid WRITEs matched
        self.propose_msg = None
        self.write_msg = None
        self.accept_msg = None

    def in_progress(self, voters=1):
        """
        Whether a proposal was taken, or at least C{voters} replicas voted.
        """
        if self.proposed:
            return True
        return sum(map(len, self.writes.values())) + sum(map(len, self.accepts.values())) >= voters


@implementer(IJournalledOrdering)
class Orderer:
    """
    One replica's side of the agreement (see the module docstring).

    Feed it what happens with L{submit}, L{receive}, L{tick} and
    L{checkpoint}; each returns L{Effects} to carry out.  It performs no
    I/O and reads no clock.

    @param index: this replica's index, 0 .. replicas-1.
    @param replicas: how many replicas there are (n).
    @param faults: how many may fail (f).
    @param byzantine: C{True} for Mod-SMaRt (n >= 3f+1), C{False} for the
        crash-tolerant variant (n >= 2f+1, no signatures).
    @param crypto: an object with C{sign(bytes)} and C{verify(replica,
        bytes, signature)}, see L{fit_broker.agreement.crypto}; unused and
        may be C{None} when not byzantine.
    @param validate: C{validate(value, now)} -> C{None} or a reason; a
        proposal holding a value it rejects is not voted for.
    @param pool_limit_values: values (and C{pool_limit_bytes} bytes) that
        each replica's announcements may hold in this replica's pool; also
        how many decided values are remembered so they are never proposed
        again.
    @param pool_ttl: seconds an announced value stays undecided at most.
    @param recovering: C{True} when this replica may have voted before (a
        restart without the engine's memory): it casts no vote and sends no
        STOPDATA until 2f+1 other replicas told it their last decided
        instance L and the cluster decided up to the highest L + 2, since it
        may have voted up to there and forgotten what.
    """

    def __init__(
        self, index, replicas, faults, byzantine, crypto, *, validate=None,
        checkpoint_interval=64, leader_timeout=2.0, max_batch_values=2048,
        max_batch_bytes=1 << 20, clock_skew=300.0, pool_limit_values=100_000,
        pool_limit_bytes=64 << 20, pool_ttl=600.0, max_state_bytes=64 << 20,
        status_interval=None, recovering=False, journal=False,
    ):
        n, f = replicas, faults
        if type(n) is not int or type(f) is not int or f < 0 or not 0 <= index < n:
            raise ValueError("replicas and faults must be integers, 0 <= index < replicas")
        if byzantine and n < 3 * f + 1:
            raise ValueError(f"Byzantine agreement needs replicas >= 3f+1 ({3 * f + 1}), got {n}")
        if not byzantine and n < 2 * f + 1:
            raise ValueError(f"crash-tolerant agreement needs replicas >= 2f+1 ({2 * f + 1}), got {n}")
        if byzantine and crypto is None:
            raise ValueError("Byzantine agreement needs crypto to sign and verify")
        if checkpoint_interval < 1 or max_batch_values < 1 or max_batch_bytes < MAX_VALUE_BYTES:
            raise ValueError("checkpoint_interval and max_batch_values must be >= 1, max_batch_bytes >= 64 KiB")
        self.index = index
        self.replicas = n
        self.faults = f
        self.byzantine = bool(byzantine)
        self._crypto = crypto
        self._validate = validate
        self._interval = checkpoint_interval
        self._leader_timeout = float(leader_timeout)
        self._max_values = max_batch_values
        self._max_bytes = max_batch_bytes
        self._skew = clock_skew
        self._limit_values = pool_limit_values
        self._limit_bytes = pool_limit_bytes
        self._ttl = pool_ttl
        self._max_state = max_state_bytes
        self._status_interval = status_interval if status_interval is not None else leader_timeout
        self._max_message = max_state_bytes + STATE_REPLY_BYTES + 2 * max_batch_bytes + (1 << 20)
        self._buffer_bytes_cap = 2 * max_batch_bytes + (1 << 20)
        if byzantine:
            self._q = (n + f) // 2 + 1
            self._eligible_at = 2 * f + 1
        else:
            self._q = n // 2 + 1
            self._eligible_at = f + 1
        self._weak = f + 1
        self._bit = 1 << index
        self.counters = {}

        # regency
        self._regency = 0
        self._synced = True
        self._timeout = self._leader_timeout
        self._decided_since_install = True
        self._waiting_since = None
        self._stop_sent = 0
        self._stop_sent_at = None
        self._stops = {}  # sender -> highest regency it asked for
        self._stopdata = {}  # sender -> (regency, body, signature, parsed), at the leader
        self._stopdata_msg = None  # (leader, bytes) to re-send until SYNC
        self._sync_msg = None  # the SYNC of the current regency, to re-send or forward
        self._sync_seen = {}  # leader -> highest regency whose SYNC it checked
        self._sync_pending = None  # (regency, instance, proposal, forced) while catching up
        self._helped = {}  # peer -> when its lag in regency was last answered

        # instances
        self._last = 0
        self._last_ts = float("-inf")
        self._chain = bytes(32)
        self._slot = _Slot(1, 0)
        self._wc = None  # (regency, digest, timestamp, data, certificate) for instance last+1
        self._bodies = {}  # digest -> (timestamp, data) for instance last+1
        self._wanted = {}  # digest -> (asked at, peers asked) for instance last+1
        self._log = {}  # instance -> (regency, timestamp, data, certificate, digest)
        self._stable = None  # (instance, chain, state, certificate)
        self._own_checkpoints = {}  # instance -> [chain, digest or None, state or None]
        self._checkpoint_votes = {}  # sender -> {instance: (digest, signature)}

        # values
        self._pool = OrderedDict()  # key -> [value, data, announcers mask, own, first seen]
        self._eligible = OrderedDict()  # key -> None, in the order they became eligible
        self._own = OrderedDict()  # key -> last announced, own undecided values
        self._charge_values = [0] * n
        self._charge_bytes = [0] * n
        self._decided_keys = set()
        self._history = deque()  # (instance, timestamp, concatenated keys) of recent decisions
        self._history_chain = bytes(32)  # the chain before the oldest entry of the history
        self._expire_at = 0.0
        self._announce_at = 0.0

        # recovery after a restart
        self._recovering = bool(recovering)
        self._recovery_lasts = {}  # peer -> the last decided instance it reported
        self._recovery_target = None
        self._amnesiac = set()  # peers that report they restarted without memory, at instance 0
        self._all_restarted = False

        # peers
        self._peer_last = [0] * n
        self._behind_since = None
        self._transfer_at = None
        self._answered = {}  # peer -> (request, when) of the last state request answered
        self._value_answered = {}
        self._buffer = {}  # sender -> [(instance, regency, message, size)]
        self._buffer_size = {}
        self._status_at = None
        self._resend_at = None

        # what must survive a restart (see L{resume}); None: not journalled
        self._journal = [] if journal else None
        self._replaying = False
        self._voted = None  # (instance, regency) of this replica's last vote

        # effects of the call in progress
        self._messages = []
        self._decided = []
        self._restore = None
        self._checkpoints = []
        self._changed = False
        self._now = 0.0
        self._handlers = {
            M.HAVE: self._on_have,
            M.PROPOSE: self._on_propose,
            M.WRITE: self._on_write,
            M.ACCEPT: self._on_accept,
            M.VALUE_REQUEST: self._on_value_request,
            M.VALUE_REPLY: self._on_value_reply,
            M.STOP: self._on_stop,
            M.STOPDATA: self._on_stopdata,
            M.SYNC: self._on_sync,
            M.CHECKPOINT: self._on_checkpoint,
            M.STATE_REQUEST: self._on_state_request,
            M.STATE_REPLY: self._on_state_reply,
            M.STATUS: self._on_status,
        }

    # --- public API ------------------------------------------------------------

    @property
    def name(self):
        return "mod-smart" if self.byzantine else "multi-paxos"

    def submit(self, values, now):
        """
        Offer values this replica holds: they are announced to every replica
        (HAVE) and proposed once enough replicas announced them.
        """
        self._now = now
        fresh = []
        size = 0
        for value in values:
            reason = check_value(value)
            if reason is not None:
                self._count("submit_invalid")
                continue
            data = encode_value(value)
            if len(data) > MAX_VALUE_BYTES:
                self._count("submit_too_large")
                continue
            key = _sha256(data).digest()
            if key in self._decided_keys:
                self._count("submit_decided")
                continue
            entry = self._pool.get(key)
            if entry is not None and entry[3]:
                continue
            if not self._charge(self.index, entry, len(data)):
                self._count("submit_pool_full")
                continue
            if entry is None:
                entry = self._pool[key] = [value, data, 0, True, now]
            entry[3] = True
            self._announced(key, entry, self.index)
            self._own[key] = now
            fresh.append(data)
            size += len(data)
            if len(fresh) >= M.MAX_VALUES or size >= self._max_bytes:
                self._send(None, M.encode_have(tuple(fresh)))
                fresh, size = [], 0
        if fresh:
            self._send(None, M.encode_have(tuple(fresh)))
        self._settle(now)
        return self._flush()

    def receive(self, sender, message, now):
        """
        Handle C{message} (bytes) from replica C{sender}, whose link already
        authenticated it.  Malformed or unwelcome messages are counted and
        dropped.
        """
        self._now = now
        if type(sender) is not int or not 0 <= sender < self.replicas or sender == self.index:
            self._count("drop_sender")
            return NOTHING
        if type(message) is not bytes or len(message) > self._max_message:
            self._count("drop_oversize")
            return NOTHING
        try:
            m = M.decode(message)
        except M.MessageError:
            self._count("drop_malformed")
            return NOTHING
        self._handlers[m[0]](sender, m, message, now)
        self._settle(now)
        return self._flush()

    def tick(self, now):
        """
        Let time pass: leader-change timers, re-sending, state transfer,
        announcements and expiry.  Call it every 50 ms or so.
        """
        self._now = now
        self._timers(now)
        self._settle(now)
        return self._flush()

    def checkpoint(self, instance, state, now):
        """
        Take the application's snapshot C{state} (bytes) after it applied
        instance C{instance}, as L{Effects.checkpoints} asked.
        """
        self._now = now
        own = self._own_checkpoints.get(instance)
        if own is None or own[2] is not None or type(state) is not bytes:
            self._count("checkpoint_unexpected")
            return self._flush()
        own[2] = state
        own[1] = M.checkpoint_digest(instance, own[0], _sha256(state).digest())
        signature = self._sign(M.checkpoint_payload(instance, own[1]))
        self._send(None, M.encode_checkpoint(instance, own[1], signature))
        self._checkpoint_votes.setdefault(self.index, {})[instance] = (own[1], signature)
        self._check_stable(instance)
        self._settle(now)
        return self._flush()

    def resume(self, records, now):
        """
        Rebuild what this replica knew before a restart from the records
        its journal kept (L{Effects.journal}, in order): its last stable
        checkpoint and the instances decided after it (handed back as
        L{Effects} to apply, like a state transfer), its regency, and its
        vote and write certificate for the next instance.  It casts no
        second vote in an instance and regency it voted in before, and
        reports its write certificate in the STOPDATA of a leader change,
        so a restart, even of every replica at once, decides nothing
        differently.  Call it once, before anything else.

        @raise ValueError: a record is not one this engine wrote.
        """
        self._now = now
        stable, decided, regency, voted, written = None, {}, 0, set(), {}
        for payload in records:
            try:
                record = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
                kind = record[0]
                if kind == J_STABLE:
                    stable = record
                    decided = {i: d for i, d in decided.items() if i > record[1]}
                elif kind == J_DECIDED:
                    decided[record[1]] = record
                elif kind == J_REGENCY:
                    regency = max(regency, record[1])
                elif kind == J_VOTED:
                    voted.add((record[1], record[2]))
                elif kind == J_WRITTEN:
                    written[record[1]] = record[2:]
                else:
                    raise ValueError(f"unknown journal record {str(kind)[:40]!r}")
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"not an agreement journal record: {type(e).__name__}") from None
        self._replaying = True
        try:
            if stable is not None:
                _, instance, chain, state, certificate, history = stable
                self._restore_checkpoint(instance, chain, state, certificate, history)
            while self._last + 1 in decided:
                _, i, r, timestamp, data, certificate = decided[self._last + 1]
                if not self._decide(i, r, timestamp, data, certificate, M.proposal_digest(timestamp, data)):
                    break
            if regency > self._regency:
                self._enter(regency, synced=False)
            wc = written.get(self._last + 1)
            if wc is not None and wc[0] <= self._regency:
                self._wc = tuple(wc)
                self._bodies[wc[1]] = (wc[2], wc[3])
            slot = self._slot
            if (slot.instance, slot.regency) in voted:
                # voted here before the restart, for what is not known: abstain
                slot.proposed = slot.wrote = slot.accepted = True
                self._voted = (slot.instance, slot.regency)
                self._count("abstained_after_restart")
        finally:
            self._replaying = False
        self._count("resumed")
        if not self._synced:
            self._waiting_since = now
            self._send_stopdata(self._regency, now)
        self._changed = True
        self._settle(now)
        return self._flush()

    def status(self):
        """
        Return a dict describing this replica's agreement state and counters.
        """
        return {
            "protocol": self.name,
            "regency": self._regency,
            "leader": self._regency % self.replicas,
            "synced": self._synced,
            "recovering": self._recovering,
            "decided": self._last,
            "stable_checkpoint": self._stable[0] if self._stable else 0,
            "in_progress": self._slot.in_progress(),
            "timeout": self._timeout,
            "pool_values": len(self._pool),
            "pool_bytes": sum(self._charge_bytes),
            "eligible": len(self._eligible),
            "log_entries": len(self._log),
            "counters": dict(self.counters),
        }

    # --- plumbing --------------------------------------------------------------

    def _count(self, what, by=1):
        self.counters[what] = self.counters.get(what, 0) + by

    def _send(self, to, message):
        self._messages.append((to, message))

    def _flush(self):
        if not (
            self._messages or self._decided or self._restore is not None or self._checkpoints
            or self._journal
        ):
            return NOTHING
        journal = ()
        if self._journal:
            journal = tuple(self._journal)
            self._journal = []
        effects = Effects(
            tuple(self._messages), tuple(self._decided), self._restore, tuple(self._checkpoints),
            journal,
        )
        self._messages = []
        self._decided = []
        self._restore = None
        self._checkpoints = []
        return effects

    def _sign(self, payload):
        return self._crypto.sign(payload) if self.byzantine else b""

    def _note(self, *record, base=False):
        """
        Journal C{record} (see L{Effects.journal}), unless not journalled or
        replaying the journal.
        """
        if self._journal is not None and not self._replaying:
            self._journal.append((base, _pack(record)))

    def _note_vote(self, slot):
        self._voted = (slot.instance, slot.regency)
        self._note(J_VOTED, slot.instance, slot.regency)

    def _leader(self, regency):
        return regency % self.replicas

    def _hint(self, sender, last):
        """
        Remember that C{sender} decided at least up to C{last}.
        """
        if last > self._peer_last[sender]:
            self._peer_last[sender] = last

    def _valid_certificate(self, pairs, payload):
        """
        Return the first quorum of distinct replicas in C{pairs} whose
        signatures of C{payload} are valid, as a tuple, or C{None}.
        """
        seen = set()
        good = []
        n = self.replicas
        for pair in pairs:
            replica, signature = pair
            if replica in seen or not 0 <= replica < n:
                continue
            seen.add(replica)
            if self.byzantine and not self._crypto.verify(replica, payload, signature):
                self._count("bad_signature")
                continue
            good.append((replica, signature))
            if len(good) >= self._q:
                return tuple(good)
        return None

    # --- values and the pool --------------------------------------------------

    def _charge(self, replica, entry, size):
        """
        Charge an announcement of C{replica} to its share of the pool;
        return False when it has no room left.
        """
        if entry is not None and entry[2] & (1 << replica):
            return True
        if self._charge_values[replica] >= self._limit_values or self._charge_bytes[replica] + size > self._limit_bytes:
            return False
        self._charge_values[replica] += 1
        self._charge_bytes[replica] += size
        return True

    def _announced(self, key, entry, replica):
        bit = 1 << replica
        if entry[2] & bit:
            return
        entry[2] |= bit
        if entry[2].bit_count() == self._eligible_at:
            self._eligible[key] = None
        missing = self._slot.missing
        if missing and key in missing and self._holds(entry):
            missing.discard(key)
            if not missing:
                self._changed = True

    def _holds(self, entry):
        return entry[3] or entry[2].bit_count() >= self._weak

    def _drop_value(self, key):
        entry = self._pool.pop(key, None)
        if entry is None:
            return
        size = len(entry[1])
        mask = entry[2]
        while mask:
            low = mask & -mask
            replica = low.bit_length() - 1
            self._charge_values[replica] -= 1
            self._charge_bytes[replica] -= size
            mask ^= low
        self._eligible.pop(key, None)
        self._own.pop(key, None)

    def _on_have(self, sender, m, raw, now):
        # the hot path of every value: _charge and _announced, inlined
        pool = self._pool
        decided = self._decided_keys
        eligible = self._eligible
        eligible_at = self._eligible_at
        missing = self._slot.missing
        bit = 1 << sender
        count = self._charge_values[sender]
        size = self._charge_bytes[sender]
        limit_values = self._limit_values
        limit_bytes = self._limit_bytes
        sha256 = _sha256
        over = bad = 0
        for data in m[1]:
            key = sha256(data).digest()
            if key in decided:
                continue
            entry = pool.get(key)
            length = len(data)
            if entry is None:
                if count >= limit_values or size + length > limit_bytes:
                    over += 1
                    continue
                try:
                    value = decode_value(data)
                except ValueError:
                    bad += 1
                    continue
                entry = pool[key] = [value, data, bit, False, now]
                mask = bit
            else:
                mask = entry[2]
                if mask & bit:
                    continue
                if count >= limit_values or size + length > limit_bytes:
                    over += 1
                    continue
                mask |= bit
                entry[2] = mask
            count += 1
            size += length
            if mask.bit_count() == eligible_at:
                eligible[key] = None
            if missing and key in missing and self._holds(entry):
                missing.discard(key)
                if not missing:
                    self._changed = True
        self._charge_values[sender] = count
        self._charge_bytes[sender] = size
        if over:
            self._count("have_over_quota", over)
        if bad:
            self._count("have_bad_value", bad)

    def _values_of(self, data):
        """
        Return (values, keys) of a proposal's encoded values, or a reason
        string when one does not decode or one repeats.
        """
        pool = self._pool
        values = []
        keys = []
        seen = set()
        for d in data:
            key = _sha256(d).digest()
            if key in seen:
                return "duplicate value"
            seen.add(key)
            entry = pool.get(key)
            if entry is not None:
                values.append(entry[0])
            else:
                try:
                    values.append(decode_value(d))
                except ValueError as e:
                    return str(e)
            keys.append(key)
        return tuple(values), keys

    def _take_batch(self, now):
        """
        Return (data, values, keys) of the next batch a leader proposes, or None.
        """
        data, values, keys = [], [], []
        size = 0
        drop = []
        validate = self._validate
        for key in self._eligible:
            entry = self._pool.get(key)
            if entry is None:
                drop.append(key)
                continue
            if validate is not None and validate(entry[0], now) is not None:
                drop.append(key)
                continue
            if size + len(entry[1]) > self._max_bytes:
                break
            data.append(entry[1])
            values.append(entry[0])
            keys.append(key)
            size += len(entry[1])
            if len(data) >= self._max_values:
                break
        for key in drop:
            self._count("pool_invalid")
            self._drop_value(key)
            self._eligible.pop(key, None)
        if not data:
            return None
        return tuple(data), tuple(values), keys

    # --- the normal case -------------------------------------------------------

    def _processable(self, sender, instance, regency, m, raw):
        """
        Return True when a message for (instance, regency) belongs to the
        current slot; otherwise buffer it if it is near, or count it.
        """
        last = self._last
        if instance == last + 1 and regency == self._regency and self._synced:
            return True
        self._hint(sender, instance - 1)
        if instance <= last or regency < self._regency:
            self._count("drop_old")
            return False
        if instance > last + 1 + FUTURE_INSTANCES or regency > self._regency + FUTURE_REGENCIES:
            self._count("drop_future")
            return False
        size = len(raw)
        queue = self._buffer.setdefault(sender, [])
        used = self._buffer_size.get(sender, 0)
        if len(queue) >= BUFFER_MESSAGES or used + size > self._buffer_bytes_cap:
            self._count("drop_buffer_full")
            return False
        queue.append((instance, regency, m, raw))
        self._buffer_size[sender] = used + size
        return False

    def _replay(self, now):
        """
        Hand buffered messages that now belong to the current slot to their
        handlers, and forget those that went stale.
        """
        if not self._buffer:
            return
        last, regency = self._last, self._regency
        ready = []
        for sender in list(self._buffer):
            queue = self._buffer[sender]
            keep = []
            size = 0
            for item in queue:
                instance, r = item[0], item[1]
                if instance <= last or r < regency:
                    continue
                if instance == last + 1 and r == regency and self._synced:
                    ready.append((sender, item))
                else:
                    keep.append(item)
                    size += len(item[3])
            if keep:
                self._buffer[sender] = keep
                self._buffer_size[sender] = size
            else:
                del self._buffer[sender]
                self._buffer_size.pop(sender, None)
        for sender, (instance, r, m, raw) in ready:
            if instance != self._last + 1 or r != self._regency:
                continue
            self._handlers[m[0]](sender, m, raw, now)

    def _on_propose(self, sender, m, raw, now):
        _, instance, regency, timestamp, data = m
        if sender != self._leader(regency):
            self._count("drop_not_leader")
            return
        if not self._processable(sender, instance, regency, m, raw):
            return
        if self._slot.proposed:
            if self._slot.propose_msg != raw and self._slot.digest != M.proposal_digest(timestamp, data):
                self._count("equivocation")
            return
        self._consider(timestamp, data, now)

    def _consider(self, timestamp, data, now):
        """
        Check a (non-forced) proposal for the current slot and vote for it,
        or hold it until its values are announced, or reject it.
        """
        slot = self._slot
        slot.proposed = True
        result = self._values_of(data)
        if isinstance(result, str):
            self._count("proposal_bad_value")
            self._start_stop(now)
            return
        values, keys = result
        digest = M.keys_digest(timestamp, b"".join(keys))
        self._bodies[digest] = (timestamp, data)
        reason = None
        if abs(timestamp - now) > self._skew:
            reason = "timestamp_skew"
        elif timestamp < self._last_ts:
            reason = "timestamp_backwards"
        elif not data or len(data) > self._max_values or sum(map(len, data)) > self._max_bytes:
            reason = "batch_size"
        if reason is None:
            decided = self._decided_keys
            validate = self._validate
            for key, value in zip(keys, values):
                if key in decided:
                    reason = "decided_value"
                    break
                if validate is not None and validate(value, now) is not None:
                    reason = "invalid_value"
                    break
        if reason is not None:
            self._count("proposal_" + reason)
            self._start_stop(now)
            return
        if self.byzantine:
            pool = self._pool
            missing = set()
            for key in keys:
                entry = pool.get(key)
                if entry is None or not self._holds(entry):
                    missing.add(key)
            if missing:
                self._count("proposal_held")
                slot.pending = (digest, timestamp, data, values, keys)
                slot.missing = missing
                return
        self._vote(digest, timestamp, data, values, keys)

    def _vote(self, digest, timestamp, data, values, keys):
        """
        Vote for a proposal: WRITE (Byzantine) or ACCEPT (crash mode).
        """
        slot = self._slot
        slot.proposed = True
        slot.pending = None
        slot.missing = None
        slot.digest = digest
        slot.timestamp = timestamp
        slot.data = data
        slot.values = values
        slot.keys = keys
        self._bodies[digest] = (timestamp, data)
        if self._recovering:
            self._count("passive_votes")
            return
        self._note_vote(slot)
        if self.byzantine:
            signature = self._crypto.sign(M.vote_payload("write", slot.instance, slot.regency, digest))
            slot.write_msg = M.encode_write(slot.instance, slot.regency, digest, signature)
            slot.wrote = True
            self._send(None, slot.write_msg)
            slot.writes.setdefault(digest, {})[self.index] = signature
            slot.write_ok.add(self.index)
            self._check_writes(digest)
        else:
            self._accept(digest)

    def _on_write(self, sender, m, raw, now):
        if not self.byzantine:
            self._count("drop_unexpected")
            return
        digest = self._take_vote(sender, m, raw, "writes")
        if digest is not None:
            self._check_writes(digest)

    def _take_vote(self, sender, m, raw, table):
        """
        Record C{sender}'s WRITE or ACCEPT C{m} in the current slot's
        C{table} (C{"writes"} or C{"accepts"}) and return its digest; or
        C{None} when it is not for this slot, its sender signed badly
        before, or the sender voted already (a different digest is counted).
        """
        _, instance, regency, digest, signature = m
        if not self._processable(sender, instance, regency, m, raw):
            return None
        slot = self._slot
        if sender in slot.bad:
            return None
        tally = getattr(slot, table)
        for d, votes in tally.items():
            if sender in votes:
                if d != digest:
                    self._count("conflicting_vote")
                return None
        tally.setdefault(digest, {})[sender] = signature
        return digest

    def _check_quorum(self, votes, checked, kind, digest):
        """
        Check the signatures of a quorum of matching votes, dropping the bad
        ones; return True when a quorum of valid ones remains.
        """
        slot = self._slot
        if len(votes) < self._q:
            return False
        if self.byzantine:
            payload = M.vote_payload(kind, slot.instance, slot.regency, digest)
            for sender in [s for s in votes if s not in checked]:
                if self._crypto.verify(sender, payload, votes[sender]):
                    checked.add(sender)
                else:
                    self._count("bad_signature")
                    slot.bad.add(sender)
                    del votes[sender]
        return len(votes) >= self._q

    def _check_writes(self, digest):
        slot = self._slot
        if slot.wc is not None:
            return
        votes = slot.writes.get(digest)
        if votes is None or not self._check_quorum(votes, slot.write_ok, "write", digest):
            return
        slot.wc = (digest, tuple(votes.items()))
        self._maybe_accept()

    def _maybe_accept(self):
        """
        Send ACCEPT once the slot has a write certificate and the proposal body.
        """
        slot = self._slot
        if slot.accepted or slot.wc is None:
            return
        digest = slot.wc[0]
        body = self._bodies.get(digest)
        if body is None:
            self._want(digest, slot.writes.get(digest, ()))
            return
        self._wc = (slot.regency, digest, body[0], body[1], slot.wc[1])
        self._accept(digest)

    def _accept(self, digest):
        slot = self._slot
        if self._recovering:
            return
        slot.accepted = True
        if not self.byzantine:
            body = self._bodies[digest]
            self._wc = (slot.regency, digest, body[0], body[1], ())
            self._note_vote(slot)
        self._note(J_WRITTEN, slot.instance, *self._wc)
        signature = self._sign(M.vote_payload("accept", slot.instance, slot.regency, digest))
        slot.accept_msg = M.encode_accept(slot.instance, slot.regency, digest, signature)
        self._send(None, slot.accept_msg)
        slot.accepts.setdefault(digest, {})[self.index] = signature
        slot.accept_ok.add(self.index)
        self._check_accepts(digest)

    def _on_accept(self, sender, m, raw, now):
        digest = self._take_vote(sender, m, raw, "accepts")
        if digest is not None:
            self._check_accepts(digest)

    def _check_accepts(self, digest):
        slot = self._slot
        votes = slot.accepts.get(digest)
        if votes is None or not self._check_quorum(votes, slot.accept_ok, "accept", digest):
            return
        body = self._bodies.get(digest)
        if body is None:
            self._want(digest, votes)
            return
        timestamp, data = body
        if slot.digest == digest:
            self._decide(slot.instance, slot.regency, timestamp, data, tuple(votes.items()), digest, slot.values, slot.keys)
        else:
            self._decide(slot.instance, slot.regency, timestamp, data, tuple(votes.items()), digest)

    def _want(self, digest, voters):
        """
        Ask a peer that voted for C{digest} for the proposal's body.
        """
        asked = self._wanted.get(digest)
        if asked is not None:
            return
        peers = [p for p in voters if p != self.index]
        if not peers:
            return
        self._wanted[digest] = [None, set(), tuple(peers)]
        self._ask_value(digest, self._now)

    def _ask_value(self, digest, now):
        want = self._wanted[digest]
        untried = [p for p in want[2] if p not in want[1]] or list(want[2])
        if not untried:
            return
        peer = untried[0]
        want[1].add(peer)
        want[0] = now
        self._count("value_requests")
        self._send(peer, M.encode_value_request(self._last + 1, digest))

    def _on_value_request(self, sender, m, raw, now):
        _, instance, digest = m
        body = None
        if instance == self._last + 1:
            body = self._bodies.get(digest)
        else:
            entry = self._log.get(instance)
            if entry is not None and entry[4] == digest:
                body = (entry[1], entry[2])
        if body is None:
            return
        answered = self._value_answered.get(sender)
        if answered is not None and answered[0] == (instance, digest) and now - answered[1] < self._leader_timeout / 4:
            self._count("drop_repeated_request")
            return
        self._value_answered[sender] = ((instance, digest), now)
        self._send(sender, M.encode_value_reply(instance, body[0], body[1]))

    def _on_value_reply(self, sender, m, raw, now):
        _, instance, timestamp, data = m
        if instance != self._last + 1:
            return
        digest = M.proposal_digest(timestamp, data)
        if digest not in self._wanted:
            self._count("drop_unwanted_value")
            return
        del self._wanted[digest]
        self._bodies[digest] = (timestamp, data)
        self._maybe_accept()
        if self._last + 1 == instance:
            self._check_accepts(digest)

    def _decide(self, instance, regency, timestamp, data, certificate, digest, values=None, keys=None,
                transferred=False):
        """
        Record instance C{instance} as decided and hand it to the application.
        """
        if values is None:
            result = self._values_of(data)
            if isinstance(result, str):
                # Only possible when more than f replicas lie; refuse it.
                self._count("decided_bad_value")
                return False
            values, keys = result
        self._last = instance
        if timestamp > self._last_ts:
            self._last_ts = timestamp
        self._chain = M.chain_next(self._chain, digest)
        self._log[instance] = (regency, timestamp, data, certificate, digest)
        self._note(J_DECIDED, instance, regency, timestamp, data, certificate)
        self._remember(instance, timestamp, keys)
        self._decided.append(Decided(instance, timestamp, values, transferred))
        if instance % self._interval == 0:
            self._checkpoints.append(instance)
            own = self._own_checkpoints
            own[instance] = [self._chain, None, None]
            while len(own) > CHECKPOINT_VOTES_PER_PEER:
                del own[min(own)]
        if regency > self._regency:
            # A decision certificate of a later regency: that regency was
            # installed and synchronised by a quorum, so join it.
            self._enter(regency, synced=True)
        self._new_slot()
        self._timeout = self._leader_timeout
        self._decided_since_install = True
        self._waiting_since = None
        self._behind_since = None
        self._changed = True
        return True

    def _remember(self, instance, timestamp, keys):
        """
        Remember the keys of a decided proposal (so its values are never
        proposed again) within the window of C{pool_limit_values} keys.
        """
        decided = self._decided_keys
        drop = self._drop_value
        for key in keys:
            drop(key)
            decided.add(key)
        self._history.append((instance, timestamp, b"".join(keys)))
        history = self._history
        while len(decided) > self._limit_values and len(history) > 1:
            _, ts, blob = history.popleft()
            self._history_chain = M.chain_next(self._history_chain, M.keys_digest(ts, blob))
            for k in range(0, len(blob), 32):
                decided.discard(blob[k:k + 32])

    def _history_until(self, instance):
        """
        Return the history message field for decisions up to C{instance}
        (within one reply's bytes), or C{None}.
        """
        chain = self._history_chain
        entries = [(ts, blob) for i, ts, blob in self._history if i <= instance]
        if not entries or self._history[0][0] + len(entries) - 1 != instance:
            return None
        size = sum(len(blob) + 16 for _, blob in entries)
        while size > STATE_REPLY_BYTES and len(entries) > 1:
            ts, blob = entries.pop(0)
            size -= len(blob) + 16
            chain = M.chain_next(chain, M.keys_digest(ts, blob))
        return (chain, tuple(entries))

    def _new_slot(self):
        """
        Start on instance last+1 (after a decision or a restore).
        """
        self._slot = _Slot(self._last + 1, self._regency)
        self._wc = None
        self._bodies = {}
        self._wanted = {}

    def _maybe_propose(self, now):
        slot = self._slot
        if (
            self._leader(self._regency) != self.index
            or self._recovering
            or not self._synced
            or slot.proposed
            or not self._eligible
            or self._sync_pending is not None
        ):
            return
        batch = self._take_batch(now)
        if batch is None:
            return
        data, values, keys = batch
        timestamp = max(now, self._last_ts)
        slot.propose_msg = M.encode_propose(slot.instance, slot.regency, timestamp, data)
        self._send(None, slot.propose_msg)
        self._vote(M.keys_digest(timestamp, b"".join(keys)), timestamp, data, values, keys)

    def _settle(self, now):
        """
        Carry on after a change of state: apply a SYNC that waited for this
        replica to catch up, hand over buffered messages, propose.
        """
        for _ in range(10_000):
            self._changed = False
            if self._recovering and self._recovery_target is not None and self._last >= self._recovery_target:
                self._recovering = False
                self._count("recovered")
            slot = self._slot
            if slot.pending is not None and not slot.missing:
                self._vote(*slot.pending)
            pending = self._sync_pending
            if pending is not None:
                if pending[0] != self._regency or self._last >= pending[1]:
                    self._sync_pending = None
                elif self._last + 1 == pending[1]:
                    self._sync_pending = None
                    self._take_sync_proposal(pending[2], pending[3], now)
            self._replay(now)
            self._maybe_propose(now)
            if not self._changed:
                return

    # --- leader change --------------------------------------------------------

    def _start_stop(self, now, target=None):
        """
        Ask for regency C{target} (default: the next one).
        """
        target = max(self._regency + 1, target or 0)
        if self._stop_sent >= target:
            return
        self._stop_sent = target
        self._stop_sent_at = now
        self._count("stops_sent")
        self._send(None, M.encode_stop(target, self._last))
        self._stops[self.index] = target
        self._check_stops(now)

    def _on_stop(self, sender, m, raw, now):
        _, regency, last = m
        self._hint(sender, last)
        if regency <= self._regency:
            self._help(sender, now)
            return
        if regency > self._regency + REGENCY_WINDOW:
            self._count("drop_future")
            return
        if self._stops.get(sender, -1) >= regency:
            return
        self._stops[sender] = regency
        self._check_stops(now)

    def _help(self, sender, now):
        """
        A peer is in an older regency: re-send it our STOP for the current
        one and the SYNC that installed it, at most every quarter timeout.
        """
        if self._regency == 0:
            return
        when = self._helped.get(sender)
        if when is not None and now - when < self._leader_timeout / 4:
            return
        self._helped[sender] = now
        self._send(sender, M.encode_stop(self._regency, self._last))
        if self._sync_msg is not None:
            self._send(sender, self._sync_msg)

    def _check_stops(self, now):
        wanted = sorted((r for r in self._stops.values() if r > self._regency), reverse=True)
        if len(wanted) >= self._weak:
            join = wanted[self._weak - 1]
            if join > self._stop_sent:
                self._start_stop(now, join)
                return
        if len(wanted) >= self._q:
            self._install(wanted[self._q - 1], now)

    def _enter(self, regency, synced):
        """
        Move to C{regency}, forgetting everything of older ones.
        """
        self._regency = regency
        # durable before a STOPDATA promises to leave older regencies
        self._note(J_REGENCY, regency)
        self._synced = synced or regency == 0
        self._sync_msg = None
        self._stopdata_msg = None
        self._stops = {s: r for s, r in self._stops.items() if r > regency}
        self._stopdata = {s: v for s, v in self._stopdata.items() if v[0] >= regency}
        if self._stop_sent < regency:
            self._stop_sent = regency
        if not self._decided_since_install:
            self._timeout = min(self._timeout * 2, self._leader_timeout * (1 << MAX_TIMEOUT_DOUBLINGS))
        self._decided_since_install = False
        self._waiting_since = None
        self._slot = _Slot(self._last + 1, regency)
        self._wanted = {}
        wc = self._wc
        self._bodies = {wc[1]: (wc[2], wc[3])} if wc is not None else {}
        self._changed = True

    def _install(self, regency, now):
        """
        Enough replicas asked for C{regency}: install it and send our
        STOPDATA to its leader.
        """
        self._count("regencies_installed")
        self._enter(regency, synced=False)
        self._waiting_since = now
        self._send_stopdata(regency, now)

    def _send_stopdata(self, regency, now):
        if self._recovering:
            return
        entry = None
        logged = self._log.get(self._last)
        if logged is not None:
            entry = (self._last, logged[0], logged[1], logged[2], logged[3])
        write = None
        if self._wc is not None:
            write = (self._wc[0], self._wc[2], self._wc[3], self._wc[4])
        body = M.encode_stopdata_body(regency, self._last, entry, write)
        signature = self._sign(M.stopdata_payload(body))
        leader = self._leader(regency)
        if leader == self.index:
            self._stopdata[self.index] = (regency, body, signature, M.decode_stopdata_body(body))
            self._maybe_sync(now)
        else:
            self._stopdata_msg = (leader, M.encode_stopdata(body, signature))
            self._send(leader, self._stopdata_msg[1])

    def _on_stopdata(self, sender, m, raw, now):
        _, body, signature = m
        try:
            parsed = M.decode_stopdata_body(body)
        except M.MessageError:
            self._count("drop_malformed")
            return
        regency = parsed[0]
        self._hint(sender, parsed[1])
        if self._leader(regency) != self.index or regency < self._regency:
            self._count("drop_old")
            return
        if regency > self._regency + REGENCY_WINDOW:
            self._count("drop_future")
            return
        if regency == self._regency and self._synced:
            if self._sync_msg is not None:
                self._send(sender, self._sync_msg)
            return
        old = self._stopdata.get(sender)
        if old is not None and old[0] >= regency:
            return
        if self.byzantine and not self._crypto.verify(sender, M.stopdata_payload(body), signature):
            self._count("bad_signature")
            return
        self._stopdata[sender] = (regency, body, signature, parsed)
        if regency == self._regency:
            self._maybe_sync(now)

    def _choose(self, regency, parsed):
        """
        Apply the synchronisation rule to STOPDATA bodies: return
        (last, entry, forced) where C{last} is the highest instance proven
        decided, C{entry} its (instance, regency, timestamp, data,
        certificate), and C{forced} the (timestamp, data) that instance
        last+1 must decide, or C{None} when any proposal may.
        """
        last, entry = 0, None
        for body in sorted(parsed, key=lambda b: b[1], reverse=True):
            e = body[2]
            if body[1] <= last or e is None:
                continue
            digest = M.proposal_digest(e[2], e[3])
            if self._valid_certificate(e[4], M.vote_payload("accept", e[0], e[1], digest)):
                last, entry = body[1], e
                break
        forced = None
        writes = [b[3] for b in parsed if b[1] == last and b[3] is not None and b[3][0] < regency]
        for w in sorted(writes, key=lambda w: w[0], reverse=True):
            if not self.byzantine:
                forced = (w[1], w[2])
                break
            digest = M.proposal_digest(w[1], w[2])
            if self._valid_certificate(w[3], M.vote_payload("write", last + 1, w[0], digest)):
                forced = (w[1], w[2])
                break
        return last, entry, forced

    def _maybe_sync(self, now):
        if self._synced or self._recovering or self._leader(self._regency) != self.index:
            return
        chosen = [(s, v) for s, v in sorted(self._stopdata.items()) if v[0] == self._regency]
        if len(chosen) < self._q:
            return
        last, entry, forced = self._choose(self._regency, [v[3] for _, v in chosen])
        proposal = forced
        if proposal is None and last == self._last and self._eligible:
            batch = self._take_batch(now)
            if batch is not None:
                proposal = (max(now, self._last_ts), batch[0])
        stopdatas = tuple((s, v[1], v[2]) for s, v in chosen)
        self._count("syncs_sent")
        message = M.encode_sync(self._regency, stopdatas, proposal)
        self._send(None, message)
        self._sync_msg = message
        self._apply_sync(last, entry, proposal, forced is not None, now)

    def _on_sync(self, sender, m, raw, now):
        _, regency, stopdatas, proposal = m
        if sender != self._leader(regency):
            self._count("drop_not_leader")
            return
        if regency < self._regency or (regency == self._regency and self._synced):
            return
        if regency > self._regency + REGENCY_WINDOW or self._sync_seen.get(sender, -1) >= regency:
            self._count("drop_sync")
            return
        self._sync_seen[sender] = regency
        parsed = []
        seen = set()
        for replica, body, signature in stopdatas:
            if replica in seen or not 0 <= replica < self.replicas:
                continue
            try:
                p = M.decode_stopdata_body(body)
            except M.MessageError:
                continue
            if p[0] != regency:
                continue
            if self.byzantine and not self._crypto.verify(replica, M.stopdata_payload(body), signature):
                self._count("bad_signature")
                continue
            seen.add(replica)
            parsed.append(p)
        if len(parsed) < self._q:
            self._count("bad_sync")
            return
        last, entry, forced = self._choose(regency, parsed)
        if forced is not None and (
            proposal is None or M.proposal_digest(*proposal) != M.proposal_digest(*forced)
        ):
            self._count("bad_sync")
            return
        if regency > self._regency:
            self._count("regencies_installed")
            self._enter(regency, synced=True)
            self._waiting_since = now
        self._synced = True
        self._sync_msg = raw
        self._stopdata_msg = None
        self._apply_sync(last, entry, proposal, forced is not None, now)

    def _apply_sync(self, last, entry, proposal, forced, now):
        self._synced = True
        self._changed = True
        if self._last == last - 1 and entry is not None:
            self._decide(entry[0], entry[1], entry[2], entry[3], entry[4], M.proposal_digest(entry[2], entry[3]))
        if self._last < last:
            self._sync_pending = (self._regency, last + 1, proposal, forced)
            self._request_state(now, force=True)
            return
        if self._last == last and proposal is not None:
            self._take_sync_proposal(proposal, forced, now)

    def _take_sync_proposal(self, proposal, forced, now):
        slot = self._slot
        if slot.proposed or proposal is None:
            return
        timestamp, data = proposal
        if not forced:
            self._consider(timestamp, data, now)
            return
        slot.proposed = True
        slot.forced = True
        result = self._values_of(data)
        if isinstance(result, str):
            self._count("decided_bad_value")
            return
        self._vote(M.keys_digest(timestamp, b"".join(result[1])), timestamp, data, result[0], result[1])

    # --- checkpoints and state transfer -----------------------------------------

    def _on_checkpoint(self, sender, m, raw, now):
        _, instance, digest, signature = m
        self._hint(sender, instance)
        if self._stable is not None and instance <= self._stable[0]:
            return
        votes = self._checkpoint_votes.setdefault(sender, {})
        votes[instance] = (digest, signature)
        while len(votes) > CHECKPOINT_VOTES_PER_PEER:
            del votes[min(votes)]
        self._check_stable(instance)

    def _check_stable(self, instance):
        own = self._own_checkpoints.get(instance)
        if own is None or own[1] is None:
            return
        digest = own[1]
        matching = []
        for sender, votes in self._checkpoint_votes.items():
            vote = votes.get(instance)
            if vote is not None and vote[0] == digest:
                matching.append((sender, vote[1]))
        if len(matching) < self._q:
            return
        certificate = self._valid_certificate(matching, M.checkpoint_payload(instance, digest))
        if certificate is None:
            for sender, _ in matching:
                if sender != self.index:
                    self._checkpoint_votes[sender].pop(instance, None)
            return
        self._make_stable(instance, own[0], own[2], certificate)

    def _make_stable(self, instance, chain, state, certificate):
        self._count("checkpoints_stable")
        self._stable = (instance, chain, state, certificate)
        for i in [i for i in self._log if i < instance]:
            del self._log[i]
        if self._journal is not None and not self._replaying:
            # a new base: the checkpoint and everything after it still needed
            self._note(J_STABLE, instance, chain, state, certificate, self._history_until(instance), base=True)
            for i in sorted(self._log):
                if i > instance:
                    e = self._log[i]
                    self._note(J_DECIDED, i, e[0], e[1], e[2], e[3])
            self._note(J_REGENCY, self._regency)
            if self._wc is not None:
                self._note(J_WRITTEN, self._last + 1, *self._wc)
            if self._voted is not None and self._voted[0] > self._last:
                self._note(J_VOTED, *self._voted)
        for i in [i for i in self._own_checkpoints if i <= instance]:
            del self._own_checkpoints[i]
        for votes in self._checkpoint_votes.values():
            for i in [i for i in votes if i <= instance]:
                del votes[i]

    def _request_state(self, now, force=False):
        retry = self._leader_timeout / 2
        if not force and self._transfer_at is not None and now - self._transfer_at < retry:
            return
        self._transfer_at = now
        self._count("state_requests")
        self._send(None, M.encode_state_request(self._last + 1))

    def _on_state_request(self, sender, m, raw, now):
        first = m[1]
        answered = self._answered.get(sender)
        if answered is not None and answered[0] == first and now - answered[1] < self._leader_timeout / 4:
            self._count("drop_repeated_request")
            return
        self._answered[sender] = (first, now)
        checkpoint = None
        stable = self._stable
        start = first
        if stable is not None and first <= stable[0] and self._last >= first:
            checkpoint = stable
            start = stable[0]
        entries = []
        size = 0
        if self._last >= first:
            for i in range(start, self._last + 1):
                e = self._log.get(i)
                if e is None:
                    continue
                entries.append((i, e[0], e[1], e[2], e[3]))
                size += sum(map(len, e[2])) + 100 * len(e[3]) + 64
                if size > STATE_REPLY_BYTES:
                    break
        self._count("state_replies")
        history = self._history_until(checkpoint[0]) if checkpoint is not None else None
        # a replica that left recovery because all had restarted still says it
        # restarted until it decides, so the others leave it too
        restarted = self._recovering or (self._all_restarted and self._last == 0)
        self._send(sender, M.encode_state_reply(self._last, restarted, checkpoint, tuple(entries), history))

    def _on_state_reply(self, sender, m, raw, now):
        _, last, recovering, checkpoint, entries, history = m
        self._hint(sender, last)
        if checkpoint is not None and checkpoint[0] > self._last:
            instance, chain, state, certificate = checkpoint
            digest = M.checkpoint_digest(instance, chain, _sha256(state).digest())
            if len(state) > self._max_state:
                self._count("state_too_large")
            elif self._valid_certificate(certificate, M.checkpoint_payload(instance, digest)) is None:
                self._count("state_bad_checkpoint")
            else:
                self._restore_checkpoint(instance, chain, state, certificate, history)
        progressed = False
        for e in entries:
            i, regency, timestamp, data, certificate = e
            if i == self._last and i not in self._log and self._stable is not None and i == self._stable[0]:
                # the entry of the checkpoint just restored: keep it for STOPDATA
                digest = M.proposal_digest(timestamp, data)
                if self._valid_certificate(certificate, M.vote_payload("accept", i, regency, digest)):
                    self._log[i] = (regency, timestamp, data, certificate, digest)
                    if timestamp > self._last_ts:
                        self._last_ts = timestamp
                continue
            if i != self._last + 1:
                continue
            digest = M.proposal_digest(timestamp, data)
            valid = self._valid_certificate(certificate, M.vote_payload("accept", i, regency, digest))
            if valid is None:
                self._count("state_bad_entry")
                break
            if not self._decide(i, regency, timestamp, data, valid, digest, transferred=True):
                break
            progressed = True
        if progressed:
            self._count("state_entries", len(entries))
        if self._recovering and recovering and last == 0 and self._last == 0 and self._stable is None:
            # every replica restarted without memory: nobody holds a vote or a
            # decision any more, so the log starts afresh (with fewer than all
            # of them, one that kept its memory may hold what was decided)
            self._amnesiac.add(sender)
            if len(self._amnesiac) >= self.replicas - 1:
                self._recovering = False
                self._all_restarted = True
                self._count("recovered_all_restarted")
                self._changed = True
        if self._recovering and not recovering and self._recovery_target is None and last <= self._last:
            # a claim counts once this replica decided up to it, so a liar cannot inflate it
            self._recovery_lasts[sender] = max(last, self._recovery_lasts.get(sender, 0))
            if len(self._recovery_lasts) >= self._q:
                self._recovery_target = max(self._recovery_lasts.values()) + 2
                self._changed = True
        if last > self._last and (progressed or checkpoint is not None):
            self._transfer_at = None

    def _restore_checkpoint(self, instance, chain, state, certificate, history):
        self._count("state_restored")
        if history is not None:
            # keys decided up to the checkpoint, checked against its chain
            link = history[0]
            for ts, blob in history[1]:
                link = M.chain_next(link, M.keys_digest(ts, blob))
            if link == chain:
                first = instance - len(history[1]) + 1
                self._history = deque()
                self._history_chain = history[0]
                for offset, (ts, blob) in enumerate(history[1]):
                    keys = [blob[k:k + 32] for k in range(0, len(blob), 32)]
                    self._remember(first + offset, ts, keys)
                    self._last_ts = max(self._last_ts, ts)
            else:
                self._count("state_bad_history")
                history = None
        if history is None:
            self._history = deque()
            self._history_chain = chain
        self._last = instance
        self._chain = chain
        self._log = {}
        self._decided = []
        self._checkpoints = [c for c in self._checkpoints if c > instance]
        self._restore = (instance, state)
        self._own_checkpoints = {i: v for i, v in self._own_checkpoints.items() if i > instance}
        self._make_stable(instance, chain, state, certificate)
        self._wc = None
        self._new_slot()
        self._waiting_since = None
        self._behind_since = None
        self._changed = True

    def _on_status(self, sender, m, raw, now):
        _, regency, last = m
        self._hint(sender, last)
        if regency < self._regency:
            self._help(sender, now)

    # --- timers ----------------------------------------------------------------

    def _timers(self, now):
        if self._recovering and self._recovery_target is None:
            self._request_state(now)
        slot = self._slot
        busy = bool(self._eligible) or slot.proposed or slot.in_progress(self._weak)
        if busy:
            if self._waiting_since is None:
                self._waiting_since = now
            elif now - self._waiting_since > self._timeout:
                if self._stop_sent <= self._regency:
                    self._count("timeouts")
                    self._start_stop(now)
                    self._request_state(now)
        else:
            self._waiting_since = None
        # re-send what may have been lost
        if self._resend_at is None or now >= self._resend_at:
            self._resend_at = now + self._leader_timeout / 2
            if self._waiting_since is not None and now - self._waiting_since >= self._leader_timeout / 2:
                self._resend(now)
            if self._stop_sent > self._regency and now - self._stop_sent_at >= self._timeout / 2:
                self._stop_sent_at = now
                self._send(None, M.encode_stop(self._stop_sent, self._last))
            if self._stopdata_msg is not None:
                self._send(*self._stopdata_msg)
        for digest, want in list(self._wanted.items()):
            if want[0] is None or now - want[0] > self._leader_timeout / 4:
                self._ask_value(digest, now)
        # behind the others?
        weak = self._weak
        last = self._last
        ahead = sum(1 for p in self._peer_last if p > last)
        if ahead >= weak:
            far = sum(1 for p in self._peer_last if p > last + 1)
            if self._behind_since is None:
                self._behind_since = now
            if far >= weak or now - self._behind_since >= self._leader_timeout / 4:
                self._request_state(now)
        else:
            self._behind_since = None
        if self._status_at is None or now >= self._status_at:
            self._status_at = now + self._status_interval
            self._send(None, M.encode_status(self._regency, self._last))
        if now >= self._announce_at:
            self._announce_at = now + self._leader_timeout / 2
            self._reannounce(now)
        if now >= self._expire_at:
            self._expire_at = now + 1.0
            self._expire(now)

    def _resend(self, now):
        slot = self._slot
        self._count("resends")
        for message in (slot.propose_msg, slot.write_msg, slot.accept_msg):
            if message is not None:
                self._send(None, message)
        if self._sync_msg is not None and self._leader(self._regency) == self.index:
            self._send(None, self._sync_msg)

    def _reannounce(self, now):
        """
        Announce again own values not decided for a while (a HAVE may
        have been lost, or a peer restarted), within one batch's bytes.
        """
        own = self._own
        if not own:
            return
        old = now - self._leader_timeout
        data = []
        size = 0
        moved = []
        for key, when in own.items():
            if when > old or size >= self._max_bytes or len(data) >= self._max_values:
                break
            entry = self._pool.get(key)
            if entry is None:
                continue
            data.append(entry[1])
            size += len(entry[1])
            moved.append(key)
        for key in moved:
            own[key] = now
            own.move_to_end(key)
        if data:
            self._count("reannounced", len(data))
            self._send(None, M.encode_have(tuple(data)))

    def _expire(self, now):
        old = now - self._ttl
        expired = []
        for key, entry in self._pool.items():
            if entry[4] > old:
                break
            expired.append(key)
        keep = self._slot.keys or ()
        for key in expired:
            if key in keep:
                continue
            self._count("pool_expired")
            self._drop_value(key)
