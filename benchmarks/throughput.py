"""
Throughput against channels: FIT Broker, a null relay and peer brokers.

    python -m benchmarks.throughput [--channels 5,10,20,50,70,90] [--modes cft,bft-ha]
        [--peers mosquitto,nats,redis|none] [--seconds 10] [--event-size 256]
        [--rate R] [--subscribers N] [--out benchmarks/results]

For every channel count: a null relay (4 relay processes, the ceiling), each
FIT Broker mode on 4 replica processes (f=1), and each peer broker, each
driven by one publisher process and one subscriber process on loopback.  The
publisher publishes round-robin over the channels for --seconds as fast as
acknowledgements come back (or at --rate events/s, for latency at a given
load); the subscriber streams every channel and stops once it delivered
everything acknowledged (or nothing came for a while).  Ordered modes also
have their hand-over order checked (L{benchmarks.driver.OrderCheck}).
See benchmarks/README.md for what each number means.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import report
from benchmarks.cluster import (
    DATA_DIR,
    MODES,
    PUBLISHER,
    ROOT,
    SUBSCRIBER,
    Cluster,
    Unavailable,
    channel_tags,
    child_env,
    subscriber_names,
    git_commit,
    fsync_latency,
    prepare_cluster,
    stop_processes,
)
from benchmarks.ledger import lost_events, read_ledger
from benchmarks.peers import PEER_MODES, SERVERS, client_command

DEFAULT_CHANNELS = "5,10,20,50,70,90"
# Large enough that no queue overflows while the subscriber catches up, so
# a loss is a loss and not the overflow policy doing its job.
BENCH_CAPACITY = 2_000_000
REPLICAS = 4
FAULTS = 1


class Progress:
    """
    A one-line progress bar on stderr: points done, the current point, and
    an estimate of the time left.
    """

    def __init__(self, total, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.stream = stream
        self.tty = stream.isatty()

    def show(self, label):
        elapsed = time.monotonic() - self.started
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        eta = ""
        if self.done:
            left = elapsed / self.done * (self.total - self.done)
            eta = f" ~{left:.0f}s left"
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:.0f}s{eta}  {label}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, label):
        self.done += 1
        self.show(label)

    def close(self):
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return None


def _tail(path, lines=3):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_ready(process, stderr_path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(stderr_path, "rb") as f:
                if b"ready\n" in f.read():
                    return
        except OSError:
            pass
        if process.poll() is not None:
            out = process.stdout.read().decode("utf-8", "replace")
            summary = _last_json(out) or {}
            raise RuntimeError(
                f"subscriber exited before subscribing: {summary.get('error') or _tail(stderr_path)}"
            )
        time.sleep(0.05)
    raise RuntimeError(f"subscriber not subscribed after {timeout} s: {_tail(stderr_path)}")


def _wait_publishing(process, stderr_path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with open(stderr_path, "rb") as f:
                if b"publishing\n" in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.05)


def start_samplers(prefix, pids, seconds):
    """
    Sample each process of C{pids} (name -> pid) with py-spy for C{seconds},
    idle time included, into C{<prefix>-<name>.txt} (collapsed stacks);
    L{benchmarks.report.summarise_samples} reads them.  Returns the py-spy
    processes; none when py-spy is not installed.
    """
    spy = shutil.which("py-spy")
    if spy is None:
        print("--sample: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return []
    samplers = []
    for name, pid in pids.items():
        samplers.append(
            subprocess.Popen(
                [
                    spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                    "--rate", "200", "--idle", "--nonblocking", "--format", "raw",
                    "--output", f"{prefix}-{name}.txt",
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )
    return samplers


def run_clients(folder, publish_command, subscribe_commands, options, sample=None, cluster=None):
    """
    Run the subscriber processes and one publisher process to the end;
    return C{(publisher summary, subscriber summary, events lost)}, the
    subscribers' summaries joined by L{join_subscribers}.

    @param subscribe_commands: one command per subscriber process (one for
        a peer broker, which knows one subscriber).
    @param sample: called with C{{"publish": pid, "subscribe": pid}} once the
        publisher says it publishes; returns the sampler processes it
        started, which end on their own and are stopped at the end.
    @param cluster: the L{Cluster} served, whose replicas' CPU time from
        the publisher's start to the last subscriber's end goes into the
        publisher's summary as C{replica_cpu_s}.
    """
    env = child_env()
    pub_ledger = os.path.join(folder, "published.json")
    pub_err = os.path.join(folder, "publisher.err")
    subscribers = []
    processes = []
    try:
        for number, command in enumerate(subscribe_commands, 1):
            suffix = "" if number == 1 else f"-{number}"
            ledger = os.path.join(folder, f"delivered{suffix}.json")
            err_path = os.path.join(folder, f"subscriber{suffix}.err")
            with open(err_path, "wb") as err:
                process = subprocess.Popen(
                    command + ["--ledger", ledger, "--idle", str(options.idle)],
                    cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                )
            processes.append(process)
            subscribers.append((process, ledger, err_path))
        for process, _, err_path in subscribers:
            _wait_ready(process, err_path, 60)
        with open(pub_err, "wb") as err:
            publisher = subprocess.Popen(
                publish_command + ["--ledger", pub_ledger],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )
        processes.append(publisher)
        replica_cpu = None
        if sample is not None or cluster is not None:
            _wait_publishing(publisher, pub_err, 60)
        if cluster is not None:
            replica_cpu = cluster.cpu()
        if sample is not None:
            processes.extend(sample({"publish": publisher.pid, "subscribe": subscribers[0][0].pid}))
        try:
            out, _ = publisher.communicate(timeout=options.seconds + 120)
        except subprocess.TimeoutExpired:
            raise RuntimeError("publisher did not finish") from None
        published = _last_json(out.decode("utf-8", "replace"))
        if published is None:
            raise RuntimeError(f"publisher printed no summary: {_tail(pub_err)}")
        acked = published.get("acked") or 0
        for process, _, _ in subscribers:
            # every subscriber learns the count before any is waited for
            try:
                process.stdin.write(f"{acked}\n".encode())
                process.stdin.flush()
            except OSError:
                pass  # it exited: its summary (or its absence) says why
        deadline = time.monotonic() + options.drain
        summaries = []
        for process, _, err_path in subscribers:
            try:
                out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"subscriber still draining after {options.drain} s") from None
            delivered = _last_json(out.decode("utf-8", "replace"))
            if delivered is None:
                raise RuntimeError(f"subscriber printed no summary: {_tail(err_path)}")
            summaries.append(delivered)
        if replica_cpu is not None:
            published["replica_cpu_s"] = round(cluster.cpu() - replica_cpu, 3)
        with open(os.path.join(folder, "summaries.json"), "w") as f:
            json.dump({"publisher": published, "subscribers": summaries}, f, indent=1)
        lost = None
        if os.path.exists(pub_ledger) and all(os.path.exists(ledger) for _, ledger, _ in subscribers):
            acknowledged = read_ledger(pub_ledger)
            lost = sum(lost_events(acknowledged, read_ledger(ledger)) for _, ledger, _ in subscribers)
        return published, join_subscribers(summaries), lost
    finally:
        stop_processes(processes)


def join_subscribers(summaries):
    """
    One summary for several subscribers of the same point: the slowest
    one's rate and the worst latencies, duplicates and order violations
    added up, and C{order_mismatch}, the channels whose order some
    subscriber that delivered everything the others did saw differently.
    """
    if len(summaries) == 1:
        joined = dict(summaries[0])
        joined["order_mismatch"] = 0 if "order" in joined else None
        return joined
    joined = {"role": "subscriber", "subscribers": len(summaries)}
    errors = [s["error"] for s in summaries if s.get("error")]
    if errors:
        joined["error"] = errors[0]
    rates = [s.get("delivered_per_s") for s in summaries]
    joined["delivered_per_s"] = None if None in rates else min(rates)
    for key in ("p50_ms", "p99_ms", "cpu_s"):
        values = [s.get(key) for s in summaries if s.get(key) is not None]
        joined[key] = max(values) if values else None
    joined["delivered"] = min(s.get("delivered") or 0 for s in summaries)
    for key in ("duplicates", "client_errors"):
        joined[key] = sum(s.get(key) or 0 for s in summaries)
    first_errors = [s["first_client_error"] for s in summaries if s.get("first_client_error")]
    if first_errors:
        joined["first_client_error"] = first_errors[0]
    orders = [s.get("order") for s in summaries]
    joined["order_mismatch"] = None
    if all(orders):
        joined["order"] = {
            key: sum(o.get(key, 0) for o in orders)
            for key in ("backwards", "seq_backwards", "position_backwards", "skipped", "ordered_batches")
        }
        prints = [o.get("fingerprint") for o in orders]
        if all(prints):
            tags = set().union(*prints)
            joined["order_mismatch"] = sum(1 for tag in tags if len({p.get(tag) for p in prints}) > 1)
    return joined


def _row(system, mode, channels, published=None, delivered=None, lost=None, note="", rate=0.0, ordered=False):
    published = published or {}
    delivered = delivered or {}
    if published.get("error") and not published.get("acked") and not note:
        # Nothing was ever accepted: the mode cannot run here yet.
        return _row(system, mode, channels, note=f"unavailable: {published['error']}", rate=rate)
    notes = [note] if note else []
    for side in (published, delivered):
        if side.get("error"):
            notes.append(f"{side.get('role', '?')}: {side['error']}")
    if delivered.get("duplicates"):
        notes.append(f"{delivered['duplicates']} duplicates")
    if delivered.get("client_errors"):
        notes.append(f"{delivered['client_errors']} client errors: {delivered['first_client_error']}")
    out_of_order = None
    order = delivered.get("order")
    if ordered and order is not None:
        out_of_order, why = _order_violations(order, delivered.get("order_mismatch"))
        notes += why
    return {
        "system": system,
        "mode": mode,
        "channels": channels,
        "published_per_s": published.get("published_per_s"),
        "delivered_per_s": delivered.get("delivered_per_s"),
        "lost": lost,
        "p50_ms": delivered.get("p50_ms"),
        "p99_ms": delivered.get("p99_ms"),
        "rate": rate,
        "ack_p50_ms": published.get("ack_p50_ms"),
        "ack_p99_ms": published.get("ack_p99_ms"),
        "replica_cpu_us": _per_event(published.get("replica_cpu_s"), published.get("acked")),
        "publisher_cpu_us": _per_event(published.get("cpu_s"), published.get("acked")),
        "subscriber_cpu_us": _per_event(delivered.get("cpu_s"), delivered.get("delivered")),
        "out_of_order": out_of_order,
        "note": "; ".join(notes),
        "acked": published.get("acked"),
        "delivered": delivered.get("delivered"),
    }


def _per_event(seconds, events):
    """
    CPU microseconds per event, or C{None} without both figures.
    """
    if seconds is None or not events:
        return None
    return round(seconds * 1e6 / events, 1)


def _order_violations(order, mismatch):
    """
    Return C{(count, notes)}: the hand-overs that broke an ordered
    channel's promise (see L{benchmarks.driver.OrderCheck}), and a note
    for each kind seen.
    """
    kinds = (
        ("backwards", "batches before their publisher's previous one"),
        ("seq_backwards", "sequence numbers going back"),
        ("position_backwards", "log positions going back"),
    )
    count = 0
    notes = []
    for key, text in kinds:
        if order.get(key):
            count += order[key]
            notes.append(f"{order[key]} {text}")
    if mismatch:
        count += mismatch
        notes.append(f"{mismatch} channels in a different order at different subscribers")
    if order.get("skipped"):
        notes.append(f"{order['skipped']} sequence numbers skipped")
    if not order.get("ordered_batches"):
        notes.append("no batch carried a sequence number")
    return count, notes


def _common(options, tags):
    return [
        "--channels", ",".join(tags),
        "--size", str(options.event_size),
        "--batch", str(options.batch),
        "--window", str(options.window),
    ]


def run_fit_point(workdir, mode, channels, options, relay=False):
    """
    One point on FIT Broker replicas (or null relays, with C{relay}).
    """
    system, label = ("null-relay", "relay") if relay else ("fitbroker", mode)
    folder = os.path.join(workdir, f"{system}-{label}-{channels}")
    notes = []
    try:
        path, ports = prepare_cluster(
            folder, mode, channels, REPLICAS, FAULTS, capacity=BENCH_CAPACITY,
            subscribers=options.subscribers,
        )
    except Unavailable as e:
        return _row(system, label, channels, note=f"unavailable: {e}", rate=options.rate)
    if not relay and MODES[mode].on_disk and getattr(options, "disk_probe", None) is None:
        # Once per run, where the first disk point's replicas keep their data.
        data = os.path.join(folder, DATA_DIR)
        options.disk_probe = {"folder": data, **fsync_latency(data)}
    profile = sample = None
    if options.profile:
        os.makedirs(options.profile, exist_ok=True)
        profile = os.path.join(os.path.abspath(options.profile), f"{system}-{label}-{channels}")
    if options.sample:
        os.makedirs(options.sample, exist_ok=True)
        prefix = os.path.join(os.path.abspath(options.sample), f"{system}-{label}-{channels}")

        def sample(pids):
            replicas = {f"replica{i}": process.pid for i, process in enumerate(cluster.processes)}
            return start_samplers(prefix, {**replicas, **pids}, options.seconds)
    cluster = Cluster(folder, path, ports, relay=relay, profile=profile and profile + "-replica0.prof")
    try:
        cluster.start()
    except RuntimeError as e:
        return _row(
            system, label, channels, note=f"unavailable: replicas did not start: {e}", rate=options.rate
        )
    try:
        tags = channel_tags(channels)

        def driver(role, name=""):
            python = [sys.executable]
            if profile:
                python += ["-m", "cProfile", "-o", f"{profile}-{role}{name}.prof"]
            return python + ["-m", "benchmarks.driver", role]

        publish = driver("publish") + [
            "--config", path, "--as", PUBLISHER,
            "--seconds", str(options.seconds), "--rate", str(options.rate),
        ] + _common(options, tags)
        subscribe = [
            driver("subscribe", name[len(SUBSCRIBER):]) + [
                "--config", path, "--as", name, "--credit", str(options.credit),
                "--channels", ",".join(tags),
            ]
            for name in subscriber_names(options.subscribers)
        ]
        published, delivered, lost = run_clients(
            folder, publish, subscribe, options, sample, cluster=cluster
        )
        if not all(cluster.alive()):
            notes.append(f"a replica exited: {cluster.log_tail()}")
        note = "; ".join(notes)
        ordered = not relay and MODES[mode].ordered
        return _row(
            system, label, channels, published, delivered, lost, note, rate=options.rate, ordered=ordered
        )
    except RuntimeError as e:
        return _row(system, label, channels, note=f"failed: {e}", rate=options.rate)
    finally:
        cluster.stop()


def run_peer_point(workdir, system, mode, channels, options):
    folder = os.path.join(workdir, f"{system}-{mode}-{channels}")
    server = SERVERS[system](folder)
    try:
        server.start()
    except Unavailable as e:
        return _row(system, mode, channels, note=f"unavailable: {e}", rate=options.rate)
    try:
        tags = channel_tags(channels)
        publish = client_command(
            "publish", system, mode, server.port, tags,
            seconds=options.seconds, rate=options.rate, size=options.event_size,
            batch=options.batch, window=options.window,
        )
        subscribe = client_command(
            "subscribe", system, mode, server.port, tags, size=options.event_size
        )
        published, delivered, lost = run_clients(folder, publish, [subscribe], options)
        return _row(system, mode, channels, published, delivered, lost, rate=options.rate)
    except RuntimeError as e:
        return _row(system, mode, channels, note=f"failed: {e}", rate=options.rate)
    finally:
        server.stop()


def _peer_client_missing(system):
    module = {"mosquitto": "paho.mqtt.client", "nats": "nats", "redis": "redis"}[system]
    try:
        __import__(module)
    except ImportError:
        return f"the Python client is not installed ({module}; pip install '.[bench]')"
    return None


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _parse_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Events/s against channels for FIT Broker, a null relay and peer brokers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--channels", default=DEFAULT_CHANNELS, help="channel counts, comma-separated")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"FIT Broker modes, comma-separated (default all: {', '.join(MODES)}); "
        "one this checkout cannot run yet becomes a row saying why",
    )
    parser.add_argument(
        "--peers",
        default="mosquitto,nats,redis",
        help="peer brokers, comma-separated, each with all its modes or one as system:mode; or 'none'",
    )
    parser.add_argument("--no-relay", action="store_true", help="skip the null relay ceiling")
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time per point")
    parser.add_argument("--event-size", type=int, default=256, help="bytes of content per event")
    parser.add_argument(
        "--rate", type=float, default=0.0,
        help="events/s each publisher offers, at a fixed pace (for latency at a given load); 0 = flat out",
    )
    parser.add_argument("--batch", type=int, default=100, help="events per publish call or pipeline")
    parser.add_argument("--window", type=int, default=64, help="batches in flight per publisher")
    parser.add_argument("--credit", type=int, default=2000, help="FIT subscriber credit per channel")
    parser.add_argument(
        "--subscribers", type=int, default=1,
        help="FIT subscriber processes per point, each streaming every channel; with 2 or more, "
        "ordered modes also check that all were handed the same order",
    )
    parser.add_argument("--idle", type=float, default=3.0, help="seconds without events that end a subscriber")
    parser.add_argument("--drain", type=float, default=300.0, help="seconds a subscriber may take to catch up")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results"), help="where results go"
    )
    parser.add_argument("--keep", action="store_true", help="keep the per-point folders (logs, ledgers)")
    parser.add_argument("--no-plot", action="store_true", help="skip throughput.png")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write cProfile statistics of replica 0 and both clients of every FIT point to DIR "
        "(figures are then slower than unprofiled ones)",
    )
    parser.add_argument(
        "--sample",
        metavar="DIR",
        help="sample every replica and both clients of every FIT point with py-spy while the publisher "
        "publishes, into DIR (collapsed stacks and a summary each); far lighter than --profile",
    )
    options = parser.parse_args(argv)
    try:
        options.channel_counts = [int(c) for c in _parse_list(options.channels)]
    except ValueError:
        parser.error(f"--channels: expected comma-separated integers, found {options.channels!r}")
    if not options.channel_counts or min(options.channel_counts) < 1:
        parser.error("--channels: at least one count, each at least 1")
    options.mode_list = _parse_list(options.modes)
    options.disk_probe = None
    options.peer_points = []
    for item in [] if options.peers.strip() == "none" else _parse_list(options.peers):
        system, _, mode = item.partition(":")
        if system not in PEER_MODES:
            parser.error(f"--peers: unknown {system!r}; known: {', '.join(PEER_MODES)} or none")
        if mode and mode not in PEER_MODES[system]:
            parser.error(f"--peers: {system} modes are {', '.join(PEER_MODES[system])}")
        for one in [mode] if mode else PEER_MODES[system]:
            if (system, one) not in options.peer_points:
                options.peer_points.append((system, one))
    if options.subscribers < 1:
        parser.error("--subscribers: at least 1")
    if options.rate < 0:
        parser.error("--rate: 0 (flat out) or a positive number of events/s")
    if options.event_size < 16:
        parser.error("--event-size: at least 16 bytes (the peers' id and clock header)")
    return options


def plan(options):
    """
    The points in the order they run: per channel count, the ceiling first,
    then FIT Broker's modes, then the peers, so that drift in the machine's
    load affects every system alike.
    """
    points = []
    for channels in options.channel_counts:
        if not options.no_relay:
            points.append(("null-relay", "cft", channels))
        for mode in options.mode_list:
            points.append(("fitbroker", mode, channels))
        for peer, mode in options.peer_points:
            points.append((peer, mode, channels))
    return points


def main(argv=None):
    options = parse_args(argv)
    command = "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    context = {
        "command": command.strip(),
        "cores": os.cpu_count(),
        "load": _load_average(),
        "commit": git_commit(),
        "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "replicas": REPLICAS,
        "faults": FAULTS,
        "event_size": options.event_size,
        "seconds": options.seconds,
        "publishers": 1,
        "subscribers": options.subscribers,
        "rate": options.rate,
    }
    points = plan(options)
    progress = Progress(len(points))
    workdir = tempfile.mkdtemp(prefix="fitbroker-bench-")
    os.makedirs(options.out, exist_ok=True)
    rows = []
    known_unavailable = {}
    try:
        for system, mode, channels in points:
            label = f"{system} {channels}ch" if system == "null-relay" else f"{system} {mode} {channels}ch"
            progress.show(label + " ...")
            key = (system, mode)
            if key in known_unavailable:
                row = _row(system, mode, channels, note=known_unavailable[key], rate=options.rate)
            elif system == "null-relay":
                row = run_fit_point(workdir, mode, channels, options, relay=True)
            elif system == "fitbroker":
                row = run_fit_point(workdir, mode, channels, options)
            else:
                missing = _peer_client_missing(system)
                if missing:
                    row = _row(system, mode, channels, note=f"unavailable: {missing}", rate=options.rate)
                else:
                    row = run_peer_point(workdir, system, mode, channels, options)
            if row["note"].startswith("unavailable"):
                known_unavailable[key] = row["note"]
            rows.append(row)
            report.write_csv(os.path.join(options.out, "results.csv"), rows)
            progress.step(
                f"{label}: {row['delivered_per_s'] or '-'} delivered/s"
                + (f" ({row['note'][:60]})" if row["note"] else "")
            )
    except KeyboardInterrupt:
        print("\ninterrupted; writing what was measured", file=sys.stderr)
    finally:
        progress.close()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"per-point folders kept in {workdir}", file=sys.stderr)
    context["disk"] = options.disk_probe
    if options.sample:
        for name in sorted(os.listdir(options.sample)):
            if name.endswith(".txt") and not name.endswith(".summary.txt"):
                path = os.path.join(options.sample, name)
                with open(path[: -len(".txt")] + ".summary.txt", "w") as f:
                    f.write(report.summarise_samples(path))
    report.write_all(options.out, rows, context, with_plot=not options.no_plot)
    print(open(os.path.join(options.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
