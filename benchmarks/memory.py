"""
A replica's resident size with every channel's queue full.

    python -m benchmarks.memory [--channels 90] [--event-size 256] [--out DIR]

Starts 4 replica processes whose channels use the broker's default QoS
class (its default queue capacity and TTL), subscribes one client to every
channel without reading, so that its queues only fill, publishes 10% more
than the capacity into every channel, checks with a status request that
every queue is full, and reports each replica's VmRSS and VmHWM from
/proc/PID/status: the footprint an operator must plan for when a console
goes away.
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

from benchmarks.cluster import (
    PUBLISHER,
    ROOT,
    SUBSCRIBER,
    Cluster,
    Unavailable,
    channel_tags,
    child_env,
    git_commit,
    prepare_cluster,
)

LIMIT_MIB = 300


def _driver(role, config, *extra, timeout=600):
    command = [sys.executable, "-m", "benchmarks.driver", role, "--config", config, *extra]
    done = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{role} printed nothing: {done.stderr.strip()[-300:]}")
    summary = json.loads(lines[-1])
    if "error" in summary:
        raise RuntimeError(f"{role}: {summary['error']}")
    return summary


def measure(folder, channels, event_size, mode="cft"):
    from fit_broker.qos import QoSClass

    default = QoSClass("default")
    path, ports = prepare_cluster(folder, mode, channels)
    tags = channel_tags(channels)
    cluster = Cluster(folder, path, ports)
    cluster.start()
    try:
        idle = cluster.resident()
        _driver("fill", path, "--as", SUBSCRIBER, "--channels", ",".join(tags))
        per_channel = int(default.capacity * 1.1)
        batch = 100
        per_channel = -(-per_channel // batch) * batch
        started = time.monotonic()
        published = _driver(
            "publish", path, "--as", PUBLISHER, "--channels", ",".join(tags),
            "--events", str(per_channel * channels), "--seconds", "3600",
            "--size", str(event_size), "--batch", str(batch),
        )
        filled_in = time.monotonic() - started
        status = _driver("status", path, "--as", SUBSCRIBER)["replicas"]
        full = {}
        for index, info in status.items():
            waiting = [
                channel["subscribers"].get(SUBSCRIBER, {}).get("waiting", 0)
                for channel in info["channels"].values()
            ]
            full[index] = sum(1 for w in waiting if w >= default.capacity)
        resident = cluster.resident()
        return {
            "channels": channels,
            "capacity": default.capacity,
            "ttl": default.ttl,
            "event_size": event_size,
            "published": published["acked"],
            "fill_seconds": round(filled_in, 1),
            "replicas": [
                {
                    "replica": index,
                    "idle_rss_mib": round(idle[index][0] / 1024, 1),
                    "rss_mib": round(rss / 1024, 1),
                    "peak_mib": round(hwm / 1024, 1),
                    "full_queues": full.get(str(index), 0),
                }
                for index, (rss, hwm) in enumerate(resident)
            ],
        }
    finally:
        cluster.stop()


def markdown(result, command):
    lines = [
        "# Replica memory with full queues",
        "",
        f"`{command}`",
        "",
        f"{os.cpu_count()} cores, commit {result['commit']}, {result['when']}; "
        f"{result['channels']} channels, queue capacity "
        f"{result['capacity']} and TTL {result['ttl']:.0f} s (the defaults), one subscriber, "
        f"{result['event_size']}-byte events, {result['published']:,} events published "
        f"in {result['fill_seconds']} s. Target: under {LIMIT_MIB} MiB per replica.",
        "",
        "| replica | idle RSS MiB | RSS MiB | peak MiB | full queues |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["replicas"]:
        lines.append(
            f"| {r['replica']} | {r['idle_rss_mib']} | {r['rss_mib']} | {r['peak_mib']} | "
            f"{r['full_queues']} of {result['channels']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("--channels", type=int, default=90)
    parser.add_argument("--event-size", type=int, default=256)
    parser.add_argument("--mode", default="cft")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="fitbroker-memory-")
    try:
        result = measure(folder, args.channels, args.event_size, args.mode)
    except (Unavailable, RuntimeError) as e:
        print(f"memory benchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["when"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    result["commit"] = git_commit()
    command = "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command.strip())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(text)
    worst = max(r["rss_mib"] for r in result["replicas"])
    print(f"largest replica: {worst} MiB ({'within' if worst < LIMIT_MIB else 'over'} {LIMIT_MIB} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
