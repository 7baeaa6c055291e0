"""
HA, hash and MAC: each replica checks that a batch comes from its publisher.

The publisher shares one MAC key with each replica and attaches to each
batch an authenticator vector: one HMAC-SHA256 per replica, in replica
order, over the batch's digest.  Replica r checks entry r only, so a replica
that lies cannot forge what another accepts.  Subscribers are protected by
the voter's quorum, not by the MACs, which they cannot check.

The proof is C{version (1 byte) | digest (32) | one tag (32) per replica}.
Carrying the digest lets a replica tell a batch altered after it was
protected ('bad-proof') from one protected with the wrong key ('bad-mac').
"""

import hmac
import struct
from hashlib import sha256

from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IProtectionScheme
from fit_broker.units import PAYLOAD, PROOF, PUBLISHER, unpack_contents

NO_KEY = "no-key"
MALFORMED = "malformed"
WRONG_PUBLISHER = "wrong-publisher"
BAD_PROOF = "bad-proof"
BAD_MAC = "bad-mac"

VERSION = 1
DIGEST_SIZE = 32
TAG_SIZE = 32

# Channel and publisher lengths, first id, timestamp, ttl, urgency, payload
# length.  Lengths make the encoding unambiguous; 'd' encodes an int
# timestamp like the equal float, whatever a codec decoded.
_HEADER = struct.Struct("!HHQddqI")
_TAGS_AT = 1 + DIGEST_SIZE
_VERSION_BYTE = bytes((VERSION,))

# What ill-typed fields from a hostile peer raise while being encoded.
MALFORMED_ERRORS = (TypeError, ValueError, AttributeError, IndexError, OverflowError, struct.error)


def batch_header(channel, batch):
    """
    Return the canonical encoding of everything in wire batch C{batch} but
    its payload and proof, bound to C{channel}.
    """
    publisher, first_id, timestamp, ttl, urgency, payload = batch[:PROOF]
    if type(payload) is not bytes:
        raise TypeError("a payload is bytes")
    ch = channel.encode("utf-8")
    pub = publisher.encode("utf-8")
    return _HEADER.pack(len(ch), len(pub), first_id, timestamp, ttl, urgency, len(payload)) + ch + pub


def batch_digest(domain, channel, batch):
    """
    Return the SHA-256 digest of wire batch C{batch} on C{channel}, every
    field but the proof, under the scheme's C{domain} tag.

    @raise TypeError: or another of L{MALFORMED_ERRORS}, when a field has
        the wrong type or range.
    """
    h = sha256(domain)
    h.update(batch_header(channel, batch))
    h.update(batch[PAYLOAD])
    return h.digest()


@implementer(IPlugin, IProtectionScheme)
class HashAuthenticators:
    """
    One MAC per replica per batch.
    """

    name = "ha"
    subscriber_verifiable = False
    domain = b"FITB-HA1"

    def protect(self, keys, channel, batch):
        publisher = batch[PUBLISHER]
        mac_keys = []
        while (key := keys.mac_key(publisher, len(mac_keys))) is not None:
            mac_keys.append(key)
        if not mac_keys:
            raise ConfigError(f"key ring {keys.identity!r} holds no MAC keys for {publisher!r}")
        digest = batch_digest(self.domain, channel, batch)
        tags = [hmac.digest(key, digest, "sha256") for key in mac_keys]
        return batch[:PROOF] + (b"".join([_VERSION_BYTE, digest, *tags]),)

    def check_batch(self, keys, channel, publisher, batch):
        replica = getattr(keys, "replica_index", None)
        if replica is None:
            return NO_KEY
        try:
            if batch[PUBLISHER] != publisher:
                return WRONG_PUBLISHER
            proof = batch[PROOF]
            start = _TAGS_AT + replica * TAG_SIZE
            if (
                type(proof) is not bytes
                or len(proof) < start + TAG_SIZE
                or (len(proof) - _TAGS_AT) % TAG_SIZE
                or proof[0] != VERSION
            ):
                return MALFORMED
            key = keys.mac_key(publisher, replica)
            if key is None:
                return NO_KEY
            digest = batch_digest(self.domain, channel, batch)
        except MALFORMED_ERRORS:
            return MALFORMED
        if digest != proof[1:_TAGS_AT]:
            return BAD_PROOF
        if not hmac.compare_digest(
            hmac.digest(key, digest, "sha256"), proof[start : start + TAG_SIZE]
        ):
            return BAD_MAC
        return None

    def check_delivered(self, keys, channel, batch):
        return None

    def open(self, keys, channel, batch):
        return unpack_contents(batch[PAYLOAD])


ha = HashAuthenticators()
