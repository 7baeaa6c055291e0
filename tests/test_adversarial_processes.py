"""
BFT delivery under attack with real processes on loopback: `twistd
fitbroker` replicas, one Byzantine replica process (tests.byzantine_replica),
misbehaving certified clients, honest replicas paused with SIGSTOP, and
subscribers SIGKILLed and restarted.

Every run checks, per subscriber: nothing acknowledged missing, nothing
delivered twice, nothing forged or altered (histories carry a content
checksum); no traceback in any honest process; and each honest replica's and
subscriber's peak resident size (VmHWM) within its idle size (VmRSS once
connected) plus a bound stated by the test.

Rows 1, 2, 3 and 5 run in CI; the others are marked C{full}:

    python3 -m pytest -m full tests/test_adversarial_processes.py
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from zlib import crc32

import pytest

from benchmarks.cluster import channel_tags, free_ports, prepare_cluster, resident_kib, wait_for_port
from fit_broker.init import cluster_toml
from tests.processes import ROOT, ReplicaProcesses, read_history

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
CHANNELS = 3
TAGS = channel_tags(CHANNELS)
# Bytes a subscriber lets one replica have in flight per channel (the
# subscriber's default credit, fit_broker.client.subscriber.DEFAULT_CREDIT_BYTES).
CREDIT_BYTES = 1 * MiB
# What an honest replica may grow by in these runs: at most a few thousand
# small events kept per channel until acknowledged (well under a MiB of
# payload each), the publishers' and subscribers' write buffers, and the
# allocator's slack (these runs grow replicas by 1-3 MiB).  The unbounded growth these rows once showed was in the
# hundreds of MB.
REPLICA_GROWTH = 32 * MiB
# What a subscriber may grow by: four replicas' credit on every channel held
# by its voters, plus decoding and allocator slack.
SUBSCRIBER_GROWTH = 4 * CREDIT_BYTES * CHANNELS + 48 * MiB


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Memory:
    """
    Peak resident sizes of processes, sampled from /proc while they run
    (VmHWM is a high-water mark, so a sample a tenth of a second before a
    process exits misses little).
    """

    def __init__(self):
        self.pids = {}
        self.idle = {}
        self.peak = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def watch(self, name, pid):
        self.pids[name] = pid
        self.mark_idle(name)

    def mark_idle(self, name):
        rss, _ = self._read(self.pids[name])
        if rss is not None:
            self.idle[name] = rss * 1024

    def _read(self, pid):
        try:
            return resident_kib(pid)
        except OSError:
            return None, None

    def sample(self):
        for name, pid in list(self.pids.items()):
            _, hwm = self._read(pid)
            if hwm is not None:
                self.peak[name] = max(self.peak.get(name, 0), hwm * 1024)

    def _sample(self):
        while not self._stop.wait(0.1):
            self.sample()

    def stop(self):
        self.sample()
        self._stop.set()
        self._thread.join()

    def check(self, name, growth):
        idle, peak = self.idle[name], self.peak[name]
        assert peak <= idle + growth, (
            f"{name}: peak {peak / MiB:.1f} MiB above idle {idle / MiB:.1f} MiB + {growth / MiB:.1f} MiB"
        )
        return peak - idle


class Run:
    """
    The processes of one scenario, all stopped by process id at the end.
    """

    def __init__(self, folder):
        self.folder = folder
        self.processes = {}
        self.replicas = None
        self.liar = None
        self.memory = Memory()

    def path(self, name):
        return os.path.join(self.folder, name)

    def cluster(self, mode="bft-ha", liar=None, liar_index=3, **options):
        """Start three honest replicas and, with C{liar}, a Byzantine one (else four honest)."""
        config, ports = prepare_cluster(self.folder, mode, CHANNELS, **options)
        self.start_replicas(config, ports, liar, liar_index)
        return config

    def start_replicas(self, config, ports, liar=None, liar_index=3):
        self.config = config
        self.replicas = ReplicaProcesses(self.folder, config, ports)
        for index in range(len(ports)):
            if index == liar_index and liar is not None:
                self.liar = self.start(
                    "liar", [sys.executable, "-m", "tests.byzantine_replica", config, str(index), liar]
                )
            else:
                self.replicas.start(index)
        for port in ports:
            wait_for_port(port, 60)
        for index in self.honest:
            self.memory.watch(f"replica-{index}", self.replicas.processes[index].pid)

    @property
    def honest(self):
        return sorted(self.replicas.processes)

    def start(self, name, argv, stdin=None):
        out = open(self.path(f"{name}.out"), "wb")
        err = open(self.path(f"{name}.err"), "wb")
        process = subprocess.Popen(
            argv, cwd=ROOT, stdin=stdin, stdout=out, stderr=err, env=child_env()
        )
        out.close()
        err.close()
        self.processes[name] = process
        return process

    def loadgen(self, name, role, *args):
        return self.start(name, [sys.executable, "-m", "benchmarks.loadgen", role, *args])

    def fitbroker(self, name, *args, stdin=None):
        argv = [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())", *args]
        return self.start(name, argv, stdin=stdin)

    def err(self, name):
        with open(self.path(f"{name}.err"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def out(self, name):
        with open(self.path(f"{name}.out"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for(self, name, text, timeout=30):
        """Wait until process C{name} writes C{text} on stderr."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.err(name):
                return
            if self.processes[name].poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{name}: no {text!r} on stderr: {self.err(name)[-2000:]} {self.out(name)[-2000:]}")

    def subscriber(self, name, *args, client="console", channels=TAGS):
        """Start a loadgen subscriber, wait until it subscribed, and note its idle size."""
        process = self.loadgen(
            name, "subscribe", "--config", self.config, "--as", client, "--channels", ",".join(channels),
            "--delivered", self.path(f"{name}.delivered"), *args,
        )
        self.wait_for(name, "ready")
        self.memory.watch(name, process.pid)
        return process

    def publisher(self, name, events, *args, client="probe", channels=TAGS):
        return self.loadgen(
            name, "publish", "--config", self.config, "--as", client, "--channels", ",".join(channels),
            "--events", str(events), "--acked", self.path(f"{name}.acked"), *args,
        )

    def summary(self, name, timeout=120):
        """Wait for a loadgen process and return its JSON summary."""
        self.processes[name].wait(timeout)
        lines = self.out(name).strip().splitlines()
        assert lines, f"{name} printed nothing: {self.err(name)[-2000:]}"
        summary = json.loads(lines[-1])
        assert "error" not in summary, summary
        return summary

    def pause(self, index, seconds):
        """SIGSTOP honest replica C{index} for C{seconds}, in the background."""
        process = self.replicas.processes[index]
        process.send_signal(signal.SIGSTOP)
        timer = threading.Timer(seconds, lambda: process.poll() is None and process.send_signal(signal.SIGCONT))
        timer.start()
        return timer

    def no_tracebacks(self, *names):
        """Assert that no honest replica nor process C{names} wrote a traceback."""
        for index in self.honest:
            text = self.replicas.output(index)
            assert "Traceback" not in text, f"replica {index}: {text[-3000:]}"
        for name in names:
            for text in (self.out(name), self.err(name)):
                assert "Traceback" not in text, f"{name}: {text[-3000:]}"

    def check_memory(self, subscribers=(), subscriber_growth=SUBSCRIBER_GROWTH):
        self.memory.sample()
        growth = {}
        for index in self.honest:
            growth[f"replica-{index}"] = self.memory.check(f"replica-{index}", REPLICA_GROWTH)
        for name in subscribers:
            growth[name] = self.memory.check(name, subscriber_growth)
        return growth

    def stop(self):
        self.memory.stop()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.wait()
        if self.replicas is not None:
            self.replicas.stop_all()


