"""
The syslog adapter as operators run it: four replica processes, a
`twistd -n fitbroker-syslog` process, a `fitbroker tail` subscriber, and
real senders (util-linux `logger` in each of its modes, rsyslog forwarding
with octet counting, a TLS client) plus hostile ones (a 10 MB line, a
connection trickling one byte a second, 1,000 connections at once).

One cluster and one adapter serve every test of the module; each test
sends messages carrying its own marker and waits for them at the subscriber.
"""

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fit_broker import pki
from fit_broker.init import cluster_toml
from tests.processes import ReplicaProcesses, free_ports, twistd, wait_for_port

pytestmark = pytest.mark.integration

LOGGER = "/usr/bin/logger" if os.path.exists("/usr/bin/logger") else shutil.which("logger")
RSYSLOGD = shutil.which("rsyslogd") or (
    "/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None
)
needs_logger = pytest.mark.skipif(LOGGER is None, reason="util-linux logger is not installed")
needs_rsyslog = pytest.mark.skipif(RSYSLOGD is None, reason="rsyslogd is not installed")

CONNECTIONS = 1000


def cluster_file(ports):
    """The cluster's file: client C{syslog} publishes to both syslog channels, C{console} reads them."""
    rows = [(tag, tag, "big", "cft", "si", ["syslog"], ["console"]) for tag in ("syslog", "syslog-raw")]
    return cluster_toml(
        "sl", 1, ports, ["console", "syslog"], rows, keys_dir=None, tls=False, admins=[],
        classes={"big": {"capacity": 100000}},
    )


def syslog_toml(port, tls_port):
    return f"""
stats_interval = 1
max_connections = {CONNECTIONS + 100}

[[listeners]]
endpoint = "udp:{port}:interface=127.0.0.1"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1:backlog=2048"

[[listeners]]
endpoint = "tls:{tls_port}:interface=127.0.0.1"
certificate = "tls/server.pem"
private_key = "tls/server.key"
ca = "tls/ca.pem"
require_client_certificate = true

[routing]
default = "syslog"
malformed_channel = "syslog-raw"
"""


class Ingest:
    """
    The running cluster, adapter and subscriber, and how to talk to them.
    """

    def __init__(self, folder, ports, port, tls_port, ca, client_tls):
        self.folder = folder
        self.port = port
        self.tls_port = tls_port
        self.ca = ca
        self.client_tls = client_tls
        self.replicas = ReplicaProcesses(folder, os.path.join(folder, "cluster.toml"), ports)
        self.adapter = None
        self.tail = None
        self._offset = 0
        self._records = []

    def start(self):
        env = self.replicas.env()
        self.replicas.start_all()
        with open(os.path.join(self.folder, "adapter.out"), "wb") as out:
            self.adapter = subprocess.Popen(
                twistd()
                + ["-n", "--pidfile", "adapter.pid", "fitbroker-syslog", "--config", "cluster.toml"],
                cwd=self.folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for_port(self.port, 20)
        fitbroker = shutil.which("fitbroker", path=os.path.dirname(sys.executable))
        command = [fitbroker] if fitbroker else [
            sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())"
        ]
        with open(os.path.join(self.folder, "tail.out"), "wb") as out, open(
            os.path.join(self.folder, "tail.err"), "wb"
        ) as err:
            self.tail = subprocess.Popen(
                command + ["tail", "--config", "cluster.toml", "--as", "console", "syslog", "syslog-raw"],
                cwd=self.folder,
                stdout=out,
                stderr=err,
                env=env,
            )
        deadline = time.monotonic() + 20
        while b"subscribed to" not in self._read("tail.err"):
            assert self.tail.poll() is None, self._read("tail.err").decode()
            assert time.monotonic() < deadline, "the subscriber did not subscribe"
            time.sleep(0.1)

    def stop(self):
        for process in (self.tail, self.adapter):
            if process is not None and process.poll() is None:
                process.terminate()
        for process in (self.tail, self.adapter):
            if process is not None:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.replicas.stop_all()

    def _read(self, name):
        with open(os.path.join(self.folder, name), "rb") as f:
            return f.read()

    def adapter_log(self):
        return self._read("adapter.out").decode("utf-8", "replace")

    def records(self):
        """
        Every record the subscriber printed so far: the tail line with its
        content parsed as the syslog event.
        """
        with open(os.path.join(self.folder, "tail.out"), "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            record = json.loads(line)
            record["event"] = json.loads(record["content"])
            self._records.append(record)
        return self._records

    def wait_for(self, marker, count=1, timeout=15.0):
        """
        Return the records whose raw message holds C{marker}, once there
        are C{count} of them.
        """
        needle = marker.encode()
        deadline = time.monotonic() + timeout
        while True:
            found = [
                r for r in self.records() if needle in base64.b64decode(r["event"]["raw_b64"])
            ]
            if len(found) >= count:
                return found
            assert self.adapter.poll() is None, "the adapter exited:\n" + self.adapter_log()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} events with {marker!r} after {timeout} s; "
                    f"adapter log:\n{self.adapter_log()[-3000:]}"
                )
            time.sleep(0.05)

    def logger(self, *args, message=None, stdin=None):
        command = [LOGGER, "-n", "127.0.0.1", "-P", str(self.port), *args]
        if message is not None:
            command.append(message)
        subprocess.run(command, input=stdin, check=True, timeout=10)


