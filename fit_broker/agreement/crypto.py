"""
Replica signatures for the agreement engine's certificates.

Votes that must convince a third party (write and decision certificates,
STOPDATA, checkpoints) are signed with each replica's Ed25519 key; links
between replicas are MAC'd separately, so a message's sender is known
before any signature is checked.  Crash-tolerant orderers never sign.
"""

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class ReplicaCrypto:
    """
    Signs as replica C{index} and checks every replica's signatures.

    @param signing_key: this replica's L{Ed25519PrivateKey} (or its 32 raw bytes).
    @param verify_keys: replica index -> L{Ed25519PublicKey} (or 32 raw bytes).
    """

    def __init__(self, index, signing_key, verify_keys):
        if isinstance(signing_key, bytes):
            signing_key = Ed25519PrivateKey.from_private_bytes(signing_key)
        self.index = index
        self._signing_key = signing_key
        self._verify_keys = {
            replica: Ed25519PublicKey.from_public_bytes(key) if isinstance(key, bytes) else key
            for replica, key in verify_keys.items()
        }

    def sign(self, data):
        """
        Return this replica's signature of C{data} (64 bytes).
        """
        return self._signing_key.sign(data)

    def verify(self, replica, data, signature):
        """
        Return whether C{signature} is replica C{replica}'s signature of C{data}.
        """
        key = self._verify_keys.get(replica)
        if key is None or type(signature) is not bytes:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


def generate(replicas):
    """
    Return a list of L{ReplicaCrypto}, one per replica, with fresh keys
    (for tests and local clusters).
    """
    keys = [Ed25519PrivateKey.generate() for _ in range(replicas)]
    verify = {i: key.public_key() for i, key in enumerate(keys)}
    return [ReplicaCrypto(i, key, verify) for i, key in enumerate(keys)]
