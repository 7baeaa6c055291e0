"""
Hostile input: random and mutated bytes never make the parser or the framer
raise, and the framer keeps its invariants however the stream is split.
"""

import base64
import datetime
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fit_broker.syslog.framing import Frame, OctetOrLineFramer
from fit_broker.syslog.parser import JSON_KEYS, LENIENT_REASONS, UNPARSED_REASONS, parse
from tests.test_syslog_parser import CORPUS

FAST = settings(max_examples=300, deadline=None)
SEEDS = [param.values[0] for param in CORPUS]

# Pieces that steer random messages into the parser's deeper branches.
TOKENS = [
    b"<13>", b"<165>", b"<0>", b"<191>", b"<192>", b"<", b">", b"1 ", b"- ", b"-", b" ",
    b"  ", b"[", b"]", b'"', b"\\", b"\\]", b'\\"', b"=", b"a@1", b'x="y"', b"Jan",
    b"FEB", b" 1 ", b"29", b"2024", b"12:00:00", b"23:59:60", b".123", b",5", b":", b": ",
    b"*", b".", b"UTC", b"CET", b"+0100", b"+01:00", b"-00:00", b"Z", b"T",
    b"2024-01-15T", b"2003-02-30T10:00:00Z", b"%ASA-6-302013:", b"host", b"2001:db8::1",
    b"app[1]:", b"app[]", b"123: ", b"\n", b"\r", b"\x00", b"\xff", b"\xc3", b"\xef\xbb\xbf",
    b"9", b"99999",
]
token_messages = st.lists(st.sampled_from(TOKENS), max_size=30).map(b"".join)
zones = st.sampled_from(
    [None, datetime.timezone.utc, datetime.timezone(datetime.timedelta(hours=-11, minutes=-30))]
)
reception = st.floats(min_value=0, max_value=4e9, allow_nan=False)


def check_message(data, message, max_size=65536):
    """
    The invariants every parse result holds, whatever the input.
    """
    assert "internal-error" not in message.reasons
    assert message.format in ("rfc5424", "rfc3164", "unparsed")
    assert message.raw == data[:max_size]
    assert message.truncated is (len(data) > max_size)
    if message.format == "unparsed":
        assert message.reasons and message.reasons[0] in UNPARSED_REASONS
        assert message.facility is None and message.structured_data is None
    else:
        assert 0 <= message.facility <= 23 and 0 <= message.severity <= 7
        assert isinstance(message.structured_data, dict)
        assert set(message.reasons) <= set(LENIENT_REASONS)
    if message.msg_b64 is not None:
        exact = base64.b64decode(message.msg_b64)
        assert exact.decode("utf-8", "replace") == message.msg
    event = json.loads(message.to_json_bytes())
    assert tuple(event) == JSON_KEYS
    assert base64.b64decode(event["raw_b64"]) == message.raw


@FAST
@given(st.binary(max_size=600), reception, zones)
def test_random_bytes_parse(data, received_at, zone):
    """Random bytes always parse to a valid event, never an exception."""
    check_message(data, parse(data, "198.51.100.1:514", received_at, local_tz=zone))


@FAST
@given(token_messages, reception, zones)
def test_token_soup_parse(data, received_at, zone):
    """Random mixtures of syslog syntax pieces always parse to a valid event."""
    check_message(data, parse(data, None, received_at, local_tz=zone))


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "token"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = bytes([draw(st.integers(0, 255))])
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.sampled_from(TOKENS))
    return bytes(data)


@FAST
@given(mutated(), st.integers(1, 300))
def test_mutated_corpus_parse(data, max_size):
    """Corpus messages with random mutations and sizes always parse to a valid event."""
    check_message(data, parse(data, None, 1705320000.0, max_size=max_size), max_size)


def feed_all(framer, stream, chunks):
    """
    Feed C{stream} cut at the sizes in C{chunks} (cycled), then end it.
    """
    frames, pos, i = [], 0, 0
    while pos < len(stream):
        size = chunks[i % len(chunks)] if chunks else len(stream)
        frames += framer.feed(stream[pos : pos + size])
        pos += size
        i += 1
    return frames + framer.end()


stream_pieces = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\n", b"\r\n", b"\x00", b" ", b"5 ", b"12 ", b"70 ", b"0 ", b"999999999 "]),
        st.integers(1, 90).map(lambda n: b"%d " % n),
    ),
    max_size=25,
).map(b"".join)


@FAST
@given(stream_pieces, st.lists(st.integers(1, 50), max_size=10), st.integers(1, 64))
def test_framer_invariants(stream, chunks, max_size):
    """Any stream in any chunking frames identically to feeding it whole, within every bound."""
    whole_framer = OctetOrLineFramer(max_size=max_size)
    whole = feed_all(whole_framer, stream, [])
    framer = OctetOrLineFramer(max_size=max_size)
    frames = feed_all(framer, stream, chunks)
    assert frames == whole
    assert framer.counters == whole_framer.counters
    counters = framer.counters
    assert all(isinstance(f, Frame) and 0 < len(f.data) <= max_size for f in frames)
    assert counters["frames"] == len(frames)
    assert counters["octet-counted"] + counters["lf-framed"] == len(frames)
    assert counters["truncated"] == sum(f.truncated for f in frames)
    assert sum(len(f.data) for f in frames) + counters["discarded-bytes"] <= len(stream)
    assert framer.end() == [] and framer.feed(b"") == []


@FAST
@given(st.binary(max_size=2000), st.integers(1, 100))
def test_framer_random_bytes(stream, max_size):
    """Random bytes fed in random pieces never make the framer raise or exceed its bounds."""
    framer = OctetOrLineFramer(max_size=max_size)
    frames = feed_all(framer, stream, [7, 1, 33])
    assert all(len(f.data) <= max_size for f in frames)
    assert framer.counters["frames"] == len(frames)


line_message = st.binary(min_size=1, max_size=64).filter(
    lambda m: b"\n" not in m and m[:1] not in b"123456789" and m.rstrip(b"\x00\r") == m
)
octet_message = st.binary(min_size=1, max_size=64).filter(
    lambda m: m.rstrip(b"\x00") == m and not m.endswith((b"\n", b"\r"))
)


@FAST
@given(
    st.lists(
        st.one_of(
            line_message.map(lambda m: (m, m + b"\n")),
            octet_message.map(lambda m: (m, b"%d %s" % (len(m), m))),
            octet_message.map(lambda m: (m, b"%d %s\n" % (len(m) + 1, m))),
        ),
        max_size=20,
    ),
    st.lists(st.integers(1, 40), max_size=6),
)
def test_framer_round_trip(messages, chunks):
    """Messages framed each in its own way come back exactly, in order, in any chunking."""
    stream = b"".join(framed for _, framed in messages)
    frames = feed_all(OctetOrLineFramer(max_size=64), stream, chunks)
    assert frames == [Frame(m, False) for m, _ in messages]