@pytest.fixture(scope="module")
def ingest(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("syslog-e2e"))
    ports = free_ports(6)
    replica_ports, port, tls_port = ports[:4], ports[4], ports[5]
    with open(os.path.join(folder, "cluster.toml"), "w") as f:
        f.write(cluster_file(replica_ports))
    with open(os.path.join(folder, "syslog.toml"), "w") as f:
        f.write(syslog_toml(port, tls_port))
    ca = pki.new_certificate_authority("syslog-e2e")
    server = ca.issue(dns_names=["localhost"], ip_addresses=["127.0.0.1"], server=True, client=False)
    client = ca.issue(dns_names=["probe.example"], server=False, client=True)
    os.makedirs(os.path.join(folder, "tls"))
    files = {"ca.pem": ca.cert_pem, "server.pem": server.cert_pem, "server.key": server.key_pem,
             "client.pem": client.cert_pem, "client.key": client.key_pem}
    for name, data in files.items():
        with open(os.path.join(folder, "tls", name), "wb") as f:
            f.write(data)
    running = Ingest(folder, replica_ports, port, tls_port, ca, client)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def marker():
    return "m" + uuid.uuid4().hex[:12]


# util-linux logger, mode by mode.


@needs_logger
@pytest.mark.parametrize(
    "args, fmt",
    [
        (["--udp", "--rfc5424"], "rfc5424"),
        (["--udp", "--rfc3164"], "rfc3164"),
        (["--tcp", "--rfc5424"], "rfc5424"),
        (["--tcp", "--rfc3164"], "rfc3164"),
        (["--tcp", "--octet-count", "--rfc5424"], "rfc5424"),
        (["--tcp", "--octet-count", "--rfc3164"], "rfc3164"),
    ],
)
def test_logger_modes(ingest, args, fmt):
    """Each transport and format logger has arrives as one event with its fields."""
    text = marker()
    ingest.logger(*args, "-t", "probe-app", "-p", "local3.err", message=f"hello {text}")
    [record] = ingest.wait_for(text)
    event = record["event"]
    assert event["format"] == fmt
    assert (event["facility"], event["severity"]) == (19, 3)
    assert event["app_name"] == "probe-app" and event["msg"] == f"hello {text}"
    assert event["hostname"] and event["timestamp"]
    assert event["source"].startswith("127.0.0.1:")
    assert record["channel"] == "syslog" and record["urgency"] == 2


