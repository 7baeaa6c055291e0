"""
Unit tests of the agreement engine (fit_broker/agreement): each message
kind and each rule, on small clusters joined by an in-memory queue.
"""

import hashlib
from collections import deque

import msgpack
import pytest
from zope.interface.verify import verifyObject

from fit_broker.agreement import messages as M
from fit_broker.agreement.crypto import ReplicaCrypto, generate
from fit_broker.agreement.effects import Decided, Effects
from fit_broker.agreement.engine import Orderer
from fit_broker.agreement.values import decode_value, encode_value, value_key
from fit_broker.interfaces import IOrderingProtocol
from tests.agreement_sim import FastCrypto


class Cluster:
    """
    n engines joined by a FIFO queue; C{block(src, dst, message)} may drop.
    """

    def __init__(self, n=4, f=1, byzantine=True, validate=None, **options):
        self.keys = {i: bytes([i + 1]) * 32 for i in range(n)}
        self.n, self.f = n, f
        options.setdefault("leader_timeout", 1.0)
        self.options = dict(options, validate=validate)
        self.byzantine = byzantine
        self.nodes = [self.make(i) for i in range(n)]
        self.queue = deque()
        self.decided = {i: [] for i in range(n)}
        self.restored = {i: [] for i in range(n)}
        self.states = {i: [] for i in range(n)}
        self.down = set()
        self.block = None
        self.now = 0.0
        self.sent = []

    def make(self, i, **extra):
        return Orderer(i, self.n, self.f, self.byzantine, FastCrypto(i, self.keys), **dict(self.options, **extra))

    def state(self, i):
        return hashlib.sha256(repr(self.states[i]).encode()).digest()

    def handle(self, i, effects):
        if effects.restore is not None:
            self.restored[i].append(effects.restore)
            self.states[i] = [("restored", effects.restore[1])]
        for d in effects.decided:
            self.decided[i].append(d)
            self.states[i].append((d.instance, d.values))
            if d.instance in effects.checkpoints:
                self.handle(i, self.nodes[i].checkpoint(d.instance, self.state(i), self.now))
        for to, message in effects.messages:
            self.sent.append((i, to, message))
            for j in (range(self.n) if to is None else (to,)):
                if j != i:
                    self.queue.append((i, j, message))

    def submit(self, values, to=None):
        for i in (range(self.n) if to is None else to):
            if i not in self.down:
                self.handle(i, self.nodes[i].submit(values, self.now))

    def run(self, limit=100_000):
        while self.queue and limit:
            limit -= 1
            src, dst, message = self.queue.popleft()
            if dst in self.down or src in self.down:
                continue
            if self.block is not None and self.block(src, dst, message):
                continue
            self.handle(dst, self.nodes[dst].receive(src, message, self.now))

    def advance(self, seconds, step=0.05):
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for i, node in enumerate(self.nodes):
                if i not in self.down:
                    self.handle(i, node.tick(self.now))
            self.run()

    def values_at(self, i):
        return [v for d in self.decided[i] for v in d.values]


def kind_of(message):
    return M.decode(message)[0]


def values(count, tag="v"):
    return [(tag, k, b"x" * 10) for k in range(count)]


# --- values, effects, crypto, messages ---------------------------------------------


def test_value_key_is_sha256_of_msgpack():
    """A value's key is the sha256 of its msgpack encoding (bytes as msgpack bin)."""
    value = ("batch", "tag", "pub", 1, 2, b"\x00" * 32, 1.5, 60.0, 100)
    assert value_key(value) == hashlib.sha256(msgpack.packb(value, use_bin_type=True)).digest()
    assert decode_value(encode_value(value)) == value


def test_decode_value_rejects_non_canonical_and_bad_shapes():
    """Decoding a value refuses encodings that do not re-encode identically, and non-tuples."""
    assert decode_value(b"\x91\x01") == (1,)
    with pytest.raises(ValueError):
        decode_value(b"\x91\xd0\x01")  # 1 as int8: not canonical
    with pytest.raises(ValueError):
        decode_value(msgpack.packb(5))
    with pytest.raises(ValueError):
        decode_value(msgpack.packb([{"a": 1}]))


