"""
Seeded simulation of BFT delivery under adversarial schedules.

Each run draws, from its seed, a 4-replica BFT cluster (f = 1, scheme SI or
HA, one or two channels), two honest publishers, sometimes a certified
publisher that sends each replica different batches with overlapping ids,
two subscribers with small credits (sometimes keeping delivery state and
crashing), at most one Byzantine replica of the run's kind, and a schedule
of publishes, pauses and resumptions of honest replicas and dropped links.
After the final heal and a recovery window it checks, per subscriber and
channel: nothing delivered twice (a counted repeat after a crash aside),
nothing that was not published, every acknowledged event delivered (or, in
the short-TTL variant, expired and counted); and at every step, the
voters' pending memory and the replicas' queues within their bounds.

A failing run prints how to replay it: ``--seed KIND:N``.  ``--seeds N``
runs N seeds of every kind.
"""

import random

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from fit_broker import units
from fit_broker.units import Request, pack_contents
from tests import byzantine
from tests.seeds import chosen_runs, parametrize_runs
from tests.seeds import replay_command as _replay_command
from tests.simnet import SimNet, cluster_config, drop_link, prune_links

SUBSCRIBERS = ("console", "dashboard")
PUBLISHERS = ("probe", "honest")
CLIENTS = PUBLISHERS + ("mallory",) + SUBSCRIBERS
DEFAULT_SEEDS = 20
STEPS = (12, 24)
RECOVERY = 10.0
# The largest batch any party sends here, in bytes (bogus full copies included).
MAX_BATCH_BYTES = 110_000
MAX_BATCH_EVENTS = 100

KINDS = {
    "none": None,
    "withhold": lambda rng: byzantine.withhold,
    "alter": lambda rng: byzantine.alter,
    "replay": lambda rng: byzantine.replay(),
    "flood": lambda rng: byzantine.flood(per_delivery=rng.choice([20, 100, 300])),
    "bogus_full_copies": lambda rng: byzantine.bogus_full_copies(
        per_delivery=rng.randint(2, 20), size=rng.choice([2_000, 20_000, 100_000])
    ),
    "equivocate": lambda rng: byzantine.equivocate,
    "acks_without_storing": "liar",
    "drops_fetches": lambda rng: byzantine.unfetchable("drop"),
    "junk_fetches": lambda rng: byzantine.unfetchable("junk"),
}

# (kind, seed) -> why: runs that find a known bug in fit_broker/, expected to fail until it is fixed.
KNOWN_BUGS = {}


def replay_command(kind, seed):
    return _replay_command("tests/test_seeded_sim.py", "--seed", kind, seed)


def pytest_generate_tests(metafunc):
    if "kind" not in metafunc.fixturenames:
        return
    runs = chosen_runs(metafunc.config, "--seed", KINDS)
    if runs is None:
        seeds = metafunc.config.getoption("seeds") or DEFAULT_SEEDS
        runs = [(kind, seed) for kind in KINDS for seed in range(seeds)]
    parametrize_runs(metafunc, runs, KNOWN_BUGS)


class Broken(AssertionError):
    """A property the run checks did not hold; the message says how to replay it."""