@needs_logger
def test_logger_structured_data(ingest):
    """--sd-id and --sd-param become structured_data, escapes undone."""
    text = marker()
    ingest.logger(
        "--tcp", "--octet-count", "--rfc5424", "--msgid", "ID47",
        "--sd-id", "zoo@123", "--sd-param", 'tiger="hungry"', "--sd-param", r'zebra="a \"b\" \] c"',
        message=text,
    )
    [record] = ingest.wait_for(text)
    event = record["event"]
    assert event["msgid"] == "ID47"
    assert event["structured_data"]["zoo@123"] == {"tiger": "hungry", "zebra": 'a "b" ] c'}
    assert "timeQuality" in event["structured_data"]


@needs_logger
@pytest.mark.parametrize("args", [["--udp"], ["--tcp", "--octet-count"]])
def test_logger_multi_line(ingest, args):
    """A multi-line message sent as a datagram or an octet-counted frame stays one event."""
    text = marker()
    ingest.logger(*args, "--rfc5424", "-t", "trace", message=f"Traceback {text}\n  line 2\n  line 3")
    [record] = ingest.wait_for(text)
    assert record["event"]["msg"] == f"Traceback {text}\n  line 2\n  line 3"


@needs_logger
def test_logger_lines_from_stdin(ingest):
    """logger reading lines from stdin over LF-framed TCP sends one event per line."""
    text = marker()
    ingest.logger("--tcp", "--rfc3164", "-t", "batch", stdin=f"{text} 1\n{text} 2\n{text} 3\n".encode())
    records = ingest.wait_for(text, count=3)
    assert sorted(r["event"]["msg"] for r in records) == [f"{text} {i}" for i in (1, 2, 3)]


def test_malformed_published_raw(ingest):
    """Unparsable input reaches the malformed channel raw and does not disturb the connection."""
    text = marker()
    with socket.create_connection(("127.0.0.1", ingest.port)) as s:
        s.sendall(f"<999>{text} bad\n<13>{text} good\n".encode())
    records = ingest.wait_for(text, count=2)
    by_channel = {r["channel"]: r["event"] for r in records}
    assert by_channel["syslog-raw"]["format"] == "unparsed"
    assert by_channel["syslog-raw"]["msg"] == f"<999>{text} bad"
    assert by_channel["syslog"]["msg"] == f"{text} good"


def test_udp_64k_datagram(ingest):
    """A datagram of almost 64 KiB arrives whole (Twisted's 8 KiB default would cut it)."""
    text = marker()
    body = f"<14>1 - host app - - - {text} ".encode() + b"z" * 65000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(body, ("127.0.0.1", ingest.port))
    [record] = ingest.wait_for(text)
    event = record["event"]
    assert event["truncated"] is False and len(event["msg"]) == len(body) - 23


def test_tls_client_certificate(ingest):
    """Over TLS a client with a certificate is served; one without is refused, others unharmed."""
    folder = os.path.join(ingest.folder, "tls")
    context = ssl.create_default_context(cafile=os.path.join(folder, "ca.pem"))
    text = marker()
    bare = socket.create_connection(("127.0.0.1", ingest.tls_port))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with context.wrap_socket(bare, server_hostname="localhost") as s:
            s.sendall(f"<13>{text} no certificate\n".encode())
            s.recv(1)
    context.load_cert_chain(os.path.join(folder, "client.pem"), os.path.join(folder, "client.key"))
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", ingest.tls_port)), server_hostname="localhost"
    ) as s:
        frame = f"<13>1 - tlshost app - - - {text} over tls".encode()
        s.sendall(b"%d %s" % (len(frame), frame))
    [record] = ingest.wait_for(text)
    assert record["event"]["msg"] == f"{text} over tls"


# rsyslog forwarding to the adapter.