def test_effects_merge_concatenates_and_restore_supersedes():
    """Merging effects concatenates messages and decisions; a later restore replaces earlier decisions."""
    a = Effects(messages=((1, b"a"),), decided=(Decided(1, 0.0, ()),), checkpoints=(1,))
    b = Effects(messages=((None, b"b"),), decided=(Decided(2, 0.0, ()),))
    merged = a.merge(b)
    assert merged.messages == ((1, b"a"), (None, b"b"))
    assert [d.instance for d in merged.decided] == [1, 2] and merged.checkpoints == (1,)
    r = Effects(decided=(Decided(9, 0.0, ()),), restore=(8, b"s"))
    assert a.merge(r).decided == r.decided and a.merge(r).restore == (8, b"s")


def test_ed25519_crypto_signs_and_verifies():
    """ReplicaCrypto signatures verify under the signer's key only."""
    a, b = generate(2)
    signature = a.sign(b"payload")
    assert b.verify(0, b"payload", signature)
    assert not b.verify(1, b"payload", signature)
    assert not b.verify(0, b"other", signature)
    raw = ReplicaCrypto(0, a._signing_key, {0: a._verify_keys[0]})
    assert raw.verify(0, b"payload", raw.sign(b"payload"))


ROUND_TRIPS = [
    M.encode_have((b"\x91\x01",)),
    M.encode_propose(1, 0, 2.5, (b"\x91\x01",)),
    M.encode_write(1, 0, bytes(32), b"s"),
    M.encode_accept(1, 0, bytes(32), b"s"),
    M.encode_value_request(1, bytes(32)),
    M.encode_value_reply(1, 2.5, (b"\x91\x01",)),
    M.encode_stop(3, 7),
    M.encode_stopdata(M.encode_stopdata_body(1, 0, None, None), b"s"),
    M.encode_sync(1, ((0, M.encode_stopdata_body(1, 0, None, None), b"s"),), None),
    M.encode_checkpoint(4, bytes(32), b"s"),
    M.encode_state_request(5),
    M.encode_state_reply(3, False, None, ((1, 0, 1.0, (b"\x91\x01",), ((0, b"s"),)),)),
    M.encode_status(2, 9),
]


@pytest.mark.parametrize("message", ROUND_TRIPS, ids=lambda m: M.KIND_NAMES[m[2]])
def test_each_message_kind_decodes(message):
    """Every message kind decodes from its encoder's bytes into a tuple led by its kind."""
    decoded = M.decode(message)
    assert decoded[0] == message[2]


MALFORMED = [
    b"",
    b"\x02\x91\x01",  # wrong version
    b"\x01\xc1",  # not msgpack
    b"\x01\x81\x01\x02",  # a map
    b"\x01" + msgpack.packb([99, 1]),  # unknown kind
    b"\x01" + msgpack.packb([M.HAVE, [1, 2]]),  # values not bytes
    b"\x01" + msgpack.packb([M.HAVE, [b""]]),  # empty value
    b"\x01" + msgpack.packb([M.PROPOSE, 0, 0, 1.0, []]),  # instance 0
    b"\x01" + msgpack.packb([M.PROPOSE, 1, -1, 1.0, []]),  # negative regency
    b"\x01" + msgpack.packb([M.PROPOSE, 1, 0, float("nan"), []]),
    b"\x01" + msgpack.packb([M.PROPOSE, 1, 0, "now", []]),
    b"\x01" + msgpack.packb([M.WRITE, 1, 0, b"short", b""]),
    b"\x01" + msgpack.packb([M.ACCEPT, 1, 0, bytes(32), "sig"]),
    b"\x01" + msgpack.packb([M.ACCEPT, 1, 0, bytes(32), b"x" * 300]),
    b"\x01" + msgpack.packb([M.VALUE_REQUEST, 1]),
    b"\x01" + msgpack.packb([M.VALUE_REPLY, 1, 1.0, b"x"]),
    b"\x01" + msgpack.packb([M.STOP, 1.5, 0]),
    b"\x01" + msgpack.packb([M.STOPDATA, "body", b""]),
    b"\x01" + msgpack.packb([M.SYNC, 1, [[0, b"b"]], None]),
    b"\x01" + msgpack.packb([M.SYNC, 1, [], [1.0]]),
    b"\x01" + msgpack.packb([M.CHECKPOINT, 1, bytes(31), b""]),
    b"\x01" + msgpack.packb([M.STATE_REQUEST, 0]),
    b"\x01" + msgpack.packb([M.STATE_REPLY, 1, 0, None, [], None]),  # flag not a boolean
    b"\x01" + msgpack.packb([M.STATE_REPLY, 1, False, [1, bytes(32), b"s"], [], None]),
    b"\x01" + msgpack.packb([M.STATE_REPLY, 1, False, None, [[1, 0, 1.0, [b"v"], [[0]]]], None]),
    b"\x01" + msgpack.packb([M.STATE_REPLY, 1, False, None, [], [bytes(32), [[1.0, b"abc"]]]]),
    b"\x01" + msgpack.packb([M.STATUS, 1]),
]


