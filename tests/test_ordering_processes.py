"""
Ordered channels under load with real processes on loopback: four `twistd
fitbroker` replicas over mutual TLS ordering publishes through the
replicated log, a publisher process at a steady rate, and two `fitbroker
tail` subscribers, while the leader is SIGKILLed or SIGSTOPped, a replica is
restarted after the cluster moved two checkpoints on, or the control table
changes.

Every row checks, per subscriber: every acknowledged event delivered exactly
once, nothing unacknowledged delivered, gapless sequence numbers in log
order, each publisher's events in publication order; that both subscribers
delivered the same sequence on every channel; and that no replica wrote a
traceback.  Rows print their figures (run with -s to see them).

The longer variants are marked C{full}:

    python3 -m pytest -s -m full tests/test_ordering_processes.py
"""

import bisect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from zlib import crc32

import pytest

from benchmarks.cluster import free_ports
from fit_broker.init import cluster_toml
from fit_broker.pki import write_cluster_material
from tests.processes import ROOT, ReplicaProcesses, read_history

pytestmark = pytest.mark.integration

TAGS = ["ch0", "ch1"]
PUBLISHERS = ["probe", "rogue"]
SUBSCRIBERS = ["console", "console2"]
ADMIN = "admin"
CLIENTS = [ADMIN, *PUBLISHERS, *SUBSCRIBERS]
# The engine's defaults (fit_broker.agreement.engine.Orderer), which the
# replicas run with: the cluster file has no key for either.
CHECKPOINT_INTERVAL = 64
LEADER_TIMEOUT = 2.0

FITBROKER = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"]

