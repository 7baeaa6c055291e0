"""
Hostile clients against a replica: well-framed requests with arbitrary
fields never raise out of the protocol, and the replica keeps serving.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fit_broker.replica.protocol import ReplicaProtocol
from fit_broker.replica.service import Replica
from fit_broker.schemes.registry import scheme_lookup
from fit_broker.units import METHODS, Request
from fit_broker.wire.codec import decode, encode_request
from tests.simnet import cluster_config

CONFIG = cluster_config(("events", "audit"), qop="bft", clients=("probe", "console"))
SCHEMES = scheme_lookup(CONFIG)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=40),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
payloads = st.one_of(
    st.binary(max_size=60),
    st.lists(st.binary(max_size=20), min_size=1, max_size=5).map(
        lambda contents: __import__("fit_broker.units", fromlist=["pack_contents"]).pack_contents(contents)
    ),
)
batches = st.tuples(
    st.sampled_from(["probe", "console", "mallory", ""]),
    st.integers(-(2**63), 2**63 - 1),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40)),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6)),
    st.integers(-5, 20),
    payloads,
    st.binary(max_size=80),
)
requests = st.builds(
    Request,
    seq=st.integers(0, 2**40),
    method=st.sampled_from(sorted(METHODS)),
    channel=st.sampled_from(["events", "audit", "nope", ""]),
    count=st.integers(-(2**31), 2**31),
    batches=st.lists(batches, max_size=3).map(tuple),
    options=st.dictionaries(st.sampled_from(["resume", "stream", "credit", "client", "x"]), values, max_size=4),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests, min_size=1, max_size=8))
def test_arbitrary_requests_never_break_a_replica(sequence):
    """Any sequence of well-framed requests after a hello gets replies or a counted hang-up, never an exception; a fresh client is still served."""
    clock = Clock()
    clock.advance(1_800_000_000)
    replica = Replica(CONFIG, 0, clock, SCHEMES)
    protocol = ReplicaProtocol(replica)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode_request(Request(1, "hello", options={"client": "probe"})))
    for request in sequence:
        protocol.dataReceived(encode_request(request))
        clock.advance(0.01)
    clock.advance(5)
    replica.expire()
    # every frame the replica wrote is a valid message
    written = transport.value()
    while written:
        length = int.from_bytes(written[:4], "big")
        decode(written[4 : 4 + length])
        written = written[4 + length :]
    # and the replica still serves a well-behaved client
    fresh = ReplicaProtocol(replica)
    fresh_transport = StringTransport()
    fresh.makeConnection(fresh_transport)
    fresh.dataReceived(encode_request(Request(1, "hello", options={"client": "console"})))
    fresh.dataReceived(encode_request(Request(2, "status")))
    assert b"ok" in fresh_transport.value()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.lists(batches, max_size=4)), max_size=6))
def test_arbitrary_copies_never_break_a_voter(offers):
    """Voters take any batches a hostile replica can encode without raising, and never deliver an expired one."""
    from fit_broker import registry
    from fit_broker.interfaces import IVoterFactory

    now = 1_800_000_000.0
    for name in ("first-copy", "f-plus-one"):
        voter = registry.find(IVoterFactory, name)(faults=1, replicas=4, channel="events")
        for replica, offered in offers:
            for batch in voter.offer(replica, tuple(offered), now):
                assert batch[2] + batch[3] > now
            voter.expire(now + 1)
