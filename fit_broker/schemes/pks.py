"""
PKS, publisher signatures: a subscriber checks each batch on its own.

The publisher signs each batch once, with Ed25519, over its digest (every
field but the proof, bound to the channel).  Replicas forward the batch
unchanged, so any subscriber holding the publisher's verify key checks it,
and a signature-checking voter can deliver the first copy that verifies
instead of waiting for f+1 identical ones.

The proof is C{version (1 byte) | digest (32) | signature (64)}.  Carrying
the digest tells a batch altered after signing ('bad-proof') from one signed
with the wrong key ('bad-signature').

Verified digests are remembered, with their signature and key, in a bounded
map: the copies of one batch that several replicas forward cost a hash each,
not a signature check each.
"""

from cryptography.exceptions import InvalidSignature
from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.errors import ConfigError
from fit_broker.interfaces import IProtectionScheme
from fit_broker.schemes.ha import MALFORMED_ERRORS, batch_digest
from fit_broker.units import PAYLOAD, PROOF, PUBLISHER, unpack_contents

NO_KEY = "no-key"
MALFORMED = "malformed"
WRONG_PUBLISHER = "wrong-publisher"
BAD_PROOF = "bad-proof"
BAD_SIGNATURE = "bad-signature"

VERSION = 1
DIGEST_SIZE = 32
SIGNATURE_SIZE = 64
PROOF_SIZE = 1 + DIGEST_SIZE + SIGNATURE_SIZE

_SIGNATURE_AT = 1 + DIGEST_SIZE
_VERSION_BYTE = bytes((VERSION,))


class VerifiedDigests:
    """
    Digests whose signature verified, each mapped to C{(verify key,
    signature)}: a copy with the same digest, key and signature bytes
    verifies the same way, so the answer never depends on what came before.

    The map is emptied when it reaches C{size} entries: at worst, one more
    signature check per batch.
    """

    def __init__(self, size):
        self.size = size
        self.entries = {}

    def known(self, digest, verify_key, signature):
        found = self.entries.get(digest)
        return (
            found is not None
            and (found[0] is verify_key or found[0] == verify_key)
            and found[1] == signature
        )

    def add(self, digest, verify_key, signature):
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[digest] = (verify_key, signature)

    def __len__(self):
        return len(self.entries)


@implementer(IPlugin, IProtectionScheme)
class PublisherSignatures:
    """
    One Ed25519 signature per batch.

    @param cache_size: how many verified digests to remember.
    """

    name = "pks"
    subscriber_verifiable = True
    domain = b"FITB-PKS1"

    def __init__(self, cache_size=4096):
        self._verified = VerifiedDigests(cache_size)

    def _seal(self, keys, channel, batch):
        """
        Return C{batch} as it is signed; PKE encrypts its payload here.
        """
        return batch

    def protect(self, keys, channel, batch):
        publisher = batch[PUBLISHER]
        signing_key = keys.signing_key(publisher)
        if signing_key is None:
            raise ConfigError(f"key ring {keys.identity!r} holds no signing key for {publisher!r}")
        batch = self._seal(keys, channel, batch)
        digest = batch_digest(self.domain, channel, batch)
        signature = signing_key.sign(self.domain + digest)
        return batch[:PROOF] + (_VERSION_BYTE + digest + signature,)

    def check_batch(self, keys, channel, publisher, batch):
        try:
            if batch[PUBLISHER] != publisher:
                return WRONG_PUBLISHER
        except MALFORMED_ERRORS:
            return MALFORMED
        return self.check_delivered(keys, channel, batch)

    def check_delivered(self, keys, channel, batch):
        try:
            proof = batch[PROOF]
            if type(proof) is not bytes or len(proof) != PROOF_SIZE or proof[0] != VERSION:
                return MALFORMED
            verify_key = keys.verify_key(batch[PUBLISHER])
            if verify_key is None:
                return NO_KEY
            digest = batch_digest(self.domain, channel, batch)
        except MALFORMED_ERRORS:
            return MALFORMED
        if digest != proof[1:_SIGNATURE_AT]:
            return BAD_PROOF
        signature = proof[_SIGNATURE_AT:]
        if self._verified.known(digest, verify_key, signature):
            return None
        try:
            verify_key.verify(signature, self.domain + digest)
        except InvalidSignature:
            return BAD_SIGNATURE
        self._verified.add(digest, verify_key, signature)
        return None

    def open(self, keys, channel, batch):
        return unpack_contents(batch[PAYLOAD])


pks = PublisherSignatures()
