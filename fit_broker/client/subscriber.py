"""
Receiving events: streams with flow control, and pulls.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fit_broker import units
from fit_broker.components import VOTERS
from fit_broker.errors import FitBrokerError
from fit_broker.units import DeliveredBatch, Request, credit_cost

DEFAULT_CREDIT = 4000
VOTER_EXPIRY_INTERVAL = 1.0


class _Stream:
    __slots__ = ("tag", "callback", "owed", "busy", "backlog", "batches")

    def __init__(self, tag, callback, batches):
        self.tag = tag
        self.callback = callback
        self.batches = batches
        self.owed = {}
        self.busy = False
        self.backlog = []


class Subscriber:
    """
    Subscribes to channels and hands each decided event to the application once.

    Every replica pushes copies of batches; the channel's voter decides which
    copy is the batch (CFT: the first), and only that one is decoded.  Credits go back to a replica only after the
    application has taken the events it sent, so a slow console stops its
    own streams at the replicas and holds at most C{credit} events per
    replica and channel here.
    """

    log = Logger()

    def __init__(self, proxy, clock, schemes, keys=None, credit=DEFAULT_CREDIT):
        self.proxy = proxy
        self.config = proxy.config
        self.client = proxy.client
        self.clock = clock
        self.schemes = schemes
        self.keys = keys
        self.credit = credit
        self.voters = {}
        self._streams = {}
        self._pulled = {}
        self._opened = {}
        self._expiry = None
        proxy.on_delivery = self._delivery
        proxy.on_link_up.append(self._link_up)

    def _spec(self, tag):
        return self.config.authorised(tag, self.client, publish=False)

    def voter(self, tag):
        voter = self.voters.get(tag)
        if voter is None:
            spec = self.config.channels[tag]
            voter = self.voters[tag] = VOTERS[spec.voter](
                faults=self.config.faults,
                scheme=self.schemes(spec.scheme),
                keys=self.keys,
                channel=tag,
                replicas=len(self.config.replicas),
            )
            if self._expiry is None:
                self._expiry = LoopingCall(self._expire)
                self._expiry.clock = self.clock
                self._expiry.start(VOTER_EXPIRY_INTERVAL, now=False)
        return voter

    def _expire(self):
        now = self.clock.seconds()
        for voter in self.voters.values():
            voter.expire(now)

    def stop(self):
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._expiry = None

    def subscribe(self, tag, callback=None, resume=False, batches=False):
        """
        Subscribe to C{tag}.  With C{callback}, events are streamed to it in
        lists of L{Event}; if it returns a Deferred, no more events come
        until it fires.  Without, use L{receive}.

        @param resume: keep what the replicas queued for this client since
            it last went away, instead of starting afresh.
        @param batches: give C{callback} lists of L{DeliveredBatch} instead,
            for consumers that ingest at high rates.
        """
        try:
            spec = self._spec(tag)
        except FitBrokerError:
            return fail()
        self.voter(tag)
        options = {"resume": resume}
        if callback is not None:
            self._streams[tag] = _Stream(tag, callback, batches)
            options.update(stream=True, credit=self.credit)
        request = Request(self.proxy.next_seq(), units.SUBSCRIBE, tag, options=options)
        quorum = self.config.acks_needed(spec.tag)
        # kept for replicas not connected yet, so that the quorum can still form
        return self.proxy.invoke(request, quorum)

    def unsubscribe(self, tag):
        self._streams.pop(tag, None)
        request = Request(self.proxy.next_seq(), units.UNSUBSCRIBE, tag)
        return self.proxy.invoke(request, self.config.acks_needed(tag), retry=False)

    def _link_up(self, index):
        for tag, stream in self._streams.items():
            stream.owed[index] = 0
            self.proxy.send(
                index,
                Request(
                    0,
                    units.SUBSCRIBE,
                    tag,
                    options={"resume": True, "stream": True, "credit": self.credit},
                ),
            )

    def _delivery(self, index, delivery):
        stream = self._streams.get(delivery.channel)
        if stream is None:
            self.proxy.count("delivery-without-stream")
            return
        decided = self.voter(stream.tag).offer(index, delivery.batches, self.clock.seconds())
        stream.owed[index] = stream.owed.get(index, 0) + sum(map(credit_cost, delivery.batches))
        if stream.busy:
            stream.backlog.extend(decided)
            return
        if decided:
            self._hand_over(stream, decided)
        if not stream.busy:
            self._grant(stream)

    def _hand_over(self, stream, decided):
        try:
            opened = self._open(stream.tag, decided)
            if not stream.batches:
                opened = [event for batch in opened for event in batch.events()]
            result = stream.callback(opened)
        except Exception:
            self.log.failure("the application failed on events of {tag}", tag=stream.tag)
            return
        if not isinstance(result, Deferred):
            return
        stream.busy = True

        def done(_):
            stream.busy = False
            if stream.backlog:
                backlog, stream.backlog = stream.backlog, []
                self._hand_over(stream, backlog)
            if not stream.busy:
                self._grant(stream, force=True)

        result.addErrback(self._callback_failed, stream.tag)
        result.addBoth(done)

    def _callback_failed(self, failure, tag):
        self.log.failure("the application failed on events of {tag}", failure, tag=tag)

    def _grant(self, stream, force=False):
        threshold = 1 if force else self.credit // 2
        for index, owed in stream.owed.items():
            if owed >= threshold:
                stream.owed[index] = 0
                self.proxy.send(index, Request(0, units.CREDIT, stream.tag, owed))

    def _events(self, tag, decided):
        return [event for batch in self._open(tag, decided) for event in batch.events()]

    def _open(self, tag, decided):
        """
        Open and decode decided batches into L{DeliveredBatch}es; a batch
        that cannot be opened is counted and logged.
        """
        scheme = self.schemes(self.config.channels[tag].scheme)
        keys = self.keys
        events = []
        for batch in decided:
            try:
                contents = scheme.open(keys, tag, batch)
            except ValueError as e:
                self.proxy.count(f"unopenable:{tag}")
                self.log.warn(
                    "cannot open a batch of {publisher} on {tag}: {why}",
                    publisher=batch[0], tag=tag, why=e,
                )
                continue
            events.append(DeliveredBatch(*batch[:5], contents))
        return events

    def receive(self, tag, count):
        """
        Pull up to C{count} events of C{tag} (after L{subscribe} without a callback).
        """
        try:
            self._spec(tag)
        except FitBrokerError:
            return fail()
        buffer = self._pulled.setdefault(tag, [])
        if len(self._opened.get(tag, ())) >= count:
            return succeed(self._take(tag, count))
        voter = self.voter(tag)

        def observe(index, reply):
            buffer.extend(voter.offer(index, reply.batches, self.clock.seconds()))

        request = Request(self.proxy.next_seq(), units.RECEIVE, tag, count)
        d = self.proxy.invoke(request, self.config.acks_needed(tag), retry=False, observe=observe)
        d.addCallback(lambda _: self._take(tag, count))
        return d

    def _take(self, tag, count):
        buffer = self._pulled[tag]
        if buffer:
            self._pulled[tag] = []
            buffer = self._events(tag, buffer)
        events = self._opened.setdefault(tag, [])
        events.extend(buffer)
        taken, self._opened[tag] = events[:count], events[count:]
        return taken
