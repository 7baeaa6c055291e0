"""
The record format of segment files, and a checked reader of it.

A record is a 16-byte header and the payload::

    [u32 length][u32 crc32c][f64 timestamp][payload]

big-endian, where the CRC32C covers the length, the timestamp and the
payload.  Covering the header's fields, not the payload alone, catches a
damaged length or timestamp, and makes a run of zero bytes (what a file
system may leave after a crash that extended a file without writing its
data) fail the check: the CRC32C of an empty payload alone is 0.  The
timestamp is the record's own (a publisher's clock): retention by age
reads it back after a restart without decoding payloads.
"""

import struct

from crc32c import crc32c

HEADER = struct.Struct(">IId")
HEADER_SIZE = HEADER.size
_COVERED = struct.Struct(">Id")

#: The default cap on one payload: a longer length field is damage, and
#: never sizes a read.
MAX_RECORD_BYTES = 16 * 1024 * 1024

#: How much a reader asks the storage for at once.
READ_CHUNK = 256 * 1024


def checksum(length, timestamp, payload):
    """
    Return the CRC32C a record of these fields carries.
    """
    return crc32c(payload, crc32c(_COVERED.pack(length, timestamp)))


_pack_header = HEADER.pack
_pack_covered = _COVERED.pack


def encode(payload, timestamp):
    """
    Return one record holding C{payload}, stamped C{timestamp}.
    """
    length = len(payload)
    crc = crc32c(payload, crc32c(_pack_covered(length, timestamp)))
    return _pack_header(length, crc, timestamp) + payload


class Reader:
    """
    Iterate the records of one file from C{offset} to C{end}, checking each.

    Iterating yields C{(offset, timestamp, payload)}; it stops at C{end} or
    at the first bad record, leaving in L{offset} where the good records end
    and in L{error} why it stopped early (C{None} at C{end}):
    C{"short header"} and C{"past end"} (a record cut short: a torn write,
    or a damaged length), C{"too long"} (a length over the cap),
    C{"checksum"}.
    """

    def __init__(self, storage, name, offset, end, max_record_bytes=MAX_RECORD_BYTES):
        self.storage = storage
        self.name = name
        self.offset = offset
        self.end = end
        self.max_record_bytes = max_record_bytes
        self.error = None

    def __iter__(self):
        storage, name, end, cap = self.storage, self.name, self.end, self.max_record_bytes
        unpack = HEADER.unpack_from
        pos = self.offset
        buf = b""
        buf_at = pos
        while pos < end:
            if end - pos < HEADER_SIZE:
                self.error = "short header"
                break
            rel = pos - buf_at
            if len(buf) - rel < HEADER_SIZE:
                buf = storage.read(name, pos, min(READ_CHUNK, end - pos))
                buf_at, rel = pos, 0
                if len(buf) < HEADER_SIZE:
                    self.error = "short header"
                    break
            length, crc, timestamp = unpack(buf, rel)
            if length > cap:
                self.error = "too long"
                break
            total = HEADER_SIZE + length
            if pos + total > end:
                self.error = "past end"
                break
            if len(buf) - rel < total:
                buf = storage.read(name, pos, max(total, min(READ_CHUNK, end - pos)))
                buf_at, rel = pos, 0
                if len(buf) < total:
                    self.error = "past end"
                    break
            payload = buf[rel + HEADER_SIZE : rel + total]
            if checksum(length, timestamp, payload) != crc:
                self.error = "checksum"
                break
            self.offset = pos + total
            yield pos, timestamp, payload
            pos += total


def count_damaged(storage, name, offset, end, max_record_bytes=MAX_RECORD_BYTES, limit=100_000):
    """
    Return how many records the bytes from C{offset} to C{end} seem to hold,
    following their length fields (at least 1 when there are bytes): an
    estimate of what cutting them loses, exact unless a length is damaged,
    and a lower bound past C{limit} headers.
    """
    count = 0
    pos = offset
    while pos < end and count < limit:
        count += 1
        header = storage.read(name, pos, HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            break
        length = HEADER.unpack(header)[0]
        if length > max_record_bytes:
            break
        pos += HEADER_SIZE + length
    return count
