"""
Receiving events: streams with flow control and acknowledgements, and pulls.
"""

import math
import os
from itertools import islice

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fit_broker import registry, units
from fit_broker.errors import FitBrokerError, RequestFailed
from fit_broker.interfaces import IVoterFactory
from fit_broker.sequencer import ORDERED_SCOPES, GlobalMerge, Lane, OrderedVoter
from fit_broker.units import (
    BATCH_OVERHEAD,
    MAX_CREDIT_BYTES,
    MAX_CREDIT_EVENTS,
    DeliveredBatch,
    OrderedDelivery,
    Request,
    batch_bytes,
    credit_cost,
    entry_cost,
)

DEFAULT_CREDIT = 4000
DEFAULT_CREDIT_BYTES = 1 << 20
# Seconds between two looks at what voters want fetched and what expired.
TICK = 0.1
VOTER_EXPIRY_INTERVAL = 1.0
# Batch identities per acknowledgement frame (replicas read at most 4,096).
ACK_CHUNK = 4096
# Acknowledgements wait at most this many seconds, or until this many batches
# are to be acknowledged, so that one frame carries many: they only free the
# replicas' memory, and what is unacknowledged is bounded there.
ACK_DELAY = 0.05
ACK_BATCH = 512
# Batches one fetch request asks for.
FETCH_CHUNK = 64
# Batches whose acknowledgement time is remembered: a later copy of one is
# acknowledged again to its sender only if that replica's link came up after
# the acknowledgement went out (it resends what it had not heard of).
ACKED_MEMORY = 65_536


class _Stream:
    """
    One streamed channel: the application's callback, and per replica the
    credit it may still use (mirroring the replica's count exactly) and the
    credit owed back to it.
    """

    __slots__ = ("tag", "callback", "batches", "unfinished", "window", "backlog", "outstanding", "owed",
                 "takeover", "record", "in_hand")

    ordered = False

    def __init__(self, tag, callback, batches, takeover, record):
        self.tag = tag
        self.callback = callback
        self.batches = batches
        self.takeover = takeover
        self.record = record
        self.unfinished = 0
        self.window = 1
        self.backlog = []
        # decided, not yet taken by the application: acknowledged only once it is
        self.in_hand = set()
        self.outstanding = {}
        self.owed = {}

    @property
    def busy(self):
        """
        True while as many hand-overs as allowed wait for the application.
        """
        return self.unfinished >= self.window


class _OrderedStream(_Stream):
    """
    A streamed ordered channel: also its lane of decided items waiting to
    be handed over, and its scope (C{"channel"} or C{"global"}).
    """

    __slots__ = ("lane", "scope")

    ordered = True

    def __init__(self, tag, callback, batches, takeover, record, lane, scope):
        super().__init__(tag, callback, batches, takeover, record)
        self.lane = lane
        self.scope = scope

    @property
    def busy(self):
        """
        True while the application has as many groups as allowed, or items
        wait to be handed over: no credit goes back meanwhile, so what
        waits stays within the credit given.
        """
        return self.unfinished >= self.window or bool(self.lane.items)


