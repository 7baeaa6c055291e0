"""
RFC 6587 stream framing for syslog over TCP and TLS, sans-IO.

The framing is decided per frame, as rsyslog and Vector do, not once per
connection: a frame that starts with C{NONZERO-DIGIT *DIGIT SP} is octet
counted, anything else runs to the next LF.  A digit-led line that is not a
count (a CEF line, an ISO timestamp without PRI) is therefore read as a
line instead of desynchronising the connection.

Nothing is lost silently: every byte ends in a frame, in a counted
truncation, or in a counted discard; the framer always stays in step with
the sender.  One C{bytearray} holds unconsumed input, and a line is scanned
for LF only from where the previous scan stopped, so a 10 MB line arriving
in small pieces costs linear time.
"""

import attrs

DEFAULT_MAX_SIZE = 65536

#: The names of L{OctetOrLineFramer.counters}.
COUNTERS = (
    "frames",  # frames returned
    "octet-counted",  # frames returned that were octet counted
    "lf-framed",  # frames returned that were LF framed (or unterminated)
    "truncated",  # frames returned marked truncated
    "bad-count",  # digit-led frames whose count was not one (read as lines)
    "unterminated",  # partial frames returned by end()
    "empty",  # frames empty after trimming, dropped
    "discarded-bytes",  # bytes dropped past the maximum size
)

_DIGITS = b"0123456789"
_NONZERO = b"123456789"
_SP = 0x20
_LF = b"\n"
# Last bytes of a line that trimming may remove.
_TRAILERS = frozenset({b"\0", b"\r"})

# States.
_START = "start"  # at a frame boundary
_OCTETS = "octets"  # reading a counted frame that fits
_HEAD = "head"  # reading the kept head of an oversize counted frame
_SKIP = "skip"  # skipping the rest of an oversize counted frame
_LINE = "line"  # reading an LF-terminated frame
_DISCARD = "discard"  # discarding an oversize line up to its LF

# A counted frame may exceed max_size by a trailing CR LF that is stripped.
_SLACK = 2


def trim_datagram(data):
    """
    Return a datagram's message without the trailer many senders add: the
    same trailing NULs and one trailing LF (or CR LF) dropped in frames.
    """
    data = bytes(data).rstrip(b"\0")
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
        data = data.rstrip(b"\0")
    return data


@attrs.frozen(slots=False)
class Frame:
    """
    One message's bytes, without framing.

    Not slotted: a frozen dict class is built with plain C{__dict__}
    stores, cheaper than a slotted one's C{object.__setattr__} calls, and
    one is built per message.

    @ivar truncated: the sender's frame was longer than the maximum size
        (or was cut by the connection closing); C{data} is its head.
    """

    data: bytes
    truncated: bool = False