@pytest.mark.parametrize("message", MALFORMED)
def test_malformed_messages_are_counted_drops(message):
    """Malformed bytes never raise out of receive: they are dropped and counted."""
    with pytest.raises(M.MessageError):
        M.decode(message)
    node = Cluster().nodes[0]
    assert not node.receive(1, message, 0.0)
    assert node.status()["counters"]["drop_malformed"] == 1


def test_malformed_stopdata_body_is_a_counted_drop():
    """A STOPDATA whose signed body is not a well-formed body is dropped and counted."""
    node = Cluster().nodes[1]
    node.receive(0, M.encode_stopdata(b"\x93\x01\x02\x03", b""), 0.0)
    assert node.status()["counters"]["drop_malformed"] == 1


def test_bad_sender_and_oversize_are_dropped():
    """A sender index out of range or equal to the replica's own is dropped, as is an oversized message."""
    node = Cluster().nodes[0]
    for sender in (0, 4, -1):
        assert not node.receive(sender, M.encode_stop(1, 0), 0.0)
    assert node.status()["counters"]["drop_sender"] == 3
    assert not node.receive(1, b"\x01" + b"x" * (node._max_message + 1), 0.0)
    assert node.status()["counters"]["drop_oversize"] == 1


# --- construction and the interface ---------------------------------------------------


def test_provides_the_ordering_interface():
    """Both variants provide IOrderingProtocol and are named after their protocol."""
    for byzantine, n, name in ((True, 4, "mod-smart"), (False, 3, "multi-paxos")):
        node = Orderer(0, n, 1, byzantine, FastCrypto(0, {i: b"k" * 32 for i in range(n)}))
        assert verifyObject(IOrderingProtocol, node)
        assert node.name == name
        status = node.status()
        assert status["regency"] == 0 and status["leader"] == 0 and status["decided"] == 0


def test_too_few_replicas_is_a_one_line_error():
    """A Byzantine cluster needs 3f+1 replicas and a crash-tolerant one 2f+1; fewer is a clear error."""
    with pytest.raises(ValueError, match="3f\\+1"):
        Orderer(0, 3, 1, True, FastCrypto(0, {}))
    with pytest.raises(ValueError, match="2f\\+1"):
        Orderer(0, 2, 1, False, None)


# --- the normal case ------------------------------------------------------------------


def test_bft_normal_case_decides_one_batch_everywhere():
    """Values submitted to every replica are decided in one instance, identically, after PROPOSE, WRITE and ACCEPT."""
    c = Cluster()
    c.submit(values(5))
    c.run()
    for i in range(4):
        assert [d.instance for d in c.decided[i]] == [1]
        assert c.values_at(i) == values(5)
    assert len({d.timestamp for i in range(4) for d in c.decided[i]}) == 1
    kinds = {kind_of(m) for _, _, m in c.sent}
    assert {M.HAVE, M.PROPOSE, M.WRITE, M.ACCEPT} <= kinds


def test_next_batch_is_proposed_as_soon_as_one_is_decided():
    """A leader proposes the next batch right after a decision, capped by max_batch_values."""
    c = Cluster(max_batch_values=2)
    c.submit(values(5))
    c.run()
    assert [len(d.values) for d in c.decided[2]] == [2, 2, 1]
    assert c.values_at(2) == values(5)


def test_cft_has_no_write_phase_and_no_signatures():
    """Crash-tolerant mode decides on f+1 ACCEPTs with no WRITE and empty signatures."""
    c = Cluster(n=3, f=1, byzantine=False)
    c.nodes = [Orderer(i, 3, 1, False, None, leader_timeout=1.0) for i in range(3)]
    c.submit(values(3))
    c.run()
    assert all(c.values_at(i) == values(3) for i in range(3))
    kinds = [M.decode(m) for _, _, m in c.sent]
    assert not [m for m in kinds if m[0] == M.WRITE]
    assert all(m[4] == b"" for m in kinds if m[0] == M.ACCEPT)


