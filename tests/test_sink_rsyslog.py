"""
The sink as operators run it, against a real rsyslog: four replica
processes, `twistd -n fitbroker-sink` forwarding channel `events` over
TCP syslog (and to a JSON-lines file), a `fitbroker publish` publisher,
and an rsyslog on loopback that writes every message it receives to a
file.  rsyslog is stopped for 10 seconds and started again while events
keep coming; what it wrote is compared by event id with what was
published, and the file sink must keep growing during the outage (the
window lets it run ahead of the syslog sink).
"""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.processes import ROOT, ReplicaProcesses, free_ports, twistd, wait_for_port, write_cluster

pytestmark = pytest.mark.integration

RSYSLOGD = shutil.which("rsyslogd") or (
    "/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None
)

RATE = 100  # events a second
OUTAGE = 10.0  # seconds rsyslog is down
CONFIRM_AFTER = 1.0

SD = re.compile(r'\[fitbroker@32473 channel="events" publisher="([^"]+)" event_id="(\d+)" urgency="\d+"\]')


class Rsyslog:
    """
    An rsyslogd that receives octet-counted TCP syslog on a port and
    appends each raw message to C{received.log}.
    """

    def __init__(self, folder, port):
        self.folder = folder
        self.port = port
        self.output = os.path.join(folder, "received.log")
        work = os.path.join(folder, "rsyslog-work")
        os.makedirs(work, exist_ok=True)
        self.conf = os.path.join(folder, "rsyslog.conf")
        with open(self.conf, "w") as f:
            f.write(
                f'global(workDirectory="{work}" maxMessageSize="64k")\n'
                'module(load="imtcp")\n'
                f'input(type="imtcp" address="127.0.0.1" port="{port}")\n'
                'template(name="raw" type="string" string="%rawmsg%\\n")\n'
                f'*.* action(type="omfile" file="{self.output}" template="raw")\n'
            )
        self.process = None

    def start(self):
        with open(os.path.join(self.folder, "rsyslog.out"), "ab") as out:
            self.process = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", self.conf, "-i", os.path.join(self.folder, "rsyslog.pid")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, 15, self.process)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def received(self):
        """
        Return C{(publisher, event_id, content)} of every message in the file.
        """
        if not os.path.exists(self.output):
            return []
        records = []
        with open(self.output, "rb") as f:
            for line in f.read().decode("utf-8", "replace").splitlines():
                match = SD.search(line)
                if match:
                    records.append((match[1], int(match[2]), line[match.end():].strip()))
        return records


def sink_toml(port):
    return f"""
client = "console"
channels = ["events"]
stats_interval = 0.5
window = 1000                # groups the file may run ahead of rsyslog
credit = 60                  # (window + 1) x credit within a replica's unacknowledged bound

[[sinks]]
kind = "syslog"
name = "siem"
connect = "tcp:127.0.0.1:{port}"
confirm_after = {CONFIRM_AFTER}

[[sinks]]
kind = "file"
name = "archive"
path = "archive/events.jsonl"
max_bytes = 65536
keep = 20
"""


