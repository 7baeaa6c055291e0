"""
The message codec: one version byte, then a msgpack array.

Messages::

    request:  [1, seq, method, channel, count, batches, options]
    reply:    [2, seq, status, text, channel, batches, info]
    delivery: [3, channel, batches]
    ordered:  [4, channel, entries, watermark]   (entry: [position, seq, batch, note, span])
    peer:     [5, sender, counter, kind, body, mac]   (between replicas)

and batches are 7-element arrays in L{fit_broker.units.BATCH_FIELDS} order,
whose payload stays one opaque byte string.
Decoding never builds anything but lists, tuples, dicts, str, bytes, ints and
floats (msgpack executes no code), and every message is checked for shape and
types before it leaves this module: a peer's bad bytes become a
L{ProtocolError} with what was wrong, never an exception elsewhere.
"""

from typing import NamedTuple

import msgpack

from fit_broker.errors import ProtocolError
from fit_broker.units import METHODS, TOMBSTONE_NOTES, Delivery, OrderedDelivery, Reply, Request
from fit_broker.wire.framing import frame

VERSION = 1
_VERSION_BYTE = bytes([VERSION])
REQUEST, REPLY, DELIVERY = 1, 2, 3
ORDERED_DELIVERY = 4
PEER = 5

_MAX_STR = 1 << 20
_pack = msgpack.Packer(use_bin_type=True).pack


def encode_request(request):
    return frame(
        _VERSION_BYTE
        + _pack(
            (
                REQUEST,
                request.seq,
                request.method,
                request.channel,
                request.count,
                request.batches,
                request.options,
            )
        )
    )


def encode_reply(reply):
    return frame(
        _VERSION_BYTE
        + _pack(
            (
                REPLY,
                reply.seq,
                reply.status,
                reply.text,
                reply.channel,
                reply.batches,
                reply.info,
            )
        )
    )


def encode_delivery(channel, batches):
    """
    Encode pushed batches (wire tuples).
    """
    return frame(_VERSION_BYTE + _pack((DELIVERY, channel, batches)))


def encode_ordered_delivery(channel, entries, watermark):
    """
    Encode pushed entries of an ordered channel, C{(position, seq, batch,
    note, span)} tuples, and the replica's watermark for the channel.
    """
    return frame(_VERSION_BYTE + _pack((ORDERED_DELIVERY, channel, entries, watermark)))


class PeerFrame(NamedTuple):
    """
    A frame from replica C{sender} on a link between replicas; C{mac} is
    checked by L{fit_broker.replica.peers}, not here.
    """

    sender: int
    counter: int
    kind: str
    body: bytes
    mac: bytes


def encode_peer_frame(sender, counter, kind, body, mac):
    return frame(_VERSION_BYTE + _pack((PEER, sender, counter, kind, body, mac)))


def check_batches(batches):
    """
    Return C{batches} when it is a tuple of well-formed wire batches.

    @raise ProtocolError: naming the expected shape otherwise.
    """
    return _check_batches(batches)


def _check_batches(batches):
    if type(batches) is not tuple:
        raise ProtocolError("batches must be an array")
    for batch in batches:
        if (
            type(batch) is not tuple
            or len(batch) != 7
            or type(batch[0]) is not str
            or type(batch[1]) is not int
            or type(batch[2]) not in (float, int)
            or type(batch[3]) not in (float, int)
            or type(batch[4]) is not int
            or type(batch[5]) is not bytes
            or type(batch[6]) is not bytes
        ):
            raise ProtocolError(
                "each batch must be [publisher:str, first_id:int, timestamp:float, "
                "ttl:float, urgency:int, payload:bin, proof:bin]"
            )
    return batches


_NOTES = frozenset(("",) + TOMBSTONE_NOTES)


def _check_entries(entries):
    if type(entries) is not tuple:
        raise ProtocolError("ordered entries must be an array")
    for entry in entries:
        if type(entry) is not tuple or len(entry) != 5:
            raise ProtocolError("each ordered entry must be [position, seq, batch, note, span]")
        position, seq, batch, note, span = entry
        if type(position) is not int or position < 1 or type(seq) is not int or seq < 0:
            raise ProtocolError("an ordered entry needs a position >= 1 and a seq >= 0 (integers)")
        if type(note) is not str or note not in _NOTES:
            raise ProtocolError(f"an ordered entry's note must be one of {sorted(_NOTES)}")
        if type(span) is not int or span < 1 or (not note and span != 1):
            raise ProtocolError("an ordered entry's span must be 1, or >= 1 for a tombstone")
        _check_batches((batch,))
        if note and (batch[5] or len(batch[6]) != 32):
            raise ProtocolError("a tombstone's batch must be a digest form (empty payload, 32-byte proof)")
    return entries


def _expect_types(what, fields, types):
    """Refuse a message unless each of its C{fields} has exactly the type in C{types}."""
    if tuple(map(type, fields)) != types:
        raise ProtocolError(f"{what} fields have the wrong types")


def decode(payload):
    """
    Decode one frame payload into a L{Request}, L{Reply}, L{Delivery} or
    L{OrderedDelivery}.

    @raise ProtocolError: when the payload is not a valid message.
    """
    if not payload:
        raise ProtocolError("empty frame")
    if payload[0] != VERSION:
        raise ProtocolError(f"unsupported protocol version {payload[0]}, expected {VERSION}")
    try:
        message = msgpack.unpackb(
            memoryview(payload)[1:],
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=_MAX_STR,
        )
    except Exception as e:
        raise ProtocolError(f"undecodable message: {type(e).__name__}") from None
    if type(message) is not tuple or not message or type(message[0]) is not int:
        raise ProtocolError("message must be an array starting with its kind")
    kind = message[0]
    try:
        if kind == DELIVERY:
            _, channel, batches = message
            if type(channel) is not str:
                raise ProtocolError("delivery channel must be a string")
            return Delivery(channel, _check_batches(batches))
        if kind == ORDERED_DELIVERY:
            _, channel, entries, watermark = message
            if type(channel) is not str:
                raise ProtocolError("delivery channel must be a string")
            if type(watermark) is not int or watermark < 0:
                raise ProtocolError("an ordered delivery's watermark must be an integer >= 0")
            return OrderedDelivery(channel, _check_entries(entries), watermark)
        if kind == REQUEST:
            _, seq, method, channel, count, batches, options = message
            _expect_types("request", (seq, method, channel, count, options), (int, str, str, int, dict))
            if method not in METHODS:
                raise ProtocolError(f"unknown method {method[:40]!r}")
            return Request(seq, method, channel, count, _check_batches(batches), options)
        if kind == REPLY:
            _, seq, status, text, channel, batches, info = message
            _expect_types("reply", (seq, status, text, channel, info), (int, str, str, str, dict))
            return Reply(seq, status, text, _check_batches(batches), channel, info)
        if kind == PEER:
            _, sender, counter, peer_kind, body, mac = message
            _expect_types(
                "peer frame", (sender, counter, peer_kind, body, mac), (int, int, str, bytes, bytes)
            )
            return PeerFrame(sender, counter, peer_kind, body, mac)
    except ValueError:
        raise ProtocolError(f"message of kind {kind} has the wrong number of fields") from None
    raise ProtocolError(f"unknown message kind {kind}")