def test_leader_waits_until_2f_plus_1_replicas_announced():
    """A value announced by fewer than 2f+1 replicas is not proposed; the third announcement makes it eligible."""
    c = Cluster()
    c.submit(values(1), to=[0, 1])
    c.run()
    assert not any(c.decided.values())
    assert c.nodes[0].status()["eligible"] == 0
    c.submit(values(1), to=[2])
    c.run()
    assert all(c.values_at(i) == values(1) for i in range(4))


def test_follower_holds_a_proposal_until_f_plus_1_announced_each_value():
    """A BFT follower does not WRITE for a value only the leader announced, and votes once f+1 did."""
    c = Cluster()
    leader = c.nodes[0]
    value = ("only-leader", 1, b"")
    c.handle(0, leader.submit([value], 0.0))
    # the leader's HAVE reaches nobody; force eligibility at the leader with forged announcements
    c.queue.clear()
    for j in (1, 2):
        c.handle(0, leader.receive(j, M.encode_have((encode_value(value),)), 0.0))
    proposals = [m for _, _, m in c.sent if kind_of(m) == M.PROPOSE]
    assert proposals
    c.run()
    assert c.nodes[3].status()["counters"].get("proposal_held") == 1
    assert not [s for s, _, m in c.sent if kind_of(m) == M.WRITE and s != 0]
    # replicas 1 and 2 announce too: now f+1 announced to replica 3 and the others hold it
    c.submit([value], to=[1, 2])
    c.run()
    assert all(c.values_at(i) == [value] for i in range(4))


def test_invalid_value_is_not_voted_for_and_starts_a_leader_change():
    """A proposal with a value the application rejects gets no vote and its receiver sends STOP."""
    c = Cluster(validate=lambda v, now: "bad" if v[0] == "bad" else None)
    c.nodes[0] = c.make(0, validate=None)  # a leader that does not check
    c.submit([("bad", 1, b"")])
    c.run()
    assert not any(c.decided.values())
    assert c.nodes[1].status()["counters"]["proposal_invalid_value"] == 1
    assert any(kind_of(m) == M.STOP and s == 1 for s, _, m in c.sent)


def _deliver_propose(c, to, instance, regency, timestamp, data):
    c.handle(to, c.nodes[to].receive(0, M.encode_propose(instance, regency, timestamp, data), c.now))


def test_timestamp_beyond_clock_skew_is_rejected():
    """A proposal whose timestamp is further than clock_skew from the replica's clock is rejected."""
    c = Cluster(clock_skew=5.0)
    c.submit(values(1))
    c.queue.clear()
    node = c.nodes[1]
    _deliver_propose(c, 1, 1, 0, 100.0, (encode_value(values(1)[0]),))
    assert node.status()["counters"]["proposal_timestamp_skew"] == 1


def test_duplicate_values_in_a_proposal_are_rejected():
    """A proposal naming one value twice is rejected."""
    c = Cluster()
    c.submit(values(1))
    c.queue.clear()
    data = encode_value(values(1)[0])
    _deliver_propose(c, 1, 1, 0, 0.0, (data, data))
    assert c.nodes[1].status()["counters"]["proposal_bad_value"] == 1


def test_decided_value_is_never_proposed_or_voted_again():
    """A value already decided is refused in a later proposal."""
    c = Cluster()
    c.submit(values(1))
    c.run()
    _deliver_propose(c, 1, 2, 0, 0.1, (encode_value(values(1)[0]),))
    assert c.nodes[1].status()["counters"]["proposal_decided_value"] == 1
    c.submit(values(1))
    assert c.nodes[0].status()["counters"]["submit_decided"] == 1


def test_second_proposal_for_an_instance_is_ignored():
    """Only the leader's first PROPOSE for (instance, regency) counts; a different second one is equivocation."""
    c = Cluster()
    c.submit(values(2))
    c.queue.clear()
    a, b = (encode_value(v) for v in values(2))
    _deliver_propose(c, 1, 1, 0, 0.0, (a,))
    _deliver_propose(c, 1, 1, 0, 0.0, (b,))
    assert c.nodes[1].status()["counters"]["equivocation"] == 1
    writes = [M.decode(m) for s, _, m in c.sent if s == 1 and kind_of(m) == M.WRITE]
    assert len(writes) == 1 and writes[0][3] == M.proposal_digest(0.0, (a,))


