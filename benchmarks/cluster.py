"""
A FIT Broker cluster (or a null relay standing in for it) on 127.0.0.1.

The benchmark writes its own cluster file per point, starts one process per
replica and stops each by its process id, so it needs nothing from the test
suite and leaves nothing running.  L{MODES} is the one place that says what
channel configuration each benchmark mode means.
"""

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import attrs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLISHER = "probe"
SUBSCRIBER = "console"


def subscriber_names(count):
    """
    The client names of C{count} subscribers: L{SUBSCRIBER}, then
    C{console-2}, C{console-3}...
    """
    return [SUBSCRIBER] + [f"{SUBSCRIBER}-{i}" for i in range(2, count + 1)]


@attrs.frozen
class Mode:
    """
    How a benchmark mode configures every channel.

    @ivar ordering: the QoS class's C{ordering} (none, channel, global).
    @ivar persistence: the class's C{persistence} (memory, disk).
    @ivar fsync: a disk class's C{fsync} (always, interval, never).
    @ivar fsync_interval: a disk class's C{fsync_interval}, in ms.
    """

    qop: str
    scheme: str
    ordering: str = "none"
    persistence: str = "memory"
    fsync: str = "always"
    fsync_interval: int = 50

    @property
    def ordered(self):
        return self.ordering != "none"

    @property
    def on_disk(self):
        return self.persistence == "disk"

    def class_keys(self):
        """
        The C{[classes.bench]} keys this mode sets, beside capacity and ttl.
        """
        keys = {"ordering": self.ordering}
        if self.on_disk:
            keys.update(persistence="disk", fsync=self.fsync)
            if self.fsync == "interval":
                keys["fsync_interval"] = self.fsync_interval
        return keys

    @property
    def needs_keys(self):
        # Ordered channels need the replicas' link (MAC) keys, and BFT ones
        # their signing keys, whatever the channel's protection scheme.
        return self.scheme != "si" or self.ordered


MODES = {
    "cft": Mode(qop="cft", scheme="si"),
    "bft-ha": Mode(qop="bft", scheme="ha"),
    "bft-pks": Mode(qop="bft", scheme="pks"),
    "bft-pke": Mode(qop="bft", scheme="pke"),
    # Ordered channels go through the replicated log: Multi-Paxos when every
    # channel is CFT, Mod-SMaRt when one is BFT ([cluster] orderer = "auto").
    # Multi-Paxos needs n >= 2f+1, so the 4 replicas (f=1) of every mode do.
    "cft-ordered": Mode(qop="cft", scheme="si", ordering="channel"),
    "bft-ordered": Mode(qop="bft", scheme="ha", ordering="channel"),
    "bft-ordered-global": Mode(qop="bft", scheme="ha", ordering="global"),
    # Disk channels: each replica logs every batch it accepts into its data
    # folder, inside the point's folder (ordered ones also their decided
    # entries and acknowledgements).
    "cft-disk-always": Mode(qop="cft", scheme="si", persistence="disk", fsync="always"),
    "cft-disk-interval": Mode(qop="cft", scheme="si", persistence="disk", fsync="interval"),
    "cft-disk-never": Mode(qop="cft", scheme="si", persistence="disk", fsync="never"),
    "bft-disk-always": Mode(qop="bft", scheme="ha", persistence="disk", fsync="always"),
    "cft-ordered-disk-always": Mode(
        qop="cft", scheme="si", ordering="channel", persistence="disk", fsync="always"
    ),
    "bft-ordered-disk-always": Mode(
        qop="bft", scheme="ha", ordering="channel", persistence="disk", fsync="always"
    ),
}

DATA_DIR = "data"


def replica_data(index):
    """
    Replica C{index}'s data folder, relative to the cluster file's folder
    (where the broker resolves a relative C{data}).
    """
    return f"{DATA_DIR}/replica-{index}"


def channel_tags(count):
    return [f"ch{i}" for i in range(count)]


def free_ports(count):
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for_port(port, timeout, process=None):
    """
    Wait until something accepts on 127.0.0.1:C{port}.

    @raise RuntimeError: on timeout, or when C{process} exits first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def stop_processes(processes, timeout=10.0):
    """
    Stop each C{Popen} by its pid: SIGCONT (in case it was paused), SIGTERM,
    then SIGKILL for any still running after C{timeout}.
    """
    for process in processes:
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGCONT)
                process.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def resident_kib(pid):
    """
    Return C{(VmRSS, VmHWM)} of process C{pid} in KiB, from /proc.
    """
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values.get("VmRSS"), values.get("VmHWM")


def cpu_seconds(pid):
    """
    Return the CPU time (user and system) process C{pid} has used, from
    /proc, or C{None} when it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); these start at field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_toml(
    ports, tags, mode, faults=1, capacity=None, ttl=None, keys_dir=None, subscribers=1,
):
    """
    Return the text of a cluster file: one replica per port, clients
    C{probe} (publishes) and C{console} (subscribes; C{console-2}... too
    with C{subscribers} > 1), every channel in C{tags} configured as
    C{mode} says.

    @param capacity: queue capacity per subscriber; C{None} keeps the
        broker's default, as the memory benchmark wants.
    """
    from fit_broker.init import cluster_toml as write_toml

    bench = mode.class_keys()
    for key, value in (("capacity", capacity), ("ttl", ttl)):
        if value is not None:
            bench[key] = value
    readers = subscriber_names(subscribers)
    rows = [(tag, tag, "bench", mode.qop, mode.scheme, [PUBLISHER], readers) for tag in tags]
    classes = {"bench": bench}
    text = write_toml(
        "bench", faults, ports, [PUBLISHER, *readers], rows, keys_dir=keys_dir, tls=False,
        admins=[], classes=classes,
    )
    return with_replica_data(text) if mode.on_disk else text


