"""
Links between replicas: keys from `fitbroker init`, four replicas in one
process on 127.0.0.1 linking up over plain TCP and mutual TLS, impostors and
tampered frames refused, restarts reconnected, and sends bounded.
"""

import json
import os
import time

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs, formatEvent

from benchmarks.cluster import free_ports
from fit_broker import keys as keyfiles
from fit_broker import pki
from fit_broker.config import load_config
from fit_broker.credentials import replica_credentials, replica_peer_tls
from fit_broker.init import cluster_toml, init_cluster, sample_channels
from fit_broker.replica.peers import FrameChecker, FrameSealer, PeerLinks
from fit_broker.replica.service import make_replica_service
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.tls import client_tls_options
from fit_broker.units import Reply, Request
from fit_broker.wire.codec import PeerFrame, decode, encode_peer_frame, encode_reply, encode_request
from fit_broker.wire.framing import FrameDecoder

NAME = "peers"
#: Connections the test opened by hand, closed when it ends.
ROGUES = []
CLIENTS = ["local", "probe"]


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    """One cluster's keys, written by init, shared by the module's clusters."""
    folder = str(tmp_path_factory.mktemp("peers") / "c")
    init_cluster(folder, clients=CLIENTS, name=NAME)
    return folder


def write_config(folder, tls, keys=True):
    """Write a 4-replica cluster file on fresh ports into C{folder}; return its config."""
    ports = free_ports(4)
    if keys:
        channels = [row for row in sample_channels(CLIENTS) if row[2] != "ordered"]
    else:
        channels = [("health", "health", "standard", "cft", "si", CLIENTS, CLIENTS)]
    # no administrators and no ordered channel: the replicas run no ordering
    # protocol, so the frames on their links are the test's alone
    text = cluster_toml(
        NAME, 1, ports, CLIENTS, channels, keys_dir="." if keys else None, tls=tls, admins=[]
    )
    path = os.path.join(folder, f"cluster-{ports[0]}.toml")
    with open(path, "w") as f:
        f.write(text)
    return load_config(path)


def unframe(data):
    """Decode one encoded frame, length prefix and all."""
    (payload,) = FrameDecoder().feed(data)
    return decode(payload)


def port_of(config, index):
    return int(config.replicas[index].connect.rsplit(":", 1)[1])


@pytest.fixture
def reactor():
    """
    The global reactor, turned by hand: TLS connections time their writes
    with it whatever reactor they run on.
    """
    from twisted.internet import reactor

    yield reactor
    while ROGUES:
        rogue = ROGUES.pop()
        if not rogue.lost:
            rogue.transport.abortConnection()
            run_until(reactor, lambda: rogue.lost)
    for _ in range(3):
        reactor.iterate(0)


def run_until(reactor, done, timeout=15.0):
    """Turn the reactor until C{done()} holds; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {done.__doc__ or done}")
        reactor.iterate(0.01)


def run_for(reactor, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reactor.iterate(0.01)


def wait(reactor, deferred, timeout=15.0):
    result = []
    deferred.addBoth(result.append)
    run_until(reactor, lambda: result, timeout)
    return result[0]


class Cluster:
    """Replicas of C{config} as services in this process, recording their frames."""

    def __init__(self, reactor, config):
        self.reactor = reactor
        self.config = config
        self.services = {}
        self.received = {i: [] for i in range(4)}

    def start(self, index):
        keys, tls_options, identify = replica_credentials(self.config, index)
        service = make_replica_service(
            self.config, index, self.reactor, scheme_lookup(self.config), keys,
            identify=identify, tls_options=tls_options,
            on_peer_message=lambda sender, kind, body: self.received[index].append(
                (sender, kind, body)
            ),
        )
        service.startService()
        self.services[index] = service
        return service.peers

    def stop(self, index):
        wait(self.reactor, self.services.pop(index).stopService())

    def stop_all(self):
        for index in list(self.services):
            self.stop(index)

    def peers(self, index):
        return self.services[index].peers

    def linked(self):
        """every running replica's links to every other running one are up"""
        running = set(self.services)
        return all(self.peers(i).up == running - {i} for i in running)

    def heard(self):
        """every running replica heard a valid frame from every other running one"""
        running = set(self.services)
        return all(self.peers(i).incoming == running - {i} for i in running)


@pytest.fixture
def cluster_of(reactor):
    made = []

    def make(config):
        cluster = Cluster(reactor, config)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop_all()


