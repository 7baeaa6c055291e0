"""
Byzantine replicas for tests: a replica whose outgoing frames are rewritten
by a behaviour, while it runs the real broker state machine underneath.

A behaviour is a callable C{(protocol, message) -> list of messages or raw
bytes} applied to each L{Delivery} and L{Reply} the replica would send.
"""

import random

from fit_broker.units import BATCH_FIELDS, Delivery, OrderedDelivery, Reply, pack_contents, unpack_contents
from fit_broker.wire.codec import decode, encode_delivery, encode_ordered_delivery, encode_reply
from fit_broker.replica.protocol import ReplicaProtocol
from fit_broker.replica.service import Replica


class _Rewriting:
    def __init__(self, protocol, transport, behaviour):
        self._protocol = protocol
        self._transport = transport
        self._behaviour = behaviour

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def write(self, data):
        message = decode(data[4:])
        for out in self._behaviour(self._protocol, message):
            if isinstance(out, bytes):
                self._transport.write(out)
            elif isinstance(out, Delivery):
                self._transport.write(encode_delivery(out.channel, out.batches))
            elif isinstance(out, OrderedDelivery):
                self._transport.write(encode_ordered_delivery(out.channel, out.entries, out.watermark))
            else:
                self._transport.write(encode_reply(out))

    def writeSequence(self, data):
        for piece in data:
            self.write(piece)


class ByzantineReplicaProtocol(ReplicaProtocol):
    def __init__(self, replica, behaviour):
        super().__init__(replica)
        self.behaviour = behaviour

    def makeConnection(self, transport):
        super().makeConnection(_Rewriting(self, transport, self.behaviour))


def _deliveries(rewrite):
    """
    Make a behaviour that rewrites deliveries and passes replies unchanged.
    """

    def behaviour(protocol, message):
        if isinstance(message, Delivery):
            return rewrite(protocol, message)
        return [message]

    return behaviour


def _with(batch, **changes):
    fields = list(batch)
    for index, name in enumerate(BATCH_FIELDS):
        if name in changes:
            fields[index] = changes[name]
    return tuple(fields)


def _evil(batch):
    """The batch with every content prefixed by EVIL, its proof kept (a digest copy: another digest)."""
    if not batch[5]:
        digest = bytearray(batch[6])
        digest[0] ^= 1
        return _with(batch, proof=bytes(digest))
    contents = unpack_contents(batch[5]) if batch[6] == b"" else None
    if contents is None:
        # a protected payload: flip a byte the proof covers
        payload = bytearray(batch[5])
        payload[-1] ^= 1
        return _with(batch, payload=bytes(payload))
    return _with(batch, payload=pack_contents([b"EVIL" + c for c in contents]))


@_deliveries
def alter(protocol, delivery):
    """Change the content of every batch."""
    return [Delivery(delivery.channel, tuple(_evil(b) for b in delivery.batches))]


def forge_events(counter=[10**15]):
    """Add invented batches in the name of each real batch's publisher."""

    @_deliveries
    def forge(protocol, delivery):
        forged = []
        for b in delivery.batches:
            counter[0] += 1000
            forged.append(_with(b, first_id=counter[0], payload=pack_contents([b"forged alarm"])))
        return [Delivery(delivery.channel, delivery.batches + tuple(forged))]

    return forge


def replay():
    """Send every earlier delivery again, and already-expired copies too."""
    history = []

    @_deliveries
    def rewrite(protocol, delivery):
        old = tuple(history)
        history.extend(delivery.batches)
        expired = tuple(
            _with(b, timestamp=b[2] - 10_000, first_id=b[1] + 7) for b in delivery.batches
        )
        return [delivery, Delivery(delivery.channel, old + expired)]

    return rewrite


@_deliveries
def withhold(protocol, delivery):
    """Send nothing to subscribers."""
    return []


@_deliveries
def equivocate(protocol, delivery):
    """Send the truth to one subscriber and a lie to the others."""
    if protocol.client == "console":
        return [delivery]
    return alter(protocol, delivery)


def other_channel(tag):
    """Also deliver every batch again as if it belonged to channel C{tag}."""

    @_deliveries
    def rewrite(protocol, delivery):
        return [delivery, Delivery(tag, delivery.batches)]

    return rewrite