@pytest.fixture
def run(tmp_path):
    scenario = Run(str(tmp_path))
    yield scenario
    scenario.stop()


def acked_history(*paths):
    return [record for path in paths for record in read_history(path)]


def check_delivery(acked, delivered, repeats_allowed=0):
    """
    Compare histories of C{(channel, event id, crc32)} records: nothing
    acknowledged missing, nothing forged or altered, and nothing delivered
    twice beyond C{repeats_allowed}.  Return the duplicated records.
    """
    counts = Counter(delivered)
    acked_set = set(acked)
    by_id = {(tag, event_id): crc for tag, event_id, crc in acked}
    altered = [r for r in counts if (r[0], r[1]) in by_id and by_id[(r[0], r[1])] != r[2]]
    forged = [r for r in counts if (r[0], r[1]) not in by_id]
    missing = acked_set - set(counts)
    duplicated = {r: n - 1 for r, n in counts.items() if n > 1}
    assert not altered, f"{len(altered)} altered, e.g. {altered[:3]}"
    assert not forged, f"{len(forged)} forged, e.g. {forged[:3]}"
    assert not missing, f"{len(missing)} acknowledged and never delivered, e.g. {sorted(missing)[:3]}"
    assert sum(duplicated.values()) <= repeats_allowed, (
        f"{sum(duplicated.values())} delivered again, e.g. {list(duplicated)[:3]}"
    )
    return duplicated


