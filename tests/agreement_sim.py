"""
A deterministic simulation of the agreement engine (L{fit_broker.agreement}).

One run, drawn from (kind, seed): n replicas (4 with f=1 or 7 with f=2
Byzantine, 3 with f=1 crash-tolerant) each an L{Orderer} with a small
application on top (its state is the hash chain of what it applied), a fake
clock and a seeded network that delays, drops, duplicates, reorders and
partitions messages until it heals.  Adversary kinds add crashes and
restarts (a fresh Orderer that recovers by state transfer), leader changes
forced at each phase, and one Byzantine replica (f of them at most) that
equivocates, votes both ways, forges senders and junk, replays, mutates one
field of one message, lies in state transfer, stays silent, or runs as two
twins with the same keys.

Checked at every decision of a correct replica: no two decide differently
at one instance (nor apply different states), only submitted values are
decided, each at most once.  After the network heals: every correct
replica decides every value submitted to at least 2f+1 correct replicas
within bounded simulated time.
"""

import hashlib
import heapq
import hmac
import random

import msgpack

from fit_broker.agreement import messages as M
from fit_broker.agreement.crypto import generate as ed25519_replicas
from fit_broker.agreement.engine import Orderer
from fit_broker.agreement.values import value_key

TICK = 0.15
LEADER_TIMEOUT = 1.0
CHAOS = (2.0, 6.0)
LIVENESS_BOUND = 150.0

KINDS = (
    "calm", "network", "crash", "phase", "cft", "cft_crash", "equivocate", "conflicting",
    "forge", "replay", "mutate", "lying_state", "silent", "twins", "journal", "cft_journal",
    "journal_equivocate",
)
BYZANTINE_KINDS = {
    "equivocate", "conflicting", "forge", "replay", "mutate", "lying_state", "silent", "twins",
    "journal_equivocate",
}
# Kinds whose correct replicas keep a journal and may all crash at once
# (power loss: what was not synced is gone) and restart from it.
JOURNAL_KINDS = {"journal", "cft_journal", "journal_equivocate"}

_packb = msgpack.Packer(use_bin_type=True).pack


class Broken(AssertionError):
    """A property of the run did not hold."""


class FastCrypto:
    """
    A keyed-hash stand-in for Ed25519 with the same two methods: each
    replica's signature is a BLAKE2b MAC under its own key, which every
    replica can check (fine inside one process, not a real signature).
    """

    def __init__(self, index, keys):
        self.index = index
        self._keys = keys

    def sign(self, data):
        return hashlib.blake2b(data, key=self._keys[self.index], digest_size=16).digest()

    def verify(self, replica, data, signature):
        key = self._keys.get(replica)
        if key is None:
            return False
        return hmac.compare_digest(hashlib.blake2b(data, key=key, digest_size=16).digest(), signature)


class App:
    """
    The replicated application: the hash chain of every value it applied.
    """

    def __init__(self):
        self.applied = 0
        self.chain = bytes(32)

    def apply(self, decided):
        if decided.instance != self.applied + 1:
            raise Broken(f"instance {decided.instance} applied after {self.applied}")
        self.applied = decided.instance
        self.chain = hashlib.sha256(self.chain + _packb((decided.timestamp, decided.values))).digest()

    def state(self):
        return _packb((self.applied, self.chain))

    def restore(self, instance, state):
        applied, chain = msgpack.unpackb(state, use_list=False)
        if applied != instance:
            raise Broken(f"restored state of {applied} as instance {instance}")
        self.applied, self.chain = applied, chain