class Rogue(Protocol):
    """A party that speaks the wire by hand: sends what it is told, keeps what it gets."""

    def __init__(self):
        self.decoder = FrameDecoder()
        self.messages = []
        self.lost = False

    def dataReceived(self, data):
        self.messages.extend(decode(p) for p in self.decoder.feed(data))

    def connectionLost(self, reason):
        self.lost = True

    def hello(self, reactor, replica, cluster=NAME):
        self.transport.write(
            encode_request(Request(0, "hello", options={"replica": replica, "cluster": cluster}))
        )
        run_until(reactor, lambda: self.messages or self.lost)
        return self.messages[0] if self.messages else None


def rogue_connect(reactor, port, tls=None):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    rogue = wait(reactor, endpoint.connect(Factory.forProtocol(Rogue)))
    ROGUES.append(rogue)
    return rogue


def tls_as(keys_dir, identity, server_index):
    """Client TLS options presenting C{identity}'s certificate to replica C{server_index}."""
    material = pki.load_tls_material(keys_dir, identity)
    return client_tls_options(
        material.ca_pem, material.cert_pem, material.key_pem,
        pki.replica_hostname(NAME, server_index),
    )


# Keys.


def test_init_writes_replica_link_keys(keys_dir):
    """Each pair of replicas shares one MAC key of its own; each replica signs with a key every replica can verify."""
    rings = [keyfiles.load_keyring(keys_dir, f"replica-{r}") for r in range(4)]
    pair_keys = set()
    for a in range(4):
        assert rings[a].peer_mac_key(a) is None
        for b in range(4):
            if a != b:
                assert rings[a].peer_mac_key(b) == rings[b].peer_mac_key(a)
                assert len(rings[a].peer_mac_key(b)) == 32
                pair_keys.add(rings[a].peer_mac_key(b))
        signature = rings[a].replica_signing_key.sign(b"value")
        for other in rings:
            other.replica_verify_key(a).verify(signature, b"value")
    assert len(pair_keys) == 6
    client = keyfiles.load_keyring(keys_dir, "probe")
    assert client.replica_signing_key is None and client.peer_mac_key(0) is None
    assert "<key>" in repr(rings[0]) and repr(rings[0].peer_mac_key(1))[2:20] not in repr(rings[0])


def _strip_link_keys(folder, replica):
    """Make replica C{replica}'s key files look like those written before replicas linked up."""
    party = os.path.join(folder, "replicas", f"replica-{replica}")
    for name, fields in (
        ("mac-keys.json", ("peer_mac_keys", "replica_signing_key")),
        ("verify-keys.json", ("replica_verify_keys",)),
    ):
        path = os.path.join(party, name)
        with open(path) as f:
            data = json.load(f)
        for field in fields:
            data.pop(field)
        write = keyfiles.write_private_file if name == "mac-keys.json" else keyfiles.write_public_file
        write(path, json.dumps(data).encode())


def _files(folder):
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return found


def test_reused_older_folder_gains_link_keys_and_keeps_the_rest(tmp_path):
    """Init with reuse_keys on a folder from before replicas linked up adds their keys and changes no other key."""
    folder = str(tmp_path / "c")
    init_cluster(folder, clients=CLIENTS, name=NAME)
    for r in range(4):
        _strip_link_keys(folder, r)
    old = keyfiles.load_keyring(folder, "replica-1")
    assert old.peer_mac_key(0) is None and old.replica_signing_key is None
    assert old.replica_verify_key(1) is None
    before = _files(folder)

    init_cluster(folder, clients=CLIENTS, name=NAME, reuse_keys=True)
    rings = [keyfiles.load_keyring(folder, f"replica-{r}") for r in range(4)]
    for a in range(4):
        for b in range(4):
            if a != b:
                assert rings[a].peer_mac_key(b) == rings[b].peer_mac_key(a) is not None
        assert rings[a].replica_verify_key(a).public_bytes_raw() == (
            rings[a].replica_signing_key.public_key().public_bytes_raw()
        )
    assert rings[1].mac_keys == old.mac_keys and rings[1].verify_keys.keys() == old.verify_keys.keys()
    after = _files(folder)
    assert set(after) == set(before)
    changed = {path for path in before if before[path] != after[path]}
    assert changed == {
        f"replicas/replica-{r}/{name}" for r in range(4) for name in ("mac-keys.json", "verify-keys.json")
    }
    for r in range(4):
        mode = os.stat(os.path.join(folder, "replicas", f"replica-{r}", "mac-keys.json")).st_mode
        assert mode & 0o777 == 0o600

    # a replica whose files alone are old gets the keys the others hold
    _strip_link_keys(folder, 2)
    init_cluster(folder, clients=CLIENTS, name=NAME, reuse_keys=True)
    again = [keyfiles.load_keyring(folder, f"replica-{r}") for r in range(4)]
    for r in (0, 1, 3):
        assert again[r].peer_mac_keys == rings[r].peer_mac_keys
        assert again[2].peer_mac_key(r) == rings[r].peer_mac_key(2)
    assert keyfiles.complete_replica_keys(folder, 4, NAME) == []