@pytest.mark.parametrize(
    "events, rate, pause",
    [
        pytest.param(6000, 800, 3.0, id="6k"),
        pytest.param(24000, 1000, 8.0, id="24k", marks=pytest.mark.full),
    ],
)
def test_withholding_replica_and_a_paused_one_lose_nothing(run, events, rate, pause):
    """Row 1: one replica withholds everything and the honest one beside it in the full-copy rota is SIGSTOPped while one-event batches are published: every acknowledged event is delivered once, within memory bounds."""
    run.cluster(liar="withhold")
    run.subscriber("sub", "--expect", str(events), "--idle", "20")
    # paced, so that each publish is its own batch (one reactor turn, one batch)
    run.publisher("pub", events, "--batch", "1", "--rate", str(rate))
    time.sleep(1.0)
    # replicas 2 and 3 are the designated full senders of a quarter of the batches
    run.pause(2, pause).join()
    published = run.summary("pub")
    delivered = run.summary("sub")
    assert published["acked"] == events, published
    check_delivery(read_history(run.path("pub.acked")), read_history(run.path("sub.delivered")))
    assert delivered["duplicates"] == 0, delivered
    # small batches, so the voter holds many: on a loaded machine the publisher
    # batches more per reactor turn, hence a fifth rather than a half
    assert sum(v["delivered"] for v in delivered["voter"].values()) > events // 5, "small batches"
    assert delivered["subscriber"].get("fetches", 0) > 0, "batches whose full senders were the liar and the paused replica were fetched"
    run.no_tracebacks("pub", "sub")
    run.check_memory(["sub"])