class Node:
    """
    One replica process: its engine, application and (if Byzantine) behaviour.
    """

    def __init__(self, sim, index, crypto, behaviour=None, twin=0):
        self.sim = sim
        self.index = index
        self.crypto = crypto
        self.behaviour = behaviour
        self.twin = twin
        self.correct = behaviour is None
        self.up = True
        self.incarnation = 0
        # the journal: records synced, and appended since the last sync
        self.journalled = sim.kind in JOURNAL_KINDS and self.correct
        self.durable = []
        self.pending = []
        self.base = None
        self.start()

    def start(self):
        sim = self.sim
        # a journalled replica sent no vote it did not sync first
        recovering = self.incarnation > 0 and not self.journalled
        self.incarnation += 1
        self.app = App()
        self.orderer = Orderer(
            self.index, sim.n, sim.f, sim.byzantine, self.crypto,
            validate=sim.validate, checkpoint_interval=sim.checkpoint_interval,
            leader_timeout=LEADER_TIMEOUT, max_batch_values=sim.max_batch_values,
            clock_skew=sim.clock_skew, pool_limit_values=sim.pool_limit, pool_ttl=sim.pool_ttl,
            recovering=recovering, journal=self.journalled,
        )
        self.pending = []
        self.base = None
        if self.journalled and self.durable:
            sim.handle(self, self.orderer.resume(list(self.durable), self.clock()))

    def note(self, records):
        for base, record in records:
            if base:
                self.base = len(self.pending)
            self.pending.append(record)

    def sync(self):
        """
        Make the journal durable; a durable base makes what precedes it go.
        """
        if self.base is not None:
            self.durable = self.pending[self.base:]
        else:
            self.durable.extend(self.pending)
        self.pending = []
        self.base = None

    def lose_power(self, keep_unsynced):
        """
        What a crash leaves of the journal: a killed process keeps what it
        wrote (the page cache survives), a power loss only what was synced.
        """
        if keep_unsynced:
            self.sync()
        self.pending = []
        self.base = None

    def clock(self):
        return self.sim.now + self.sim.skews[self.index]


