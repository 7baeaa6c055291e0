"""
The null relay: a stand-in replica that passes frames with no broker logic.

    python -m benchmarks.relay --config F --replica-id N

It speaks enough of FIT Broker's wire protocol for the benchmark's own
client processes (hello, subscribe with a stream, publish, credit), so the
same publisher and subscriber, with the same batching, codec and first-copy
voter, run against it.  A publish is acknowledged at once and its events
are forwarded to the channel's streams as the very bytes the publisher sent,
spliced into a delivery frame: no access control, deduplication, queues,
TTL or urgency.  Credits are honoured, so a slow subscriber is paced as it
would be by a replica.  What FIT Broker delivers as a share of what this
delivers is the cost of the broker logic; the rest is the cost of moving
bytes between Python processes on this machine.
"""

import argparse
import sys
from collections import deque

import msgpack
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from fit_broker import units
from fit_broker.units import Reply, Request
from fit_broker.wire.codec import decode, encode_reply
from fit_broker.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder, frame

DELIVERY_PREFIX = b"\x01\x93\x03"  # version 1, array of 3, kind DELIVERY


def _events_in(unpacker):
    """
    Read one item of a publish's array and return how many events it holds,
    the unit subscribers grant credit in: an item is one event, or (where
    the wire carries batches) a batch whose payload's array header says.
    """
    if not hasattr(units, "BATCH_FIELDS"):
        unpacker.skip()
        return 1
    item = unpacker.unpack()
    return units.payload_count(item[units.PAYLOAD])


MAX_PENDING = 2_000_000  # events held per stream before dropping (and counting)


class _Stream:
    """
    One subscriber's stream of one channel: credit and what waits for it.
    """

    __slots__ = ("protocol", "credit", "pending", "waiting", "dropped")

    def __init__(self, protocol, credit):
        self.protocol = protocol
        self.credit = credit
        self.pending = deque()
        self.waiting = 0
        self.dropped = 0

    def offer(self, count, delivery):
        if not self.pending and self.credit > 0 and not self.protocol.paused:
            self.credit -= count
            self.protocol.transport.write(delivery)
        elif self.waiting + count > MAX_PENDING:
            self.dropped += count
        else:
            self.pending.append((count, delivery))
            self.waiting += count

    def drain(self):
        pending = self.pending
        out = []
        while pending and self.credit > 0:
            count, delivery = pending.popleft()
            self.credit -= count
            self.waiting -= count
            out.append(delivery)
        if out:
            self.protocol.transport.writeSequence(out)


@implementer(IPushProducer)
class RelayProtocol(Protocol):
    """
    Acknowledges publishes at once and splices their events into deliveries.
    """

    def __init__(self, relay):
        self.relay = relay
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.streams = {}
        self.paused = False

    def connectionMade(self):
        self.transport.registerProducer(self, True)

    def dataReceived(self, data):
        for payload in self.decoder.feed(data):
            self.message(payload)

    def message(self, payload):
        # Read only the head of the message; the events stay bytes.
        unpacker = msgpack.Unpacker(raw=False, use_list=False)
        unpacker.feed(memoryview(payload)[1:])
        unpacker.read_array_header()
        unpacker.skip()  # kind: always a request from a client
        seq = unpacker.unpack()
        method = unpacker.unpack()
        if method == units.PUBLISH:
            channel = unpacker.unpack()
            unpacker.skip()  # count
            start = unpacker.tell()
            items = unpacker.read_array_header()
            count = 0
            for _ in range(items):
                count += _events_in(unpacker)
            end = unpacker.tell()
            self.transport.write(
                encode_reply(Reply(seq, "ok", channel=channel, info={"appended": count}))
            )
            self.relay.publish(channel, count, payload[start + 1 : end + 1])
            return
        request = decode(payload)
        if type(request) is not Request:
            return
        if method == units.CREDIT:
            stream = self.streams.get(request.channel)
            if stream is not None and request.count > 0:
                stream.credit += request.count
                if not self.paused:
                    stream.drain()
            return
        info = {}
        if method == units.HELLO:
            info = {"replica": self.relay.index, "relay": True}
        elif method == units.SUBSCRIBE and request.options.get("stream"):
            credit = request.options.get("credit", 0)
            stream = self.streams.get(request.channel)
            if stream is None:
                stream = self.streams[request.channel] = _Stream(self, credit)
                self.relay.streams.setdefault(request.channel, []).append(stream)
            else:
                stream.credit = credit
        if request.seq or method == units.HELLO:
            self.transport.write(
                encode_reply(Reply(request.seq, "ok", channel=request.channel, info=info))
            )

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        for stream in self.streams.values():
            stream.drain()

    def stopProducing(self):
        self.paused = True

    def connectionLost(self, reason):
        for tag, stream in self.streams.items():
            streams = self.relay.streams.get(tag, [])
            if stream in streams:
                streams.remove(stream)
        self.streams.clear()


class Relay(Factory):
    """
    One relay process: the streams of every channel, across connections.
    """

    def __init__(self, index):
        self.index = index
        self.streams = {}
        self._headers = {}

    def buildProtocol(self, addr):
        return RelayProtocol(self)

    def publish(self, channel, count, events):
        streams = self.streams.get(channel)
        if not streams:
            return
        header = self._headers.get(channel)
        if header is None:
            header = self._headers[channel] = DELIVERY_PREFIX + msgpack.packb(channel)
        delivery = frame(header + events)
        for stream in streams:
            stream.offer(count, delivery)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay")
    parser.add_argument("--config", required=True)
    parser.add_argument("--replica-id", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from fit_broker.config import load_config

    config = load_config(args.config)
    endpoint = serverFromString(reactor, config.replicas[args.replica_id].listen)
    endpoint.listen(Relay(args.replica_id))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
