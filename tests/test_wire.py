"""
Framing and codec: valid messages round-trip, hostile bytes become ProtocolError.
"""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fit_broker.errors import ProtocolError
from fit_broker.units import Delivery, Reply, Request
from fit_broker.wire.codec import (
    decode,
    encode_delivery,
    encode_reply,
    encode_request,
)
from fit_broker.wire.framing import FrameDecoder, frame
from tests.mutation import mutated

BATCH = ("probe", 7, 1700000000.5, 60.0, 2, b"\x92\xc4\x01a\xc4\x00", b"proof")


def payload(encoded):
    return encoded[4:]


def test_request_round_trip():
    """A publish request with batches decodes to an equal Request."""
    request = Request(3, "publish", "events", 0, (BATCH, BATCH), {"proof": b"x"})
    assert decode(payload(encode_request(request))) == request


def test_reply_and_delivery_round_trip():
    """Replies and pushed deliveries keep every field."""
    reply = Reply(9, "ok", "", (BATCH,), "events", {"appended": 1})
    assert decode(payload(encode_reply(reply))) == reply
    assert decode(payload(encode_delivery("events", [BATCH]))) == Delivery("events", (BATCH,))


def test_frames_split_anywhere_reassemble():
    """Frames fed one byte at a time come out whole and in order."""
    stream = frame(b"one") + frame(b"") + frame(b"three" * 100)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == [b"one", b"", b"three" * 100]
    assert decoder.buffered == 0


def test_oversized_frame_refused_before_buffering():
    """An announced length above the maximum raises at once."""
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(ProtocolError, match="1001 bytes announced"):
        decoder.feed(struct.pack(">I", 1001) + b"x")


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "empty frame"),
        (b"\x02\x90", "unsupported protocol version 2"),
        (b"\x01\xc1", "undecodable"),
        (b"\x01\x93\x01\x02\x03", "wrong number of fields"),
        (b"\x01\x91\xa1x", "array starting with its kind"),
        (b"\x01\x93\x07\x01\x02", "unknown message kind 7"),
    ],
)
def test_malformed_payloads_say_what_is_wrong(raw, message):
    """Each kind of malformed payload raises ProtocolError naming the problem."""
    with pytest.raises(ProtocolError, match=message):
        decode(raw)


def test_bad_batch_shape_refused():
    """A batch with a text payload instead of bytes is refused."""
    bad = Request(1, "publish", "events", 0, (("probe", 1, 1.0, 1.0, 0, "text", b""),), {})
    with pytest.raises(ProtocolError, match="each batch must be"):
        decode(payload(encode_request(bad)))


def test_unknown_method_refused():
    """A request naming a method the protocol lacks is refused."""
    bad = Request(1, "drop-tables", "events")
    with pytest.raises(ProtocolError, match="unknown method"):
        decode(payload(encode_request(bad)))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_payloads_never_crash(raw):
    """Random bytes decode or raise ProtocolError, nothing else."""
    try:
        decode(raw)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_frames_never_crash(data):
    """A valid frame with bytes flipped, cut or inserted never raises anything but ProtocolError."""
    raw = mutated(
        data, payload(encode_request(Request(5, "publish", "events", 0, (BATCH,) * 3, {"proof": b""})))
    )
    try:
        decode(raw)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(1, 17))
def test_framing_any_chunking(payloads, chunk):
    """However a stream of frames is chunked, the decoder yields the same payloads."""
    stream = b"".join(frame(p) for p in payloads)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        out.extend(decoder.feed(stream[i : i + chunk]))
    assert out == payloads


def test_payload_count_reads_only_the_header():
    """payload_count gives the number of contents from the array header, 0 for anything else."""
    from fit_broker.units import pack_contents, payload_count, unpack_contents

    for n in (1, 15, 16, 100, 65535):
        payload = pack_contents([b"x"] * n)
        assert payload_count(payload) == n
        assert len(unpack_contents(payload)) == n
    assert payload_count(b"") == 0
    assert payload_count(pack_contents([])) == 0
    assert payload_count(b"\xc4\x01x") == 0
    with pytest.raises(ValueError, match="array of byte strings"):
        unpack_contents(b"\x91\x01")