class OctetOrLineFramer:
    """
    Splits one connection's byte stream into L{Frame}s.

    Octet-counted frames lose trailing NULs and exactly one trailing LF (or
    CR LF): rsyslog and syslog-ng senders count that LF in MSG-LEN.  Lines
    lose their LF, one CR before it, and trailing NULs.  Empty results are
    counted, not returned.

    Oversize is judged on what arrived, before trimming (a line of more
    than C{max_size + 1} bytes, a count above C{max_size + 2}), so the
    frames and counters never depend on how the stream was split.

    @ivar max_size: the longest frame kept; longer frames keep their head,
        marked truncated, and the rest is skipped by count (octet frames)
        or up to the next LF (lines).
    @ivar counters: reason -> count, with the keys of L{COUNTERS}.
    """

    def __init__(self, max_size=DEFAULT_MAX_SIZE):
        if max_size < 1:
            raise ValueError(f"max_size must be positive, not {max_size!r}")
        self.max_size = max_size
        # A count needs at most the digits of 10x the maximum; more is absurd.
        self._max_digits = len(str(10 * max_size))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._buffer = bytearray()
        self._state = _START
        self._remaining = 0  # bytes still due in _OCTETS, _HEAD or _SKIP
        self._scan = 0  # where the LF search resumes in _LINE

    def feed(self, data):
        """
        Add C{data} and return the list of L{Frame}s it completes.
        """
        buffer = self._buffer
        buffer += data
        frames = []
        pos = 0
        snapshot = None
        while pos < len(buffer):
            state = self._state
            if state == _START:
                if buffer[pos] not in _NONZERO:
                    if snapshot is None:
                        # The buffer does not change until the loop ends.
                        snapshot = bytes(buffer)
                    end = self._lines(snapshot, pos, frames)
                    if end != pos:
                        pos = end
                        continue
                pos = self._start(buffer, pos)
                if self._state == _START:
                    break  # a count's digits, waiting for more
            elif state == _OCTETS:
                if len(buffer) - pos < self._remaining:
                    break
                end = pos + self._remaining
                self._octet_frame(frames, bytes(buffer[pos:end]))
                pos = end
                self._state = _START
            elif state == _HEAD:
                if len(buffer) - pos < self.max_size:
                    break
                end = pos + self.max_size
                self._emit(frames, bytes(buffer[pos:end]), True, "octet-counted")
                self._remaining -= self.max_size
                pos = end
                self._state = _SKIP
            elif state == _SKIP:
                taken = min(self._remaining, len(buffer) - pos)
                self.counters["discarded-bytes"] += taken
                self._remaining -= taken
                pos += taken
                if not self._remaining:
                    self._state = _START
            elif state == _LINE:
                newline = buffer.find(_LF, self._scan)
                if newline < 0:
                    if len(buffer) - pos > self.max_size + 1:
                        # Too long already: keep the head, drop to the LF.
                        end = pos + self.max_size
                        self._emit(frames, bytes(buffer[pos:end]), True, "lf-framed")
                        self.counters["discarded-bytes"] += len(buffer) - end
                        pos = len(buffer)
                        self._state = _DISCARD
                    else:
                        self._scan = len(buffer)
                    break
                self._line_frame(frames, bytes(buffer[pos:newline]))
                pos = newline + 1
                self._state = _START
            else:  # _DISCARD
                newline = buffer.find(_LF, pos)
                end = len(buffer) if newline < 0 else newline
                self.counters["discarded-bytes"] += end - pos
                if newline < 0:
                    pos = end
                    break
                pos = newline + 1
                self._state = _START
        if pos:
            del buffer[:pos]
            self._scan = max(0, self._scan - pos)
        return frames

    def end(self):
        """
        The connection closed: return the partial frame left, if any.

        A partial line is returned as a frame; a partial octet-counted frame
        is returned marked truncated.  Both are counted C{unterminated}.
        """
        buffer = bytes(self._buffer)
        state = self._state
        self._buffer.clear()
        self._state = _START
        self._scan = 0
        frames = []
        if not buffer:
            return frames
        if state in (_START, _LINE):
            before = self.counters["frames"]
            self._line_frame(frames, buffer)
            self.counters["unterminated"] += self.counters["frames"] - before
        elif state in (_OCTETS, _HEAD):
            data = buffer[: self.max_size]
            self.counters["discarded-bytes"] += len(buffer) - len(data)
            self._emit(frames, data, True, "octet-counted")
            self.counters["unterminated"] += 1
        else:
            self.counters["discarded-bytes"] += len(buffer)
        return frames

    def _lines(self, data, pos, frames):
        """
        Frame the complete lines from C{pos} on in one loop; return where
        it stopped.

        The common stream is many short LF-terminated lines per read: this
        frames them as L{_start} and L{_line_frame} would, without a state
        change per line.  It stops, leaving the rest to the state machine,
        at a line that starts with a non-zero digit (it may be octet
        counted), at one too long to keep whole, and at the partial line.
        """
        find = data.find
        limit = self.max_size
        end = len(data)
        emitted = empty = 0
        append = frames.append
        while pos < end:
            first = data[pos]
            if 0x31 <= first <= 0x39:
                break
            newline = find(_LF, pos)
            if newline < 0 or newline - pos > limit:
                break
            line = data[pos:newline]
            pos = newline + 1
            if line[-1:] in _TRAILERS:
                line = line.rstrip(b"\0")
                if line.endswith(b"\r"):
                    line = line[:-1].rstrip(b"\0")
            if line:
                append(Frame(line))
                emitted += 1
            else:
                empty += 1
        if emitted:
            counters = self.counters
            counters["frames"] += emitted
            counters["lf-framed"] += emitted
        if empty:
            self.counters["empty"] += empty
        return pos

    def _start(self, buffer, pos):
        """
        Decide how the frame at C{pos} is framed; return the new position.
        """
        if buffer[pos] not in _NONZERO:
            self._begin_line(pos)
            return pos
        end = pos + 1
        limit = min(len(buffer), pos + self._max_digits + 1)
        while end < limit and buffer[end] in _DIGITS:
            end += 1
        if end - pos > self._max_digits:
            # Absurd count: a line, resynchronised at its LF.
            self.counters["bad-count"] += 1
            self._begin_line(pos)
            return pos
        if end == len(buffer):
            return pos  # need the byte after the digits
        if buffer[end] != _SP:
            self.counters["bad-count"] += 1
            self._begin_line(pos)
            return pos
        count = int(buffer[pos:end])
        if count > self.max_size + _SLACK:
            self._state = _HEAD
        else:
            self._state = _OCTETS
        self._remaining = count
        return end + 1

    def _begin_line(self, pos):
        self._state = _LINE
        self._scan = pos

    def _octet_frame(self, frames, data):
        self._sized(frames, trim_datagram(data), "octet-counted")

    def _line_frame(self, frames, data):
        if len(data) > self.max_size + 1:
            self.counters["discarded-bytes"] += len(data) - self.max_size
            self._emit(frames, data[: self.max_size], True, "lf-framed")
            return
        data = data.rstrip(b"\0")
        if data.endswith(b"\r"):
            data = data[:-1].rstrip(b"\0")
        self._sized(frames, data, "lf-framed")

    def _sized(self, frames, data, kind):
        if len(data) > self.max_size:
            self.counters["discarded-bytes"] += len(data) - self.max_size
            self._emit(frames, data[: self.max_size], True, kind)
        elif not data:
            self.counters["empty"] += 1
        else:
            self._emit(frames, data, False, kind)

    def _emit(self, frames, data, truncated, kind):
        frames.append(Frame(data, truncated))
        self.counters["frames"] += 1
        self.counters[kind] += 1
        if truncated:
            self.counters["truncated"] += 1