def test_replicas_holding_different_link_keys_are_named(tmp_path):
    """Two replicas that disagree on their link's key stop init with one line naming both."""
    folder = str(tmp_path / "c")
    init_cluster(folder, clients=CLIENTS, name=NAME)
    party = os.path.join(folder, "replicas", "replica-0")
    path = os.path.join(party, "mac-keys.json")
    with open(path) as f:
        data = json.load(f)
    data["peer_mac_keys"][0]["key"] = "A" * 43 + "="
    keyfiles.write_private_file(path, json.dumps(data).encode())
    with pytest.raises(Exception, match="replica-0 and replica-1 hold different keys"):
        init_cluster(folder, clients=CLIENTS, name=NAME, reuse_keys=True)


# Frames, sans-IO.


def test_checker_takes_each_good_frame_once_and_resets_after_two_bad():
    """A frame passes once; a wrong sender, a replay or an unknown kind is dropped, and two in a row reset."""
    sealer = FrameSealer(0, 1, b"k" * 32, b"n" * 16)
    checker = FrameChecker(0, 1, b"k" * 32, b"n" * 16)
    first = unframe(sealer.seal("agreement", b"a"))
    assert checker.check(first) is None
    assert checker.check(first) == "bad-counter"
    assert not checker.should_reset
    assert checker.check(unframe(sealer.seal("fetch", b"b"))) is None
    assert checker.check(first._replace(sender=2)) == "bad-sender"
    assert checker.check(unframe(sealer.seal("gossip", b"c"))) == "bad-kind"
    assert checker.should_reset
    other_link = FrameChecker(0, 1, b"k" * 32, b"m" * 16)
    assert other_link.check(first) == "bad-mac"
    # without keys (TLS proved the sender) the empty MAC passes
    tls_only = FrameChecker(0, 1, None, b"n" * 16)
    assert tls_only.check(unframe(FrameSealer(0, 1, None, b"n" * 16).seal("agreement", b"x"))) is None


# Four replicas on real sockets.


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_every_pair_exchanges_frames(reactor, cluster_of, keys_dir, tls):
    """Every replica links to every other and each frame sent arrives once at its peer."""
    cluster = cluster_of(write_config(keys_dir, tls))
    for i in range(4):
        cluster.start(i)
    run_until(reactor, cluster.linked)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert cluster.peers(i).send(j, "agreement", f"{i}->{j}".encode()) is True
        assert cluster.peers(i).broadcast("fetch", f"all from {i}".encode()) == 3

    def arrived():
        """every frame arrived"""
        return all(len(cluster.received[j]) == 6 for j in range(4))

    run_until(reactor, arrived)
    assert cluster.heard()
    for j in range(4):
        assert sorted(cluster.received[j]) == sorted(
            [(i, "agreement", f"{i}->{j}".encode()) for i in range(4) if i != j]
            + [(i, "fetch", f"all from {i}".encode()) for i in range(4) if i != j]
        )
        for i in range(4):
            if i != j:
                counters = cluster.peers(j).counters[i]
                assert counters["sent"] == 2 and counters["received"] == 2
                assert counters["dropped"] == counters["bad-mac"] == 0, {k: v for k, v in counters.items() if v}
    # a client still talks to a replica that carries peer links
    client = rogue_connect(
        reactor, port_of(cluster.config, 0), tls_as(keys_dir, "local", 0) if tls else None
    )
    client.transport.write(encode_request(Request(0, "hello", options={"client": "local"})))
    run_until(reactor, lambda: client.messages)
    assert client.messages[0].ok and client.messages[0].info["replica"] == 0