def with_replica_data(text):
    """
    Give each C{[[replicas]]} table of cluster file C{text} a C{data} key
    naming L{replica_data}, so that a point's disk channels live in its own
    folder and not in the user's state folder.  (L{fit_broker.init.cluster_toml}
    has no such parameter.)
    """
    lines = []
    index = 0
    for line in text.split("\n"):
        lines.append(line)
        if line.strip() == "[[replicas]]":
            lines.append(f'data = "{replica_data(index)}"')
            index += 1
    return "\n".join(lines)


def filesystem_type(path):
    """
    The type of the filesystem holding C{path} (ext4, tmpfs, overlay...),
    from the longest matching mount point in /proc/mounts, or C{"unknown"}.
    """
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def fsync_latency(folder, count=50, size=4096):
    """
    Time C{count} appends of C{size} bytes to a file in C{folder}, each
    followed by C{os.fsync}: what one C{fsync = "always"} flush costs there
    at best.  Returns C{{"filesystem", "fsyncs", "median_ms", "p99_ms"}}.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "fsync-probe")
    block = os.urandom(size)
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    return {
        "filesystem": filesystem_type(folder),
        "fsyncs": count,
        "median_ms": round(statistics.median(times), 3),
        "p99_ms": round(p99, 3),
    }


def prepare_cluster(
    folder, mode_name, channels, replicas=4, faults=1, capacity=None, ttl=None, subscribers=1,
):
    """
    Write the cluster file (and key material, for schemes and orderings
    that need it) into C{folder} and check that FIT Broker accepts it.

    @return: C{(path, ports)}.
    @raise Unavailable: when this checkout cannot run C{mode_name} yet.
    """
    if mode_name not in MODES:
        raise Unavailable(f"no mode {mode_name!r}; known: {', '.join(MODES)}")
    mode = MODES[mode_name]
    os.makedirs(folder, exist_ok=True)
    if mode.on_disk:
        for index in range(replicas):
            os.makedirs(os.path.join(folder, replica_data(index)), exist_ok=True)
    tags = channel_tags(channels)
    ports = free_ports(replicas)
    keys_dir = None
    if mode.needs_keys:
        keys_dir = "keys"
        try:
            from fit_broker.pki import write_cluster_material

            material = os.path.join(folder, keys_dir)
            shutil.rmtree(material, ignore_errors=True)
            clients = [PUBLISHER, *subscriber_names(subscribers)]
            write_cluster_material(material, "bench", replicas, clients, {tag: clients for tag in tags})
        except Exception as e:
            raise Unavailable(f"cannot make key material: {type(e).__name__}: {e}") from None
    path = os.path.join(folder, "cluster.toml")
    with open(path, "w") as f:
        f.write(cluster_toml(ports, tags, mode, faults, capacity, ttl, keys_dir, subscribers))
    check_config(path)
    return path, ports


def check_config(path):
    """
    Load C{path} the way a replica would, turning any refusal into L{Unavailable}.
    """
    from fit_broker.config import load_config
    from fit_broker.errors import FitBrokerError
    from fit_broker.schemes.registry import scheme_lookup

    try:
        scheme_lookup(load_config(path))
    except FitBrokerError as e:
        raise Unavailable(str(e).replace(path + ": ", "")) from None


class Unavailable(Exception):
    """
    A mode or peer this machine or checkout cannot run; the text says why.
    """


def git_commit():
    """
    The checkout's short commit, marked when tracked files have changed since.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def twistd():
    found = shutil.which("twistd", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "twisted"]


class Cluster:
    """
    One process per replica of a cluster file: real replicas, or null relays.
    """

    def __init__(self, folder, config_path, ports, relay=False, profile=None):
        """
        @param profile: a file to write replica 0's cProfile statistics to.
        """
        self.folder = folder
        self.config_path = config_path
        self.ports = ports
        self.relay = relay
        self.profile = profile
        self.processes = []

    def command(self, index):
        profiled = self.profile is not None and index == 0
        if self.relay:
            python = [sys.executable]
            if profiled:
                python += ["-m", "cProfile", "-o", self.profile]
            return python + [
                "-m", "benchmarks.relay", "--config", self.config_path, "--replica-id", str(index),
            ]
        options = ["--profile", self.profile, "--profiler", "cprofile", "--savestats"] if profiled else []
        return twistd() + options + [
            "-n", "fitbroker", "--config", self.config_path, "--replica-id", str(index),
        ]

    def start(self, timeout=30):
        for index in range(len(self.ports)):
            with open(os.path.join(self.folder, f"replica-{index}.log"), "ab") as out:
                self.processes.append(
                    subprocess.Popen(
                        self.command(index),
                        cwd=self.folder,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=child_env(),
                    )
                )
        try:
            for port, process in zip(self.ports, self.processes):
                wait_for_port(port, timeout, process)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; {self.log_tail()}") from None

    def alive(self):
        return [p.poll() is None for p in self.processes]

    def log_tail(self, lines=3):
        tails = []
        for index in range(len(self.ports)):
            try:
                with open(os.path.join(self.folder, f"replica-{index}.log"), "rb") as f:
                    text = f.read().decode("utf-8", "replace").strip().splitlines()
            except OSError:
                continue
            if text:
                tails.append(f"replica {index}: " + " | ".join(text[-lines:]))
        return "; ".join(tails)

    def cpu(self):
        """
        Return the CPU seconds all replica processes used so far.
        """
        return sum(cpu_seconds(p.pid) or 0.0 for p in self.processes)

    def resident(self):
        """
        Return C{[(VmRSS, VmHWM)]} in KiB per replica process.
        """
        return [resident_kib(p.pid) for p in self.processes]

    def stop(self):
        stop_processes(self.processes)
        self.processes = []