def test_cli_publish_past_a_replica_that_acknowledges_without_storing(run):
    """Row 2: a replica acknowledges publishes without storing them and an honest one is paused while `fitbroker publish` sends 2,000 stdin lines: the CLI exits 0, `fitbroker tail --count` prints every line once, and the paused replica's copies are fetched from the others."""
    config = run.cluster(liar="acks-without-storing")
    state = run.path("tail-state")
    run.fitbroker("tail", "tail", "--config", config, "--as", "console", "--state-dir", state, "--count", "2000", "ch0")
    run.wait_for("tail", "subscribed")
    run.memory.watch("tail", run.processes["tail"].pid)
    lines = [f"line {i} {os.urandom(6).hex()}" for i in range(2000)]
    with open(run.path("lines.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    paused = run.pause(2, 600)
    with open(run.path("lines.txt"), "rb") as stdin:
        publish = run.fitbroker("publish", "publish", "--config", config, "--as", "probe", "ch0", stdin=stdin)
    assert publish.wait(60) == 0, run.err("publish")
    assert "published 2000 event(s)" in run.err("publish"), run.err("publish")
    paused.cancel()
    run.replicas.signal(2, signal.SIGCONT)
    assert run.processes["tail"].wait(60) == 0, run.err("tail")
    printed = [json.loads(line)["content"] for line in run.out("tail").splitlines()]
    assert len(printed) == 2000 and set(printed) == set(lines), (
        f"{len(printed)} printed, {len(set(lines) - set(printed))} missing, {len(printed) - len(set(printed))} twice"
    )
    time.sleep(1.0)  # the paused replica catches up
    run.no_tracebacks("publish", "tail")
    run.check_memory(["tail"])


def test_subscriber_killed_and_restarted_while_a_replica_replays(run):
    """Row 3: a subscriber keeping delivery state is SIGKILLed mid-stream and restarted while a replica replays everything and an honest one lags: nothing acknowledged is missing, and nothing is delivered twice but the one hand-over in flight at the kill, which is counted."""
    config = run.cluster(liar="replay")
    state = run.path("sub-state")
    run.subscriber("first", "--expect", "4000", "--idle", "30", "--state-dir", state)
    run.publisher("pub", 4000, "--batch", "1", "--rate", "1000")
    time.sleep(1.5)
    lag = run.pause(1, 3.0)
    time.sleep(0.5)
    run.processes["first"].send_signal(signal.SIGKILL)
    run.processes["first"].wait()
    run.subscriber("second", "--idle", "4", "--state-dir", state)
    lag.join()
    published = run.summary("pub")
    again = run.summary("second", timeout=90)
    assert published["acked"] == 4000, published
    first = read_history(run.path("first.delivered"))
    second = read_history(run.path("second.delivered"))
    assert first and second, "killed mid-stream"
    repeated = again["subscriber"].get("repeated-after-crash", 0)
    duplicated = check_delivery(read_history(run.path("pub.acked")), first + second, repeats_allowed=64)
    if duplicated:
        assert repeated > 0, f"{len(duplicated)} delivered again, not counted: {again['subscriber']}"
        assert set(duplicated) <= set(first[-len(duplicated):]), "only the last hand-over may repeat"
    assert again["duplicates"] == 0, again
    assert sum(v.get("duplicate", 0) + v.get("stale", 0) for v in again["voter"].values()) > 0, again["voter"]
    run.no_tracebacks("pub", "second")
    run.check_memory(["second"])


def split_cluster(folder, clients, publishers, subscribers):
    """Write a BFT-HA cluster with keys for several publishers and subscribers; return (path, ports)."""
    from fit_broker.pki import write_cluster_material

    ports = free_ports(4)
    write_cluster_material(os.path.join(folder, "keys"), "bench", 4, clients, {tag: clients for tag in TAGS})
    rows = [(tag, tag, "bench", "bft", "ha", publishers, subscribers) for tag in TAGS]
    text = cluster_toml(
        "bench", 1, ports, clients, rows, keys_dir="keys", tls=False, admins=[], classes={"bench": {}}
    )
    path = os.path.join(folder, "cluster.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, ports


@pytest.mark.full
def test_publisher_splitting_batches_among_replicas_blocks_no_one(run):
    """Row 4: a certified publisher sends each replica different one-event batches beside two honest publishers, with one honest replica paused: every honest event reaches both subscribers once, none of the split ones."""
    path, ports = split_cluster(
        run.folder, ["probe", "honest", "mallory", "console", "dashboard"],
        ["probe", "honest", "mallory"], ["console", "dashboard"],
    )
    run.start_replicas(path, ports)
    for name in ("console", "dashboard"):
        # a small window, so that the split batches fill each replica's share of the voters
        run.subscriber(name, "--expect", "4000", "--idle", "20", "--credit", "200", client=name)
    mallory = run.start("mallory", [sys.executable, "-m", "tests.split_publisher", path, "mallory", ",".join(TAGS), "6000", "1000"])
    time.sleep(1.0)
    run.publisher("probe", 2000, "--batch", "1", "--rate", "400", client="probe")
    run.publisher("honest", 2000, "--batch", "1", "--rate", "400", client="honest")
    time.sleep(1.0)
    run.pause(1, 2.0).join()
    assert mallory.wait(60) == 0, run.err("mallory")
    acked = []
    for name in ("probe", "honest"):
        assert run.summary(name)["acked"] == 2000
        acked += read_history(run.path(f"{name}.acked"))
    for name in ("console", "dashboard"):
        summary = run.summary(name)
        check_delivery(acked, read_history(run.path(f"{name}.delivered")))
        assert summary["duplicates"] == 0, summary
        evicted = sum(v.get("evicted:replica-window", 0) for v in summary["voter"].values())
        assert evicted > 0, summary["voter"]
    assert json.loads(run.out("mallory").strip().splitlines()[-1])["sent"] == 6000
    run.no_tracebacks("probe", "honest", "console", "dashboard")
    run.check_memory(["console", "dashboard"])


def test_tail_is_one_per_client_and_a_killed_tail_resumes_exactly(run):
    """Row 5: a second `fitbroker tail` as the same client is refused in one line naming --takeover; a tail killed while events flow is followed by `tail --count N` with its state folder, which prints every event the first did not, and none it did but, at most, the last hand-over a SIGKILL cut between printing and recording."""
    config = run.cluster()
    state = run.path("tail-state")
    run.fitbroker("first", "tail", "--config", config, "--as", "console", "--state-dir", state, "ch0")
    run.wait_for("first", "subscribed")
    run.memory.watch("first", run.processes["first"].pid)
    second = run.fitbroker("second", "tail", "--config", config, "--as", "console", "--no-state", "ch0")
    assert second.wait(30) != 0
    refusal = [line for line in run.err("second").splitlines() if line.strip()]
    assert len(refusal) == 1 and "--takeover" in refusal[0], refusal
    run.publisher("pub", 3000, "--batch", "5", "--rate", "1000", channels=["ch0"])
    time.sleep(1.5)
    run.processes["first"].send_signal(signal.SIGSTOP)
    time.sleep(0.2)
    run.processes["first"].send_signal(signal.SIGKILL)
    run.processes["first"].wait()
    published = run.summary("pub")
    assert published["acked"] == 3000, published

    def printed(name):
        records = [json.loads(line) for line in run.out(name).splitlines()]
        return [("ch0", str(r["event_id"]), f"{crc32(r['content'].encode()):08x}") for r in records]

    before = printed("first")
    acked = read_history(run.path("pub.acked"))
    rest = len(set(acked) - set(before))
    assert before and rest, "killed mid-stream"
    after = run.fitbroker(
        "after", "tail", "--config", config, "--as", "console", "--state-dir", state, "--count", str(rest), "ch0"
    )
    assert after.wait(60) == 0, run.err("after")
    now = printed("after")
    again = set(now) & set(before)
    # a SIGKILL between printing a hand-over and recording it may repeat that
    # one hand-over (documented, and counted as repeated-after-crash): only the
    # very last lines printed may come again, nothing earlier
    assert not again or again == set(before[-len(again):]), f"{len(again)} printed again, not only the last lines"
    check_delivery(acked, before + now, repeats_allowed=len(again))
    run.no_tracebacks("pub", "after")
    run.check_memory()


@pytest.mark.full
def test_bogus_full_copies_stay_within_the_subscribers_credit(run):
    """Row 6: a replica sends 100 KB invented full copies claiming a TTL of 1e12 s with every delivery, and an honest one is paused: the subscriber's peak resident size stays within its idle size plus four replicas' byte credit on every channel and slack, and every honest event is delivered once."""
    run.cluster(liar="bogus-copies")
    run.subscriber("sub", "--expect", "6000", "--idle", "20")
    run.publisher("pub", 6000, "--batch", "10", "--rate", "1000")
    time.sleep(1.0)
    run.pause(1, 2.0).join()
    published = run.summary("pub")
    delivered = run.summary("sub")
    assert published["acked"] == 6000, published
    check_delivery(read_history(run.path("pub.acked")), read_history(run.path("sub.delivered")))
    assert delivered["subscriber"].get("over-credit:replica-3", 0) > 0, delivered["subscriber"]
    run.no_tracebacks("pub", "sub")
    run.check_memory(["sub"])


def test_tail_count_records_its_last_group(run):
    """A `fitbroker tail --count N` that stopped at the end of a group prints none of it again when restarted with the same state folder."""
    config = run.cluster()
    state = run.path("tail-state")
    run.fitbroker("tail", "tail", "--config", config, "--as", "console", "--state-dir", state, "--count", "300", "ch0")
    run.wait_for("tail", "subscribed")
    with open(run.path("lines.txt"), "w") as f:
        f.write("".join(f"line {i}\n" for i in range(300)))
    with open(run.path("lines.txt"), "rb") as stdin:
        assert run.fitbroker("publish", "publish", "--config", config, "ch0", stdin=stdin).wait(60) == 0
    assert run.processes["tail"].wait(60) == 0, run.err("tail")
    assert len(run.out("tail").splitlines()) == 300
    run.fitbroker("again", "tail", "--config", config, "--as", "console", "--state-dir", state, "--count", "1", "ch0")
    run.wait_for("again", "subscribed")
    time.sleep(2.0)
    assert run.out("again") == "", "printed again after a restart"
