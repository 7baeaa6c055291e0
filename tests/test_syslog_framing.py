"""
RFC 6587 framing: per-frame detection, trimming, oversize frames kept in
step, bad counts, chunking independence and linear cost on huge lines.
"""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fit_broker.syslog.framing import COUNTERS, Frame, OctetOrLineFramer, trim_datagram


def frames_of(stream, max_size=64, chunk=None):
    """
    Feed C{stream} (whole or in chunks), end it, return (data list, framer).
    """
    framer = OctetOrLineFramer(max_size=max_size)
    frames = []
    if chunk is None:
        frames += framer.feed(stream)
    else:
        for i in range(0, len(stream), chunk):
            frames += framer.feed(stream[i : i + chunk])
    frames += framer.end()
    return frames, framer


def datas(frames):
    return [f.data for f in frames]


def test_octet_counted():
    """Octet-counted frames are cut by their count, whatever bytes they hold."""
    frames, framer = frames_of(b"11 <13>a\nb c d5 <13>x")
    assert datas(frames) == [b"<13>a\nb c d", b"<13>x"]
    assert framer.counters["octet-counted"] == 2


def test_logger_tcp_captures():
    """The bytes util-linux logger sends over TCP frame as one message each way."""
    octet = (
        b'97 <13>1 2026-11-26T23:25:51.966953+00:00 vm root - - [timeQuality tzKnown="1" '
        b'isSynced="0"] tcp msg'
    )
    line = b"<13>Nov 26 23:25:51 vm root: tcp msg\n"
    frames, framer = frames_of(octet + line, max_size=65536)
    assert datas(frames) == [octet[3:], line[:-1]]
    assert (framer.counters["octet-counted"], framer.counters["lf-framed"]) == (1, 1)


def test_lf_framed():
    """Lines end at LF; a CR before the LF is dropped too."""
    frames, framer = frames_of(b"<13>one\n<13>two\r\n<13>three\n")
    assert datas(frames) == [b"<13>one", b"<13>two", b"<13>three"]
    assert framer.counters["lf-framed"] == 3


def test_mixed_framing_decided_per_frame():
    """Octet-counted and LF-framed frames interleave in one stream."""
    stream = b"8 <13>oct1<13>line1\n8 <13>oct2CEF:0|v|p|1|x|y|5|a=b\n2024-01-15T10:00:00Z h a: z\n"
    frames, framer = frames_of(stream)
    assert datas(frames) == [
        b"<13>oct1",
        b"<13>line1",
        b"<13>oct2",
        b"CEF:0|v|p|1|x|y|5|a=b",
        b"2024-01-15T10:00:00Z h a: z",
    ]
    assert framer.counters["octet-counted"] == 2
    assert framer.counters["lf-framed"] == 3


def test_one_trailing_lf_stripped_from_octet_frame():
    """Exactly one trailing LF (or CR LF) counted in MSG-LEN is dropped, as rsyslog sends it."""
    frames, _ = frames_of(b"8 <13>abc\n9 <13>abc\n\n9 <13>abc\r\n")
    assert datas(frames) == [b"<13>abc", b"<13>abc\n", b"<13>abc"]


def test_trailing_nuls_stripped():
    """Trailing NULs are dropped in both framings; inner NULs stay."""
    frames, _ = frames_of(b"9 <13>a\x00b\x00\x00<13>c\x00d\x00\n")
    assert datas(frames) == [b"<13>a\x00b", b"<13>c\x00d"]


@pytest.mark.parametrize(
    "datagram, message",
    [
        (b"<13>a\n", b"<13>a"),
        (b"<13>a\r\n", b"<13>a"),
        (b"<13>a\n\n", b"<13>a\n"),
        (b"<13>a\x00", b"<13>a"),
        (b"<13>a\n\x00\x00", b"<13>a"),
        (b"<13>a\x00b\r", b"<13>a\x00b\r"),
        (b"", b""),
    ],
)
def test_trim_datagram(datagram, message):
    """A datagram loses trailing NULs and one trailing LF or CR LF, as frames do."""
    assert trim_datagram(datagram) == message


def test_lf_after_octet_frame_is_an_empty_line():
    """A sender's extra LF after a counted frame is counted as empty and skipped."""
    frames, framer = frames_of(b"5 <13>a\n5 <13>b\n")
    assert datas(frames) == [b"<13>a", b"<13>b"]
    assert framer.counters["empty"] == 2


def test_empty_frames_counted_not_returned():
    """Empty lines and frames that are empty after trimming are counted, not returned."""
    frames, framer = frames_of(b"\n\r\n\x00\n1 \n")
    assert frames == []
    assert framer.counters["empty"] == 4
    assert framer.counters["frames"] == 0


def test_count_without_space_is_a_line():
    """Digits not followed by SP are not a count: the frame is a line and counted bad-count."""
    frames, framer = frames_of(b"123abc\n5 <13>x")
    assert datas(frames) == [b"123abc", b"<13>x"]
    assert framer.counters["bad-count"] == 1
    assert framer.counters["lf-framed"] == 1


