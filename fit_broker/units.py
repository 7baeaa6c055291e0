"""
Data units: events, requests and replies.

Events travel in batches (L{Batch}); L{Event} is the value the client API
hands to applications.
"""

from hashlib import sha256
from zlib import crc32

import attrs
import msgpack

BATCH_FIELDS = ("publisher", "first_id", "timestamp", "ttl", "urgency", "payload", "proof")
PUBLISHER, FIRST_ID, TIMESTAMP, TTL, URGENCY, PAYLOAD, PROOF = range(7)
MAX_BATCH_EVENTS = 65_535

_pack_contents = msgpack.Packer(use_bin_type=True).pack


def pack_contents(contents):
    """
    Encode a list of event contents (bytes) as a batch payload.
    """
    return _pack_contents(contents)


_ONLY_BYTES = frozenset({bytes})


def unpack_contents(payload):
    """
    Decode a batch payload into its list of contents.

    @raise ValueError: when C{payload} is not an array of byte strings.
    """
    try:
        contents = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as e:
        raise ValueError(f"undecodable payload: {type(e).__name__}") from None
    if type(contents) is not list or not set(map(type, contents)) <= _ONLY_BYTES:
        raise ValueError("payload must be an array of byte strings")
    return contents


def payload_count(payload):
    """
    Return how many events a payload holds, from its array header alone, or
    0 when the header is not that of a non-empty array.

    Replicas count events for queue bounds without decoding the contents.
    """
    if not payload:
        return 0
    head = payload[0]
    if 0x91 <= head <= 0x9F:
        return head - 0x90
    if head == 0xDC and len(payload) >= 3:
        return (payload[1] << 8) | payload[2]
    return 0


# Request methods.
HELLO = "hello"
REGISTER = "register"
UNREGISTER = "unregister"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
PUBLISH = "publish"
RECEIVE = "receive"
CREDIT = "credit"
ACK = "ack"
FETCH = "fetch"
STATUS = "status"
# A signed control-table change (options "change", "signature"), and the table.
ADMIN = "admin"
TABLE = "table"
METHODS = frozenset(
    {HELLO, REGISTER, UNREGISTER, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, RECEIVE, CREDIT, ACK, FETCH, STATUS,
     ADMIN, TABLE}
)


@attrs.define(slots=True)
class Event:
    """
    One event as a publisher sent it.  Its identity is C{(publisher, event_id)}.

    Treat it as read-only.  It is not frozen because subscribers make one per
    delivered event, and a frozen attrs class costs three times as much to
    build.

    @ivar timestamp: the publisher's clock, seconds since the epoch.
    @ivar ttl: seconds after C{timestamp} at which the event expires.
    @ivar urgency: 0 is the least urgent; higher levels leave queues first.
    @ivar position: the log position of its batch on an ordered channel,
        else C{None} (see L{OrderedEvent}).
    @ivar seq: its batch's sequence number on an ordered channel, else C{None}.
    """

    publisher: str
    event_id: int
    timestamp: float
    ttl: float
    urgency: int
    content: bytes
    # Class attributes, not fields: unordered events are built by the
    # million, and two more fields would cost each of them.
    position = None
    seq = None

    @property
    def deadline(self):
        return self.timestamp + self.ttl


@attrs.define(slots=True)
class OrderedEvent(Event):
    """
    An event of an ordered channel: L{Event} with the log position and the
    channel's sequence number of the batch it came in.
    """

    position: int | None = attrs.field(default=None, kw_only=True)
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Batch:
    """
    Events one publisher published together on one channel: the unit that
    travels, is authenticated, queued, voted on and deduplicated.

    Events of a batch share timestamp, TTL and urgency, and have the ids
    C{first_id} to C{first_id + count - 1}.  Replicas never decode the
    payload: they forward the publisher's bytes, and a subscriber decodes
    only the copy that wins the vote.  On hot paths a batch is the plain
    tuple L{to_wire} returns, in L{BATCH_FIELDS} order.

    @ivar payload: the contents, as L{pack_contents} encodes them (PKE:
        encrypted).
    @ivar proof: what the channel's protection scheme attached.
    """

    publisher: str
    first_id: int
    timestamp: float
    ttl: float
    urgency: int
    payload: bytes
    proof: bytes = b""

    def to_wire(self):
        return (
            self.publisher,
            self.first_id,
            self.timestamp,
            self.ttl,
            self.urgency,
            self.payload,
            self.proof,
        )


def credit_cost(batch):
    """
    Return the flow-control credits a pushed batch uses: its events, or 1
    for a digest copy.  Replicas and subscribers must count alike.
    """
    return payload_count(batch[5]) or 1


# The most flow-control credit a subscriber may give one replica on one
# channel: replicas cap it there, and subscribers never give more, so both
# count the same.  It bounds what a replica holds sent and unacknowledged.
MAX_CREDIT_EVENTS = 65_536
MAX_CREDIT_BYTES = 16 * 1024 * 1024