def test_impostor_certificates_refused(reactor, cluster_of, keys_dir):
    """Over TLS a hello as replica 0 is refused from replica 2's certificate and from a client's."""
    cluster = cluster_of(write_config(keys_dir, tls=True))
    cluster.start(1)
    port = port_of(cluster.config, 1)
    for identity in ("replica-2", "local"):
        rogue = rogue_connect(reactor, port, tls_as(keys_dir, identity, 1))
        reply = rogue.hello(reactor, 0)
        assert reply.status == "unauthorized"
        assert f"a hello as replica-0 but its certificate says {identity!r}" in reply.text
        run_until(reactor, lambda: rogue.lost)
    assert cluster.peers(1).counters[0]["hello-refused"] == 2
    assert cluster.peers(1).incoming == set()
    # replica 2's certificate does prove replica 2
    honest = rogue_connect(reactor, port, tls_as(keys_dir, "replica-2", 1))
    reply = honest.hello(reactor, 2)
    assert reply.ok and reply.info["replica"] == 1 and len(reply.info["nonce"]) == 16
    # a hello that claims this replica itself, or one out of range, is refused too
    for claim in (1, 7):
        rogue = rogue_connect(reactor, port, tls_as(keys_dir, "replica-2", 1))
        assert rogue.hello(reactor, claim).status == "unauthorized"


def test_replica_checks_the_certificate_of_the_replica_it_reaches(reactor, cluster_of, keys_dir):
    """Replica 0's link to replica 2 does not come up when replica 1 answers in its place."""
    cluster = cluster_of(write_config(keys_dir, tls=True))
    cluster.start(1)
    config = cluster.config
    closed = TCP4ClientEndpoint(reactor, "127.0.0.1", free_ports(1)[0])
    endpoints = {1: closed, 2: TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(config, 1)), 3: closed}
    links = PeerLinks(
        0, config, reactor, keyfiles.load_keyring(keys_dir, "replica-0"),
        replica_peer_tls(config, 0), lambda *a: None, endpoints=endpoints,
    )
    links.startService()
    try:
        run_until(reactor, lambda: links.counters[2]["lost-before-hello"] >= 2)
        assert links.up == set() and links.counters[2]["connects"] == 0
        assert cluster.peers(1).counters[0]["hello-refused"] == 0
    finally:
        wait(reactor, links.stopService())


def test_tampered_and_replayed_frames_dropped_and_counted(reactor, cluster_of, keys_dir):
    """A frame with a bad MAC, an old counter or an unknown kind is counted and dropped; two bad in a row reset the link."""
    cluster = cluster_of(write_config(keys_dir, tls=False))
    cluster.start(1)
    port = port_of(cluster.config, 1)
    key = keyfiles.load_keyring(keys_dir, "replica-0").peer_mac_key(1)
    rogue = rogue_connect(reactor, port)
    reply = rogue.hello(reactor, 0)
    assert reply.ok
    sealer = FrameSealer(0, 1, key, reply.info["nonce"])
    one = sealer.seal("agreement", b"one")
    rogue.transport.write(one)
    tampered = unframe(sealer.seal("agreement", b"two"))
    rogue.transport.write(encode_peer_frame(0, tampered.counter, "agreement", b"two!", tampered.mac))
    rogue.transport.write(sealer.seal("agreement", b"three"))
    counters = cluster.peers(1).counters[0]
    run_until(reactor, lambda: counters["received"] == 2)
    assert cluster.received[1] == [(0, "agreement", b"one"), (0, "agreement", b"three")]
    assert counters["bad-mac"] == 1 and counters["resets"] == 0 and not rogue.lost
    rogue.transport.write(one)  # replayed
    rogue.transport.write(sealer.seal("gossip", b"four"))
    run_until(reactor, lambda: rogue.lost)
    assert counters["bad-counter"] == 1 and counters["bad-kind"] == 1 and counters["resets"] == 1
    # a frame recorded on one connection fails on the next: each has its own nonce
    again = rogue_connect(reactor, port)
    assert again.hello(reactor, 0).ok
    again.transport.write(one)
    run_until(reactor, lambda: counters["bad-mac"] == 2)
    assert len(cluster.received[1]) == 2


