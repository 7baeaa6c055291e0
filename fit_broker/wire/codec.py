"""
The message codec: one version byte, then a msgpack array.

Messages::

    request:  [1, seq, method, channel, count, events, options]
    reply:    [2, seq, status, text, channel, events, info]
    delivery: [3, channel, events]

and events are 7-element arrays in L{fit_broker.units.EVENT_FIELDS} order.
Decoding never builds anything but lists, tuples, dicts, str, bytes, ints and
floats (msgpack executes no code), and every message is checked for shape and
types before it leaves this module: a peer's bad bytes become a
L{ProtocolError} with what was wrong, never an exception elsewhere.
"""

import msgpack

from fit_broker.errors import ProtocolError
from fit_broker.units import METHODS, Delivery, Reply, Request
from fit_broker.wire.framing import frame

VERSION = 1
_VERSION_BYTE = bytes([VERSION])
REQUEST, REPLY, DELIVERY = 1, 2, 3

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
                request.events,
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
                reply.events,
                reply.info,
            )
        )
    )


def encode_delivery(channel, events):
    """
    Encode a pushed batch; C{events} is a sequence of wire tuples.
    """
    return frame(_VERSION_BYTE + _pack((DELIVERY, channel, events)))


def _check_events(events):
    if type(events) is not tuple:
        raise ProtocolError("events must be an array")
    for event in events:
        if (
            type(event) is not tuple
            or len(event) != 7
            or type(event[0]) is not str
            or type(event[1]) is not int
            or type(event[2]) not in (float, int)
            or type(event[3]) not in (float, int)
            or type(event[4]) is not int
            or type(event[5]) is not bytes
            or type(event[6]) is not bytes
        ):
            raise ProtocolError(
                "each event must be [publisher:str, event_id:int, timestamp:float, "
                "ttl:float, urgency:int, content:bin, protection:bin]"
            )
    return events


def decode(payload):
    """
    Decode one frame payload into a L{Request}, L{Reply} or L{Delivery}.

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
            _, channel, events = message
            if type(channel) is not str:
                raise ProtocolError("delivery channel must be a string")
            return Delivery(channel, _check_events(events))
        if kind == REQUEST:
            _, seq, method, channel, count, events, options = message
            if (
                type(seq) is not int
                or type(method) is not str
                or type(channel) is not str
                or type(count) is not int
                or type(options) is not dict
            ):
                raise ProtocolError("request fields have the wrong types")
            if method not in METHODS:
                raise ProtocolError(f"unknown method {method[:40]!r}")
            return Request(seq, method, channel, count, _check_events(events), options)
        if kind == REPLY:
            _, seq, status, text, channel, events, info = message
            if (
                type(seq) is not int
                or type(status) is not str
                or type(text) is not str
                or type(channel) is not str
                or type(info) is not dict
            ):
                raise ProtocolError("reply fields have the wrong types")
            return Reply(seq, status, text, _check_events(events), channel, info)
    except ValueError:
        raise ProtocolError(f"message of kind {kind} has the wrong number of fields") from None
    raise ProtocolError(f"unknown message kind {kind}")