def test_leading_zero_is_not_a_count():
    """A frame starting with 0 is a line: MSG-LEN has no leading zeros."""
    frames, framer = frames_of(b"05 <13>x\n")
    assert datas(frames) == [b"05 <13>x"]
    assert framer.counters["bad-count"] == 0


def test_absurd_count_resyncs_at_lf():
    """A count with more digits than 10x the maximum needs is bad-count and read as a line."""
    frames, framer = frames_of(b"99999999 <13>x\n5 <13>y", max_size=64)
    assert datas(frames) == [b"99999999 <13>x", b"<13>y"]
    assert framer.counters["bad-count"] == 1


def test_oversize_octet_frame_stays_in_step():
    """An oversize counted frame keeps its head marked truncated and the next frame is intact."""
    body = b"<13>" + b"x" * 96
    frames, framer = frames_of(b"100 " + body + b"5 <13>n", max_size=64)
    assert frames == [Frame(body[:64], True), Frame(b"<13>n", False)]
    assert framer.counters["truncated"] == 1
    assert framer.counters["discarded-bytes"] == 36


def test_oversize_line_discarded_to_lf():
    """An oversize line keeps its head marked truncated; the rest up to LF is dropped."""
    line = b"<13>" + b"y" * 200
    frames, framer = frames_of(line + b"\n<13>next\n", max_size=64)
    assert frames == [Frame(line[:64], True), Frame(b"<13>next", False)]
    assert framer.counters["discarded-bytes"] == len(line) - 64


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, None])
def test_oversize_same_in_any_chunking(chunk):
    """Oversize handling gives the same frames and counters however the stream is split."""
    stream = (
        b"<13>" + b"a" * 150 + b"\n" + b"70 " + b"b" * 70 + b"66 " + b"c" * 64 + b"\r\n"
        + b"<13>" + b"d" * 58 + b"\x00\x00\x00\n" + b"3 <13>"
    )
    expected, expected_framer = frames_of(stream, max_size=64)
    frames, framer = frames_of(stream, max_size=64, chunk=chunk)
    assert frames == expected
    assert framer.counters == expected_framer.counters
    assert [f.truncated for f in frames] == [True, True, False, False, False, False]
    assert datas(frames)[-2:] == [b"<13", b">"]


def test_counted_frame_of_max_plus_crlf_is_not_truncated():
    """A frame of exactly max_size plus a counted CR LF is not truncated."""
    body = b"<13>" + b"z" * 60
    frames, framer = frames_of(b"66 " + body + b"\r\n", max_size=64)
    assert frames == [Frame(body, False)]
    assert framer.counters["truncated"] == 0


def test_line_of_exactly_max_size_is_not_truncated():
    """A line of exactly max_size bytes is kept whole, fed in any pieces."""
    line = b"<13>" + b"q" * 60
    for chunk in (1, 5, None):
        frames, _ = frames_of(line + b"\r\n", max_size=64, chunk=chunk)
        assert frames == [Frame(line, False)]


def test_count_split_across_feeds():
    """A count whose digits arrive in several feeds is still a count."""
    framer = OctetOrLineFramer()
    assert framer.feed(b"1") == []
    assert framer.feed(b"2") == []
    assert framer.feed(b" <13>hello w") == []
    assert framer.feed(b"orld") == [Frame(b"<13>hello wo", False)]
    assert framer.feed(b"\n") == [Frame(b"rld", False)]


def test_byte_at_a_time_equals_whole():
    """Feeding a mixed stream one byte at a time gives the same frames and counters as at once."""
    stream = (
        b"8 <13>oct1<13>line1\r\n123abc\n\n17 <13>with\nnewline\n"
        b"99999999999 x\nCEF:0|a|b\n5 <13>z" + b"<13>tail-without-lf"
    )
    whole, whole_framer = frames_of(stream, max_size=64)
    pieces, pieces_framer = frames_of(stream, max_size=64, chunk=1)
    assert pieces == whole
    assert pieces_framer.counters == whole_framer.counters
    assert datas(whole)[:3] == [b"<13>oct1", b"<13>line1", b"123abc"]
    assert datas(whole)[3] == b"<13>with\nnewline"


def test_end_returns_unterminated_line():
    """At connection close a final line without LF is returned and counted unterminated."""
    framer = OctetOrLineFramer()
    assert framer.feed(b"<13>a\n<13>b") == [Frame(b"<13>a", False)]
    assert framer.end() == [Frame(b"<13>b", False)]
    assert framer.counters["unterminated"] == 1
    assert framer.end() == []


def test_end_returns_partial_octet_frame_truncated():
    """At connection close a counted frame missing bytes is returned marked truncated."""
    framer = OctetOrLineFramer()
    assert framer.feed(b"20 <13>only") == []
    assert framer.end() == [Frame(b"<13>only", True)]
    assert framer.counters["unterminated"] == 1
    assert framer.counters["truncated"] == 1


def test_end_with_pending_digits():
    """At connection close lone digits that never became a count are returned as a line."""
    framer = OctetOrLineFramer()
    assert framer.feed(b"42") == []
    assert framer.end() == [Frame(b"42", False)]


