"""
A replica protects itself from clients at the connection level: hello
deadline, small frames before hello, caps on connections, and no reading
while replies pile up unread.
"""

import struct

from twisted.internet.address import IPv4Address
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory

from fit_broker.replica.protocol import ReplicaFactory, ReplicaProtocol
from fit_broker.replica.service import Replica, connection_limit
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.units import Request
from fit_broker.wire.codec import decode, encode_request
from tests.simnet import cluster_config

CONFIG = cluster_config(("events",), clients=("probe", "console"))
SCHEMES = scheme_lookup(CONFIG)
MiB = 1024 * 1024


def make_replica(**limits):
    clock = Clock()
    clock.advance(1_800_000_000)
    return Replica(CONFIG, 0, clock, SCHEMES, **limits)


def connect(replica, port=1):
    protocol = ReplicaProtocol(replica)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", port))
    protocol.makeConnection(transport)
    return protocol, transport


def hello(protocol, client="probe", seq=1):
    protocol.dataReceived(encode_request(Request(seq, "hello", options={"client": client})))


def replies(transport):
    data = transport.value()
    out = []
    while data:
        length = int.from_bytes(data[:4], "big")
        out.append(decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


def test_silent_connection_closed_at_hello_deadline():
    """A connection that says nothing is closed and counted when the hello deadline passes."""
    replica = make_replica(hello_timeout=10.0)
    protocol, transport = connect(replica)
    replica.clock.advance(9.9)
    assert not transport.disconnecting
    replica.clock.advance(0.2)
    assert transport.disconnecting
    assert replica.counters["hello-timeout"] == 1


def test_hello_in_time_stops_the_deadline():
    """A client that said hello stays connected past the deadline and gets the normal frame limit."""
    replica = make_replica(hello_timeout=10.0)
    protocol, transport = connect(replica)
    assert protocol.decoder.max_frame == 64 * 1024
    hello(protocol)
    replica.clock.advance(60)
    assert not transport.disconnecting
    assert protocol.decoder.max_frame == replica.max_frame
    assert "hello-timeout" not in replica.counters


def test_large_frame_before_hello_refused_before_buffering():
    """A 16 MiB frame announced before hello is refused on its header, so nothing of it is buffered."""
    replica = make_replica()
    protocol, transport = connect(replica)
    protocol.dataReceived(struct.pack(">I", 16 * MiB) + b"x" * 1000)
    assert transport.disconnecting
    assert replica.counters["bad-frame"] == 1
    assert protocol.decoder.buffered <= 1004
    assert "at most 65536 allowed" in replies(transport)[0].text


def test_large_frame_after_hello_accepted():
    """After hello a frame of 1 MiB is read, even when it shares a read with the hello."""
    replica = make_replica()
    protocol, transport = connect(replica)
    big = encode_request(Request(2, "status", options={"pad": "p" * MiB}))
    protocol.dataReceived(encode_request(Request(1, "hello", options={"client": "probe"})) + big)
    assert not transport.disconnecting
    assert [r.seq for r in replies(transport)] == [1, 2]
    assert "bad-frame" not in replica.counters


def test_large_frame_behind_a_bad_hello_refused():
    """A bad hello followed by a large frame in one read is refused without taking the large frame."""
    replica = make_replica()
    protocol, transport = connect(replica)
    big = encode_request(Request(2, "status", options={"pad": "p" * MiB}))
    protocol.dataReceived(encode_request(Request(1, "hello", options={"client": "mallory"})) + big)
    assert transport.disconnecting
    assert replica.counters["refused-hello"] == 1
    assert [r.seq for r in replies(transport)] == [1]


def test_oldest_silent_connection_makes_room():
    """Past the cap on connections waiting for hello, the oldest of them is closed, not the newcomer."""
    replica = make_replica(max_pre_hello=3)
    first, first_transport = connect(replica, 1)
    named, named_transport = connect(replica, 2)
    hello(named)
    others = [connect(replica, port) for port in (3, 4)]
    assert not first_transport.disconnecting
    newest, newest_transport = connect(replica, 5)
    assert first_transport.disconnecting
    assert not named_transport.disconnecting
    assert not any(t.disconnecting for _, t in others) and not newest_transport.disconnecting
    assert replica.counters["evicted-before-hello"] == 1
    hello(newest, "console")
    assert replies(newest_transport)[0].ok


def test_connections_per_client_capped_at_hello():
    """A client name may hold only so many connections; one more is refused at hello, and room comes back when one ends."""
    replica = make_replica(max_per_client=2)
    links = [connect(replica, port) for port in (1, 2, 3)]
    for protocol, _ in links[:2]:
        hello(protocol)
    hello(links[2][0])
    [refusal] = replies(links[2][1])
    assert refusal.status == "unauthorized" and "already holds 2 connections" in refusal.text
    assert replica.counters["refused-client-limit"] == 1
    hello(connect(replica, 4)[0], "console")
    links[0][0].connectionLost(None)
    again, again_transport = connect(replica, 5)
    hello(again)
    assert replies(again_transport)[0].ok
    assert replica.per_client == {"probe": 2, "console": 1}


def test_connections_over_the_total_cap_refused_at_once():
    """Past the total cap a new connection is closed as it arrives, counted, and not tracked."""
    replica = make_replica(max_connections=2)
    connect(replica, 1)
    connect(replica, 2)
    protocol, transport = connect(replica, 3)
    assert transport.disconnecting
    assert replica.counters["refused-connection-limit"] == 1
    assert protocol not in replica.connections and len(replica.connections) == 2
    protocol.connectionLost(None)
    assert "closed-before-hello" not in replica.counters


def test_connection_limit_follows_the_descriptor_limit():
    """The total cap is the soft descriptor limit less a margin, never below one."""
    assert connection_limit(64, lambda which: (1024, 4096)) == 960
    assert connection_limit(64, lambda which: (10, 4096)) == 1
    assert connection_limit() > 0


def test_refusals_logged_within_a_rate():
    """A flood of bad frames is counted in full but logged only a few times."""
    replica = make_replica(max_pre_hello=10_000)
    with capturedLogs() as events:
        for port in range(500):
            protocol, _ = connect(replica, port)
            protocol.dataReceived(b"\x00\x00\x00\x02\x09\x00")
    assert replica.counters["bad-frame"] == 500
    assert len([e for e in events if "dropping connection" in e.get("log_format", "")]) <= 21


def test_paused_connection_stops_reading_and_queues_requests():
    """While the transport's buffer is full the protocol stops reading and handles no requests; it catches up on resume."""
    replica = make_replica()
    protocol, transport = connect(replica)
    hello(protocol)
    transport.clear()
    transport.producer.pauseProducing()
    assert transport.producerState == "paused"
    protocol.dataReceived(b"".join(encode_request(Request(seq, "status")) for seq in range(2, 12)))
    assert transport.value() == b""
    transport.producer.resumeProducing()
    assert transport.producerState == "producing"
    assert [r.seq for r in replies(transport)] == list(range(2, 12))


def test_replies_that_fill_the_buffer_stop_the_rest():
    """When a reply fills the buffer mid-read, the requests after it wait until the buffer drains."""
    replica = make_replica()
    protocol, transport = connect(replica)
    hello(protocol)
    transport.clear()
    sent = []
    original_write = transport.write

    def write(data):
        original_write(data)
        sent.append(data)
        if len(sent) == 3:
            transport.producer.pauseProducing()

    transport.write = write
    protocol.dataReceived(b"".join(encode_request(Request(seq, "status")) for seq in range(2, 12)))
    assert len(sent) == 3 and transport.producerState == "paused"
    transport.producer.resumeProducing()
    assert len(sent) == 10


def test_pausing_under_tls_stops_the_socket_reading():
    """Under TLS the protocol's transport is the TLS layer, and pausing stops the TCP transport below it."""
    replica = make_replica()
    factory = TLSMemoryBIOFactory(CertificateOptions(), False, ReplicaFactory(replica))
    tls = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    tcp = StringTransport()
    tls.makeConnection(tcp)
    protocol = tls.wrappedProtocol
    assert protocol.transport is tls
    tcp.producer.pauseProducing()
    assert tcp.producerState == "paused"
    assert protocol._reading_paused
    tcp.producer.resumeProducing()
    assert tcp.producerState == "producing"


# Real sockets against one replica process (its descriptor limit set to 1024).

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from benchmarks.cluster import (  # noqa: E402
    child_env,
    free_ports,
    resident_kib,
    stop_processes,
    twistd,
    wait_for_port,
)
from tests.processes import ROOT, write_cluster  # noqa: E402


def _low_descriptor_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


class LoneReplica:
    def __init__(self, folder):
        self.folder = folder
        self.config_path, (self.port,) = write_cluster(folder, ["events"], replicas=1, faults=0)
        self.out = os.path.join(folder, "replica.out")
        with open(self.out, "ab") as out:
            self.process = subprocess.Popen(
                twistd() + ["-n", "fitbroker", "--config", self.config_path, "--replica-id", "0"],
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
                preexec_fn=_low_descriptor_limit,
            )
        try:
            wait_for_port(self.port, 60, self.process)
        except BaseException:
            stop_processes([self.process])
            raise

    def rss_mib(self):
        return resident_kib(self.process.pid)[0] / 1024

    def descriptors(self):
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def log(self):
        with open(self.out, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def cli(self, *args):
        return subprocess.run(
            [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
             *args, "--config", self.config_path],
            cwd=ROOT, capture_output=True, timeout=60, env=child_env(),
        )

    def counters(self):
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
    replica = LoneReplica(str(tmp_path_factory.mktemp("guard")))
    try:
        yield replica
    finally:
        stop_processes([replica.process])


def _hello(sock):
    sock.sendall(encode_request(Request(1, "hello", options={"client": "probe"})))
    header = _recv_exactly(sock, 4)
    reply = decode(_recv_exactly(sock, int.from_bytes(header, "big")))
    assert reply.ok, reply


def _recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


@pytest.mark.integration
def test_large_frames_before_hello_do_not_grow_the_replica(lone):
    """Forty connections announcing 16 MiB frames before hello are cut off at once; the replica's memory stays put."""
    before = lone.rss_mib()
    sockets = []
    body = b"\x01" * (4 * MiB)
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", lone.port), 5)
        sockets.append(sock)
        try:
            sock.sendall(struct.pack(">I", 16 * MiB) + body)
        except OSError:
            pass  # cut off, as it should be
    time.sleep(0.5)
    growth = lone.rss_mib() - before
    closed = 0
    for sock in sockets:
        sock.settimeout(5)
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except OSError:
            closed += 1
        sock.close()
    assert closed == 40
    assert growth < 20, f"replica grew by {growth:.0f} MiB"
    assert lone.counters()  # still serving


def _open_idle(port, count, batch=25):
    """
    Open C{count} connections that say nothing, a few at a time so that the
    listen backlog does not overflow (a dropped SYN costs a second).
    """
    sockets = []
    while len(sockets) < count:
        pending = []
        for _ in range(min(batch, count - len(sockets))):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            pending.append(sock)
        sockets += pending
        poller = select.poll()
        for sock in pending:
            poller.register(sock, select.POLLOUT)
        waiting = {sock.fileno() for sock in pending}
        deadline = time.monotonic() + 10
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(1000):
                waiting.discard(fd)
                poller.unregister(fd)
        assert not waiting, "connections did not complete"
        time.sleep(0.01)
    return sockets


@pytest.mark.integration
def test_idle_connections_do_not_lock_out_an_honest_client(lone):
    """Two thousand idle sockets leave the replica within its descriptors, and a client that says hello still publishes."""
    sockets = []
    try:
        sockets = _open_idle(lone.port, 2000)
        time.sleep(0.5)
        assert lone.descriptors() < 128 + 64
        result = lone.cli("publish", "events", "honest")
        assert result.returncode == 0, result.stderr
    finally:
        for sock in sockets:
            sock.close()
    evictions = [line for line in lone.log().splitlines() if "is the oldest" in line]
    assert 20 <= len(evictions) <= 30


@pytest.mark.integration
def test_unread_status_flood_stops_the_replica_reading(lone):
    """A client sending 300k status requests and reading no reply cannot grow the replica: it stops reading."""
    sock = socket.create_connection(("127.0.0.1", lone.port), 5)
    _hello(sock)
    before = lone.rss_mib()
    request = encode_request(Request(2, "status"))
    chunk = request * 1000
    sock.setblocking(False)
    sent, stalled_since = 0, None
    while sent < 300_000 * len(request):
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 3:
                break
            time.sleep(0.05)
    growth = lone.rss_mib() - before
    assert sent < 300_000 * len(request), "the replica read every request"
    assert growth < 30, f"replica grew by {growth:.0f} MiB"
    # reading our replies lets it go on
    sock.setblocking(True)
    sock.settimeout(10)
    got = 0
    while got < 4 * MiB:
        got += len(sock.recv(1 << 20))
    sock.close()
    assert got >= 4 * MiB


# The same over mutual TLS, where the protocol's transport is the TLS layer.


@pytest.fixture(scope="module")
def tls_replica(tmp_path_factory):
    from fit_broker.config import load_config
    from fit_broker.pki import replica_hostname

    folder = str(tmp_path_factory.mktemp("guard-tls"))
    directory = os.path.join(folder, "c")
    base = free_ports(1)[0]
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())",
         "init", directory, "--replicas", "1", "--faults", "0", "--clients", "probe",
         "--first-port", str(base)],
        cwd=ROOT, capture_output=True, timeout=120, env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    path = os.path.join(directory, "cluster.toml")
    config = load_config(path)
    port = int(config.replicas[0].connect.rsplit(":", 1)[1])
    out = open(os.path.join(folder, "replica.out"), "ab")
    process = subprocess.Popen(
        twistd() + ["-n", "fitbroker", "--config", path, "--replica-id", "0"],
        cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
    )
    out.close()
    try:
        wait_for_port(port, 60, process)
        from fit_broker.keys import party_directory

        party = party_directory(directory, "probe")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(os.path.join(party, "ca.crt"))
        context.load_cert_chain(os.path.join(party, "tls.crt"), os.path.join(party, "tls.key"))

        def connect():
            raw = socket.create_connection(("127.0.0.1", port), 5)
            return context.wrap_socket(raw, server_hostname=replica_hostname(config.name, 0))

        yield process, connect
    finally:
        stop_processes([process])