class _Subscriber:
    """
    One subscriber client across its incarnations: what its application
    took, and which batch keys a restart may hand over once more.
    """

    def __init__(self, run, name):
        self.run = run
        self.name = name
        rng = run.rng
        self.credit = rng.randint(50, 500)
        self.credit_bytes = rng.randint(4096, 131_072)
        self.state_dir = str(run.tmp_path / name) if rng.random() < 0.5 else None
        self.slow = rng.random() < 0.3
        # (incarnation, tag, batch key, event key, content), in hand-over order
        self.taken = []
        # (incarnation, tag) -> keys of batches its delivery record says may be repeated
        self.may_repeat = {}
        self.incarnation = 0
        self.session = None
        self.subscriptions = []
        self.timers = []
        self.repeated = 0
        self.start()

    def start(self):
        run = self.run
        self.incarnation += 1
        self.subscriptions = []
        options = {"credit": self.credit, "credit_bytes": self.credit_bytes, "timeout": 3600.0}
        if self.state_dir is not None:
            options["state_dir"] = self.state_dir
        self.session = run.net.client(self.name, **options)
        for tag in run.channels:
            d = self.session.subscriber.subscribe(tag, self.application(tag), batches=True)
            record = self.session.subscriber.records.get(tag)
            if record is not None:
                self.may_repeat[(self.incarnation, tag)] = set(record.maybe_repeated)
            self.subscriptions.append(d)
        # events published from now on are this subscriber's
        run.net.run()

    def application(self, tag):
        incarnation = self.incarnation
        rng = self.run.rng

        def take(batches):
            for batch in batches:
                key = (batch.publisher, batch.first_id)
                for event in batch.events():
                    self.taken.append(
                        (incarnation, tag, key, (event.publisher, event.event_id), event.content)
                    )
            if self.slow and rng.random() < 0.5:
                d = Deferred()
                self.timers.append(self.run.net.clock.callLater(rng.uniform(0.01, 1.5), d.callback, None))
                return d
            return None

        return take

    def crash(self):
        """The process dies: its pending application work never finishes."""
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        self.timers = []
        self.repeated += self.session.subscriber.counters.get("repeated-after-crash", 0)
        self.run.net.crash_client(self.session)
        self.session = None

    def repeats(self):
        now = self.session.subscriber.counters.get("repeated-after-crash", 0) if self.session else 0
        return self.repeated + now


