"""
EXAMPLE ONLY, NOT SECURITY: the 'rot13-demo' protection scheme.

It shows the shape of a drop-in scheme: a module-level instance providing
both C{IPlugin} and C{IProtectionScheme}.  It scrambles each batch's payload
with ROT13 and attaches a CRC-32 of the batch, which catches accidental
corruption and nothing else: anyone can recompute a CRC and undo ROT13.
Never use it for a channel whose events matter; use 'ha', 'pks' or 'pke'.
"""

import struct
import zlib

from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.interfaces import IProtectionScheme
from fit_broker.units import PAYLOAD, PROOF, unpack_contents

_LOWER = b"abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_ROT13 = bytes.maketrans(_LOWER + _UPPER, _LOWER[13:] + _LOWER[:13] + _UPPER[13:] + _UPPER[:13])
_HEADER = struct.Struct("!QddqI")
_CRC = struct.Struct("!I")


def _checksum(channel, batch):
    publisher, first_id, timestamp, ttl, urgency, payload = batch[:PROOF]
    crc = zlib.crc32(channel.encode("utf-8") + b"\0" + publisher.encode("utf-8") + b"\0")
    crc = zlib.crc32(_HEADER.pack(first_id, timestamp, ttl, urgency, len(payload)), crc)
    return _CRC.pack(zlib.crc32(payload, crc))


@implementer(IPlugin, IProtectionScheme)
class Rot13Demo:
    """
    ROT13 payload plus a CRC-32 per batch: a teaching example.
    """

    name = "rot13-demo"
    # A CRC authenticates nothing: a signature-checking voter must never
    # deliver a single copy on its word.
    subscriber_verifiable = False
    # It reads no keys, so a cluster using it needs no keys folder.
    uses_keys = False

    def protect(self, keys, channel, batch):
        scrambled = batch[:PAYLOAD] + (batch[PAYLOAD].translate(_ROT13),)
        return scrambled + (_checksum(channel, scrambled),)

    def check_batch(self, keys, channel, publisher, batch):
        try:
            if batch[0] != publisher:
                return "wrong-publisher"
            if batch[PROOF] != _checksum(channel, batch):
                return "bad-checksum"
        except (TypeError, ValueError, AttributeError, IndexError, OverflowError, struct.error):
            return "malformed"
        return None

    def check_delivered(self, keys, channel, batch):
        return None

    def open(self, keys, channel, batch):
        return unpack_contents(batch[PAYLOAD].translate(_ROT13))


rot13_demo = Rot13Demo()
