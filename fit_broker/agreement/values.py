"""
Values the replicas agree on, and their identity.

A value is a tuple of str, int, float and bytes (msgpack-able), at most
L{MAX_VALUE_BYTES} once encoded.  On the wire each value travels as its
msgpack encoding, so a replica that already holds a value recognises it by
hashing the bytes, without decoding them again; the first time it sees a
value it decodes it and checks that re-encoding gives the same bytes, so a
peer cannot give one value two identities.
"""

import hashlib

import msgpack

MAX_VALUE_BYTES = 64 * 1024

_packb = msgpack.Packer(use_bin_type=True).pack
_sha256 = hashlib.sha256
_FIELD_TYPES = (str, int, float, bytes)


def encode_value(value):
    """
    Return the canonical encoding of C{value} (msgpack, binary type for bytes).
    """
    return _packb(value)


def value_key(value):
    """
    Return the identity of C{value}: the sha256 digest (32 bytes) of its
    encoding.  Every component that names a value uses this key.
    """
    return _sha256(_packb(value)).digest()


def check_value(value):
    """
    Return C{None} when C{value} has a value's shape, or a one-line reason.
    """
    if type(value) is not tuple:
        return "a value must be a tuple"
    for field in value:
        if type(field) not in _FIELD_TYPES:
            return f"a value's fields must be str, int, float or bytes, not {type(field).__name__}"
    return None


def decode_value(data):
    """
    Return the value whose canonical encoding is C{data}.

    @raise ValueError: when C{data} is not the canonical encoding of a value.
    """
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError("value too large")
    try:
        value = msgpack.unpackb(
            data, raw=False, use_list=False, max_map_len=0, max_ext_len=0, strict_map_key=True
        )
    except Exception as e:
        raise ValueError(f"undecodable value: {type(e).__name__}") from None
    reason = check_value(value)
    if reason is not None:
        raise ValueError(reason)
    if _packb(value) != data:
        raise ValueError("value not in canonical encoding")
    return value