def test_proposal_from_a_non_leader_is_dropped():
    """A PROPOSE from a replica that does not lead the regency is dropped."""
    node = Cluster().nodes[1]
    node.receive(2, M.encode_propose(1, 0, 0.0, (b"\x91\x01",)), 0.0)
    assert node.status()["counters"]["drop_not_leader"] == 1


def test_bad_signature_is_counted_and_its_vote_ignored():
    """A WRITE with a valid link but a bad signature is counted and does not count toward the quorum."""
    c = Cluster()
    c.submit(values(1))
    c.block = lambda src, dst, message: src in (2, 3) and kind_of(message) == M.WRITE
    c.run()
    assert not any(c.decided.values())
    # replica 3 now sends replica 1 a WRITE with a bad signature: it completes no quorum
    digest = [M.decode(m) for s, _, m in c.sent if kind_of(m) == M.WRITE][0][3]
    c.handle(1, c.nodes[1].receive(3, M.encode_write(1, 0, digest, b"\x00" * 16), c.now))
    assert c.nodes[1].status()["counters"]["bad_signature"] == 1
    assert not c.nodes[1]._slot.wc and not c.decided[1]
    assert not [m for s, _, m in c.sent if s == 1 and kind_of(m) == M.ACCEPT]


def test_conflicting_votes_count_once():
    """A replica's second WRITE with another digest for the same instance is counted and ignored."""
    c = Cluster()
    node = c.nodes[1]
    crypto = FastCrypto(2, c.keys)
    for digest in (bytes(32), b"\x01" * 32):
        node.receive(2, M.encode_write(1, 0, digest, crypto.sign(M.vote_payload("write", 1, 0, digest))), 0.0)
    assert node.status()["counters"]["conflicting_vote"] == 1


def test_mutated_instance_in_a_vote_does_not_count_for_the_real_one():
    """A vote whose instance was changed by one is kept apart (buffered) and never joins the current quorum."""
    c = Cluster()
    node = c.nodes[1]
    crypto = FastCrypto(2, c.keys)
    digest = bytes(32)
    node.receive(2, M.encode_write(2, 0, digest, crypto.sign(M.vote_payload("write", 2, 0, digest))), 0.0)
    assert not node._slot.writes
    node.receive(2, M.encode_write(9, 0, digest, crypto.sign(M.vote_payload("write", 9, 0, digest))), 0.0)
    assert node.status()["counters"]["drop_future"] == 1


def test_missing_body_is_fetched_from_a_voter():
    """A replica that has a quorum of ACCEPTs but missed the PROPOSE asks a voter for the body and decides."""
    c = Cluster()
    c.submit(values(2))
    c.block = lambda src, dst, message: dst == 3 and kind_of(message) == M.PROPOSE
    c.run()
    assert c.values_at(3) == values(2)
    assert c.nodes[3].status()["counters"]["value_requests"] >= 1


def test_value_reply_with_wrong_body_is_dropped():
    """A VALUE_REPLY whose body does not hash to a wanted digest is dropped."""
    node = Cluster().nodes[1]
    node.receive(2, M.encode_value_reply(1, 0.0, (b"\x91\x01",)), 0.0)
    assert node.status()["counters"]["drop_unwanted_value"] == 1


# --- pool bounds --------------------------------------------------------------------


def test_announcements_beyond_a_peers_quota_are_dropped():
    """A peer's announcements past pool_limit_values are dropped and counted, never stored."""
    c = Cluster(pool_limit_values=3)
    node = c.nodes[1]
    node.receive(2, M.encode_have(tuple(encode_value(v) for v in values(10))), 0.0)
    status = node.status()
    assert status["pool_values"] == 3
    assert status["counters"]["have_over_quota"] == 7


def test_announcements_expire_after_pool_ttl():
    """An announced value that is never decided leaves the pool after pool_ttl."""
    c = Cluster(pool_ttl=10.0)
    node = c.nodes[1]
    node.receive(2, M.encode_have((encode_value(values(1)[0]),)), 0.0)
    node.tick(5.0)
    assert node.status()["pool_values"] == 1
    node.tick(20.0)
    assert node.status()["pool_values"] == 0
    assert node.status()["counters"]["pool_expired"] == 1


