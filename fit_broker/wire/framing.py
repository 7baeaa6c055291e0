"""
Length-prefixed framing, sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes.  The
decoder keeps one C{bytearray} and slices it with C{memoryview}, so large
frames arriving in many pieces are not re-concatenated on every read (which
is what makes C{IntNStringReceiver} slow past ~100 KB frames).
"""

import struct

from fit_broker.errors import ProtocolError

_LENGTH = struct.Struct(">I")
HEADER_SIZE = _LENGTH.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


def frame(payload):
    """
    Return C{payload} with its length prefix.
    """
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """
    Splits a byte stream into frame payloads.

    @ivar max_frame: the largest payload accepted; a longer announced length
        raises L{ProtocolError} at once, before any of it is buffered.
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data):
        """
        Add C{data} and return the list of complete payloads (bytes).
        """
        buffer = self._buffer
        buffer += data
        payloads = []
        offset = 0
        available = len(buffer)
        view = memoryview(buffer)
        try:
            while available - offset >= HEADER_SIZE:
                (length,) = _LENGTH.unpack_from(buffer, offset)
                if length > self.max_frame:
                    raise ProtocolError(
                        f"frame of {length} bytes announced, at most {self.max_frame} allowed"
                    )
                end = offset + HEADER_SIZE + length
                if end > available:
                    break
                payloads.append(bytes(view[offset + HEADER_SIZE : end]))
                offset = end
        finally:
            view.release()
        if offset:
            del buffer[:offset]
        return payloads

    @property
    def buffered(self):
        """
        Bytes held waiting for the rest of a frame.
        """
        return len(self._buffer)