# Bytes a batch is charged beyond its payload and proof: header, tuple, entry.
BATCH_OVERHEAD = 64


def batch_bytes(batch):
    """
    Return the bytes a wire batch is charged in queue bounds, byte credits
    and voter bounds.  Replicas and subscribers must count alike.
    """
    return len(batch[5]) + len(batch[6]) + BATCH_OVERHEAD


def batch_digest(batch):
    """
    Return the SHA-256 digest that stands for a whole wire batch in votes:
    over the encoded header, then the payload and proof as they are (no copy
    of the payload is made).
    """
    publisher, first_id, timestamp, ttl, urgency, payload, proof = batch
    digest = sha256(_pack_contents((publisher, first_id, timestamp, ttl, urgency, len(payload))))
    digest.update(payload)
    digest.update(proof)
    return digest.digest()


def digest_form(batch, digest):
    """
    Return the light copy of C{batch} a replica sends when it is not one of
    the replicas designated to send the full batch: the header, an empty
    payload (which no real batch has) and the digest in place of the proof.
    """
    return (batch[0], batch[1], batch[2], batch[3], batch[4], b"", digest)


def full_copy_senders(publisher, first_id, replicas, copies):
    """
    Return the index of the first of the C{copies} replicas (counting on,
    modulo C{replicas}) that send the full copy of a batch; the others send
    its digest.  Rotating by batch spreads the bytes over the replicas.
    """
    return crc32(first_id.to_bytes(8, "big", signed=True), crc32(publisher.encode())) % replicas


@attrs.frozen
class DeliveredBatch:
    """
    A decided batch, opened: what a subscriber that asked for batches gets.

    Consumers that ingest at high rates take these and skip building one
    L{Event} per event; event C{i} has id C{first_id + i} and content
    C{contents[i]}.

    @ivar position: the batch's log position on an ordered channel, else C{None}.
    @ivar seq: the batch's sequence number on an ordered channel, else C{None}.
    """

    publisher: str
    first_id: int
    timestamp: float
    ttl: float
    urgency: int
    contents: list
    position: int | None = attrs.field(default=None, kw_only=True)
    seq: int | None = attrs.field(default=None, kw_only=True)

    def events(self):
        if self.seq is None:
            return [
                Event(self.publisher, self.first_id + i, self.timestamp, self.ttl, self.urgency, c)
                for i, c in enumerate(self.contents)
            ]
        position, seq = self.position, self.seq
        return [
            OrderedEvent(
                self.publisher, self.first_id + i, self.timestamp, self.ttl, self.urgency, c,
                position=position, seq=seq,
            )
            for i, c in enumerate(self.contents)
        ]


@attrs.frozen
class Request:
    """
    What a client asks of every replica.

    @ivar count: how many events to fetch (C{receive}) or credit (C{credit}).
    @ivar batches: wire batches (C{publish}).
    @ivar options: method-specific values (client name, resume flag, proof).
    """

    seq: int
    method: str
    channel: str = ""
    count: int = 0
    batches: tuple = ()
    options: dict = attrs.field(factory=dict)


@attrs.frozen
class Reply:
    """
    A replica's answer to the request with the same C{seq}.
    """

    seq: int
    status: str
    text: str = ""
    batches: tuple = ()
    channel: str = ""
    info: dict = attrs.field(factory=dict)

    @property
    def ok(self):
        return self.status == "ok"


@attrs.frozen
class Delivery:
    """
    Batches a replica pushes on a subscriber's stream.
    """

    channel: str
    batches: tuple


# Why an ordered entry carries no batch (a tombstone): the batch expired or
# overflowed at the replica, and its sequence numbers are skipped; or
# ("lost") the replica no longer holds them for this subscriber (it
# restarted with the channel in memory, or the subscriber was not
# subscribed then), skipped only when n-f replicas say so.
TOMBSTONE_NOTES = ("expired", "overflow", "lost")


@attrs.frozen
class OrderedDelivery:
    """
    Entries of an ordered channel a replica pushes on a subscriber's stream.

    @ivar entries: C{(position, seq, batch, note, span)} tuples in sequence
        order: C{note} is C{""} for a batch (full or digest form, C{span}
        1), or one of L{TOMBSTONE_NOTES} for a tombstone, whose batch is a
        digest form and which covers sequence numbers C{seq .. seq+span-1}.
    @ivar watermark: the highest log position up to which this replica has
        sent this subscriber every entry of the channel.
    """

    channel: str
    entries: tuple
    watermark: int


def entry_cost(batch, note):
    """
    Return the C{(events, bytes)} of flow-control credit an ordered entry
    uses: a batch's, or one event and L{BATCH_OVERHEAD} bytes for a
    tombstone.  Replicas and subscribers must count alike.
    """
    if note:
        return 1, BATCH_OVERHEAD
    return payload_count(batch[5]) or 1, len(batch[5]) + len(batch[6]) + BATCH_OVERHEAD