def test_restarted_replica_is_reconnected_and_frames_to_it_meanwhile_dropped(
    reactor, cluster_of, keys_dir
):
    """A replica stopped is dropped from the others' links, frames to it are counted as dropped, and it is linked again once restarted."""
    cluster = cluster_of(write_config(keys_dir, tls=True))
    for i in range(4):
        cluster.start(i)
    run_until(reactor, cluster.linked)
    cluster.stop(2)
    run_until(reactor, cluster.linked)  # the other three, without 2
    links = cluster.peers(0)
    run_until(reactor, lambda: 2 not in links.incoming)
    assert 2 not in links.up
    assert links.send(2, "agreement", b"lost") is False
    assert links.counters[2]["dropped"] == links.counters[2]["dropped-down"] == 1
    cluster.start(2)
    run_until(reactor, cluster.linked)
    assert links.counters[2]["connects"] == 2
    assert links.send(2, "agreement", b"welcome back") is True
    assert cluster.peers(2).send(0, "agreement", b"thanks") is True
    run_until(reactor, lambda: (2, "agreement", b"thanks") in cluster.received[0])
    run_until(reactor, lambda: (0, "agreement", b"welcome back") in cluster.received[2])
    assert b"lost" not in [body for _, _, body in cluster.received[2]]


def test_without_keys_or_tls_links_are_refused_in_one_line(reactor, cluster_of, tmp_path):
    """A cluster with no keys folder and TLS off links no replicas, says so in one log line, and refuses a peer's hello."""
    cluster = cluster_of(write_config(str(tmp_path), tls=False, keys=False))
    with capturedLogs() as events:
        cluster.start(0)
        cluster.start(1)
        run_for(reactor, 0.5)
    lines = [formatEvent(e) for e in events if "are off" in formatEvent(e)]
    assert len(lines) == 2 and "links with replicas [1, 2, 3] are off" in lines[0]
    assert cluster.peers(0).up == set() and cluster.peers(1).incoming == set()
    rogue = rogue_connect(reactor, port_of(cluster.config, 1))
    reply = rogue.hello(reactor, 0)
    assert reply.status == "unauthorized" and "need MAC keys" in reply.text
    with pytest.raises(ValueError, match="not a peer of replica 0"):
        cluster.peers(0).send(0, "agreement", b"")
    with pytest.raises(ValueError, match="unknown frame kind"):
        cluster.peers(0).send(1, "gossip", b"")


class Sluggard(Protocol):
    """A peer that answers the hello and then reads nothing."""

    def dataReceived(self, data):
        if getattr(self, "answered", False):
            return
        self.answered = True
        self.transport.write(
            encode_reply(Reply(0, "ok", info={"replica": 1, "cluster": NAME, "nonce": b"n" * 16}))
        )
        self.transport.pauseProducing()


def test_sends_to_a_peer_that_reads_nothing_are_bounded(reactor, keys_dir):
    """Frames for a peer that stopped reading are dropped past the byte bound, and the peer is cut off once it stalls too long."""
    config = write_config(keys_dir, tls=False)
    server = reactor.listenTCP(0, Factory.forProtocol(Sluggard), interface="127.0.0.1")
    closed = TCP4ClientEndpoint(reactor, "127.0.0.1", free_ports(1)[0])
    endpoints = {1: TCP4ClientEndpoint(reactor, "127.0.0.1", server.getHost().port), 2: closed, 3: closed}
    keys = keyfiles.load_keyring(keys_dir, "replica-0")
    links = PeerLinks(
        0, config, reactor, keys, None, lambda *a: None, endpoints=endpoints,
        max_buffered_bytes=1 << 20, stall_timeout=1.0,
    )
    links.startService()
    try:
        run_until(reactor, lambda: links.up == {1})
        link = links._outgoing[1]
        body = b"x" * 65536
        counters = links.counters[1]

        def dropped():
            """sends dropped for a full buffer"""
            for _ in range(64):
                links.send(1, "agreement", body)
            reactor.iterate(0.01)
            return counters["dropped-full"] > 0

        run_until(reactor, dropped, timeout=30)
        assert link.pending_bytes <= 1 << 20
        assert counters["dropped"] == counters["dropped-full"]
        started = time.monotonic()

        def cut_off():
            """the link cut for reading nothing"""
            dropped()
            return 1 not in links.up

        run_until(reactor, cut_off, timeout=30)
        assert time.monotonic() - started >= 0.9
        assert counters["stalled"] == 1
    finally:
        wait(reactor, links.stopService())
        wait(reactor, server.stopListening())
