"""
The broker service: requests in, replies out, for every channel of a replica.
"""

from fit_broker import units
from fit_broker.broker.channel import Channel, Refused
from fit_broker.components import ORDERINGS
from fit_broker.errors import Status
from fit_broker.units import Reply

MAX_RECEIVE = 10_000


class BrokerService:
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
                ORDERINGS[spec.qos.ordering](),
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
            return Reply(request.seq, Status.OK, info=self.snapshot())
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
            channel.subscribe(client, bool(request.options.get("resume", False)))
            return Reply(seq, Status.OK, channel=tag, info={"qos": channel.spec.qos.name})
        if method == units.UNSUBSCRIBE:
            channel.unsubscribe(client)
            return Reply(seq, Status.OK, channel=tag)
        if method == units.RECEIVE:
            count = max(0, min(request.count, MAX_RECEIVE))
            batches = channel.take(client, count, now)
            return Reply(seq, Status.OK, batches=tuple(batches), channel=tag)
        return Reply(
            seq, Status.UNKNOWN_METHOD, f"method {method!r} is not served here", channel=tag
        )

    def take(self, tag, client, count, now):
        """
        Remove batches of about C{count} events waiting for C{client} on C{tag}.
        """
        channel = self.channels[tag]
        queue = channel.queues.get(client)
        if queue is None:
            return []
        return queue.take(count, now)

    def waiting(self, tag, client):
        queue = self.channels[tag].queues.get(client)
        return 0 if queue is None else len(queue)

    def expire(self, now):
        for channel in self.channels.values():
            channel.expire(now)

    def snapshot(self):
        return {
            "requests": dict(self.counters),
            "channels": {tag: channel.snapshot() for tag, channel in self.channels.items()},
        }