def garbage(seed=1):
    """Follow each delivery with a frame of random bytes."""
    rng = random.Random(seed)

    @_deliveries
    def rewrite(protocol, delivery):
        junk = bytes(rng.randrange(256) for _ in range(40))
        return [delivery, len(junk).to_bytes(4, "big") + junk]

    return rewrite


def flood(per_delivery=2000, content=b"noise", ttl=None, first=5 * 10**15):
    """
    Send many distinct bogus batches with each delivery, to exhaust the
    voter: C{content} each, claiming C{ttl} (the real batch's when C{None}).
    """
    counter = [first]

    @_deliveries
    def rewrite(protocol, delivery):
        some = delivery.batches[0]
        if ttl is not None:
            some = _with(some, ttl=ttl)
        payload = pack_contents([content])
        bogus = []
        for _ in range(per_delivery):
            counter[0] += 1000
            bogus.append(_with(some, first_id=counter[0], payload=payload))
        return [delivery, Delivery(delivery.channel, tuple(bogus))]

    return rewrite


def lying_acks(protocol, message):
    """Acknowledge every request as ok, whatever happened."""
    if isinstance(message, Reply) and not message.ok and message.seq:
        return [Reply(message.seq, "ok", channel=message.channel)]
    return [message]


def bogus_full_copies(per_delivery=20, size=100_000, ttl=1e12):
    """Send large invented full copies claiming an enormous TTL with each delivery."""
    return flood(per_delivery, b"\0" * size, ttl, first=7 * 10**15)


def requests_to_clients(protocol, message):
    """Answer everything with request frames and nonsense replies too."""
    from fit_broker.units import Request
    from fit_broker.wire.codec import encode_request

    junk = [encode_request(Request(7, "publish", "events")), encode_reply(Reply(0, "error", "x" * 5000))]
    return [message, *junk]


class AcksWithoutStoring(Replica):
    """A replica that acknowledges every publish and stores nothing."""

    def handle(self, client, request, protocol=None):
        if request.method == "publish":
            return Reply(request.seq, "ok", channel=request.channel, info={"appended": 1})
        return super().handle(client, request, protocol)


def _digests_only(delivery):
    """The delivery with every full copy replaced by its digest form: vouch, never give."""
    from fit_broker.units import batch_digest, digest_form

    return Delivery(
        delivery.channel,
        tuple(digest_form(b, batch_digest(b)) if b[5] else b for b in delivery.batches),
    )


def unfetchable(mode="drop"):
    """
    Vouch for every batch with a digest and never send it in full, so that
    subscribers must fetch it; answer fetches with nothing (C{"drop"}) or
    with altered and invented batches (C{"junk"}).
    """
    counter = [9 * 10**15]

    def behaviour(protocol, message):
        if isinstance(message, Delivery):
            return [_digests_only(message)]
        if isinstance(message, Reply) and message.batches:
            if mode == "drop":
                return []
            junk = []
            for b in message.batches:
                counter[0] += 1000
                junk.append(_evil(b))
                junk.append(_with(b, first_id=counter[0], payload=pack_contents([b"unasked"])))
            return [Reply(message.seq, message.status, message.text, tuple(junk), message.channel)]
        return [message]

    return behaviour


def ordered_liar(seed=7):
    """
    A behaviour for ordered channels: each entry is sent altered in one way
    at random (its digest, its position, its sequence number, a tombstone
    instead of the batch, or a forged batch in full), or withheld.
    """
    rng = random.Random(seed)

    def behaviour(protocol, message):
        if not isinstance(message, OrderedDelivery):
            return [message]
        entries = []
        for position, seq, batch, note, span in message.entries:
            kind = rng.randrange(6)
            if kind == 0:
                entries.append((position, seq, _evil(batch), note, span))
            elif kind == 1:
                entries.append((position + 1, seq, batch, note, span))
            elif kind == 2:
                entries.append((position, seq + 1, batch, note, span))
            elif kind == 3:
                header = batch[:5] + (b"", batch[6] if not batch[5] else bytes(32))
                entries.append((position, seq, header, "expired", 1))
            elif kind == 4:
                entries.append((position, seq, _with(batch, payload=pack_contents([b"EVIL"]), proof=b""), "", 1))
        return [OrderedDelivery(message.channel, tuple(entries), message.watermark + 1000)]

    return behaviour