class Subscriber:
    """
    Subscribes to channels and hands each decided event to the application once.

    Every replica pushes copies of batches; the channel's voter decides which
    copy is the batch (CFT: the first; BFT: f+1 matching), and only that one
    is decoded.  Once the application has taken a batch (its callback
    returned, or the Deferred it returned fired) the subscriber acknowledges
    it to every replica, which only then forgets it and counts it delivered;
    what was sent and not acknowledged is sent again when the subscriber
    comes back.  Credits, in events and bytes, go back to a replica only when
    the voter is done with its copies and the application is not busy, so a
    slow console or a slow replica pauses streams rather than losing events,
    and a replica that sends beyond its credit has the excess dropped and
    counted.

    With C{state_dir}, what was delivered is recorded per channel in a file
    there (L{fit_broker.client.delivered.DeliveryRecord}), so a restarted
    subscriber never hands the application a batch it handed over before,
    whichever voter the channel uses.  A SIGKILL between a hand-over and its
    record can repeat that one hand-over; the repeat is counted
    (C{repeated-after-crash}).

    Channels whose QoS class has C{ordering = "channel"} or C{"global"} are
    voted on by L{fit_broker.sequencer.OrderedVoter} (f+1 matching copies
    under BFT, the first under CFT) and handed over in sequence order, each
    event carrying its position and sequence number; global channels are
    merged in log-position order (L{fit_broker.sequencer.GlobalMerge}).
    Their delivery record also keeps the last C{(position, seq)}, where a
    restart resumes, and entries are acknowledged only once handed over or
    recorded as skipped.
    """

    log = Logger()

    def __init__(self, proxy, clock, schemes, keys=None, credit=DEFAULT_CREDIT,
                 credit_bytes=DEFAULT_CREDIT_BYTES, state_dir=None, window=1):
        """
        @param window: how many hand-overs (callbacks whose Deferred has not
            fired) a stream may have at once; each is acknowledged when its
            own Deferred fires.  More than one suits consumers that hold
            groups in parallel (a sink with several destinations); a
            delivery record needs one at a time, so C{state_dir} needs 1.
        """
        if window < 1 or (state_dir is not None and window != 1):
            raise ValueError("window must be 1 with a state folder, and at least 1")
        self.window = window
        self.proxy = proxy
        self.config = proxy.config
        self.client = proxy.client
        self.clock = clock
        self.schemes = schemes
        self.keys = keys
        self.credit = max(1, min(credit, MAX_CREDIT_EVENTS))
        self.credit_bytes = max(1, min(credit_bytes, MAX_CREDIT_BYTES))
        self.state_dir = state_dir
        self.voters = {}
        self.records = {}
        self.counters = {}
        self._streams = {}
        self._pulled = {}
        self._opened = {}
        self._acks = {}
        self._ack_timer = None
        self._unsettled = set()
        self._ack_call = None
        self._linked_at = {}
        self._acked_at = {}
        self._tick = None
        self._last_expiry = 0.0
        self._merge = GlobalMerge()
        proxy.on_delivery = self._delivery
        proxy.on_link_up.append(self._link_up)

    def count(self, reason, n=1):
        self.counters[reason] = self.counters.get(reason, 0) + n

    def _spec(self, tag):
        return self.config.authorised(tag, self.client, publish=False)

    def record(self, tag):
        """
        Return the delivery record of C{tag}, or C{None} without a state folder.

        @raise ConfigError: when the record cannot be read or written.
        """
        if self.state_dir is None:
            return None
        record = self.records.get(tag)
        if record is None:
            from fit_broker.client.delivered import DeliveryRecord

            path = os.path.join(self.state_dir, state_file_name(tag))
            record = self.records[tag] = DeliveryRecord.open(path)
        return record

    def voter(self, tag, fresh=False):
        """
        Return the voter of C{tag}; with C{fresh}, a new one that remembers
        nothing delivered before (a replay hands those over again).
        """
        voter = None if fresh else self.voters.get(tag)
        if voter is None:
            spec = self.config.channels[tag]
            record = self.record(tag)
            if spec.qos.ordering in ORDERED_SCOPES:
                voter = self.voters[tag] = OrderedVoter(
                    faults=self.config.faults,
                    byzantine=spec.qop != "cft",
                    window=(self.credit, self.credit_bytes),
                    resume=record.last_order if record is not None else None,
                    max_ttl=spec.qos.ttl,
                    channel=tag,
                    replicas=len(self.config.replicas),
                )
            else:
                publishers = spec.publishers
                voter = self.voters[tag] = registry.find(IVoterFactory, spec.voter)(
                    faults=self.config.faults,
                    scheme=self.schemes(spec.scheme),
                    keys=self.keys,
                    channel=tag,
                    replicas=len(self.config.replicas),
                    publishers=len(self.config.clients) if "*" in publishers else len(publishers),
                    memory=record.seen if record is not None and not fresh else None,
                    max_ttl=spec.qos.ttl,
                    window=(self.credit, self.credit_bytes),
                )
            if self._tick is None:
                self._tick = LoopingCall(self._on_tick)
                self._tick.clock = self.clock
                self._tick.start(TICK, now=False)
        return voter

    def _on_tick(self):
        now = self.clock.seconds()
        if now - self._last_expiry >= VOTER_EXPIRY_INTERVAL:
            self._last_expiry = now
            for tag, voter in list(self.voters.items()):
                # ordered voters decide what waited on a batch that expired
                expired = voter.expire(now)
                if expired:
                    self._ordered_ready(self._streams.get(tag), expired)
        for tag, voter in self.voters.items():
            wanted = voter.wanted(now)
            if wanted:
                self._fetch(tag, wanted)
            if tag in self._streams:
                self._settle(self._streams[tag])
        for tag, stream in list(self._streams.items()):
            if stream.ordered:
                for index in self.voters[tag].take_reopen(now):
                    self._reopen(stream, index)

    def stop(self):
        if self._tick is not None and self._tick.running:
            self._tick.stop()
        self._tick = None
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
            self._end_turn()
        self._flush_acks()
        for record in self.records.values():
            record.close()
        self.records.clear()

    def subscribe(self, tag, callback=None, resume=True, batches=False, takeover=False,
                  from_position=None, from_time=None):
        """
        Subscribe to C{tag}.  With C{callback}, events are streamed to it in
        lists of L{Event}; if it returns a Deferred, no more events come
        until it fires, and they are acknowledged only then.  Without, use
        L{receive}.

        @param resume: receive what the replicas queued for this client while
            it was away (the default); with C{False} that backlog is skipped,
            and the reply's C{info["skipped"]} says how many events.
        @param batches: give C{callback} lists of L{DeliveredBatch} instead,
            for consumers that ingest at high rates.
        @param takeover: replace another connection that streams this
            channel to the same client (a console whose old connection is
            half-open); without it, such a subscription is refused.
        @param from_position: on an ordered channel, the log position to
            start at instead of where the delivery record left off: entries
            before it are acknowledged and not handed over.
        @param from_time: on a channel kept on disk, a time (seconds since
            the epoch): every replica queues again what its log still holds
            stamped at or after it by its publisher (on an ordered channel,
            every entry from the first so stamped), even what this client
            acknowledged, and the voter, starting afresh, hands it over again.
        """
        try:
            spec = self._spec(tag)
            if from_time is not None:
                self._check_replay(spec, from_time, from_position)
            voter = self.voter(tag, fresh=from_time is not None)
            record = self.record(tag)
            scope = spec.qos.ordering if spec.qos.ordering in ORDERED_SCOPES else None
            if scope is not None and callback is None:
                raise RequestFailed(
                    "bad-request",
                    f"channel {tag!r} is ordered: subscribe with a callback (pulls are unordered)",
                )
            if from_time is not None and scope is not None:
                # an ordered replay starts at the first entry f+1 replicas send
                voter.start_from(1)
            if from_position is not None:
                if scope is None:
                    raise RequestFailed(
                        "bad-request",
                        f"channel {tag!r} is not ordered: a start position needs an ordered channel",
                    )
                try:
                    voter.start_from(from_position)
                except ValueError as e:
                    raise RequestFailed("bad-request", str(e)) from None
        except FitBrokerError:
            return fail()
        options = {"resume": bool(resume)}
        if from_time is not None:
            # in this request only: a reconnection's subscribe must not replay again
            options["from_time"] = float(from_time)
        if callback is not None:
            if scope is None:
                stream = self._streams[tag] = _Stream(tag, callback, batches, takeover, record)
            else:
                lane = Lane(tag, voter)
                stream = self._streams[tag] = _OrderedStream(
                    tag, callback, batches, takeover, record, lane, scope
                )
                if scope == "global":
                    self._merge.add(lane)
            stream.window = self.window
            options.update(self._stream_options(stream))
            for index in range(len(self.config.replicas)):
                self._reset_credit(stream, index)
        request = Request(self.proxy.next_seq(), units.SUBSCRIBE, tag, options=options)
        quorum = self.config.acks_needed(spec.tag)
        # kept for replicas not connected yet, so that the quorum can still form
        return self.proxy.invoke(request, quorum)

    def _check_replay(self, spec, from_time, from_position):
        """
        Refuse a replay from C{from_time} that C{spec}'s channel cannot give,
        or that would mix with a voter in use.
        """
        tag = spec.tag
        if from_position is not None:
            raise RequestFailed("bad-request", "a start position and a start time contradict each other; use one")
        if type(from_time) not in (int, float) or not math.isfinite(from_time):
            raise RequestFailed(
                "bad-request", f"a replay starts at a time in seconds since the epoch, not {from_time!r:.60}"
            )
        if spec.qos.persistence != "disk":
            raise RequestFailed(
                "bad-request",
                f"channel {tag!r} is not kept on disk: a replay from a time needs a channel "
                'whose class has persistence = "disk"',
            )
        if tag in self._streams:
            raise RequestFailed(
                "bad-request", f"channel {tag!r} is streamed already: unsubscribe before replaying it"
            )

    def _stream_options(self, stream):
        options = {
            "stream": True,
            "credit": self.credit,
            "credit_bytes": self.credit_bytes,
            "takeover": stream.takeover,
        }
        if stream.ordered:
            # where this subscriber resumes: replicas need send nothing before it
            voter = self.voters[stream.tag]
            position = voter.resume_position()
            if position is not None:
                options["from"] = position
            seq = voter.resume_seq()
            if seq is not None:
                # numbers the replicas no longer hold come back as "lost" tombstones
                options["from_seq"] = seq
        return options

    def _reset_credit(self, stream, index):
        stream.outstanding[index] = [self.credit, self.credit_bytes]
        stream.owed[index] = [0, 0]

    def unsubscribe(self, tag):
        self._streams.pop(tag, None)
        self._merge.remove(tag)
        request = Request(self.proxy.next_seq(), units.UNSUBSCRIBE, tag)
        return self.proxy.invoke(request, self.config.acks_needed(tag), retry=False)

    def _link_up(self, index):
        self._linked_at[index] = self.clock.seconds()
        for tag, stream in self._streams.items():
            # the replica sends again what was not acknowledged: its old copies go,
            # and with them the credit they held on the old link
            self.voters[tag].forget_replica(index)
            self._collect(stream)
            self._reset_credit(stream, index)
            self.proxy.send(
                index,
                Request(0, units.SUBSCRIBE, tag, options={"resume": True, **self._stream_options(stream)}),
            )

    def _delivery(self, index, delivery):
        if delivery.__class__ is OrderedDelivery:
            self._ordered_delivery(index, delivery)
            return
        stream = self._streams.get(delivery.channel)
        if stream is None:
            self.proxy.count("delivery-without-stream")
            return
        if stream.ordered:
            self.count(f"unordered-delivery-on-ordered-channel:replica-{index}")
            return
        outstanding = stream.outstanding.get(index)
        if outstanding is None:
            self.proxy.count(f"delivery-from-unknown-replica:{index}")
            return
        batches = delivery.batches
        if not batches:
            return
        counts = [credit_cost(batch) for batch in batches]
        sizes = [len(batch[5]) + len(batch[6]) + BATCH_OVERHEAD for batch in batches]
        events = sum(counts)
        nbytes = sum(sizes)
        if outstanding[0] - events + counts[-1] > 0 and outstanding[1] - nbytes + sizes[-1] > 0:
            # the common case: the whole frame is within the credit
            accepted = batches
            outstanding[0] -= events
            outstanding[1] -= nbytes
        else:
            accepted = []
            events = nbytes = 0
            for batch, count, size in zip(batches, counts, sizes):
                if outstanding[0] > 0 and outstanding[1] > 0:
                    outstanding[0] -= count
                    outstanding[1] -= size
                    events += count
                    nbytes += size
                    accepted.append(batch)
                else:
                    self.count(f"over-credit:replica-{index}")
            counts = counts[: len(accepted)]
            sizes = sizes[: len(accepted)]
        voter = self.voters[stream.tag]
        if not voter.holds_copies:
            owed = stream.owed[index]
            owed[0] += events
            owed[1] += nbytes
        now = self.clock.seconds()
        if voter.holds_copies:
            decided = voter.offer(index, accepted, now, list(zip(counts, sizes)))
        else:
            decided = voter.offer(index, accepted, now)
        self._decided(stream, decided)
        if voter.fetch_ready:
            self._fetch(stream.tag, voter.wanted(now))

    # -- ordered channels ---------------------------------------------------

    def _ordered_delivery(self, index, delivery):
        """
        Take entries and a watermark a replica pushed on an ordered channel:
        entries use credit as batches do (a frame with only a watermark
        uses none) and go to the voter; what it decided waits in the
        stream's lane until it can be handed over in order.
        """
        stream = self._streams.get(delivery.channel)
        if stream is None:
            self.proxy.count("delivery-without-stream")
            return
        if not stream.ordered:
            self.count(f"ordered-delivery-on-unordered-channel:replica-{index}")
            return
        outstanding = stream.outstanding.get(index)
        if outstanding is None:
            self.proxy.count(f"delivery-from-unknown-replica:{index}")
            return
        voter = self.voters[stream.tag]
        now = self.clock.seconds()
        items = ()
        entries = accepted = delivery.entries
        if entries:
            accepted = []
            costs = []
            for entry in entries:
                if outstanding[0] > 0 and outstanding[1] > 0:
                    cost = entry_cost(entry[2], entry[3])
                    outstanding[0] -= cost[0]
                    outstanding[1] -= cost[1]
                    accepted.append(entry)
                    costs.append(cost)
                else:
                    self.count(f"over-credit:replica-{index}")
            items = voter.offer(index, accepted, now, costs)
        if len(accepted) == len(entries):
            # a watermark says every entry up to it was sent, which is false
            # of a frame cut short
            voter.note_watermark(index, delivery.watermark)
        self._ordered_ready(stream, items)
        if voter.fetch_ready:
            self._fetch(stream.tag, voter.wanted(now))

    def _ordered_ready(self, stream, items):
        """
        Queue decided items in C{stream}'s lane and hand over what is in
        order now (a watermark alone may let another global channel go).
        """
        if stream is None or not stream.ordered:
            return
        if items:
            in_hand = stream.in_hand
            for item in items:
                for replica, key in item.acks:
                    if replica is None:
                        in_hand.add(key)
            stream.lane.push(items)
        self._pump(stream)
        self._unsettled.add(stream)
        self._end_turn_soon()

    def _pump(self, stream):
        """
        Hand over or skip, in order, what can go now: C{stream}'s lane, or
        with global scope every global lane in log-position order.
        """
        if stream.scope == "global":
            streams = self._streams

            def busy(tag):
                other = streams[tag]
                return other.unfinished >= other.window

            while True:
                group = self._merge.next_group(busy)
                if group is None:
                    return
                self._handle(streams[group[0]], group[1])
        else:
            lane = stream.lane
            while stream.unfinished < stream.window:
                items = lane.next_group()
                if not items:
                    return
                self._handle(stream, items)

    def _handle(self, stream, items):
        self._unsettled.add(stream)
        if items[0].batch is not None:
            self._hand_over_ordered(stream, items)
            return
        # skipped numbers: recorded, then acknowledged, so a restart resumes after them
        last = items[-1]
        lost = sum(item.end - item.seq for item in items if item.note == "lost")
        if lost:
            self.log.warn(
                "{tag}: {count} event(s) (seq {first}..{last}) were lost: the replicas restarted "
                "and no longer hold them", tag=stream.tag, count=lost, first=items[0].seq,
                last=last.end - 1,
            )
        if stream.record is not None:
            try:
                stream.record.skipped(last.position, last.end - 1)
            except FitBrokerError as e:
                self.count("unrecorded")
                self.log.warn("cannot record skips of {tag}: {why}", tag=stream.tag, why=e)
        self._ordered_handed(stream, items)

    def _hand_over_ordered(self, stream, items):
        batches = [item.batch for item in items]
        self._record_handing(stream, batches, order=(items[-1].position, items[-1].seq))
        result = self._call_back(stream, batches, [(item.position, item.seq) for item in items])
        if not isinstance(result, Deferred):
            self._ordered_handed(stream, items)
            return
        stream.unfinished += 1

        def done(_):
            stream.unfinished -= 1
            self._ordered_handed(stream, items)
            if self._streams.get(stream.tag) is stream:
                self._pump(stream)
            self._unsettled.add(stream)
            self._end_turn_soon()

        result.addErrback(self._callback_failed, stream.tag)
        result.addBoth(done)

    def _ordered_handed(self, stream, items):
        """
        Acknowledge handled items: keys f+1 replicas sent to every replica
        (and record the hand-over), the others to their senders.
        """
        everyone = []
        for item in items:
            for replica, key in item.acks:
                if replica is None:
                    everyone.append(key)
                else:
                    self._ack(stream.tag, (key,), replica)
        self._handed(stream, everyone)

    def _reopen(self, stream, index):
        """
        Ask replica C{index} to stream C{stream}'s channel afresh, sending
        again what was not acknowledged: the voter dropped copies of its
        that are needed now.  Its frames before the answer belong to the old
        stream, so its copies and credit start over only then; meanwhile no
        credit goes to it.
        """
        if index not in self.proxy.links:
            return
        tag = stream.tag
        stream.outstanding[index] = [float("inf"), float("inf")]

        def reopened(replica, reply):
            if self._streams.get(tag) is stream and replica == index:
                self.voters[tag].forget_replica(index)
                self._collect(stream)
                self._reset_credit(stream, index)

        request = Request(
            self.proxy.next_seq(), units.SUBSCRIBE, tag,
            options={"resume": True, **self._stream_options(stream)},
        )
        d = self.proxy.invoke(request, 1, timeout=10.0, retry=False, observe=reopened, only=(index,))
        d.addErrback(lambda _: None)

    def _decided(self, stream, decided):
        if decided:
            stream.in_hand.update([(batch[0], batch[1]) for batch in decided])
            if stream.busy:
                stream.backlog.extend(decided)
            else:
                self._hand_over(stream, decided)
        # credit and acknowledgements go out once per reactor turn, for every
        # frame read in it
        self._unsettled.add(stream)
        self._end_turn_soon()

    def _settle(self, stream):
        """
        Collect the credit the voter freed and the acknowledgements it owes,
        and send them unless the application is busy.
        """
        self._collect(stream)
        if not stream.busy:
            self._grant(stream)

    def _collect(self, stream):
        voter = self.voters[stream.tag]
        for index, (events, nbytes) in voter.release().items():
            owed = stream.owed.get(index)
            if owed is not None:
                owed[0] += events
                owed[1] += nbytes
        acks = voter.take_acks()
        if acks:
            in_hand = stream.in_hand
            acked_at = self._acked_at
            linked_at = self._linked_at
            for index, key in acks:
                if key in in_hand:
                    continue
                when = acked_at.get(key)
                if when is None or when < linked_at.get(index, 0.0):
                    # not acknowledged on that replica's current link: it may hold it
                    self._ack(stream.tag, (key,), index)
        for index, key in voter.take_dropped():
            self._ack(stream.tag, (key,), index, "dropped")

    def _hand_over(self, stream, decided):
        keys = [(batch[0], batch[1]) for batch in decided]
        self._record_handing(stream, decided)
        result = self._call_back(stream, decided)
        if not isinstance(result, Deferred):
            self._handed(stream, keys)
            return
        stream.unfinished += 1

        def done(_):
            stream.unfinished -= 1
            self._handed(stream, keys)
            if stream.backlog and not stream.busy:
                backlog, stream.backlog = stream.backlog, []
                self._hand_over(stream, backlog)
            if not stream.busy:
                self._settle(stream)

        result.addErrback(self._callback_failed, stream.tag)
        result.addBoth(done)

    def _record_handing(self, stream, batches, order=None):
        """
        Record that C{batches} are about to be handed over (C{order}: the
        last one's C{(position, seq)} on an ordered channel), counting those
        a crash may have handed over already.
        """
        record = stream.record
        if record is None:
            return
        for batch in batches:
            if record.was_maybe_repeated((batch[0], batch[1])):
                self.count("repeated-after-crash")
        try:
            record.handing([(batch[0], batch[1], batch[4]) for batch in batches], order=order)
        except FitBrokerError as e:
            # delivering matters more than remembering: hand over, and say so
            self.count("unrecorded")
            self.log.warn("cannot record deliveries of {tag}: {why}", tag=stream.tag, why=e)

    def _call_back(self, stream, batches, places=None):
        """
        Open C{batches} and give them (or their events) to the application;
        its result, or C{None} if it failed.
        """
        try:
            opened = self._open(stream.tag, batches, places)
            if not stream.batches:
                opened = [event for batch in opened for event in batch.events()]
            return stream.callback(opened)
        except Exception:
            self.log.failure("the application failed on events of {tag}", tag=stream.tag)
            return None

    def _handed(self, stream, keys):
        stream.in_hand.difference_update(keys)
        now = self.clock.seconds()
        acked_at = self._acked_at
        for key in keys:
            acked_at[key] = now
        if len(acked_at) > ACKED_MEMORY:
            for key in list(islice(acked_at, len(acked_at) - ACKED_MEMORY)):
                del acked_at[key]
        if stream.record is not None:
            try:
                stream.record.handed()
            except FitBrokerError:
                self.count("unrecorded")
        self._ack(stream.tag, keys)

    def _callback_failed(self, failure, tag):
        self.log.failure("the application failed on events of {tag}", failure, tag=tag)

    def _ack(self, tag, keys, index=None, kind="keys"):
        """
        Acknowledge C{keys} of channel C{tag} to every linked replica, or to
        replica C{index} only; with C{kind} C{"dropped"}, tell it the voter
        gave those up undecided.  Each replica's acknowledgements wait for
        its next credit, L{ACK_BATCH} batches or L{ACK_DELAY}.
        """
        targets = self.proxy.links if index is None else (index,)
        acks = self._acks
        due = False
        for target in targets:
            pending = acks.get(target)
            if pending is None:
                pending = acks[target] = [0, {}]
            keys_of = pending[1].setdefault(kind, {})
            listed = keys_of.get(tag)
            if listed is None:
                keys_of[tag] = list(keys)
            else:
                listed.extend(keys)
            pending[0] += len(keys)
            due = due or pending[0] >= ACK_BATCH
        if due:
            self._end_turn_soon()
        elif self._ack_timer is None:
            self._ack_timer = self.clock.callLater(ACK_DELAY, self._ack_due)

    def _ack_due(self):
        self._ack_timer = None
        self._end_turn_soon()

    def _end_turn_soon(self):
        if self._ack_call is None:
            self._ack_call = self.clock.callLater(0, self._end_turn)

    def _end_turn(self):
        self._ack_call = None
        unsettled, self._unsettled = self._unsettled, set()
        for stream in unsettled:
            if self._streams.get(stream.tag) is stream:
                self._settle(stream)
        if self._ack_timer is None:
            self._flush_acks()
        else:
            for index, pending in list(self._acks.items()):
                if pending[0] >= ACK_BATCH:
                    self._flush_acks(index)

    def _flush_acks(self, only=None):
        """
        Send every replica (or replica C{only}) what was acknowledged for it
        since the last time: one frame for every channel, cut into frames of
        L{ACK_CHUNK} keys.
        """
        acks = self._acks
        if only is None:
            if self._ack_timer is not None and self._ack_timer.active():
                self._ack_timer.cancel()
            self._ack_timer = None
            self._acks = {}
        else:
            pending = acks.pop(only, None)
            acks = {only: pending} if pending is not None else {}
        links = self.proxy.links
        for index, (_, by_kind) in acks.items():
            if index not in links:
                continue
            frames = {}
            for kind, by_channel in by_kind.items():
                for tag, keys in by_channel.items():
                    for start in range(0, len(keys), ACK_CHUNK):
                        frames.setdefault(start, {}).setdefault(kind, {})[tag] = keys[
                            start : start + ACK_CHUNK
                        ]
            for options in frames.values():
                self.proxy.send(index, Request(0, units.ACK, options=options))

    def _grant(self, stream):
        """
        Return owed credit to each replica whose window fell to half.
        """
        half_events = self.credit // 2
        half_bytes = self.credit_bytes // 2
        for index, owed in stream.owed.items():
            if not (owed[0] > 0 or owed[1] > 0):
                continue
            outstanding = stream.outstanding[index]
            if outstanding[0] <= half_events or outstanding[1] <= half_bytes:
                if index in self._acks:
                    # what was taken is acknowledged before more is asked for, so a
                    # replica holds no more unacknowledged than its credit
                    self._flush_acks(index)
                outstanding[0] += owed[0]
                outstanding[1] += owed[1]
                self.proxy.send(
                    index,
                    Request(0, units.CREDIT, stream.tag, owed[0], options={"bytes": owed[1]}),
                )
                owed[0] = owed[1] = 0

    def _fetch(self, tag, wanted):
        """
        Ask replicas for the full batches the voter of C{tag} lacks: those
        that vouched for a digest, or all of them.
        """
        by_target = {}
        for key, replicas in wanted:
            targets = tuple(sorted(set(replicas))) if replicas else None
            by_target.setdefault(targets, []).append(key)
        observe = self._fetched(tag)
        for targets, keys in by_target.items():
            self.count("fetches", len(keys))
            for start in range(0, len(keys), FETCH_CHUNK):
                request = Request(
                    self.proxy.next_seq(), units.FETCH, tag,
                    options={"keys": keys[start : start + FETCH_CHUNK]},
                )
                d = self.proxy.invoke(
                    request, 1, timeout=10.0, retry=False, observe=observe, only=targets
                )
                d.addErrback(lambda _: None)

    def _fetched(self, tag):
        def observe(index, reply):
            voter = self.voters.get(tag)
            if voter is None or not reply.batches:
                return
            decided = voter.offer_fetched(index, reply.batches, self.clock.seconds())
            stream = self._streams.get(tag)
            if stream is not None and stream.ordered:
                self._ordered_ready(stream, decided)
            elif stream is not None:
                self._decided(stream, decided)
            elif not isinstance(voter, OrderedVoter):
                self._pulled.setdefault(tag, []).extend(decided)

        return observe

    def _events(self, tag, decided):
        return [event for batch in self._open(tag, decided) for event in batch.events()]

    def _open(self, tag, decided, places=None):
        """
        Open and decode decided batches into L{DeliveredBatch}es; a batch
        that cannot be opened is counted and logged.

        @param places: on an ordered channel, each batch's C{(position, seq)}.
        """
        scheme = self.schemes(self.config.channels[tag].scheme)
        keys = self.keys
        events = []
        for i, batch in enumerate(decided):
            try:
                contents = scheme.open(keys, tag, batch)
            except ValueError as e:
                self.proxy.count(f"unopenable:{tag}")
                self.log.warn(
                    "cannot open a batch of {publisher} on {tag}: {why}",
                    publisher=batch[0], tag=tag, why=e,
                )
                continue
            position, seq = places[i] if places is not None else (None, None)
            events.append(DeliveredBatch(*batch[:5], contents, position=position, seq=seq))
        return events

    def receive(self, tag, count):
        """
        Pull up to C{count} events of C{tag} (after L{subscribe} without a callback).
        """
        try:
            if self._spec(tag).qos.ordering in ORDERED_SCOPES:
                raise RequestFailed(
                    "bad-request",
                    f"channel {tag!r} is ordered: subscribe with a callback (pulls are unordered)",
                )
            voter = self.voter(tag)
        except FitBrokerError:
            return fail()
        buffer = self._pulled.setdefault(tag, [])
        if len(self._opened.get(tag, ())) >= count:
            return succeed(self._take(tag, count))

        def observe(index, reply):
            buffer.extend(voter.offer(index, reply.batches, self.clock.seconds()))
            voter.release()

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


def state_file_name(tag):
    """
    Return the file name of channel C{tag}'s delivery record: the tag with
    anything but letters, digits, dot, dash and underscore percent-encoded.
    """
    safe = "".join(
        c if c.isascii() and (c.isalnum() or c in "._-") else "".join(f"%{b:02X}" for b in c.encode())
        for c in tag
    )
    return (safe if safe not in (".", "..") else safe.replace(".", "%2E")) + ".delivered"