def test_end_while_skipping_returns_nothing():
    """At connection close in the middle of a skipped tail nothing more is returned."""
    framer = OctetOrLineFramer(max_size=8)
    assert framer.feed(b"50 " + b"x" * 20) == [Frame(b"x" * 8, True)]
    assert framer.end() == []
    assert framer.counters["discarded-bytes"] == 12


def test_counters_have_documented_names():
    """The counters dict has exactly the documented reasons, all starting at zero."""
    framer = OctetOrLineFramer()
    assert tuple(framer.counters) == COUNTERS
    assert set(COUNTERS) >= {"frames", "octet-counted", "lf-framed", "truncated", "bad-count"}
    assert not any(framer.counters.values())


def test_framers_share_no_state():
    """Two framers (two connections) keep separate buffers and counters."""
    a, b = OctetOrLineFramer(), OctetOrLineFramer()
    a.feed(b"<13>half")
    assert b.feed(b"<13>other\n") == [Frame(b"<13>other", False)]
    assert a.feed(b" done\n") == [Frame(b"<13>half done", False)]
    assert a.counters["frames"] == b.counters["frames"] == 1


def test_max_size_must_be_positive():
    """A framer with a non-positive maximum size is refused."""
    with pytest.raises(ValueError):
        OctetOrLineFramer(max_size=0)


def _feed_in_chunks(framer, data, chunk):
    frames = []
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        frames += framer.feed(view[i : i + chunk])
    return frames


def test_huge_line_in_small_chunks_is_linear():
    """A 10 MB line fed in 4 KiB chunks is truncated and finished quickly."""
    data = b"<13>" + b"x" * (10 * 1024 * 1024) + b"\n<13>after\n"
    framer = OctetOrLineFramer(max_size=65536)
    started = time.perf_counter()
    frames = _feed_in_chunks(framer, data, 4096)
    elapsed = time.perf_counter() - started
    assert [f.truncated for f in frames] == [True, False]
    assert len(frames[0].data) == 65536
    assert frames[1].data == b"<13>after"
    assert elapsed < 2.0


def test_huge_line_within_max_is_scanned_once():
    """A 10 MB line under a 16 MB maximum fed in 4 KiB chunks is kept whole, quickly."""
    line = b"<13>" + b"y" * (10 * 1024 * 1024)
    framer = OctetOrLineFramer(max_size=16 * 1024 * 1024)
    started = time.perf_counter()
    frames = _feed_in_chunks(framer, line + b"\n", 4096)
    elapsed = time.perf_counter() - started
    assert frames == [Frame(line, False)]
    assert elapsed < 2.0


def test_huge_octet_frame_in_small_chunks_is_linear():
    """A 10 MB counted frame fed in 4 KiB chunks is kept whole, quickly."""
    body = b"<13>" + b"z" * (10 * 1024 * 1024)
    framer = OctetOrLineFramer(max_size=16 * 1024 * 1024)
    started = time.perf_counter()
    frames = _feed_in_chunks(framer, str(len(body)).encode() + b" " + body, 4096)
    elapsed = time.perf_counter() - started
    assert frames == [Frame(body, False)]
    assert elapsed < 2.0


class _StateMachineOnly(OctetOrLineFramer):
    """The framer without its many-lines fast path."""

    def _lines(self, data, pos, frames):
        return pos


_LINE_PIECES = [
    b"<134>Nov 26 23:41:12 web01 nginx[1234]: x", b"\n", b"\r\n", b"\0", b"\r", b"5 ", b"12 ",
    b"0", b"9", b"x" * 70, b"abc", b" ", b"\n\n", b"\0\n", b"\r\0\n",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(_LINE_PIECES), max_size=40).map(b"".join),
    st.lists(st.integers(min_value=1, max_value=50), max_size=6),
    st.sampled_from([8, 64, 65536]),
)
def test_lines_fast_path_matches_state_machine(stream, chunks, max_size):
    """Frames and counters are the same with and without the many-lines fast path."""
    results = []
    for cls in (OctetOrLineFramer, _StateMachineOnly):
        framer = cls(max_size=max_size)
        frames, pos = [], 0
        for size in chunks + [len(stream)]:
            frames += framer.feed(stream[pos : pos + size])
            pos += size
        frames += framer.end()
        results.append((frames, framer.counters))
    assert results[0] == results[1]
    assert all(type(frame.data) is bytes for frame in results[0][0])


@pytest.mark.parametrize("trailer", [b"", b"\r", b"\0", b"\r\0", b"\0\r"])
def test_lines_fast_path_at_size_limit(trailer):
    """Lines around the maximum size are kept, cut or dropped as by the state machine."""
    for n in range(5, 12):
        stream = b"abc\n" + b"x" * n + trailer + b"\n" + b"d\n"
        results = []
        for cls in (OctetOrLineFramer, _StateMachineOnly):
            framer = cls(max_size=8)
            results.append((framer.feed(stream) + framer.end(), framer.counters))
        assert results[0] == results[1]