class Sim:
    def __init__(self, kind, seed, ed25519=None):
        self.kind = kind
        self.seed = seed
        rng = self.rng = random.Random(f"{kind}:{seed}")
        self.byzantine = not kind.startswith("cft")
        if self.byzantine:
            self.n, self.f = (7, 2) if rng.random() < 0.12 else (4, 1)
        else:
            self.n, self.f = (5, 2) if rng.random() < 0.12 else (3, 1)
        self.ed25519 = (rng.random() < 0.03) if ed25519 is None else ed25519
        self.checkpoint_interval = rng.choice([2, 3, 5, 8, 64])
        self.max_batch_values = rng.choice([1, 2, 3, 8, 100])
        self.clock_skew = 30.0
        self.pool_limit = rng.choice([50, 100_000])
        self.pool_ttl = 600.0
        self.skews = [rng.uniform(-0.2, 0.2) for _ in range(self.n)]
        self.now = 0.0
        self.events = []
        self.sequence = 0
        self.delivered = 0
        self.dropped = 0
        self.forged_dropped = 0

        if self.ed25519:
            cryptos = ed25519_replicas(self.n)
        else:
            keys = {i: rng.randbytes(32) for i in range(self.n)}
            cryptos = [FastCrypto(i, keys) for i in range(self.n)]
        faulty = set()
        if kind in BYZANTINE_KINDS:
            faulty = set(rng.sample(range(self.n), rng.randint(1, self.f)))
        self.nodes = []
        for i in range(self.n):
            behaviour = None
            if i in faulty:
                behaviour = Behaviour(self, "equivocate" if kind == "journal_equivocate" else kind, i)
            self.nodes.append(Node(self, i, cryptos[i], behaviour))
        self.twins = {}
        if kind == "twins":
            for i in sorted(faulty):
                twin = Node(self, i, cryptos[i], Behaviour(self, "twin", i), twin=1)
                self.nodes.append(twin)
                # which twin each sender's messages reach: 0, 1 or both
                self.twins[i] = {j: rng.choice((0, 1, 2)) for j in range(self.n)}
        self.by_index = {}
        for node in self.nodes:
            self.by_index.setdefault(node.index, []).append(node)

        # the network before it heals
        chaotic = kind != "calm"
        self.heal_at = rng.uniform(*CHAOS) if chaotic else 0.5
        self.drop_rate = rng.choice([0.0, 0.02, 0.1, 0.3]) if chaotic else 0.0
        self.dup_rate = rng.choice([0.0, 0.05, 0.2]) if chaotic else 0.0
        self.slow_rate = rng.choice([0.0, 0.05, 0.2]) if chaotic else 0.0
        self.cut = set()  # (src, dst) links down

        # what the checks need
        self.submitted = set()
        self.holders = {}  # value key -> replicas still holding it
        self.required = []  # value keys that must be decided
        self.decisions = {}  # instance -> (timestamp, values)
        self.chains = {}  # instance -> application chain after it
        self.where = {}  # value key -> instance

        self.values = []
        self.progress = 0
        self._plan()

    @staticmethod
    def validate(value, now):
        """The application's check: values marked "bad" are never ordered."""
        return "marked bad" if value[0] == "bad" else None

    # --- scheduling ---------------------------------------------------------------

    def at(self, when, action, *args):
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, action, args))

    def _plan(self):
        rng = self.rng
        kind = self.kind
        values = rng.randint(4, 40)
        for k in range(values):
            when = rng.uniform(0.0, self.heal_at + 1.0)
            value = ("bad" if rng.random() < 0.05 else "v", k, rng.randbytes(rng.choice([8, 40, 300])))
            # most values reach every replica, some only a quorum, a few fewer
            r = rng.random()
            if r < 0.7:
                targets = list(range(self.n))
            elif r < 0.9:
                targets = rng.sample(range(self.n), 2 * self.f + 1)
            else:
                targets = rng.sample(range(self.n), rng.randint(1, 2 * self.f))
            self.at(when, self.submit, value, tuple(sorted(targets)))
        for node in self.nodes:
            self.at(rng.uniform(0, TICK), self.tick, node, node.incarnation)
        if kind != "calm":
            for _ in range(rng.randint(0, 4)):
                start = rng.uniform(0, self.heal_at)
                self.at(start, self.partition)
        if kind in JOURNAL_KINDS:
            for _ in range(rng.randint(1, 3)):
                self.at(rng.uniform(0, self.heal_at), self.crash_all)
        if kind in ("crash", "cft_crash", "phase", "journal", "cft_journal") or (
            kind == "network" and rng.random() < 0.3
        ):
            for _ in range(rng.randint(1, 4)):
                self.at(rng.uniform(0, self.heal_at), self.crash_some)
        if kind == "phase":
            for _ in range(rng.randint(1, 5)):
                self.at(rng.uniform(0, self.heal_at), self.arm_phase)
        self.phase_trap = None
        self.at(self.heal_at, self.heal)

    # --- actions -----------------------------------------------------------------

    def submit(self, value, targets):
        key = value_key(value)
        self.submitted.add(key)
        holders = set()
        for i in targets:
            for node in self.by_index[i]:
                if node.up:
                    self.handle(node, node.orderer.submit([value], node.clock()))
                    if node.correct:
                        holders.add(i)
        self.holders[key] = holders
        if value[0] != "bad":
            self.values.append(key)

    def tick(self, node, incarnation):
        if not node.up or node.incarnation != incarnation:
            return
        self.handle(node, node.orderer.tick(node.clock()))
        if node.journalled:
            node.sync()
        if node.behaviour is not None:
            node.behaviour.on_tick(node)
        self.at(self.now + TICK, self.tick, node, incarnation)

    def partition(self):
        rng = self.rng
        side = set(rng.sample(range(self.n), rng.randint(1, self.n - 1)))
        for a in range(self.n):
            for b in range(self.n):
                if (a in side) != (b in side):
                    self.cut.add((a, b))
        self.at(self.now + rng.uniform(0.3, 3.0), self.unpartition, frozenset(side))

    def unpartition(self, side):
        if self.now >= self.heal_at:
            return
        self.cut = {(a, b) for (a, b) in self.cut if not ((a in side) != (b in side))}

    def crash_some(self):
        """
        Crash up to f correct replicas (fewer when some are Byzantine or
        already down) and restart them later with fresh engines.
        """
        rng = self.rng
        budget = self.f - sum(1 for n in self.nodes if not n.correct and n.twin == 0)
        budget -= sum(1 for n in self.nodes if n.correct and not self.healthy(n))
        candidates = [n for n in self.nodes if n.correct and n.up]
        if budget <= 0 or not candidates:
            return
        for node in rng.sample(candidates, min(budget, rng.randint(1, self.f))):
            self.crash(node)
            self.at(min(self.now + rng.uniform(0.2, 3.0), self.heal_at), self.restart, node)

    def crash_all(self):
        """
        Crash every correct replica at once (a power loss of the whole
        cluster, more than f) and restart them from their journals.
        """
        rng = self.rng
        for node in self.nodes:
            if node.correct and node.up:
                self.crash(node)
                self.at(min(self.now + rng.uniform(0.1, 2.0), self.heal_at), self.restart, node)

    @staticmethod
    def healthy(node):
        return node.up and not node.orderer._recovering

    def crash(self, node):
        node.up = False
        if node.journalled:
            node.lose_power(self.rng.random() < 0.5)
        for holders in self.holders.values():
            holders.discard(node.index)

    def restart(self, node):
        if node.up:
            return
        node.up = True
        node.start()
        self.at(self.now + TICK * self.rng.random(), self.tick, node, node.incarnation)

    def arm_phase(self):
        """
        Isolate the current leader just after it next sends a message of one
        kind, forcing a leader change in that phase.
        """
        self.phase_trap = self.rng.choice(
            [M.PROPOSE, M.WRITE, M.ACCEPT, M.STOP, M.STOPDATA, M.SYNC, M.CHECKPOINT, M.STATE_REPLY]
        )

    def spring(self, node):
        self.phase_trap = None
        rng = self.rng
        if self.now >= self.heal_at:
            return
        budget = self.f - sum(1 for n in self.nodes if not n.correct and n.twin == 0)
        budget -= sum(1 for n in self.nodes if n.correct and not self.healthy(n))
        if rng.random() < 0.5 and node.correct and budget > 0:
            self.crash(node)
            self.at(min(self.now + rng.uniform(0.2, 2.0), self.heal_at), self.restart, node)
            return
        for j in range(self.n):
            if j != node.index:
                self.cut.add((node.index, j))
                self.cut.add((j, node.index))
        self.at(self.now + rng.uniform(0.5, 2.5), self.unpartition, frozenset([node.index]))

    def heal(self):
        self.phase_trap = None
        self.cut = set()
        self.drop_rate = self.dup_rate = self.slow_rate = 0.0
        for node in self.nodes:
            if not node.up:
                self.restart(node)
        self.healed = True

    # --- the network ----------------------------------------------------------------

    def handle(self, node, effects):
        """
        Carry out one engine's effects: apply decisions, answer checkpoint
        requests, send messages.
        """
        while True:
            if effects.journal:
                if not node.journalled:
                    raise Broken(f"replica {node.index} journals without being asked to")
                node.note(effects.journal)
            if effects.restore is not None:
                node.app.restore(*effects.restore)
                self.progress += 1
                if node.correct:
                    self.check_chain(node)
            wanted = set(effects.checkpoints)
            states = []
            for decided in effects.decided:
                if decided.instance <= node.app.applied:
                    raise Broken(f"replica {node.index} decided instance {decided.instance} twice")
                node.app.apply(decided)
                self.progress += 1
                if node.correct:
                    self.check_decision(node, decided)
                if decided.instance in wanted:
                    states.append((decided.instance, node.app.state()))
            if effects.messages and node.journalled:
                node.sync()
            for to, message in effects.messages:
                self.send(node, to, message)
            if not states:
                return
            more = None
            for instance, state in states:
                got = node.orderer.checkpoint(instance, state, node.clock())
                more = got if more is None else more.merge(got)
            effects = more

    def send(self, node, to, message):
        trap = self.phase_trap
        if trap is not None and len(message) > 2 and message[2] == trap and node.up:
            if node.orderer.status()["leader"] == node.index:
                self.spring(node)
        if node.behaviour is not None:
            for to, message, claimed in node.behaviour.outgoing(node, to, message):
                self._route(node, to, message, claimed)
        else:
            self._route(node, to, message, node.index)

    def _route(self, node, to, message, claimed):
        if claimed != node.index:
            # a forged sender: the link's MAC would not check
            self.forged_dropped += 1
            return
        targets = range(self.n) if to is None else (to,)
        rng = self.rng
        for j in targets:
            if j == node.index or (node.index, j) in self.cut:
                continue
            if self.drop_rate and rng.random() < self.drop_rate:
                self.dropped += 1
                continue
            copies = 2 if self.dup_rate and rng.random() < self.dup_rate else 1
            for _ in range(copies):
                delay = rng.uniform(0.001, 0.02)
                if self.slow_rate and rng.random() < self.slow_rate:
                    delay += rng.uniform(0.05, 1.5)
                self.at(self.now + delay, self.deliver, node.index, j, message)

    def deliver(self, src, dst, message):
        if (src, dst) in self.cut:
            self.dropped += 1
            return
        nodes = self.by_index[dst]
        if len(nodes) > 1:
            which = self.twins[dst][src]
            nodes = nodes if which == 2 else [nodes[which]]
        for node in nodes:
            if node.up:
                self.delivered += 1
                self.handle(node, node.orderer.receive(src, message, node.clock()))

    # --- checks ------------------------------------------------------------------------

    def check_decision(self, node, decided):
        instance = decided.instance
        mine = (decided.timestamp, decided.values)
        known = self.decisions.get(instance)
        if known is None:
            self.decisions[instance] = mine
            for value in decided.values:
                key = value_key(value)
                if key not in self.submitted:
                    raise Broken(f"instance {instance} decided a value nobody submitted: {value!r}")
                if value[0] == "bad":
                    raise Broken(f"instance {instance} decided a value the application rejects: {value!r}")
                if key in self.where:
                    raise Broken(f"value {value!r} decided at {self.where[key]} and again at {instance}")
                self.where[key] = instance
        elif known != mine:
            raise Broken(f"replica {node.index} decided {mine!r} at instance {instance}, another {known!r}")
        self.check_chain(node)

    def check_chain(self, node):
        app = node.app
        known = self.chains.get(app.applied)
        if known is None:
            self.chains[app.applied] = app.chain
        elif known != app.chain:
            raise Broken(f"replica {node.index}'s state after instance {app.applied} differs from another's")

    def done(self):
        """
        Whether every value that must be decided is, at every correct replica.
        """
        needed = 0
        for key in self.required:
            instance = self.where.get(key)
            if instance is None:
                return False
            needed = max(needed, instance)
        return all(n.app.applied >= needed for n in self.nodes if n.correct)

    def run(self):
        """
        Run until the liveness deadline; raise L{Broken} when a check fails.
        Return a summary dict.
        """
        self.healed = False
        deadline = None
        checked = -1
        steps = 0
        while self.events:
            when, _, action, args = heapq.heappop(self.events)
            self.now = when
            action(*args)
            steps += 1
            if self.healed and deadline is None and self.now >= self.heal_at + 1.5:
                # every value is submitted by now
                self.required = [
                    k for k in self.values if len(self.holders[k]) >= 2 * self.f + 1
                ]
                deadline = self.now + LIVENESS_BOUND
            if deadline is not None:
                if self.progress != checked:
                    checked = self.progress
                    if self.done():
                        break
                if self.now > deadline:
                    missing = [k.hex()[:12] for k in self.required if k not in self.where]
                    behind = {n.index: n.app.applied for n in self.nodes if n.correct}
                    raise Broken(
                        f"not live: after healing at {self.heal_at:.1f}s, by {self.now:.1f}s "
                        f"values {missing} undecided, replicas at {behind}, "
                        f"status {[n.orderer.status() for n in self.nodes]}"
                    )
        return {
            "steps": steps, "decided": len(self.decisions), "delivered": self.delivered,
            "values": len(self.values), "required": len(self.required), "now": self.now,
        }