def test_future_messages_are_buffered_within_bounds():
    """Messages for the next instances wait in a per-sender buffer capped in count; further ones are dropped."""
    node = Cluster().nodes[1]
    crypto = FastCrypto(2, Cluster().keys)
    for k in range(40):
        digest = bytes([k]) * 32
        node.receive(2, M.encode_accept(2, 0, digest, crypto.sign(b"x")), 0.0)
    assert len(node._buffer[2]) == 32
    assert node.status()["counters"]["drop_buffer_full"] == 8


# --- leader change ---------------------------------------------------------------------


def test_silent_leader_is_replaced_and_values_decided():
    """With the leader down, replicas time out, STOP, install regency 1 and its leader decides the values."""
    c = Cluster()
    c.down.add(0)
    c.submit(values(3))
    c.advance(4.0)
    for i in (1, 2, 3):
        status = c.nodes[i].status()
        assert status["regency"] == 1 and status["leader"] == 1
        assert c.values_at(i) == values(3)
    kinds = {kind_of(m) for _, _, m in c.sent}
    assert {M.STOP, M.STOPDATA, M.SYNC} <= kinds


def test_one_stop_does_not_change_the_regency_but_f_plus_1_make_others_join():
    """A single STOP changes nothing; f+1 STOPs make a replica send its own; 2f+1 install the regency."""
    c = Cluster()
    node = c.nodes[3]
    node.receive(1, M.encode_stop(1, 0), 0.0)
    assert node.status()["regency"] == 0 and node.status()["counters"].get("stops_sent") is None
    effects = node.receive(2, M.encode_stop(1, 0), 0.0)
    assert node.status()["counters"]["stops_sent"] == 1
    assert any(kind_of(m) == M.STOP for _, m in effects.messages)
    assert node.status()["regency"] == 1  # its own STOP made 2f+1


def test_stop_far_ahead_is_dropped():
    """A STOP for a regency beyond the window is dropped, so one peer cannot make a replica store it."""
    node = Cluster().nodes[1]
    node.receive(2, M.encode_stop(1000, 0), 0.0)
    assert node.status()["counters"]["drop_future"] == 1 and not node._stops


def test_write_certificate_forces_the_value_in_the_next_regency():
    """A value with a write certificate in regency 0 that was not decided is the one regency 1 decides."""
    c = Cluster()
    c.submit(values(2))
    c.block = lambda src, dst, message: kind_of(message) == M.ACCEPT and M.decode(message)[2] == 0
    c.run()
    assert not any(c.decided.values())
    proposed = [M.decode(m) for _, _, m in c.sent if kind_of(m) == M.PROPOSE][0]
    c.down.add(0)
    c.submit(values(2, tag="later"), to=[1, 2, 3])
    c.advance(4.0)
    first = c.decided[1][0]
    assert first.instance == 1
    assert [encode_value(v) for v in first.values] == list(proposed[4])
    assert all(c.decided[i][0] == first for i in (1, 2, 3))
    syncs = [M.decode(m) for _, _, m in c.sent if kind_of(m) == M.SYNC]
    assert syncs and syncs[0][3] is not None and syncs[0][3][1] == proposed[4]


def test_sync_that_ignores_a_write_certificate_is_rejected():
    """A SYNC whose proposal is not the highest write certificate's value is rejected as bad."""
    c = Cluster()
    c.submit(values(2))
    c.block = lambda src, dst, message: kind_of(message) == M.ACCEPT
    c.run()
    # collect genuine STOPDATAs for regency 1 by installing it everywhere but delivering nothing
    c.block = lambda src, dst, message: True
    for i in range(4):
        for j in range(4):
            if i != j:
                c.handle(j, c.nodes[j].receive(i, M.encode_stop(1, 0), c.now))
    stopdatas = []
    for i in (0, 2, 3):
        sent = [m for s, to, m in c.sent if s == i and kind_of(m) == M.STOPDATA]
        _, body, sig = M.decode(sent[-1])
        stopdatas.append((i, body, sig))
    other = (c.now, (encode_value(("other", 1, b"")),))
    node = c.nodes[2]
    node.receive(1, M.encode_sync(1, tuple(stopdatas), other), c.now)
    assert node.status()["counters"]["bad_sync"] == 1
    assert not node.status()["synced"]


