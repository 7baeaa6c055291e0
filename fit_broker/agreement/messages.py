"""
The agreement engine's messages: one version byte, then a msgpack array
whose first element is the message kind.

Values travel as their canonical encodings (bytes, see
L{fit_broker.agreement.values}); certificates are arrays of
C{[replica, signature]} pairs.  L{decode} checks every message for shape
and types before the engine sees it (like L{fit_broker.wire.codec}):
bad bytes from a peer become a L{MessageError}, never another exception.

Messages (i instance, r regency, d 32-byte digest, L last decided instance)::

    HAVE            [1, values]
    PROPOSE         [2, i, r, timestamp, values]
    WRITE           [3, i, r, d, signature]
    ACCEPT          [4, i, r, d, signature]
    VALUE_REQUEST   [5, i, d]
    VALUE_REPLY     [6, i, timestamp, values]
    STOP            [7, r, L]
    STOPDATA        [8, body, signature]    body = msgpack [r, L, entry|nil, write|nil]
    SYNC            [9, r, [[replica, body, signature], ...], proposal|nil]
    CHECKPOINT      [10, c, digest, signature]
    STATE_REQUEST   [11, from]
    STATE_REPLY     [12, L, recovering, checkpoint|nil, [entry, ...], history|nil]
    STATUS          [13, r, L]

where an entry (a decided instance) is ``[i, r, timestamp, values, certificate]``,
a STOPDATA's write is ``[r, timestamp, values, certificate]`` (the sender's
highest write certificate for instance L+1 with its proposal; in
crash-tolerant mode the proposal it accepted, with no certificate), a
proposal is ``[timestamp, values]`` and a checkpoint is
``[c, chain, state, certificate]``.  A history is ``[chain, [[timestamp,
keys], ...]]``: the instances up to a checkpoint, as the timestamps and
concatenated value keys of their proposals, starting after the hash chain
C{chain}, so that a replica restoring the checkpoint learns which values
were decided before it.
"""

import hashlib
import math
import struct

import msgpack

from fit_broker.agreement.values import MAX_VALUE_BYTES

VERSION = 1
_VERSION_BYTE = bytes([VERSION])

HAVE = 1
PROPOSE = 2
WRITE = 3
ACCEPT = 4
VALUE_REQUEST = 5
VALUE_REPLY = 6
STOP = 7
STOPDATA = 8
SYNC = 9
CHECKPOINT = 10
STATE_REQUEST = 11
STATE_REPLY = 12
STATUS = 13

KIND_NAMES = {
    HAVE: "have",
    PROPOSE: "propose",
    WRITE: "write",
    ACCEPT: "accept",
    VALUE_REQUEST: "value_request",
    VALUE_REPLY: "value_reply",
    STOP: "stop",
    STOPDATA: "stopdata",
    SYNC: "sync",
    CHECKPOINT: "checkpoint",
    STATE_REQUEST: "state_request",
    STATE_REPLY: "state_reply",
    STATUS: "status",
}

MAX_INT = 1 << 62
MAX_SIGNATURE = 256
MAX_VALUES = 1 << 16
MAX_CERTIFICATE = 1024
MAX_ENTRIES = 1 << 16

_packb = msgpack.Packer(use_bin_type=True).pack
_sha256 = hashlib.sha256
_TS = struct.Struct(">d")


class MessageError(ValueError):
    """
    Bytes from a peer that are not a well-formed agreement message.
    """


def _pack(message):
    return _VERSION_BYTE + _packb(message)


# --- digests and signed payloads --------------------------------------------


def proposal_digest(timestamp, values):
    """
    Return the digest of a proposal, the d that votes carry (values as
    their encodings).
    """
    return keys_digest(timestamp, b"".join([_sha256(v).digest() for v in values]))


def keys_digest(timestamp, keys):
    """
    Return the digest of a proposal from its timestamp and the
    concatenated keys (sha256 of each encoding) of its values, so a chain of
    decided proposals can be checked from their keys alone.
    """
    return _sha256(_TS.pack(float(timestamp)) + keys).digest()


def vote_payload(kind, instance, regency, digest):
    """
    Return the bytes a WRITE (C{kind} "write") or ACCEPT ("accept") signs.
    """
    return _packb((kind, instance, regency, digest))