class Behaviour:
    """
    What a Byzantine replica does to its own outgoing messages (it runs a
    correct engine underneath, and may sign with its own key only).
    """

    def __init__(self, sim, kind, index):
        self.sim = sim
        self.kind = kind
        self.index = index
        self.rng = random.Random(f"{sim.kind}:{sim.seed}:byz:{index}:{kind}")
        self.sent = []

    def _sign(self, node, payload):
        return node.crypto.sign(payload) if self.sim.byzantine else b""

    def outgoing(self, node, to, message):
        """
        Yield (to, bytes, claimed sender) for one message the engine sends.
        """
        kind, rng, n = self.kind, self.rng, self.sim.n
        me = node.index
        if kind == "silent":
            return
        targets = [j for j in range(n) if j != me] if to is None else [to]
        m = M.decode(message)
        if kind == "replay":
            if len(self.sent) < 400:
                self.sent.append(message)
            yield to, message, me
            return
        if kind == "forge":
            yield to, message, me
            victim = rng.randrange(n)
            yield to, message, victim
            if rng.random() < 0.2:
                yield to, rng.randbytes(rng.randint(0, 80)), me
            if rng.random() < 0.1:
                yield to, M.encode_stop(rng.randint(0, 40), rng.randint(0, 10**6)), me
            return
        if kind == "equivocate" and m[0] == M.PROPOSE and len(targets) > 1:
            _, i, r, ts, values = m
            for j in targets:
                choice = rng.random()
                if choice < 0.4:
                    yield j, message, me
                elif choice < 0.7 and len(values) > 1:
                    yield j, M.encode_propose(i, r, ts, values[: rng.randint(1, len(values) - 1)]), me
                else:
                    yield j, M.encode_propose(i, r, ts + rng.uniform(0.001, 1.0), values), me
            return
        if kind == "conflicting" and m[0] in (M.WRITE, M.ACCEPT):
            _, i, r, d, _sig = m
            label = "write" if m[0] == M.WRITE else "accept"
            encode = M.encode_write if m[0] == M.WRITE else M.encode_accept
            for j in targets:
                if rng.random() < 0.5:
                    yield j, message, me
                else:
                    other = rng.randbytes(32)
                    yield j, encode(i, r, other, self._sign(node, M.vote_payload(label, i, r, other))), me
            return
        if kind == "mutate" and rng.random() < 0.3:
            victim = rng.choice(targets)
            mutated = self.mutate(node, m)
            for j in targets:
                yield j, mutated if (j == victim and mutated is not None) else message, me
            return
        if kind == "lying_state" and m[0] == M.STATE_REPLY:
            yield to, self.lie(node, m), me
            return
        if kind == "lying_state" and m[0] == M.STOPDATA and rng.random() < 0.5:
            yield to, self.lie_stopdata(node, m), me
            return
        yield to, message, me

    def mutate(self, node, m):
        """
        Change one field (instance, regency or digest) of a vote or proposal,
        re-signed with this replica's own key.
        """
        rng = self.rng
        kind = m[0]
        if kind in (M.WRITE, M.ACCEPT, M.PROPOSE):
            _, i, r, third, fourth = m[:5]
            field = rng.choice(("instance", "regency", "digest"))
            if field == "instance":
                i = max(1, i + rng.choice((-1, 1)))
            elif field == "regency":
                r = max(0, r + rng.choice((-1, 1)))
            if kind == M.PROPOSE:
                if field == "digest" and len(fourth) > 1:
                    fourth = fourth[1:]
                return M.encode_propose(i, r, third, fourth)
            d = rng.randbytes(32) if field == "digest" else third
            label = "write" if kind == M.WRITE else "accept"
            encode = M.encode_write if kind == M.WRITE else M.encode_accept
            return encode(i, r, d, self._sign(node, M.vote_payload(label, i, r, d)))
        if kind == M.STOP:
            return M.encode_stop(m[1] + rng.choice((-1, 1, 5)), m[2] + rng.choice((0, 1, 100)))
        if kind == M.CHECKPOINT:
            d = rng.randbytes(32)
            return M.encode_checkpoint(m[1], d, self._sign(node, M.checkpoint_payload(m[1], d)))
        return None

    def lie(self, node, m):
        _, last, recovering, checkpoint, entries, history = m
        rng = self.rng
        how = rng.choice(("state", "entries", "forged", "ahead", "history"))
        if how == "state" and checkpoint is not None:
            c, chain, state, cert = checkpoint
            checkpoint = (c, chain, state + b"x", cert)
        elif how == "entries" and entries:
            entries = tuple(
                (i, r, ts, tuple(reversed(values)) if len(values) > 1 else (_packb(("lie", i)),), cert)
                for (i, r, ts, values, cert) in entries
            )
        elif how == "forged":
            start = (checkpoint[0] if checkpoint else last) + 1
            entries = tuple(
                (i, 0, 1.0, (_packb(("forged", i)),),
                 ((node.index, self._sign(node, M.vote_payload("accept", i, 0, M.proposal_digest(1.0, (_packb(("forged", i)),))))),))
                for i in range(start, start + 3)
            )
        elif how == "history" and history is not None and history[1]:
            chain, past = history
            past = tuple((ts, rng.randbytes(32) * 2) for ts, _ in past)
            history = (chain, past)
        else:
            last += 1000
        return M.encode_state_reply(last, recovering, checkpoint, entries, history)

    def lie_stopdata(self, node, m):
        """
        Claim a later decision and a write certificate that no quorum signed.
        """
        _, body, _sig = m
        regency, last, entry, write = M.decode_stopdata_body(body)
        data = (_packb(("stopdata-lie", last)),)
        d = M.proposal_digest(1.0, data)
        cert = ((node.index, self._sign(node, M.vote_payload("write", last + 1, regency - 1 if regency else 0, d))),)
        write = (max(0, regency - 1), 1.0, data, cert)
        body = M.encode_stopdata_body(regency, last, entry, write)
        return M.encode_stopdata(body, self._sign(node, M.stopdata_payload(body)))

    def on_tick(self, node):
        if self.kind == "replay" and self.sent and self.rng.random() < 0.5:
            for _ in range(self.rng.randint(1, 5)):
                self.sim._route(node, None, self.rng.choice(self.sent), node.index)


def run(kind, seed, ed25519=None):
    """
    Run one seed of one kind; raise L{Broken} with the reason when a check fails.
    """
    return Sim(kind, seed, ed25519).run()