# Asks every replica for the control table and prints each one's answer.
TABLES_SCRIPT = """
import json, sys
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from fit_broker import units
from fit_broker.client.session import open_session
from fit_broker.config import load_config
from fit_broker.units import Request

config = load_config(sys.argv[1])
answers = {}

async def run():
    session = open_session(config, sys.argv[2], reactor)
    try:
        await session.proxy.wait_for_links(len(config.replicas), 20)
        def observe(index, reply):
            answers[index] = reply.info
        proxy = session.proxy
        await proxy.invoke(Request(proxy.next_seq(), units.TABLE), len(config.replicas), timeout=10,
                           retry=False, observe=observe)
    except Exception as e:
        answers["error"] = f"{type(e).__name__}: {e}"
    finally:
        session.stop()
        reactor.callLater(0, reactor.stop)

reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
reactor.run()
print(json.dumps({str(k): v for k, v in answers.items()}, default=repr))
"""


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_ordered_cluster(folder, qop="bft", ordering="channel", tags=TAGS, extra_tags=()):
    """
    Write keys and a mutual-TLS cluster file of four replicas (f = 1) into
    C{folder}: channels C{tags} of class C{ordered} (ordering C{ordering})
    that C{probe} and C{rogue} publish to and C{console} and C{console2}
    subscribe to, administrator C{admin}.  C{extra_tags} get channel keys
    only, for channels an administrator creates later.  Return (path, ports).
    """
    scheme = "ha" if qop == "bft" else "si"
    write_cluster_material(
        os.path.join(folder, "keys"), "ordered", 4, CLIENTS,
        {tag: CLIENTS for tag in [*tags, *extra_tags]},
    )
    ports = free_ports(4)
    rows = [(tag, tag, "ordered", qop, scheme, PUBLISHERS, SUBSCRIBERS) for tag in tags]
    text = cluster_toml(
        "ordered", 1, ports, CLIENTS, rows, keys_dir="keys", tls=True, admins=[ADMIN],
        classes={"ordered": {"ordering": ordering, "capacity": 100_000, "ttl": 300}},
    )
    path = os.path.join(folder, "cluster.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, ports


class Arrivals:
    """
    When each subscriber's output grew, sampled every few milliseconds, so
    that the time each printed line arrived is known to that precision.
    """

    def __init__(self, interval=0.005):
        self.interval = interval
        self.paths = {}
        self.samples = {}  # name -> ([times], [sizes])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, name, path):
        self.samples[name] = ([time.monotonic()], [0])
        self.paths[name] = path

    def _run(self):
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            for name, path in list(self.paths.items()):
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                times, sizes = self.samples[name]
                if size != sizes[-1]:
                    times.append(now)
                    sizes.append(size)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def line_times(self, name):
        """Return the arrival time of each line of C{name}'s output, in order."""
        times, sizes = self.samples[name]
        with open(self.paths[name], "rb") as f:
            data = f.read()
        arrivals, end = [], 0
        for line in data.splitlines(keepends=True):
            end += len(line)
            i = bisect.bisect_left(sizes, end)
            arrivals.append(times[i] if i < len(times) else time.monotonic())
        return arrivals

    def after(self, name, since):
        """Return the times output of C{name} grew after C{since}."""
        times, _ = self.samples[name]
        return [t for t in times if t > since]


class OrderedRun:
    """
    The processes of one scenario, each stopped by its process id at the end.
    """

    def __init__(self, folder):
        self.folder = folder
        self.processes = {}
        self.replicas = None
        self.config = None
        self.arrivals = Arrivals()

    def path(self, name):
        return os.path.join(self.folder, name)

    def cluster(self, qop="bft", ordering="channel", extra_tags=()):
        self.config, ports = write_ordered_cluster(self.folder, qop, ordering, extra_tags=extra_tags)
        self.replicas = ReplicaProcesses(self.folder, self.config, ports)
        self.replicas.start_all()
        self.wait_agreement(lambda a: len(a) == 4, "every replica up")
        return self.config

    def start(self, name, argv, stdin=subprocess.DEVNULL):
        out = open(self.path(f"{name}.out"), "wb")
        err = open(self.path(f"{name}.err"), "wb")
        process = subprocess.Popen(argv, cwd=ROOT, stdin=stdin, stdout=out, stderr=err, env=child_env())
        out.close()
        err.close()
        self.processes[name] = process
        return process

    def text(self, name, stream="out"):
        with open(self.path(f"{name}.{stream}"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def cli(self, *args, timeout=60):
        """Run one `fitbroker` command to its end; return the completed process."""
        return subprocess.run(
            [*FITBROKER, *args], cwd=ROOT, capture_output=True, timeout=timeout, env=child_env(),
            stdin=subprocess.DEVNULL,
        )

    # --- subscribers and publishers -------------------------------------------------

    def tail(self, client, channels=TAGS):
        """Start `fitbroker tail` as C{client} on C{channels}; wait until it subscribed."""
        process = self.start(
            client, [*FITBROKER, "tail", "--config", self.config, "--as", client, "--no-state", *channels]
        )
        deadline = time.monotonic() + 30
        while "subscribed" not in self.text(client, "err"):
            assert process.poll() is None and time.monotonic() < deadline, (
                f"{client} did not subscribe: {self.text(client, 'err')[-2000:]}"
            )
            time.sleep(0.05)
        self.arrivals.watch(client, self.path(f"{client}.out"))
        return process

    def publisher(self, name, events, rate, batch=1, client="probe", channels=TAGS):
        return self.start(
            name,
            [
                sys.executable, "-m", "benchmarks.loadgen", "publish", "--config", self.config,
                "--as", client, "--channels", ",".join(channels), "--events", str(events),
                "--rate", str(rate), "--batch", str(batch), "--acked", self.path(f"{name}.acked"),
            ],
        )

    def keep_publishing(self, runs, events, rate, client="probe", channels=TAGS):
        """
        Keep a load generator running: start the next of C{runs} (names
        C{<client>0, <client>1...}, appended) when the last one ended.  Each
        run's acknowledgements are complete in its file once it ended.
        """
        if not runs or self.processes[runs[-1]].poll() is not None:
            runs.append(f"{client}{len(runs)}")
            self.publisher(runs[-1], events, rate, client=client, channels=channels)

    def acked(self, runs):
        """Wait for every run of C{runs}; return their summaries and acknowledged records."""
        summaries, records = {}, []
        for name in runs:
            summaries[name] = self.summary(name)
            assert "error" not in summaries[name], (name, summaries[name])
            records += read_history(self.path(f"{name}.acked"))
        return summaries, records

    def summary(self, name, timeout=120):
        """Wait for a load generator and return its JSON summary."""
        self.processes[name].wait(timeout)
        lines = self.text(name).strip().splitlines()
        assert lines, f"{name} printed nothing: {self.text(name, 'err')[-2000:]}"
        return json.loads(lines[-1])

    def printed(self, name):
        return sum(1 for line in self.text(name).splitlines() if line.strip())

    def wait_printed(self, names, count, timeout=60, settle=1.0):
        """
        Wait until each subscriber printed C{count} events (or printed
        nothing more for 15 s), then C{settle} seconds more for anything
        printed twice to show.
        """
        deadline = time.monotonic() + timeout
        last = {}
        while time.monotonic() < deadline:
            counts = {name: self.printed(name) for name in names}
            if all(n >= count for n in counts.values()):
                break
            now = time.monotonic()
            for name, n in counts.items():
                if last.get(name, (None,))[0] != n:
                    last[name] = (n, now)
            if all(now - since > 15 for _, since in last.values()):
                break
            time.sleep(0.1)
        time.sleep(settle)

    def records(self, name):
        return [json.loads(line) for line in self.text(name).splitlines() if line.strip()]

    def wait_lines(self, name, count, timeout=60):
        deadline = time.monotonic() + timeout
        while self.printed(name) < count:
            assert time.monotonic() < deadline, f"{name}: {self.printed(name)} of {count} printed"
            time.sleep(0.05)

    # --- status ------------------------------------------------------------------

    def status(self):
        """Return `fitbroker status --json` as the administrator: replica name -> info."""
        result = self.cli("status", "--config", self.config, "--as", ADMIN, "--json", timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)

    def agreement(self):
        """Return replica index -> its "agreement" status, for those that answered."""
        found = {}
        for name, info in self.status().items():
            if isinstance(info, dict) and isinstance(info.get("agreement"), dict):
                found[int(name.rsplit("-", 1)[1])] = {**info["agreement"], "table": info.get("table")}
        return found

    def wait_agreement(self, condition, what, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            found = self.agreement()
            if condition(found):
                return found
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {brief(found)}"
            time.sleep(0.3)

    def leader(self):
        """The leader most replicas that answered name."""
        votes = Counter(a["leader"] for a in self.agreement().values())
        return votes.most_common(1)[0][0]

    def tables(self):
        """Return replica index -> its answer to a table request (all four asked)."""
        result = subprocess.run(
            [sys.executable, "-c", TABLES_SCRIPT, self.config, ADMIN], cwd=ROOT, capture_output=True,
            timeout=60, env=child_env(),
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        answers = json.loads(result.stdout.decode().strip().splitlines()[-1])
        assert "error" not in answers, answers
        return {int(k): v for k, v in answers.items()}

    def no_tracebacks(self, *names):
        for index in self.replicas.processes:
            text = self.replicas.output(index)
            assert "Traceback" not in text, f"replica {index}: {text[-3000:]}"
        for name in names:
            for stream in ("out", "err"):
                assert "Traceback" not in self.text(name, stream), f"{name}: {self.text(name, stream)[-3000:]}"

    def stop(self):
        self.arrivals.stop()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait()
        if self.replicas is not None:
            self.replicas.stop_all()


def brief(agreement):
    keys = ("regency", "leader", "decided", "stable_checkpoint", "position", "recovering", "synced")
    return {index: {k: a.get(k) for k in keys} for index, a in agreement.items()}


@pytest.fixture
def run(tmp_path):
    scenario = OrderedRun(str(tmp_path))
    yield scenario
    scenario.stop()


# --- checks ------------------------------------------------------------------------------


def record_key(record):
    return (record["channel"], str(record["event_id"]), f"{crc32(record['content'].encode()):08x}")


def check_ordered(acked, deliveries, global_order=False):
    """
    Check what each subscriber delivered (name -> `tail` JSON records, in
    the order printed) against the acknowledged events (C{(channel, event
    id, crc32)} records of every publisher): each delivered exactly once,
    nothing else delivered, per channel gapless sequence numbers in log
    order and every publisher's events in publication order (across all
    channels, in log order, with C{global_order}), and every subscriber the
    same sequence on every channel.  Return the number of events checked.
    """
    acked = set(acked)
    sequences = {}
    for name, records in deliveries.items():
        counts = Counter(record_key(r) for r in records)
        missing = acked - set(counts)
        unexpected = set(counts) - acked
        twice = {k: n for k, n in counts.items() if n > 1}
        assert not missing, f"{name}: {len(missing)} acknowledged and never delivered, e.g. {sorted(missing)[:3]}"
        assert not unexpected, f"{name}: {len(unexpected)} delivered but not acknowledged, e.g. {sorted(unexpected)[:3]}"
        assert not twice, f"{name}: {len(twice)} delivered more than once, e.g. {list(twice)[:3]}"
        by_channel = defaultdict(list)
        for r in records:
            assert isinstance(r.get("position"), int) and isinstance(r.get("seq"), int), f"{name}: not ordered: {r}"
            by_channel[r["channel"]].append(r)
        for tag, rows in by_channel.items():
            previous = None
            last_id = {}
            for r in rows:
                if previous is None:
                    assert r["seq"] == 1, f"{name} {tag}: starts at seq {r['seq']}"
                elif r["seq"] == previous["seq"]:
                    assert r["position"] == previous["position"], f"{name} {tag}: one seq, two positions: {r}"
                else:
                    assert r["seq"] == previous["seq"] + 1, (
                        f"{name} {tag}: seq {previous['seq']} then {r['seq']} (a gap or a step back)"
                    )
                    assert r["position"] > previous["position"], (
                        f"{name} {tag}: position {previous['position']} then {r['position']}"
                    )
                publisher = r["publisher"]
                if not global_order:
                    assert r["event_id"] > last_id.get(publisher, -1), (
                        f"{name} {tag}: {publisher}'s event {r['event_id']} after {last_id[publisher]}"
                    )
                    last_id[publisher] = r["event_id"]
                previous = r
        if global_order:
            # one log order for all channels: each publisher's events in publication order across them
            last_id = {}
            for r in sorted(records, key=lambda r: (r["position"], r["event_id"])):
                publisher = r["publisher"]
                assert r["event_id"] > last_id.get(publisher, -1), (
                    f"{name}: {publisher}'s event {r['event_id']} (position {r['position']}) after "
                    f"{last_id[publisher]}"
                )
                last_id[publisher] = r["event_id"]
        sequences[name] = {
            tag: [(r["position"], r["seq"], r["publisher"], r["event_id"]) for r in rows]
            for tag, rows in by_channel.items()
        }
    names = list(sequences)
    for name in names[1:]:
        for tag in set(sequences[names[0]]) | set(sequences[name]):
            first, other = sequences[names[0]].get(tag, []), sequences[name].get(tag, [])
            if first != other:
                at = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), min(len(first), len(other)))
                raise AssertionError(
                    f"{tag}: {names[0]} and {name} delivered different sequences from #{at}: "
                    f"{first[at:at + 2]} vs {other[at:at + 2]}"
                )
    return len(acked)


def stall_figures(run, since, since_wall):
    """
    Per subscriber, in seconds after C{since} (monotonic; C{since_wall} the
    same instant by the wall clock): the next delivery of anything, the
    first delivery of an event published after that instant, and the
    longest time without a delivery from then on.
    """
    figures = {}
    for name in SUBSCRIBERS:
        grew = run.arrivals.after(name, since)
        times = run.arrivals.line_times(name)
        fresh = [
            t for t, r in zip(times, run.records(name)) if float(r["content"].split(" ", 1)[0]) > since_wall
        ]
        gaps = [b - a for a, b in zip([since, *grew], grew)]
        figures[name] = {
            "next_delivery_s": round(grew[0] - since, 3) if grew else None,
            "first_fresh_delivery_s": round(min(fresh) - since, 3) if fresh else None,
            "longest_gap_s": round(max(gaps), 3) if gaps else None,
        }
    return figures


def load_and_check(run, name, events, global_order=False):
    """Wait for publisher C{name} and the subscribers; run every check; return the summary."""
    published = run.summary(name)
    assert "error" not in published, published
    assert published["acked"] == events and published["failed"] == 0, published
    run.wait_printed(SUBSCRIBERS, events)
    acked = read_history(run.path(f"{name}.acked"))
    check_ordered(acked, {s: run.records(s) for s in SUBSCRIBERS}, global_order)
    return published


def report(title, figures):
    print(f"\n[{title}] " + json.dumps(figures, sort_keys=True))


# --- rows --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qop, ordering, events, rate",
    [
        pytest.param("bft", "channel", 3000, 300, id="mod-smart"),
        pytest.param("cft", "channel", 3000, 300, id="multi-paxos", marks=pytest.mark.full),
        pytest.param("bft", "global", 12000, 400, id="mod-smart-global-12k", marks=pytest.mark.full),
    ],
)
def test_leader_killed_under_load(run, qop, ordering, events, rate):
    """Row 1: the leader is SIGKILLed mid-load: every acknowledged event reaches both subscribers once, in one gapless order that keeps the publisher's order, and a new leader takes over."""
    run.cluster(qop, ordering)
    # asked before the load: under load on two cores a status round takes seconds
    leader = run.leader()
    assert leader == 0, "replica 0 leads at start"
    for client in SUBSCRIBERS:
        run.tail(client)
    run.publisher("pub", events, rate)
    run.wait_lines(SUBSCRIBERS[0], events // 4)
    killed_at, killed_wall = time.monotonic(), time.time()
    run.replicas.signal(leader, signal.SIGKILL)
    run.replicas.processes[leader].wait()
    published = load_and_check(run, "pub", events, global_order=ordering == "global")
    after = run.wait_agreement(
        lambda a: len(a) == 3 and len({(x["decided"], x["position"]) for x in a.values()}) == 1,
        "one decided instance and position at the three live replicas",
    )
    assert leader not in after, brief(after)
    assert all(a["leader"] != leader and a["regency"] >= 1 for a in after.values()), brief(after)
    run.no_tracebacks("pub", *SUBSCRIBERS)
    report(
        f"leader killed, {after[min(after)]['protocol']}, ordering {ordering}",
        {
            "kill_to": stall_figures(run, killed_at, killed_wall),
            "new_leader": after[min(after)]["leader"],
            "regency": after[min(after)]["regency"],
            "published_per_s": published["published_per_s"],
            "decided": after[min(after)]["decided"],
        },
    )


@pytest.mark.parametrize(
    "events, rate, pause",
    [
        pytest.param(3000, 300, 5.0, id="5s"),
        pytest.param(12000, 400, 12.0, id="12s", marks=pytest.mark.full),
    ],
)
def test_leader_paused_past_its_timeout(run, events, rate, pause):
    """Row 2: the leader is SIGSTOPped for longer than the leader timeout and then resumed: everything is delivered once and in one order, and the resumed replica catches up with the new regency."""
    assert pause > 2 * LEADER_TIMEOUT
    run.cluster()
    leader = run.leader()
    for client in SUBSCRIBERS:
        run.tail(client)
    run.publisher("pub", events, rate)
    run.wait_lines(SUBSCRIBERS[0], events // 5)
    paused_at, paused_wall = time.monotonic(), time.time()
    run.replicas.signal(leader, signal.SIGSTOP)
    time.sleep(pause)
    run.replicas.signal(leader, signal.SIGCONT)
    resumed_at = time.monotonic()
    published = load_and_check(run, "pub", events)
    settled = run.wait_agreement(
        lambda a: len(a) == 4 and len({(x["regency"], x["decided"], x["position"]) for x in a.values()}) == 1,
        "one regency, decided instance and position at every replica",
    )
    assert settled[leader]["leader"] != leader, brief(settled)
    run.no_tracebacks("pub", *SUBSCRIBERS)
    figures = stall_figures(run, paused_at, paused_wall)
    for name in SUBSCRIBERS:
        # a new leader took over while the old one was stopped: the stream went on
        fresh = [
            t for t, r in zip(run.arrivals.line_times(name), run.records(name))
            if float(r["content"].split(" ", 1)[0]) > paused_wall
        ]
        figures[name]["fresh_deliveries_while_paused"] = sum(1 for t in fresh if t < resumed_at)
        assert figures[name]["fresh_deliveries_while_paused"] > 0, figures
    report(
        f"leader paused {pause:g} s",
        {
            "pause_to": figures,
            "regency": settled[0]["regency"],
            "published_per_s": published["published_per_s"],
            "decided": settled[0]["decided"],
        },
    )


@pytest.mark.parametrize(
    "checkpoints, rate",
    [
        pytest.param(2, 150, id="2-checkpoints"),
        pytest.param(6, 150, id="6-checkpoints", marks=pytest.mark.full),
    ],
)
def test_replica_restarted_after_checkpoints_catches_up(run, checkpoints, rate):
    """Row 3: a replica killed and restarted after the cluster moved two checkpoints on catches up by state transfer (its decided instance and position reach the others'), and the subscribers still get everything once and in one order."""
    run.cluster()
    for client in SUBSCRIBERS:
        run.tail(client)
    # one-event publishes at a modest rate, so instances are many and small; the
    # load runs in back-to-back publisher processes until the replica is back
    segments = []

    def keep_publishing():
        run.keep_publishing(segments, 900, rate)

    leader = run.leader()
    victim = (leader + 3) % 4
    keep_publishing()
    run.wait_lines(SUBSCRIBERS[0], 200)
    run.replicas.signal(victim, signal.SIGKILL)
    run.replicas.processes[victim].wait()
    killed_at = time.monotonic()
    at_kill = run.agreement()
    base = max(a["stable_checkpoint"] for a in at_kill.values())
    target = base + checkpoints * CHECKPOINT_INTERVAL

    def moved_on(found):
        keep_publishing()
        return len(found) == 3 and min(x["stable_checkpoint"] for x in found.values()) >= target

    moved = run.wait_agreement(
        moved_on, f"stable checkpoint {target} at the live replicas", timeout=30 + checkpoints * 10
    )
    run.replicas.start(victim)
    restarted_at = time.monotonic()
    keep_publishing()

    def caught_up(found):
        keep_publishing()
        others = [x["decided"] for i, x in found.items() if i != victim]
        return victim in found and found[victim]["decided"] > target and found[victim]["decided"] >= min(others)

    caught = run.wait_agreement(caught_up, f"replica {victim} caught up", timeout=60)
    caught_after = time.monotonic() - restarted_at
    summaries, acked = run.acked(segments)
    assert all(s["failed"] == 0 for s in summaries.values()), summaries
    run.wait_printed(SUBSCRIBERS, len(acked))
    settled = run.wait_agreement(
        lambda a: len(a) == 4 and len({(x["decided"], x["position"]) for x in a.values()}) == 1,
        "one decided instance and position at every replica",
    )
    # the others dropped the log before their stable checkpoint: the victim installed one
    assert settled[victim]["stable_checkpoint"] >= target, brief(settled)
    queues = {
        tag: info["channels"][tag]["subscribers"]
        for tag in TAGS
        for info in [run.status()[f"replica-{victim}"]]
    }
    # who subscribes is replicated state: the victim has every subscriber's queue again
    assert all(set(q) == set(SUBSCRIBERS) for q in queues.values()), queues
    check_ordered(acked, {s: run.records(s) for s in SUBSCRIBERS})
    run.no_tracebacks(*SUBSCRIBERS, *segments)
    report(
        f"replica {victim} restarted {checkpoints} checkpoints on",
        {
            "stable_checkpoint_at_kill": base,
            "stable_checkpoints_at_restart": {i: a["stable_checkpoint"] for i, a in moved.items()},
            "down_s": round(restarted_at - killed_at, 2),
            "caught_up_after_s": round(caught_after, 2),
            "decided_when_caught_up": {i: a["decided"] for i, a in caught.items()},
            "decided": settled[victim]["decided"],
            "position": settled[victim]["position"],
            "acked": len(acked),
            "stable_checkpoint": settled[victim]["stable_checkpoint"],
            "victim_delivered_since_restart": {
                tag: {name: q.get("delivered") for name, q in qs.items()} for tag, qs in queues.items()
            },
        },
    )


def test_control_table_changes_while_publishing(run):
    """Row 4: channel creation, a grant and a revocation made with `fitbroker admin` while publishing are each applied at one version by every replica, the load is not disturbed, and the revoked publisher is refused afterwards."""
    run.cluster(extra_tags=["ch2"])
    for client in SUBSCRIBERS:
        run.tail(client)
    # publishers run back to back until the changes are made (each takes
    # seconds under load): probe on both channels, rogue on ch0 until revoked
    probes, rogues = [], []

    def keep_publishing():
        run.keep_publishing(probes, 1500, 300)
        run.keep_publishing(rogues, 400, 40, client="rogue", channels=["ch0"])

    def wait(process, timeout=120):
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            assert time.monotonic() < deadline, process.args
            keep_publishing()
            time.sleep(0.1)

    keep_publishing()
    run.wait_lines(SUBSCRIBERS[0], 300)
    changed_at, changed_wall = time.monotonic(), time.time()
    changes = [
        ("create-channel", "ch2", "--class", "ordered", "--qop", "bft", "--scheme", "ha",
         "--publishers", "probe", "--subscribers", "console"),
        ("grant", "ch2", "console2", "--subscribe"),
        ("revoke", "ch0", "rogue", "--publish"),
    ]
    versions = []
    for number, change in enumerate(changes):
        name = f"admin{number}"
        wait(run.start(name, [*FITBROKER, "admin", change[0], "--config", run.config, "--as", ADMIN, *change[1:]]))
        assert run.processes[name].returncode == 0, run.text(name, "err")
        found = re.search(r"control table version (\d+)", run.text(name))
        assert found, run.text(name)
        version = int(found.group(1))
        # every replica, not only the quorum that answered, applies it at that version
        deadline = time.monotonic() + 20
        while True:
            tables = run.tables()
            if len(tables) == 4 and all(t.get("version") == version for t in tables.values()):
                break
            assert time.monotonic() < deadline, {i: t.get("version") for i, t in tables.items()}
            keep_publishing()
        assert len({json.dumps(t, sort_keys=True) for t in tables.values()}) == 1, tables
        versions.append((version, tables[0]["table"]))
    changed_for = time.monotonic() - changed_at
    assert [v for v, _ in versions] == list(range(versions[0][0], versions[0][0] + len(changes))), versions
    table = versions[-1][1]["channels"]
    assert table["ch2"]["class"] == "ordered" and set(table["ch2"]["subscribers"]) == {"console", "console2"}, table
    assert "rogue" not in table["ch0"]["publishers"] and "rogue" in table["ch1"]["publishers"], table
    # the run in flight at the revocation may have been cut short; the next is refused whole
    run.processes[rogues[-1]].wait(60)
    run.publisher("rogue-after", 40, 40, client="rogue", channels=["ch0"])
    after = run.summary("rogue-after")
    assert after["acked"] == 0 and after["failed"] == 40, after
    refused = run.cli("publish", "--config", run.config, "--as", "rogue", "ch0", "after the revocation")
    assert refused.returncode != 0, refused.stderr.decode()
    summaries, acked = run.acked(probes)
    assert all(s["failed"] == 0 and s["acked"] == s["sent"] for s in summaries.values()), summaries
    summaries, rogue_acked = run.acked(rogues)
    rogue = Counter()
    for summary in summaries.values():
        rogue.update({k: summary[k] for k in ("sent", "acked", "failed")})
    assert rogue["acked"] > 0, rogue
    acked += rogue_acked
    run.wait_printed(SUBSCRIBERS, len(acked))
    check_ordered(acked, {s: run.records(s) for s in SUBSCRIBERS})
    for name in SUBSCRIBERS:
        assert not any(r["content"] == "after the revocation" for r in run.records(name))
    agreement = run.wait_agreement(lambda a: len(a) == 4, "every replica's status")
    assert {a["table"]["version"] for a in agreement.values()} == {versions[-1][0]}, brief(agreement)
    run.no_tracebacks("rogue-after", *probes, *rogues, *SUBSCRIBERS)
    figures = stall_figures(run, changed_at, changed_wall)
    report(
        "control table changed while publishing",
        {
            "versions": [v for v, _ in versions],
            "changes_took_s": round(changed_for, 2),
            "longest_gap_s": {name: f["longest_gap_s"] for name, f in figures.items()},
            "regency": agreement[0]["regency"],
            "rogue": dict(rogue),
            "refused_publish": refused.stderr.decode().strip()[-200:],
            "probe_runs": len(probes),
        },
    )


def test_every_replica_answers_an_applied_change_ok(run):
    """Each change `fitbroker admin` makes on an idle cluster is applied by every replica, and no replica answers it refused."""
    run.cluster()
    changes = [
        ("grant", "ch0", "console", "--publish"),
        ("revoke", "ch0", "console", "--publish"),
        ("grant", "ch1", "console", "--publish"),
    ]
    for number, change in enumerate(changes, 1):
        result = run.cli("admin", change[0], "--config", run.config, "--as", ADMIN, *change[1:])
        assert result.returncode == 0 and f"version {number}" in result.stdout.decode(), result
    assert {t["version"] for t in run.tables().values()} == {len(changes)}
    refusals = [
        f"replica {index}: {line}"
        for index in range(4)
        for line in run.replicas.output(index).splitlines()
        if "refused admin" in line
    ]
    assert not refusals, "\n".join(refusals)


def test_every_replica_killed_at_once_keeps_positions_and_the_table(run):
    """Every replica SIGKILLed at once and restarted resumes from its agreement journal: the log goes on past its last position (none reused), the table keeps its revocation, the revoked publisher stays refused, and the subscriber gets every acknowledged event once in one order."""
    run.cluster()
    run.tail(SUBSCRIBERS[0])
    run.publisher("before", 300, 150)
    revoke = run.cli("admin", "revoke", "ch0", "rogue", "--publish", "--config", run.config, "--as", ADMIN)
    assert revoke.returncode == 0, revoke.stderr.decode()
    version = int(re.search(r"control table version (\d+)", revoke.stdout.decode()).group(1))
    summaries, acked = run.acked(["before"])
    run.wait_printed(SUBSCRIBERS[:1], len(acked))
    settled = run.wait_agreement(
        lambda a: len(a) == 4 and len({x["position"] for x in a.values()}) == 1, "one position everywhere"
    )
    position = settled[0]["position"]
    for index in range(4):
        run.replicas.signal(index, signal.SIGKILL)
    for process in run.replicas.processes.values():
        process.wait(10)
    run.replicas.start_all()
    restored = run.wait_agreement(lambda a: len(a) == 4, "every replica back")
    assert {a["position"] for a in restored.values()} == {position}, brief(restored)
    assert {a["table"]["version"] for a in restored.values()} == {version}, brief(restored)
    assert not any(a["recovering"] for a in restored.values()), brief(restored)
    published = run.cli("publish", "--config", run.config, "--as", "probe", "ch1", "after the restart")
    assert published.returncode == 0, published.stderr.decode()
    after = int(re.search(r"position (\d+)", published.stdout.decode() + published.stderr.decode()).group(1))
    assert after > position, (after, position)
    refused = run.cli("publish", "--config", run.config, "--as", "rogue", "ch0", "still revoked")
    assert refused.returncode != 0, refused.stderr.decode()
    run.publisher("after", 200, 150)
    more_summaries, more = run.acked(["after"])
    acked += more
    run.wait_printed(SUBSCRIBERS[:1], len(acked) + 1)
    records = run.records(SUBSCRIBERS[0])
    single = [r for r in records if r["content"] == "after the restart"]
    assert len(single) == 1 and single[0]["position"] == after, single
    check_ordered(acked + [record_key(single[0])], {SUBSCRIBERS[0]: records})
    run.no_tracebacks("before", "after", SUBSCRIBERS[0])
    report(
        "every replica killed at once",
        {"position_before": position, "first_position_after": after, "table_version": version,
         "acked": len(acked)},
    )