def read(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def wait_for_text(path, text, process, timeout=30):
    deadline = time.monotonic() + timeout
    while text not in read(path):
        assert process.poll() is None, read(path)
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{read(path)[-3000:]}"
        time.sleep(0.1)


def archive_lines(folder):
    """
    Return every JSON line the file sink wrote so far, across rotated files.
    """
    archive = os.path.join(folder, "archive")
    if not os.path.isdir(archive):
        return []
    lines = []
    for name in os.listdir(archive):
        try:
            with open(os.path.join(archive, name), "rb") as f:
                lines += f.read().splitlines()
        except FileNotFoundError:
            pass  # rotated away while we listed: the next name holds it
    return lines


def last_counters(log):
    """
    Return the last counters line of the sink's log as a dict.
    """
    lines = [line for line in log.splitlines() if "sink counters:" in line or "sink final:" in line]
    assert lines, log[-3000:]
    return dict(re.findall(r"(\S+)=(\d+)", lines[-1]))


@pytest.mark.skipif(RSYSLOGD is None, reason="rsyslogd is not installed (.ci/run installs it)")
def test_rsyslog_receives_every_event_across_a_restart(tmp_path):
    """Every published event reaches rsyslog and the file; repeats only around the restart, and counted."""
    folder = str(tmp_path)
    config, ports = write_cluster(folder, ["events"])
    [syslog_port] = free_ports(1)
    with open(os.path.join(folder, "sink.toml"), "w") as f:
        f.write(sink_toml(syslog_port))
    replicas = ReplicaProcesses(folder, config, ports)
    receiver = Rsyslog(folder, syslog_port)
    sink = publisher = None
    env = replicas.env()
    try:
        replicas.start_all()
        receiver.start()
        sink_log = os.path.join(folder, "sink.out")
        with open(sink_log, "wb") as out:
            sink = subprocess.Popen(
                twistd() + ["-n", "--pidfile", "sink.pid", "fitbroker-sink", "--config", config],
                cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        wait_for_text(sink_log, "sink subscribed to events", sink)
        publisher = subprocess.Popen(
            [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
             "publish", "--config", config, "events"],
            cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        published = []
        stopped_at = []
        done = threading.Event()

        def publish():
            started = time.monotonic()
            while not done.is_set():
                due = int((time.monotonic() - started) * RATE)
                lines = b"".join(b"ev-%06d\n" % i for i in range(len(published), due))
                if lines:
                    publisher.stdin.write(lines)
                    publisher.stdin.flush()
                    published.extend(range(len(published), due))
                time.sleep(0.02)

        writer = threading.Thread(target=publish, daemon=True)
        writer.start()
        time.sleep(4.0)
        stopped_at.append(len(published))
        receiver.stop()
        time.sleep(1.0)
        archived_early = len(archive_lines(folder))
        time.sleep(OUTAGE - 1.0)
        archived_late = len(archive_lines(folder))
        restarted_at = len(published)
        receiver.start()
        time.sleep(3.0)
        done.set()
        writer.join()
        _, err = publisher.communicate(timeout=30)
        assert publisher.returncode == 0, err.decode()
        expected = {f"ev-{i:06d}" for i in published}

        deadline = time.monotonic() + 30
        while {c for _, _, c in receiver.received()} < expected:
            assert sink.poll() is None, read(sink_log)[-3000:]
            assert time.monotonic() < deadline, (
                f"{len(expected - {c for _, _, c in receiver.received()})} events missing at rsyslog; "
                f"sink log:\n{read(sink_log)[-3000:]}"
            )
            time.sleep(0.2)
        time.sleep(1.0)  # let the counters line catch up
        received = receiver.received()
    finally:
        for process in (publisher, sink):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        receiver.stop()
        replicas.stop_all()

    contents = collections.Counter(c for _, _, c in received)
    assert set(contents) == expected
    ids = collections.Counter((p, i) for p, i, _ in received)
    assert len(ids) == len(expected) and all(p == "probe" for p, _ in ids)
    repeats = {c: n - 1 for c, n in contents.items() if n > 1}
    counters = last_counters(read(sink_log))
    # Repeats are counted, and only events sent just before the receiver stopped repeat.
    assert sum(repeats.values()) <= int(counters["siem.repeats-possible"])
    window = (CONFIRM_AFTER + 1.0) * RATE
    for content in repeats:
        index = int(content[3:])
        assert stopped_at[0] - window <= index < restarted_at, (content, stopped_at, restarted_at)
    assert int(counters["siem.retried"]) >= 1
    # While rsyslog was down the file sink kept taking new events.
    assert archived_late - archived_early >= 0.5 * RATE * (OUTAGE - 1.0), (archived_early, archived_late)
    # The file sink has every event exactly once, across rotated files.
    archive = os.path.join(folder, "archive")
    lines = [json.loads(line) for line in archive_lines(folder)]
    assert sorted(r["content"] for r in lines) == sorted(expected)
    assert len(os.listdir(archive)) > 1
    print(f"published {len(expected)}, repeats {sum(repeats.values())}, counters {counters}")