def checkpoint_digest(instance, chain, state_digest):
    """
    Return the digest replicas compare at checkpoint C{instance}.
    """
    return _sha256(_packb(("checkpoint", instance, chain, state_digest))).digest()


def checkpoint_payload(instance, digest):
    return _packb(("checkpoint", instance, digest))


def stopdata_payload(body):
    return b"stopdata" + _sha256(body).digest()


def chain_next(chain, digest):
    """
    Return the hash chain over decided proposals after one more digest.
    """
    return _sha256(chain + digest).digest()


# --- encoders -----------------------------------------------------------------


def encode_have(values):
    return _pack((HAVE, values))


def encode_propose(instance, regency, timestamp, values):
    return _pack((PROPOSE, instance, regency, timestamp, values))


def encode_write(instance, regency, digest, signature):
    return _pack((WRITE, instance, regency, digest, signature))


def encode_accept(instance, regency, digest, signature):
    return _pack((ACCEPT, instance, regency, digest, signature))


def encode_value_request(instance, digest):
    return _pack((VALUE_REQUEST, instance, digest))


def encode_value_reply(instance, timestamp, values):
    return _pack((VALUE_REPLY, instance, timestamp, values))


def encode_stop(regency, last):
    return _pack((STOP, regency, last))


def encode_stopdata_body(regency, last, entry, write):
    return _packb((regency, last, entry, write))


def encode_stopdata(body, signature):
    return _pack((STOPDATA, body, signature))


def encode_sync(regency, stopdatas, proposal):
    return _pack((SYNC, regency, stopdatas, proposal))


def encode_checkpoint(instance, digest, signature):
    return _pack((CHECKPOINT, instance, digest, signature))


def encode_state_request(first):
    return _pack((STATE_REQUEST, first))


def encode_state_reply(last, recovering, checkpoint, entries, history=None):
    return _pack((STATE_REPLY, last, bool(recovering), checkpoint, entries, history))


def encode_status(regency, last):
    return _pack((STATUS, regency, last))


# --- strict decoding -----------------------------------------------------------


def _int(x, low=0):
    if type(x) is not int or x < low or x >= MAX_INT:
        raise MessageError("bad integer field")
    return x


def _time(x):
    if type(x) is int:
        x = float(x)
    if type(x) is not float or not math.isfinite(x) or abs(x) > 1e12:
        raise MessageError("bad timestamp")
    return x


def _digest(x):
    if type(x) is not bytes or len(x) != 32:
        raise MessageError("a digest must be 32 bytes")
    return x


def _signature(x):
    if type(x) is not bytes or len(x) > MAX_SIGNATURE:
        raise MessageError("bad signature field")
    return x


def _values(x):
    if type(x) is not tuple or len(x) > MAX_VALUES:
        raise MessageError("values must be an array")
    for data in x:
        if type(data) is not bytes or not data or len(data) > MAX_VALUE_BYTES:
            raise MessageError("each value must be 1 to 65536 bytes")
    return x


def _certificate(x):
    if type(x) is not tuple or len(x) > MAX_CERTIFICATE:
        raise MessageError("a certificate must be an array")
    for pair in x:
        if type(pair) is not tuple or len(pair) != 2:
            raise MessageError("a certificate holds [replica, signature] pairs")
        _int(pair[0])
        _signature(pair[1])
    return x


def _entry(x):
    if type(x) is not tuple or len(x) != 5:
        raise MessageError("an entry is [instance, regency, timestamp, values, certificate]")
    return (_int(x[0], 1), _int(x[1]), _time(x[2]), _values(x[3]), _certificate(x[4]))


def _write(x):
    if type(x) is not tuple or len(x) != 4:
        raise MessageError("a write is [regency, timestamp, values, certificate]")
    return (_int(x[0]), _time(x[1]), _values(x[2]), _certificate(x[3]))


def _proposal(x):
    if type(x) is not tuple or len(x) != 2:
        raise MessageError("a proposal is [timestamp, values]")
    return (_time(x[0]), _values(x[1]))


def _unpack(data):
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=False, max_map_len=0, max_ext_len=0, strict_map_key=True
        )
    except Exception as e:
        raise MessageError(f"undecodable message: {type(e).__name__}") from None


