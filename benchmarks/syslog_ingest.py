"""
Syslog ingest end to end: TCP senders -> the adapter -> 4 replicas -> a subscriber.

    python -m benchmarks.syslog_ingest [--seconds 10] [--senders 2] [--rate 0]
        [--mode cft] [--size 120] [--framing lf|octet] [--batch-size 500]
        [--out FILE]

Starts a 4-replica cluster (f = 1) of replica processes, a
`twistd -n fitbroker-syslog` process publishing everything to one channel,
and a subscriber process (benchmarks.loadgen).  Sender threads here write
RFC 3164 lines (--framing lf, as `logger --tcp` does) or octet-counted
frames over --senders TCP connections for --seconds, as fast as the adapter
reads (its backpressure paces them) or at --rate messages/s in total.

Prints one JSON object: messages sent and their rate, what the adapter
received and had acknowledged, what the subscriber delivered and at what
rate (first to last delivery: the end-to-end rate), the share of sent
messages that reached the subscriber, and the CPU seconds each process used.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.cluster import (
    ROOT,
    SUBSCRIBER,
    PUBLISHER,
    Cluster,
    child_env,
    free_ports,
    prepare_cluster,
    stop_processes,
    twistd,
    wait_for_port,
)

CHANNEL = "ch0"
CAPACITY = 5_000_000
CHUNK = 2000  # messages per socket write


def syslog_toml(port, batch_size):
    # The cluster file's publisher is "probe": the adapter publishes as it.
    return f"""
client = "{PUBLISHER}"
stats_interval = 1
batch_size = {batch_size}

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[routing]
default = "{CHANNEL}"
"""


def message(sequence, size):
    head = b"<134>Nov 26 23:41:12 web01 nginx[1234]: %d " % sequence
    return head + b"x" * max(0, size - len(head))


def frames(first, count, size, framing):
    parts = []
    for sequence in range(first, first + count):
        body = message(sequence, size)
        parts.append(b"%d %s" % (len(body), body) if framing == "octet" else body + b"\n")
    return b"".join(parts)


def send(port, deadline, size, framing, rate, sent, index, senders):
    """
    Write chunks of messages until C{deadline}; count whole chunks in
    C{sent[index]}.  With a C{rate}, keep this sender's share of it.
    """
    connection = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    share = rate / senders if rate else 0.0
    total = 0
    try:
        while time.monotonic() < deadline:
            if share:
                ahead = total / share - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(min(ahead, deadline - time.monotonic(), 0.1))
                    continue
            data = frames(index * 1_000_000_000 + total, CHUNK, size, framing)
            connection.sendall(data)
            total += CHUNK
            sent[index] = total
    finally:
        connection.close()


def cpu_seconds(pid):
    """
    Return the user + system CPU seconds process C{pid} used, from /proc.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def final_counters(log_text):
    """
    Return the adapter's counters from its last counter line.
    """
    lines = [l for l in log_text.splitlines() if "syslog final:" in l or "syslog counters:" in l]
    if not lines:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\S+)=(\d+)", lines[-1])}


def run(args):
    folder = tempfile.mkdtemp(prefix="syslog-bench-")
    path, ports = prepare_cluster(folder, args.mode, 1, capacity=CAPACITY)
    [port] = free_ports(1)
    with open(os.path.join(folder, "syslog.toml"), "w") as f:
        f.write(syslog_toml(port, args.batch_size))
    cluster = Cluster(folder, path, ports)
    processes = []
    profile = []
    if args.profile:
        profile = ["--profile", os.path.abspath(args.profile), "--profiler", "cprofile", "--savestats"]
    result = {"mode": args.mode, "senders": args.senders, "size": args.size, "framing": args.framing}
    try:
        cluster.start()
        with open(os.path.join(folder, "adapter.log"), "wb") as out:
            adapter = subprocess.Popen(
                twistd() + profile + ["-n", "--pidfile", "adapter.pid", "fitbroker-syslog", "--config", path],
                cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
            )
        processes.append(adapter)
        wait_for_port(port, 30, adapter)
        subscriber = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", "subscribe", "--config", path,
             "--as", SUBSCRIBER, "--channels", CHANNEL, "--idle", str(args.idle),
             "--credit", "20000"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
        )
        processes.append(subscriber)
        if subscriber.stderr.readline().strip() != b"ready":
            raise RuntimeError("the subscriber did not start: " + subscriber.stderr.read().decode())
        threading.Thread(target=subscriber.stderr.read, daemon=True).start()

        sent = [0] * args.senders
        harness_cpu = time.process_time()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [
            threading.Thread(
                target=send,
                args=(port, deadline, args.size, args.framing, args.rate, sent, i, args.senders),
            )
            for i in range(args.senders)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sending = time.monotonic() - started
        total = sum(sent)

        # The subscriber's CPU is read just before it exits (it stops on idle).
        subscriber_cpu = None
        while subscriber.poll() is None:
            subscriber_cpu = cpu_seconds(subscriber.pid) or subscriber_cpu
            time.sleep(0.2)
        delivered = json.loads(subscriber.stdout.read().decode().strip().splitlines()[-1])
        cpu = {
            "adapter": cpu_seconds(adapter.pid),
            "replicas": [cpu_seconds(p.pid) for p in cluster.processes],
            "subscriber": subscriber_cpu,
            "senders": round(time.process_time() - harness_cpu, 2),
        }
        adapter.send_signal(signal.SIGTERM)
        adapter.wait(30)
        with open(os.path.join(folder, "adapter.log"), encoding="utf-8", errors="replace") as f:
            counters = final_counters(f.read())
        result.update(
            sent=total,
            sent_per_s=round(total / sending, 1),
            sending_seconds=round(sending, 2),
            adapter_received=counters.get("received"),
            adapter_acked=counters.get("acked"),
            adapter_pauses=counters.get("pauses", 0),
            adapter_dropped={
                k: v for k, v in counters.items()
                if k in ("spool-full", "dropped-udp", "rate-limited", "failed", "dropped-malformed")
            },
            delivered=delivered.get("delivered"),
            delivered_per_s=delivered.get("delivered_per_s"),
            delivery_seconds=delivered.get("seconds"),
            share_delivered=round(delivered.get("delivered", 0) / total, 4) if total else None,
            cpu_seconds=cpu,
            cores=os.cpu_count(),
        )
        if "error" in delivered:
            result["subscriber_error"] = delivered["error"]
    finally:
        stop_processes(processes)
        cluster.stop()
        if args.keep:
            result["folder"] = folder
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.syslog_ingest")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s in total; 0 = as fast as read")
    parser.add_argument("--mode", default="cft", help="cft, bft-ha, bft-pks, ... (benchmarks.cluster)")
    parser.add_argument("--size", type=int, default=120, help="bytes per syslog message")
    parser.add_argument("--framing", choices=["lf", "octet"], default="lf")
    parser.add_argument("--batch-size", type=int, default=500, help="the adapter's publish batch size")
    parser.add_argument("--idle", type=float, default=5.0, help="subscriber stops after this quiet")
    parser.add_argument("--out", help="also append the JSON result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the folder with every log")
    parser.add_argument("--profile", help="write the adapter's cProfile statistics to this file")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