def test_sync_with_too_few_valid_stopdatas_is_rejected():
    """A SYNC backed by fewer than 2f+1 validly signed STOPDATAs is rejected."""
    c = Cluster()
    node = c.nodes[2]
    node.receive(3, M.encode_stop(1, 0), 0.0)
    body = M.encode_stopdata_body(1, 0, None, None)
    forged = tuple((i, body, b"\x00" * 16) for i in (0, 1, 3))
    node.receive(1, M.encode_sync(1, forged, None), 0.0)
    assert node.status()["counters"]["bad_sync"] == 1
    assert node.status()["counters"]["bad_signature"] == 3


def test_timeout_doubles_per_regency_without_a_decision():
    """Each regency installed without a decision doubles the leader timeout; a decision resets it."""
    c = Cluster()
    c.down.add(0)
    c.block = lambda src, dst, message: src == 1 and kind_of(message) == M.SYNC
    c.submit(values(1))
    c.advance(1.5)
    assert c.nodes[2].status()["regency"] == 1 and c.nodes[2].status()["timeout"] == 1.0
    c.advance(1.2)
    assert c.nodes[2].status()["regency"] == 2
    assert c.values_at(2) == values(1)
    assert c.nodes[2].status()["timeout"] == 1.0
    assert c.nodes[3].status()["counters"]["regencies_installed"] == 2


def test_replica_in_an_old_regency_is_helped_forward():
    """A replica that missed a regency change learns it from a peer's STOP and SYNC after its STATUS."""
    c = Cluster()
    c.down.add(0)
    c.block = lambda src, dst, message: dst == 3 or src == 3
    c.submit(values(2), to=[1, 2, 3])
    c.advance(4.0)
    assert c.nodes[3].status()["regency"] == 0
    c.block = None
    c.advance(3.0)
    assert c.nodes[3].status()["regency"] == c.nodes[1].status()["regency"]
    assert c.values_at(3) == c.values_at(1) == values(2)


# --- checkpoints and state transfer ----------------------------------------------------------


def test_checkpoint_becomes_stable_and_truncates_the_log():
    """Every checkpoint_interval instances the app's state is asked for; 2f+1 matching make it stable."""
    c = Cluster(checkpoint_interval=2, max_batch_values=1)
    c.submit(values(5))
    c.run()
    status = c.nodes[1].status()
    assert status["decided"] == 5 and status["stable_checkpoint"] == 4
    assert status["log_entries"] == 2  # the checkpoint's own entry and instance 5
    assert any(kind_of(m) == M.CHECKPOINT for _, _, m in c.sent)


def test_checkpoint_for_an_instance_not_asked_is_ignored():
    """checkpoint() for an instance the engine did not ask about is counted and ignored."""
    node = Cluster().nodes[0]
    assert not node.checkpoint(3, b"state", 0.0)
    assert node.status()["counters"]["checkpoint_unexpected"] == 1


def test_lagging_replica_catches_up_by_state_transfer():
    """A replica cut off while others decide past a checkpoint restores it and applies the rest."""
    c = Cluster(checkpoint_interval=2, max_batch_values=1)
    c.down.add(3)
    c.submit(values(5), to=[0, 1, 2])
    c.run()
    assert c.nodes[0].status()["decided"] == 5
    c.down.discard(3)
    c.advance(3.0)
    assert c.nodes[3].status()["decided"] == 5
    assert c.restored[3] and c.restored[3][0][0] == 4
    assert c.decided[3][-1] == c.decided[0][-1]
    # the restored replica learned the values decided before the checkpoint
    assert c.nodes[3].status()["counters"].get("state_bad_history") is None
    assert all(value_key(v) in c.nodes[3]._decided_keys for v in values(5))


def _state_reply_for(c, i, first, later=1.0):
    node = c.nodes[i]
    effects = node.receive(3, M.encode_state_request(first), c.now + later)
    return [m for to, m in effects.messages if kind_of(m) == M.STATE_REPLY][0]