@needs_rsyslog
@needs_logger
def test_rsyslog_forwards_octet_counted(ingest, tmp_path):
    """rsyslog relays a logger message over TCP with octet counting; the counted LF is dropped."""
    work = tmp_path / "work"
    work.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        relay_port = s.getsockname()[1]
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{work}")\n'
        'module(load="imudp")\n'
        f'input(type="imudp" address="127.0.0.1" port="{relay_port}")\n'
        f'*.* action(type="omfwd" target="127.0.0.1" port="{ingest.port}" protocol="tcp" '
        'TCP_Framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format")\n'
    )
    with open(tmp_path / "rsyslog.out", "wb") as out:
        relay = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslog.pid")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    text = marker()
    try:
        # imudp may not listen yet: send until the first copy is through.
        deadline = time.monotonic() + 15
        while True:
            assert relay.poll() is None, (tmp_path / "rsyslog.out").read_text()
            subprocess.run(
                [LOGGER, "--udp", "-n", "127.0.0.1", "-P", str(relay_port), "--rfc3164",
                 "-t", "relayed", "-p", "auth.warning", f"via rsyslog {text}"],
                check=True,
            )
            try:
                records = ingest.wait_for(text, timeout=1.0)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
    finally:
        relay.terminate()
        relay.wait(10)
    event = records[0]["event"]
    assert event["format"] == "rfc5424"
    assert event["app_name"] == "relayed" and (event["facility"], event["severity"]) == (4, 4)
    # rsyslog puts MSG after a space of its own; the LF it counted is gone.
    assert event["msg"].strip() == f"via rsyslog {text}" and not event["msg"].endswith("\n")


# Hostile senders.


def test_ten_megabyte_line(ingest):
    """A 10 MB line is truncated to 64 KiB and marked; the next message on the connection is intact."""
    text = marker()
    with socket.create_connection(("127.0.0.1", ingest.port)) as s:
        s.sendall(f"<13>{text} huge ".encode() + b"A" * 10_000_000 + f"\n<13>{text} after\n".encode())
    records = ingest.wait_for(text, count=2, timeout=30)
    huge = [r["event"] for r in records if r["event"]["truncated"]]
    after = [r["event"] for r in records if r["event"]["msg"] == f"{text} after"]
    assert len(huge) == 1 and len(after) == 1
    assert len(base64.b64decode(huge[0]["raw_b64"])) == 65536
    deadline = time.monotonic() + 5
    while "truncated=" not in ingest.adapter_log():
        assert time.monotonic() < deadline, "the counters do not show the truncation"
        time.sleep(0.2)


@needs_logger
def test_slow_sender_and_thousand_connections(ingest):
    """A connection trickling a byte a second and 1,000 connections at once do not stop service."""
    text = marker()
    slow_message = f"<13>{text} slow\n".encode()
    slow = socket.create_connection(("127.0.0.1", ingest.port))
    stop = threading.Event()
    sent = [0]

    def trickle():
        while sent[0] < len(slow_message) - 1 and not stop.wait(1.0):
            slow.sendall(slow_message[sent[0] : sent[0] + 1])
            sent[0] += 1

    slow.sendall(slow_message[:1])
    sent[0] = 1
    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        started = time.monotonic()
        ingest.logger("--tcp", "--octet-count", message=f"{text} meanwhile")
        ingest.wait_for(f"{text} meanwhile", timeout=3)
        assert time.monotonic() - started < 3

        sockets = []
        try:
            for _ in range(CONNECTIONS):
                sockets.append(socket.create_connection(("127.0.0.1", ingest.port), timeout=10))
            for i, s in enumerate(sockets):
                s.sendall(f"<13>{text} crowd {i}\n".encode())
        finally:
            for s in sockets:
                s.close()
        ingest.logger("--udp", message=f"{text} after crowd")
        ingest.wait_for(f"{text} after crowd", timeout=10)
        crowd = ingest.wait_for(f"{text} crowd", count=CONNECTIONS, timeout=20)
        assert len({r["event"]["msg"] for r in crowd}) == CONNECTIONS
        # Keep being served while the trickle goes on for a few seconds.
        round = 0
        while sent[0] < 4:
            round += 1
            ingest.logger("--tcp", message=f"{text} round {round}")
            ingest.wait_for(f"{text} round {round}", timeout=2)
    finally:
        stop.set()
        trickler.join()
    slow.sendall(slow_message[sent[0] :])
    slow.close()
    [record] = ingest.wait_for(f"{text} slow")
    assert record["event"]["msg"] == f"{text} slow"
    assert ingest.adapter.poll() is None
