"""
PKE, publisher signatures over encrypted payloads: replicas verify and
route batches whose content they cannot read.

The publisher encrypts each batch's payload with its channel's key
(AES-256-GCM, once per batch) and then signs the batch as PKS does, so
replicas, which never hold channel keys, check signatures over ciphertext.
The payload becomes C{array header | nonce (12 bytes) | ciphertext | tag
(16)}: the header of the packed contents array stays in clear, because
replicas count a batch's events from it (L{fit_broker.units.payload_count})
for queue bounds; everything after it is encrypted.  The associated data
binds the channel, the publisher, the first event id, timestamp, TTL,
urgency and that header, so a ciphertext moved to another batch or channel
does not open, even for a subscriber that skips the signature.

Nonces are random, one per batch: with 96 bits, a channel key stays safe
for some 2**32 batches, which at 100 events a batch is beyond any
channel's life between key changes.
"""

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.plugin import IPlugin
from zope.interface import implementer

from fit_broker.errors import ConfigError, FitBrokerError
from fit_broker.interfaces import IProtectionScheme
from fit_broker.schemes.ha import MALFORMED_ERRORS, batch_header
from fit_broker.schemes.pks import PublisherSignatures
from fit_broker.units import FIRST_ID, PAYLOAD, PUBLISHER, unpack_contents

NONCE_SIZE = 12
TAG_SIZE = 16

NO_KEY = "no-key"
MALFORMED = "malformed"
BAD_CIPHERTEXT = "bad-ciphertext"

_AD_DOMAIN = b"FITB-PKE1-AD"
_CIPHER_CACHE = 256


class OpenFailed(FitBrokerError, ValueError):
    """
    A batch's payload could not be decrypted.

    @ivar reason: 'no-key', 'malformed' or 'bad-ciphertext'.
    """

    def __init__(self, reason, text):
        super().__init__(f"{text} ({reason})")
        self.reason = reason


def array_header_size(payload):
    """
    Return the size of the msgpack array header that starts C{payload}
    (as L{fit_broker.units.pack_contents} writes it), or 0 if it has none.
    """
    if not payload:
        return 0
    head = payload[0]
    if 0x90 <= head <= 0x9F:
        return 1
    if head == 0xDC:
        return 3
    if head == 0xDD:
        return 5
    return 0


def associated_data(channel, batch):
    """
    Return the bytes that bind a batch's ciphertext to its channel and
    every field but the payload and the proof.
    """
    return _AD_DOMAIN + batch_header(channel, batch[:PAYLOAD] + (b"",))


@implementer(IPlugin, IProtectionScheme)
class PublisherSignaturesEncrypted(PublisherSignatures):
    """
    PKS over a payload encrypted with the channel key.
    """

    name = "pke"
    subscriber_verifiable = True
    domain = b"FITB-PKE1"

    def __init__(self, cache_size=4096):
        super().__init__(cache_size)
        self._ciphers = {}

    def _cipher(self, key):
        """
        Return an AEAD object for C{key}, one per key so that the key
        schedule is paid once, not per batch.
        """
        cipher = self._ciphers.get(key)
        if cipher is None:
            if len(self._ciphers) >= _CIPHER_CACHE:
                self._ciphers.clear()
            cipher = self._ciphers[key] = AESGCM(key)
        return cipher

    def _seal(self, keys, channel, batch):
        key = keys.channel_key(channel)
        if key is None:
            raise ConfigError(f"key ring {keys.identity!r} holds no key for channel {channel!r}")
        payload = batch[PAYLOAD]
        size = array_header_size(payload)
        if not size:
            raise ValueError("a payload is a packed array of contents (fit_broker.units.pack_contents)")
        header = payload[:size]
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = self._cipher(key).encrypt(
            nonce, payload[size:], associated_data(channel, batch) + header
        )
        return batch[:PAYLOAD] + (header + nonce + ciphertext, b"")

    def open(self, keys, channel, batch):
        """
        Return the list of plaintext contents of C{batch}.

        @raise OpenFailed: (a C{ValueError}) when this party holds no key
            for C{channel} or the payload does not decrypt with it.
        """
        key = keys.channel_key(channel)
        if key is None:
            raise OpenFailed(NO_KEY, f"no key for channel {channel!r}")
        try:
            sealed = batch[PAYLOAD]
            ad = associated_data(channel, batch)
        except MALFORMED_ERRORS as e:
            raise OpenFailed(MALFORMED, f"batch fields do not encode: {e}") from None
        size = array_header_size(sealed) if type(sealed) is bytes else 0
        if not size or len(sealed) < size + NONCE_SIZE + TAG_SIZE:
            raise OpenFailed(MALFORMED, "payload is not an array header and a ciphertext")
        header = sealed[:size]
        nonce = sealed[size : size + NONCE_SIZE]
        try:
            rest = self._cipher(key).decrypt(nonce, sealed[size + NONCE_SIZE :], ad + header)
        except InvalidTag:
            raise OpenFailed(
                BAD_CIPHERTEXT,
                f"payload of batch {batch[FIRST_ID]!r} from {batch[PUBLISHER]!r} does not decrypt "
                f"with the key of channel {channel!r}",
            ) from None
        try:
            return unpack_contents(header + rest)
        except ValueError as e:
            raise OpenFailed(MALFORMED, f"decrypted payload: {e}") from None


pke = PublisherSignaturesEncrypted()