@pytest.mark.integration
def test_unread_status_flood_over_tls_stops_the_replica_reading(tls_replica):
    """Over TLS too, a client that never reads its replies makes the replica stop reading, not grow."""
    process, connect = tls_replica
    sock = connect()
    _hello(sock)
    before = resident_kib(process.pid)[0] / 1024
    request = encode_request(Request(2, "status"))
    chunk = request * 1000
    total = 300_000 * len(request)
    sent = 0
    sock.settimeout(3)
    try:
        while sent < total:
            sent += sock.send(chunk)
    except (TimeoutError, ssl.SSLWantWriteError, socket.timeout):
        pass
    growth = resident_kib(process.pid)[0] / 1024 - before
    assert sent < total, "the replica read every request"
    assert growth < 30, f"replica grew by {growth:.0f} MiB"
    sock.close()


@pytest.mark.integration
def test_bad_frame_over_tls_closes_promptly(tls_replica):
    """A client sending garbage after hello over TLS is cut off at once, not held open by the registered producer."""
    _, connect = tls_replica
    sock = connect()
    _hello(sock)
    sock.sendall(b"\x00\x00\x00\x02\x09\x00")
    sock.settimeout(3)
    started = time.monotonic()
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    assert time.monotonic() - started < 2
    assert b"unsupported protocol version" in received
    sock.close()