def decode_stopdata_body(body):
    """
    Decode a STOPDATA body into C{(regency, last, entry|None, write|None)}.

    @raise MessageError: when it is malformed.
    """
    x = _unpack(body)
    if type(x) is not tuple or len(x) != 4:
        raise MessageError("a stopdata body is [regency, last, entry, write]")
    regency, last, entry, write = x
    _int(regency)
    _int(last)
    if entry is not None:
        entry = _entry(entry)
        if entry[0] != last:
            raise MessageError("a stopdata's entry must be its last decided instance")
    if write is not None:
        write = _write(write)
    return (regency, last, entry, write)


def decode(data):
    """
    Decode one message into a tuple whose first element is its kind, with
    timestamps as floats.

    @raise MessageError: when C{data} is not a well-formed message.
    """
    if not data:
        raise MessageError("empty message")
    if data[0] != VERSION:
        raise MessageError(f"unsupported agreement version {data[0]}")
    m = _unpack(memoryview(data)[1:])
    if type(m) is not tuple or not m or type(m[0]) is not int:
        raise MessageError("a message is an array starting with its kind")
    kind = m[0]
    n = len(m)
    if kind == HAVE and n == 2:
        _values(m[1])
        return m
    if kind == PROPOSE and n == 5:
        return (kind, _int(m[1], 1), _int(m[2]), _time(m[3]), _values(m[4]))
    if (kind == WRITE or kind == ACCEPT) and n == 5:
        return (kind, _int(m[1], 1), _int(m[2]), _digest(m[3]), _signature(m[4]))
    if kind == VALUE_REQUEST and n == 3:
        return (kind, _int(m[1], 1), _digest(m[2]))
    if kind == VALUE_REPLY and n == 4:
        return (kind, _int(m[1], 1), _time(m[2]), _values(m[3]))
    if (kind == STOP or kind == STATUS) and n == 3:
        return (kind, _int(m[1]), _int(m[2]))
    if kind == STOPDATA and n == 3:
        if type(m[1]) is not bytes:
            raise MessageError("a stopdata body must be bytes")
        return (kind, m[1], _signature(m[2]))
    if kind == SYNC and n == 4:
        stopdatas = m[2]
        if type(stopdatas) is not tuple or len(stopdatas) > MAX_CERTIFICATE:
            raise MessageError("a sync's stopdatas must be an array")
        for s in stopdatas:
            if type(s) is not tuple or len(s) != 3 or type(s[1]) is not bytes:
                raise MessageError("a sync holds [replica, body, signature] triples")
            _int(s[0])
            _signature(s[2])
        proposal = None if m[3] is None else _proposal(m[3])
        return (kind, _int(m[1]), stopdatas, proposal)
    if kind == CHECKPOINT and n == 4:
        return (kind, _int(m[1], 1), _digest(m[2]), _signature(m[3]))
    if kind == STATE_REQUEST and n == 2:
        return (kind, _int(m[1], 1))
    if kind == STATE_REPLY and n == 6:
        if type(m[2]) is not bool:
            raise MessageError("a state reply's recovering flag must be a boolean")
        checkpoint = m[3]
        if checkpoint is not None:
            if type(checkpoint) is not tuple or len(checkpoint) != 4 or type(checkpoint[2]) is not bytes:
                raise MessageError("a checkpoint is [instance, chain, state, certificate]")
            checkpoint = (_int(checkpoint[0], 1), _digest(checkpoint[1]), checkpoint[2], _certificate(checkpoint[3]))
        entries = m[4]
        if type(entries) is not tuple or len(entries) > MAX_ENTRIES:
            raise MessageError("state entries must be an array")
        history = m[5]
        if history is not None:
            if type(history) is not tuple or len(history) != 2 or type(history[1]) is not tuple:
                raise MessageError("a history is [chain, [[timestamp, keys], ...]]")
            _digest(history[0])
            if len(history[1]) > MAX_ENTRIES:
                raise MessageError("history too long")
            for h in history[1]:
                if type(h) is not tuple or len(h) != 2 or type(h[1]) is not bytes or len(h[1]) % 32:
                    raise MessageError("a history entry is [timestamp, keys]")
                _time(h[0])
            if checkpoint is None:
                raise MessageError("a history comes with a checkpoint")
        return (kind, _int(m[1]), m[2], checkpoint, tuple(_entry(e) for e in entries), history)
    if kind in KIND_NAMES:
        raise MessageError(f"{KIND_NAMES[kind]} message with {n} fields")
    raise MessageError(f"unknown agreement message kind {kind}")