class Run:
    """
    One seeded run: the cluster, the parties, the schedule and the checks.
    """

    def __init__(self, kind, seed, tmp_path):
        self.kind = kind
        self.seed = seed
        self.tmp_path = tmp_path
        self.rng = rng = random.Random(f"{kind}:{seed}")
        # reconnect backoff draws its jitter from the global generator
        random.seed(f"jitter:{kind}:{seed}")
        self.scheme = rng.choice(["si", "ha"])
        self.channels = ("events",) if rng.random() < 0.6 else ("events", "alerts")
        self.short_ttl = rng.random() < 0.15
        self.ttl = rng.uniform(2.0, 6.0) if self.short_ttl else 600.0
        self.capacity = 50_000
        self.max_bytes = 64 * 1024 * 1024
        config = cluster_config(
            self.channels, qop="bft", scheme=self.scheme, clients=CLIENTS,
            ttl=self.ttl, capacity=self.capacity, max_bytes=self.max_bytes,
        )
        make = KINDS[kind]
        self.byzantine = None if make is None else rng.randrange(4)
        faulty, liars = {}, {}
        if make == "liar":
            liars[self.byzantine] = byzantine.AcksWithoutStoring
        elif make is not None:
            faulty[self.byzantine] = make(rng)
        self.log = []
        self.net = SimNet(config, faulty=faulty, liars=liars, keys=self.scheme != "si")
        self.honest_replicas = [i for i in range(4) if i != self.byzantine]
        self.publishers = {
            name: self.net.client(
                name, batch_size=rng.choice([1, rng.randint(1, 10), rng.randint(1, 100)]), timeout=3600.0
            )
            for name in PUBLISHERS
        }
        self.mallory = self.net.client("mallory", timeout=3600.0) if rng.random() < 0.5 else None
        self.mallory_id = 10**15
        self.mallory_sent = {}
        self.mallory_burst = rng.choice([1, 1, 5, 30])
        self.subscribers = [_Subscriber(self, name) for name in SUBSCRIBERS]
        self.subscriber_named = {sub.name: sub for sub in self.subscribers}
        # tag -> (publisher, event id) -> content, and the publish time of each
        self.acked = {tag: {} for tag in self.channels}
        self.published_at = {}
        self.published = {}
        self.publishes = []
        self.sequence = 0
        self.last_expiry = self.net.clock.seconds()

    def note(self, what):
        self.log.append(f"{self.net.clock.seconds() - 1_800_000_000:8.2f} {what}")

    def fail(self, what):
        tail = "\n".join(self.log[-25:])
        raise Broken(
            f"seed {self.kind}:{self.seed} ({self.describe()}): {what}\n"
            f"last steps:\n{tail}\n"
            f"replay: {replay_command(self.kind, self.seed)}"
        )

    def describe(self):
        return (
            f"scheme {self.scheme}, channels {','.join(self.channels)}, byzantine "
            f"{self.byzantine if self.byzantine is not None else '-'}, mallory {self.mallory is not None}, "
            f"ttl {self.ttl:.1f}, subscribers "
            + "; ".join(
                f"{s.name} credit {s.credit}/{s.credit_bytes} B"
                f"{' state' if s.state_dir else ''}{' slow' if s.slow else ''}"
                for s in self.subscribers
            )
        )

    # -- actions -------------------------------------------------------

    def publish(self):
        rng = self.rng
        name = rng.choice(PUBLISHERS)
        tag = rng.choice(self.channels)
        count = rng.randint(1, 50)
        pad = b"." * rng.randint(0, 200)
        contents = []
        for _ in range(count):
            self.sequence += 1
            contents.append(b"%s/%s/%d/" % (name.encode(), tag.encode(), self.sequence) + pad)
        self.note(f"{name} publishes {count} on {tag}")
        self.published.setdefault((tag, name), set()).update(contents)
        d = self.publishers[name].publisher.publish_many(tag, contents)
        now = self.net.clock.seconds()
        outcome = []

        def acked(ids):
            for event_id, content in zip(ids, contents):
                self.acked[tag][(name, event_id)] = content
                self.published_at[(name, event_id)] = now
            outcome.append(True)

        d.addCallbacks(acked, lambda f: outcome.append(f))
        self.publishes.append((name, tag, count, outcome))

    def hostile_publish(self):
        """Mallory sends each replica its own batch; their id ranges overlap."""
        rng = self.rng
        tag = rng.choice(self.channels)
        session = self.mallory
        scheme = session.publisher.schemes(session.proxy.config.channels[tag].scheme)
        base = self.mallory_id
        self.mallory_id += rng.randint(5, 40)
        targets = rng.sample(range(4), rng.randint(1, 4))
        shared = rng.random() < 0.3
        for _ in range(self.mallory_burst):
            batch = None
            for index in targets:
                if batch is None or not shared:
                    first = base + rng.randint(0, 30)
                    contents = [b"junk/%d/%d" % (first, rng.randrange(10**6)) for _ in range(rng.randint(1, 8))]
                    batch = scheme.protect(
                        session.publisher.keys, tag,
                        ("mallory", first, self.net.clock.seconds(), self.ttl, 0, pack_contents(contents), b""),
                    )
                    for offset, content in enumerate(contents):
                        self.mallory_sent.setdefault((tag, first + offset), set()).add(content)
                session.proxy.send(index, Request(0, units.PUBLISH, tag, 0, (batch,)))
            base = self.mallory_id
            self.mallory_id += rng.randint(5, 40)
        self.note(
            f"mallory sends {self.mallory_burst} x {'one batch' if shared else 'different batches'} to {targets}"
        )

    def pause(self):
        running = [i for i in self.honest_replicas if i not in self.net.paused]
        if running:
            index = self.rng.choice(running)
            self.net.paused.add(index)
            self.note(f"pause replica {index}")

    def resume(self):
        if self.net.paused:
            index = self.rng.choice(sorted(self.net.paused))
            self.net.paused.discard(index)
            self.note(f"resume replica {index}")

    def drop(self):
        sub = self.rng.choice(self.subscribers)
        index = self.rng.randrange(4)
        if sub.session is not None:
            drop_link(self.net, sub.session, index)
            self.note(f"drop link {sub.name}-{index}")

    def crash_or_restart(self):
        candidates = [s for s in self.subscribers if s.state_dir is not None]
        if not candidates:
            return
        sub = self.rng.choice(candidates)
        if sub.session is None:
            sub.start()
            self.note(f"restart {sub.name}")
        elif sub.incarnation < 3:
            sub.crash()
            self.note(f"crash {sub.name}")

    def advance(self, seconds):
        """Let time pass, running replicas' TTL expiry every second as their services do."""
        net = self.net
        step = 0.5
        net.run()
        while seconds > 0:
            net.run(min(step, seconds))
            seconds -= step
            now = net.clock.seconds()
            if now - self.last_expiry >= 1.0:
                self.last_expiry = now
                for replica in net.replicas:
                    replica.expire()
            prune_links(net)
            self.check_bounds()

    # -- the schedule --------------------------------------------------

    def play(self):
        rng = self.rng
        actions = [
            (self.publish, 6),
            (self.pause, 1.5),
            (self.resume, 1.5),
            (self.drop, 1.0),
            (self.crash_or_restart, 0.6),
        ]
        if self.mallory is not None:
            actions.append((self.hostile_publish, 3))
        functions = [a for a, _ in actions]
        weights = [w for _, w in actions]
        for _ in range(rng.randint(*STEPS)):
            rng.choices(functions, weights)[0]()
            self.advance(rng.choice([0.0, 0.1, 0.3, 0.5, 1.0, 2.0]))
        self.heal()

    def heal(self):
        self.note("heal")
        self.net.paused.clear()
        for sub in self.subscribers:
            if sub.session is None:
                sub.start()
        self.advance(RECOVERY)

    # -- checks --------------------------------------------------------

    def check_bounds(self):
        for sub in self.subscribers:
            if sub.session is None:
                continue
            for tag, voter in sub.session.subscriber.voters.items():
                where = f"{sub.name} voter of {tag}"
                if not voter.pending <= voter.max_pending:
                    self.fail(f"{where}: {voter.pending} pending batches, more than {voter.max_pending}")
                if not 0 <= voter.pending_bytes <= voter.max_pending_bytes:
                    self.fail(f"{where}: {voter.pending_bytes} pending bytes, bound {voter.max_pending_bytes}")
                actual = sum(entry.size for entry in voter._pending.values())
                if actual != voter.pending_bytes:
                    self.fail(f"{where}: pending_bytes says {voter.pending_bytes}, its entries hold {actual}")
                # every replica's copies are within its credit, one batch over at most
                for replica, held in voter._held.items():
                    if held[0] > sub.credit + MAX_BATCH_EVENTS or held[1] > sub.credit_bytes + MAX_BATCH_BYTES:
                        self.fail(
                            f"{where}: replica {replica}'s undecided copies hold {held[0]} events, "
                            f"{held[1]} bytes; its credit is {sub.credit}, {sub.credit_bytes} B"
                        )
                bound = 4 * (sub.credit_bytes + MAX_BATCH_BYTES) * 2
                if voter.pending_bytes > bound:
                    self.fail(f"{where}: {voter.pending_bytes} pending bytes, more than twice all credit ({bound})")
        for index, replica in enumerate(self.net.replicas):
            for tag, channel in replica.broker.channels.items():
                for name, queue in channel.queues.items():
                    where = f"replica {index} queue of {name} on {tag}"
                    if not 0 <= queue.size <= self.capacity or not 0 <= queue.bytes <= self.max_bytes:
                        self.fail(f"{where}: {queue.size} events, {queue.bytes} bytes (bounds {self.capacity}, {self.max_bytes})")
                    if queue.unacked_events < 0 or queue.unacked_bytes < 0:
                        self.fail(f"{where}: {queue.unacked_events} unacknowledged events, {queue.unacked_bytes} bytes")
                    sub = self.subscriber_named.get(name)
                    if index != self.byzantine and sub is not None:
                        self.check_unacked(where, queue, sub)

    def check_unacked(self, where, queue, sub):
        """
        What an honest replica sent and the subscriber did not acknowledge
        stays within the subscriber's credit (twice: credit returned in one
        turn may overtake that turn's acknowledgements).
        """
        events = 2 * sub.credit + MAX_BATCH_EVENTS
        nbytes = 2 * sub.credit_bytes + MAX_BATCH_BYTES
        if queue.unacked_events > events or queue.unacked_bytes > nbytes:
            publishers = {}
            for key in queue._unacked:
                publishers[key[0]] = publishers.get(key[0], 0) + 1
            self.fail(
                f"{where}: {queue.unacked_events} events, {queue.unacked_bytes} bytes sent and "
                f"unacknowledged; the subscriber's credit is {sub.credit}, {sub.credit_bytes} B "
                f"(unacknowledged batches by publisher: {publishers})"
            )

    def check_outcome(self):
        net = self.net
        now = net.clock.seconds()
        for name, tag, count, outcome in self.publishes:
            if not outcome and not self.short_ttl:
                self.fail(f"a publish of {count} events by {name} on {tag} was never answered after the heal")
        for sub in self.subscribers:
            for d in sub.subscriptions:
                if not d.called:
                    self.fail(f"{sub.name}'s subscription was never answered after the heal")
                if not getattr(d.result, "ok", False):
                    self.fail(f"{sub.name} could not subscribe: {d.result}")
            for tag in self.channels:
                self.check_subscriber(sub, tag, now)

    def check_subscriber(self, sub, tag, now):
        where = f"{sub.name} on {tag}"
        acked = self.acked[tag]
        seen = {}
        repeated_batches = set()
        for incarnation, t, batch_key, key, content in sub.taken:
            if t != tag:
                continue
            if key[0] == "mallory":
                if content not in self.mallory_sent.get((tag, key[1]), ()):
                    self.fail(f"{where}: unexpected {key} {content[:40]!r}: mallory never sent it")
            elif key in acked and acked[key] != content:
                self.fail(f"{where}: unexpected {key} {content[:40]!r}, published {acked[key][:40]!r}")
            elif key not in acked and content not in self.published.get((tag, key[0]), ()):
                self.fail(f"{where}: unexpected {key} {content[:40]!r}: never published")
            if key in seen:
                # a crash during a hand-over may repeat it once in the next incarnation, counted
                last = seen[key]
                if last < incarnation and batch_key in sub.may_repeat.get((incarnation, tag), ()):
                    repeated_batches.add(key)
                    seen[key] = incarnation
                    continue
                self.fail(f"{where}: {key} delivered twice (incarnations {last} and {incarnation})")
            seen[key] = incarnation
        if repeated_batches and not sub.repeats():
            self.fail(f"{where}: {len(repeated_batches)} events repeated after a crash, none counted")
        lost = [key for key in acked if key not in seen]
        if not lost:
            return
        if not self.short_ttl:
            self.fail(
                f"{where}: {len(lost)} acknowledged events never delivered, e.g. {sorted(lost)[:3]}"
                + self.diagnose(sub, tag, sorted(lost)[0])
            )
        alive = [key for key in lost if self.published_at[key] + self.ttl > now]
        if alive:
            self.fail(f"{where}: {len(alive)} acknowledged, unexpired events never delivered, e.g. {alive[:3]}")
        counted = sum(
            replica.broker.channels[tag].queues[sub.name].counters["expired"]
            for replica in self.net.replicas
            if sub.name in replica.broker.channels[tag].queues
        )
        counted += sum(
            replica.broker.channels[tag].counters.get("expired-on-arrival", 0) for replica in self.net.replicas
        )
        if sub.session is not None:
            counted += sub.session.subscriber.voters[tag].counters.get("expired", 0)
        if not counted:
            self.fail(f"{where}: {len(lost)} expired events lost and no expiry counted anywhere")

    def diagnose(self, sub, tag, key):
        """Where the first lost event is: each replica's queue of the subscriber, and the voter."""
        lines = []
        batch_key = None
        for index, replica in enumerate(self.net.replicas):
            queue = replica.broker.channels[tag].queues.get(sub.name)
            if queue is None:
                lines.append(f"replica {index}: no queue")
                continue
            found = [k for k in queue._index if k[0] == key[0] and k[1] <= key[1]]
            state = "-"
            if found:
                batch_key = max(found, key=lambda k: k[1])
                state = {0: "queued", 1: "sent", 2: "gone"}[queue._index[batch_key][4]]
            lines.append(f"replica {index}: {state}, queue {dict(queue.counters, size=queue.size, unacked=queue.unacked)}")
        if sub.session is not None:
            voter = sub.session.subscriber.voters[tag]
            lines.append(f"voter: pending {voter.pending}, counters {voter.counters}")
            lines.append(f"subscriber: {sub.session.subscriber.counters}")
            if batch_key is not None:
                entry = voter._pending.get(batch_key)
                if entry is not None:
                    lines.append(f"pending entry of {batch_key}: votes {({d.hex()[:8]: v for d, v in entry.votes.items()})}, fulls {len(entry.fulls)}")
        return "\n" + "\n".join(lines)


@pytest.fixture
def failures():
    """Every failure logged while the run goes: an honest party's traceback."""
    seen = []

    def observe(event):
        if "log_failure" in event:
            seen.append(event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_seeded_schedule(kind, seed, tmp_path, failures):
    """Under a seeded adversarial schedule, every subscriber gets each acknowledged event once, nothing else, and memory stays within its bounds."""
    run = Run(kind, seed, tmp_path)
    try:
        run.play()
        run.check_outcome()
    except Broken:
        raise
    except Exception as e:
        e.add_note(f"seed {kind}:{seed}; replay: {replay_command(kind, seed)}")
        raise
    if failures:
        run.fail(f"{len(failures)} tracebacks logged, the first:\n{failures[0]}")