def test_state_transfer_refuses_a_lying_state_or_entry():
    """A checkpoint whose state does not match its certified digest, or an entry without a valid certificate, is refused."""
    c = Cluster(checkpoint_interval=2, max_batch_values=1)
    c.down.add(3)
    c.submit(values(3), to=[0, 1, 2])
    c.run()
    reply = M.decode(_state_reply_for(c, 0, 1))
    _, last, recovering, (ci, chain, state, cert), entries, history = reply
    fresh = c.make(3)
    lie = M.encode_state_reply(last, False, (ci, chain, state + b"x", cert), entries, history)
    effects = fresh.receive(0, lie, c.now)
    assert effects.restore is None and fresh.status()["counters"]["state_bad_checkpoint"] == 1
    i, r, ts, data, dc = entries[0]
    forged = ((1, r, ts, (encode_value(("forged",)),), dc),)
    fresh.receive(0, M.encode_state_reply(last, False, None, forged, None), c.now)
    assert fresh.status()["decided"] == 0 and fresh.status()["counters"]["state_bad_entry"] == 1
    effects = fresh.receive(0, _state_reply_for(c, 0, 1, later=5.0), c.now + 5)
    assert effects.restore is not None and fresh.status()["decided"] == 3


def test_restarted_replica_votes_only_after_recovering():
    """A replica restarted without memory casts no vote until others told it where they are and it caught up."""
    c = Cluster()
    c.submit(values(2))
    c.run()
    c.nodes[1] = c.make(1, recovering=True)
    c.sent.clear()
    c.submit(values(2, tag="next"), to=[0, 2, 3])
    c.handle(1, c.nodes[1].submit(values(2, tag="next"), c.now))
    c.run()
    assert c.nodes[1].status()["recovering"]
    assert not [m for s, _, m in c.sent if s == 1 and kind_of(m) in (M.WRITE, M.ACCEPT)]
    c.submit(values(2, tag="third"))
    c.advance(3.0)
    c.submit(values(2, tag="fourth"))
    c.advance(3.0)
    assert not c.nodes[1].status()["recovering"]
    assert c.nodes[1].status()["counters"]["recovered"] == 1
    assert c.values_at(1)[-2:] == values(2, tag="fourth")


def test_status_heartbeat_lets_an_idle_laggard_catch_up():
    """A replica that missed decisions in an idle cluster notices from STATUS and fetches them."""
    c = Cluster()
    c.block = lambda src, dst, message: dst == 3 and kind_of(message) in (M.ACCEPT, M.WRITE, M.PROPOSE)
    c.submit(values(2))
    c.run()
    assert not c.decided[3] and c.decided[0]
    c.block = None
    c.advance(3.0)
    assert c.values_at(3) == values(2)


def test_recovering_replica_ignores_unproven_claims_of_progress():
    """A peer claiming a far later decision it does not prove cannot hold a restarted replica passive."""
    c = Cluster()
    node = c.make(1, recovering=True)
    node.receive(0, M.encode_state_reply(1000, False, None, (), None), 0.0)
    assert 0 not in node._recovery_lasts
    for peer in (0, 2, 3):
        node.receive(peer, M.encode_state_reply(0, False, None, (), None), 0.0)
    assert node._recovery_target == 2


def test_a_cluster_restarted_whole_starts_afresh_and_each_replica_follows():
    """When every other replica restarted without memory at instance 0, a recovering one votes again, and says it restarted until it decides so the rest follow."""
    c = Cluster()
    node = c.make(1, recovering=True)
    node.receive(0, M.encode_state_reply(0, True, None, (), None), 0.0)
    node.receive(2, M.encode_state_reply(0, True, None, (), None), 0.0)
    assert node.status()["recovering"] is True
    node.receive(3, M.encode_state_reply(0, True, None, (), None), 0.0)
    assert node.status()["recovering"] is False
    # a peer that asks hears it restarted too, while it has decided nothing
    effects = node.receive(0, M.encode_state_request(1), 0.0)
    replies = [M.decode(message) for to, message in effects.messages if to == 0]
    assert replies and replies[0][2] is True


def test_one_fresh_peer_keeps_a_restarted_replica_recovering():
    """A peer that did not restart (it may hold votes) keeps the restarted replica from starting afresh."""
    c = Cluster()
    node = c.make(1, recovering=True)
    for peer, restarted in ((0, True), (2, True), (3, False)):
        node.receive(peer, M.encode_state_reply(0, restarted, None, (), None), 0.0)
    assert node.status()["recovering"] is True
