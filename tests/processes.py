"""
Real replica processes on 127.0.0.1 for integration tests.
"""

import os
import signal
import subprocess
import sys

from benchmarks.cluster import free_ports, twistd, wait_for_port
from fit_broker.init import cluster_toml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_cluster(folder, channels, replicas=4, faults=1, capacity=100_000, ttl=300):
    """
    Write a plain-TCP cluster file without keys into C{folder}: clients
    C{probe} (publishes and subscribes) and C{console} (subscribes), each
    channel in C{channels} crash-tolerant in class C{big}.  Return its path
    and the replicas' ports.
    """
    ports = free_ports(replicas)
    rows = [(tag, tag, "big", "cft", "si", ["probe"], ["console", "probe"]) for tag in channels]
    text = cluster_toml(
        "it", faults, ports, ["probe", "console"], rows, keys_dir=None, tls=False, admins=[],
        classes={"big": {"capacity": capacity, "ttl": ttl}},
    )
    path = os.path.join(folder, "cluster.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, ports


class ReplicaProcesses:
    """
    Replicas of a cluster file, each a `twistd -n fitbroker` process.
    """

    def __init__(self, folder, config_path, ports):
        self.folder = folder
        self.config_path = config_path
        self.ports = ports
        self.processes = {}

    def env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, index):
        out = open(os.path.join(self.folder, f"replica-{index}.out"), "ab")
        self.processes[index] = subprocess.Popen(
            twistd() + ["-n", "fitbroker", "--config", self.config_path, "--replica-id", str(index)],
            cwd=self.folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        out.close()

    def start_all(self, timeout=60):
        for index in range(len(self.ports)):
            self.start(index)
        for port in self.ports:
            wait_for_port(port, timeout)

    def signal(self, index, sig):
        self.processes[index].send_signal(sig)

    def stop_all(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def output(self, index):
        with open(os.path.join(self.folder, f"replica-{index}.out"), "rb") as f:
            return f.read().decode("utf-8", "replace")


def loadgen(role, *args, **kwargs):
    """
    Start a load generator process (see benchmarks/loadgen.py).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen", role, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **kwargs,
    )


def read_history(path):
    with open(path) as f:
        return [tuple(line.split()) for line in f if line.strip()]
