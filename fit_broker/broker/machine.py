"""
The broker state machine (L3): requests in, replies out, for every channel of a replica.

Not a Twisted service: L{fit_broker.replica.service} makes the replica's service around it.
"""

from fit_broker import registry, units
from fit_broker.broker.channel import Channel, Refused
from fit_broker.broker.stream import Stream
from fit_broker.errors import Status
from fit_broker.interfaces import IOrderingFactory
from fit_broker.units import Reply, batch_bytes

MAX_RECEIVE = 10_000
# Batch identities one acknowledgement or fetch may name.
MAX_KEYS = 4096
# Bytes of batches one fetch reply carries, beyond its first batch.
MAX_FETCH_BYTES = 4 * 1024 * 1024


class BrokerStateMachine:
    """
    One replica's L3 state machine.

    @ivar on_ready: called with a channel tag whenever events were appended
        to its queues, so that a transport can push to streaming subscribers.
    """

    def __init__(self, config, schemes, keys=None, replica_index=None):
        """
        @param schemes: a callable from scheme name to scheme.
        @param replica_index: this replica's index; with it, BFT channels send
            full copies of the batches this replica is designated for and
            digests of the others (see L{fit_broker.units.full_copy_senders}).
        """
        self.config = config
        self.channels = {
            tag: Channel(
                spec,
                schemes(spec.scheme),
                registry.find(IOrderingFactory, spec.qos.ordering)(),
                keys,
                config.max_clock_skew,
                light_copies=self._light_copies(spec, replica_index),
            )
            for tag, spec in config.channels.items()
        }
        self.on_ready = lambda tag: None
        self.counters = {"requests": 0}

    def _light_copies(self, spec, replica_index):
        """
        With f+1 full copies, at least one comes from a correct replica, and
        the f+1 matching digests that a BFT voter needs come from the rest.
        CFT channels send every batch in full: measured, the digest every
        replica would compute costs more than the subscriber saves reading.
        """
        replicas = len(self.config.replicas)
        copies = self.config.faults + 1
        if replica_index is None or spec.qop != "bft" or copies >= replicas:
            return None
        return (replica_index, replicas, copies)

    def _count(self, reason):
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def handle(self, client, request, now):
        """
        Carry out C{request} for the authenticated C{client}; return a L{Reply}.
        """
        self.counters["requests"] += 1
        method = request.method
        if method == units.STATUS:
            return Reply(request.seq, Status.OK, info=self.snapshot(client))
        if method == units.ACK:
            self.acknowledged(client, request.options)
            return Reply(request.seq, Status.OK)
        channel = self.channels.get(request.channel)
        if channel is None:
            self._count("unknown-channel")
            return Reply(
                request.seq,
                Status.UNKNOWN_CHANNEL,
                f"no channel {request.channel!r}",
                channel=request.channel,
            )
        try:
            return self._dispatch(channel, client, request, now)
        except Refused as refused:
            return Reply(request.seq, refused.status, refused.text, channel=channel.tag)

    def _dispatch(self, channel, client, request, now):
        method = request.method
        seq = request.seq
        tag = channel.tag
        if method == units.PUBLISH:
            expired_before = channel.counters["expired-on-arrival"]
            appended = channel.publish(client, request.batches, now)
            if appended:
                self.on_ready(tag)
            info = {"appended": sum(e[0] for e in appended)}
            expired = channel.counters["expired-on-arrival"] - expired_before
            if expired:
                info["expired"] = expired
            return Reply(seq, Status.OK, channel=tag, info=info)
        if method == units.REGISTER:
            channel.check_publisher(client)
            channel.registered.add(client)
            return Reply(seq, Status.OK, channel=tag)
        if method == units.UNREGISTER:
            channel.registered.discard(client)
            return Reply(seq, Status.OK, channel=tag)
        if method == units.SUBSCRIBE:
            resume = request.options.get("resume", True) is not False
            _, skipped = channel.subscribe(client, resume)
            info = {"qos": channel.spec.qos.name}
            if not resume:
                info["skipped"] = skipped
            return Reply(seq, Status.OK, channel=tag, info=info)
        if method == units.UNSUBSCRIBE:
            channel.unsubscribe(client)
            return Reply(seq, Status.OK, channel=tag)
        if method == units.FETCH:
            return Reply(seq, Status.OK, batches=self.fetch(tag, client, request.options.get("keys")), channel=tag)
        if method == units.RECEIVE:
            count = max(0, min(request.count, MAX_RECEIVE))
            batches = channel.take(client, count, now)
            return Reply(seq, Status.OK, batches=tuple(batches), channel=tag)
        return Reply(
            seq, Status.UNKNOWN_METHOD, f"method {method!r} is not served here", channel=tag
        )

    def acknowledged(self, client, options):
        """
        Carry out one acknowledgement frame of C{client}, for any number of
        channels: C{options["keys"]} maps a channel to the batches delivered,
        C{options["dropped"]} to those its voter gave up undecided.
        """
        channels = self.channels
        for kind, delivered in (("keys", True), ("dropped", False)):
            by_channel = options.get(kind)
            if type(by_channel) is not dict:
                continue
            for tag, keys in list(by_channel.items())[: len(channels)]:
                if tag in channels:
                    self.ack(tag, client, keys, delivered)

    def ack(self, tag, client, keys, delivered=True):
        """
        C{client} holds the batches C{keys} names (or, not C{delivered}, its
        voter gave them up undecided): forget them here.  Malformed keys are
        ignored: acknowledgements only ever free memory.
        """
        queue = self.channels[tag].queues.get(client)
        if queue is None:
            return 0
        return queue.ack(_batch_keys(keys), delivered)

    def fetch(self, tag, client, keys):
        """
        Return the full batches named by C{keys} that C{client}'s queue holds
        (waiting, or sent and not acknowledged).
        """
        channel = self.channels[tag]
        queue = channel.queue_of(client)
        found = []
        size = 0
        for key in _batch_keys(keys):
            batch = queue.lookup(key)
            if batch is not None:
                found.append(batch)
                size += batch_bytes(batch)
                if size >= MAX_FETCH_BYTES:
                    # the rest is asked for again: a reply stays well within a frame
                    break
        channel.count("fetched", len(found))
        return tuple(found)

    def open_stream(self, tag, client, events, nbytes):
        """
        Start pushing C{tag} to C{client}: what it was sent and did not
        acknowledge is queued again first.
        """
        queue = self.channels[tag].queue_of(client)
        queue.requeue_unacked()
        return Stream(tag, queue, events, nbytes)

    def expire(self, now):
        for channel in self.channels.values():
            channel.expire(now)

    def snapshot(self, client=None):
        """
        Counters: all of them for an administrator (or C{client} C{None}),
        else only those of the channels C{client} may use, and of its own
        queues there.
        """
        if client is None or self.config.is_admin(client):
            return {
                "requests": dict(self.counters),
                "channels": {tag: channel.snapshot() for tag, channel in self.channels.items()},
            }
        return {
            "channels": {
                tag: channel.snapshot(client)
                for tag, channel in self.channels.items()
                if channel.spec.may_publish(client) or channel.spec.may_subscribe(client)
            },
        }


def _batch_keys(keys):
    """
    Return the well-formed C{(publisher, first_id)} pairs of a peer's list,
    at most L{MAX_KEYS} of them.
    """
    if type(keys) is not tuple:
        return []
    return [
        (key[0], key[1])
        for key in keys[:MAX_KEYS]
        if type(key) is tuple and len(key) == 2 and type(key[0]) is str and type(key[1]) is int
    ]
