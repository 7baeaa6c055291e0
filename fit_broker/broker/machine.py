"""
The broker state machine (L3): requests in, replies out, for every channel of a replica.

Not a Twisted service: L{fit_broker.replica.service} makes the replica's service around it.
"""

import math
from collections import OrderedDict

from fit_broker import units
from fit_broker.broker.channel import Channel, Refused
from fit_broker.broker.disk_channel import DiskChannel
from fit_broker.broker.ordered import (
    BATCH,
    REGISTER,
    SUBSCRIBE,
    TABLE,
    UNSUBSCRIBE,
    ReplicatedState,
    ref_key,
)
from fit_broker.broker.ordered_channel import OrderedChannel
from fit_broker.broker.ordered_disk_channel import OrderedDiskChannel
from fit_broker.control import ControlTable, table_value
from fit_broker.errors import Status
from fit_broker.units import Reply, batch_bytes, batch_digest

MAX_RECEIVE = 10_000
# Batch identities one acknowledgement or fetch may name.
MAX_KEYS = 4096
# Bytes of batches one fetch reply carries, beyond its first batch.
MAX_FETCH_BYTES = 4 * 1024 * 1024
# Seconds a request waits for the log before it is answered that it was not
# ordered (the client may retry; what is decided later is still applied).
ORDER_TIMEOUT = 60.0
# Requests waiting for the log at once, at most.
MAX_WAITING = 100_000
# The status of a control-table change the table refused.
REFUSED = "refused"
# Decided values whose log position is remembered, to answer a retry.
POSITIONS_MEMORY = 65_536
# Decided batches this replica lacks and asks its peers for, at most.
MAX_MISSING = 65_536
# Batch references one peer fetch asks for.
PEER_FETCH_CHUNK = 256
# Seconds before a missing batch is asked for again.
PEER_FETCH_RETRY = 1.0


class _Waiting:
    """
    A request waiting for the log: the values it needs decided.
    """

    __slots__ = ("request", "tag", "remaining", "positions", "since", "info", "decided_values")

    def __init__(self, request, tag, since, info):
        self.request = request
        self.tag = tag
        self.remaining = set()
        self.positions = []
        self.decided_values = []
        self.since = since
        self.info = info


class BrokerStateMachine:
    """
    One replica's L3 state machine.

    @ivar on_ready: called with a channel tag whenever events were appended
        to its queues, so that a transport can push to streaming subscribers.
    """

    def __init__(self, config, schemes, keys=None, replica_index=None, storage=None):
        """
        @param schemes: a callable from scheme name to scheme.
        @param replica_index: this replica's index; with it, BFT channels send
            full copies of the batches this replica is designated for and
            digests of the others (see L{fit_broker.units.full_copy_senders}).
        @param storage: a callable from a disk channel's tag to its two
            storages (L{DiskChannel}), or C{None} to keep disk channels in
            memory (tests).
        """
        self.config = config
        self.schemes = schemes
        self.keys = keys
        self.replica_index = replica_index
        self.storage = storage
        self.channels = {tag: self._channel(spec) for tag, spec in config.channels.items()}
        self.state = ReplicatedState(tag for tag, c in self.channels.items() if c.ordered)
        self.table = ControlTable.genesis(config)
        self.state.table = self.table.snapshot()
        # why run-time table changes are refused here, or None when the log runs
        self.table_problem = "this replica runs no ordering protocol"
        self._table_results = {}
        self._global_tags = [
            tag for tag, c in self.channels.items() if c.spec.qos.ordering == "global"
        ]
        self.on_ready = lambda tag: None
        self.counters = {"requests": 0}
        # values for the log, taken by the replica (L{take_proposals})
        self.proposals = []
        # requests waiting for the log: token -> _Waiting, value -> tokens
        self._tokens = {}
        self._waiting = {}
        self._answers = []
        self._positions = OrderedDict()
        # decided batches this replica lacks: key -> (ref, last asked)
        self.missing = OrderedDict()
        # replays asked with a first subscription to an ordered disk channel
        self._replays = OrderedDict()

    def _channel(self, spec):
        ordered = spec.qos.ordering != "none"
        options = {"light_copies": self._light_copies(spec, self.replica_index)}
        if spec.qos.persistence == "disk":
            kind = OrderedDiskChannel if ordered else DiskChannel
            options["storage"] = None if self.storage is None else self.storage(spec.tag)
        else:
            kind = OrderedChannel if ordered else Channel
        return kind(spec, self.schemes(spec.scheme), self.keys, self.config.max_clock_skew, **options)

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

    def handle(self, client, request, now, token=None):
        """
        Carry out C{request} for the authenticated C{client}; return a
        L{Reply}, or C{None} when the answer waits for the replicated log:
        it comes later from L{take_answers} with C{token}.
        """
        self.counters["requests"] += 1
        method = request.method
        if method == units.STATUS:
            return Reply(request.seq, Status.OK, info=self.snapshot(client))
        if method == units.ACK:
            self.acknowledged(client, request.options)
            return Reply(request.seq, Status.OK)
        if method == units.TABLE:
            return Reply(
                request.seq, Status.OK,
                info={"version": self.table.version, "table": self.table.describe()},
            )
        if method == units.ADMIN:
            return self._admin(client, request, now, token)
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
            if method == units.SUBSCRIBE and REPLAY_FROM in request.options:
                _check_replay(channel, request.options[REPLAY_FROM])
            if channel.ordered and request.method in _THROUGH_LOG:
                return self._through_log(channel, client, request, now, token)
            reply = self._dispatch(channel, client, request, now)
            if method == units.PUBLISH and reply.ok and type(channel) is DiskChannel:
                return self._after_sync(channel, reply, token)
            return reply
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
            since = request.options.get(REPLAY_FROM)
            if channel.ordered:
                replay = self._ordered_resume(channel, client, request.options)
                if replay is not None:
                    info["replay"] = replay
                self.on_ready(tag)
            elif since is not None:
                info["replay"] = channel.replay(client, float(since), now)
                self.on_ready(tag)
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

    def _through_log(self, channel, client, request, now, token):
        """
        What changes an ordered channel goes through the log, so that every
        correct replica applies it at the same position: publishes (as
        batch references), and first subscriptions, unsubscriptions and
        registrations.
        """
        method = request.method
        tag = channel.tag
        if method == units.PUBLISH:
            expired_before = channel.counters["expired-on-arrival"]
            admitted = channel.admit_refs(client, request.batches, now)
            waiting = _Waiting(request, tag, now, {})
            expired = channel.counters["expired-on-arrival"] - expired_before
            if expired:
                waiting.info["expired"] = expired
            values = []
            for ref, verdict in admitted:
                position = self._positions.get(ref)
                if position is not None:
                    waiting.positions.append(position)
                elif verdict != "new" and ref not in self._waiting:
                    channel.count("duplicate", ref[4])
                else:
                    values.append(ref)
            waiting.info["appended"] = sum(ref[4] for ref, _ in admitted)
            return self._wait(waiting, values, token)
        if method == units.SUBSCRIBE:
            channel.check_subscriber(client)
            if client in self.state.subscribers[tag]:
                return self._dispatch(channel, client, request, now)
            value = (SUBSCRIBE, tag, client)
            if "from" in request.options or REPLAY_FROM in request.options:
                # where the subscriber resumes is looked at once the subscription is applied
                self._replays[(tag, client)] = request.options
                while len(self._replays) > MAX_WAITING:
                    self._replays.popitem(last=False)
        elif method == units.UNSUBSCRIBE:
            if client not in self.state.subscribers[tag]:
                channel.unsubscribe(client)
                return Reply(request.seq, Status.OK, channel=tag)
            value = (UNSUBSCRIBE, tag, client)
        else:
            channel.check_publisher(client)
            if client in self.state.registered[tag]:
                return Reply(request.seq, Status.OK, channel=tag)
            value = (REGISTER, tag, client)
        return self._wait(_Waiting(request, tag, now, {}), [value], token)

    def _after_sync(self, channel, reply, token):
        """
        Return C{reply} to a publish on a disk channel, or C{None} when it
        waits for the sync that makes it durable (C{fsync = "always"}): it
        comes later from L{take_answers} with C{token}.
        """
        if not channel.must_wait():
            return reply
        if token is None:
            token = object()
        if not channel.hold(token, reply):
            self._count("refused-waiting-limit")
            return Reply(
                reply.seq, Status.BUSY,
                f"too many publishes wait for the disk of channel {channel.tag!r}; retry later",
                channel=channel.tag,
            )
        return None

    def disk_channels(self):
        """
        Return the channels kept on disk.
        """
        return [c for c in self.channels.values() if type(c) is DiskChannel]

    def ordered_disk_channels(self):
        return [c for c in self.channels.values() if type(c) is OrderedDiskChannel]

    def sync_ordered_bodies(self, now):
        """
        Make the batches ordered disk channels hold durable as their
        classes say, before this replica announces it holds them.
        """
        for channel in self.ordered_disk_channels():
            channel.sync_bodies(now)

    def tick_storage(self, now):
        for channel in self.ordered_disk_channels():
            channel.tick(now)

    def resumed(self):
        """
        The agreement journal was replayed: ordered disk channels queue
        again what their subscribers did not acknowledge; ordered memory
        channels lost what they queued, and say so to subscribers that
        still need it (C{"lost"} tombstones).
        """
        for tag, channel in self.channels.items():
            if type(channel) is OrderedDiskChannel:
                channel.rebuild()
            elif channel.ordered:
                channel.forget_queues(self.state.next_seq[tag])
                for key in [k for k in self.missing if k[0] == tag]:
                    del self.missing[key]

    def close_ordered(self, now):
        for channel in self.ordered_disk_channels():
            channel.close(now)

    def storage_synced(self, answers):
        """
        Queue the C{(token, reply)} pairs a disk channel's sync answered,
        for L{take_answers}.
        """
        self._answers.extend(answers)

    def _ordered_resume(self, channel, client, options):
        """
        Carry out where a subscriber of an ordered channel resumes.  On a
        disk channel, a replay from a time (C{from_time}) or from a log
        position (C{from}, which every reconnection also names: it queues
        only what the subscriber's queue lacks).  On any ordered channel,
        the numbers before this replica's queue the subscriber still needs
        (C{from_seq}) are sent as a C{"lost"} tombstone.  Return what a
        replay queued, or C{None}.
        """
        replay = None
        if type(channel) is OrderedDiskChannel:
            since = options.get(REPLAY_FROM)
            position = options.get("from")
            if since is not None:
                replay = channel.replay(client, since=float(since))
            elif type(position) is int and position >= 1:
                replay = channel.replay(client, position=position)
                replay = replay if replay["entries"] else None
        seq = options.get("from_seq")
        position = options.get("from")
        if type(position) is not int or not 1 <= position <= self.state.position:
            position = 1  # a client's claim, capped to what the log holds
        if type(seq) is int and seq >= 1 and REPLAY_FROM not in options:
            channel.lost_before(client, seq, position)
        return replay

    def _verify_key(self, admin):
        return None if self.keys is None else self.keys.verify_key(admin)

    def _admin(self, client, request, now, token):
        """
        A signed control-table change: checked here, then ordered through
        the log, and applied at the same position by every correct replica,
        which checks the administrator's signature itself.
        """
        if self.table_problem is not None:
            return Reply(
                request.seq, REFUSED,
                f"run-time table changes are off: {self.table_problem}",
            )
        change = request.options.get("change")
        signature = request.options.get("signature")
        if type(change) is not bytes or type(signature) is not bytes:
            return Reply(request.seq, Status.BAD_REQUEST, "an admin request carries change and signature bytes")
        problem = self.table.check(client, change, signature, self._verify_key)
        if problem is not None:
            self._count("refused-table-change")
            return Reply(request.seq, REFUSED, problem)
        return self._wait(_Waiting(request, "", now, {}), [table_value(client, change, signature)], token)

    def _apply_table(self, value):
        before = self.table.channels
        ok, text = self.table.apply_value(value, self._verify_key)
        self._table_results[value] = (ok, text)
        if not ok:
            return
        self.state.table = self.table.snapshot()
        self._follow_table(before)

    def _follow_table(self, before):
        """
        Make this replica's channels what the control table says: new
        channels start empty, removed ones are dropped, a changed row takes
        effect at once (a changed class rebuilds the channel's queues).
        """
        diff = self.table.diff(before)
        for spec in diff.created:
            self._install(spec)
        for spec in diff.removed:
            self.channels.pop(spec.tag, None)
            self._count("channel-removed")
        for old, new in diff.updated:
            channel = self.channels.get(new.tag)
            if channel is None or old.qos != new.qos or old.qop != new.qop or old.scheme != new.scheme:
                self._install(new)
            else:
                channel.spec = new
        self._global_tags = [
            tag for tag, c in self.channels.items() if c.spec.qos.ordering == "global"
        ]

    def _install(self, spec):
        channel = self.channels[spec.tag] = self._channel(spec)
        if channel.ordered:
            self.state.add_channel(spec.tag)
            for client in self.state.subscribers[spec.tag]:
                queue = channel.queues[client] = channel.new_queue()
                queue.floor = self.state.next_seq[spec.tag]

    def _wait(self, waiting, values, token):
        if not values:
            return self._answer(waiting)
        if len(self._tokens) >= MAX_WAITING:
            self._count("refused-waiting-limit")
            return Reply(
                waiting.request.seq, Status.BUSY,
                f"{MAX_WAITING} requests already wait for the log here; retry later",
                channel=waiting.tag,
            )
        if token is None:
            token = object()
        waiting.remaining.update(values)
        self._tokens[token] = waiting
        for value in values:
            self._waiting.setdefault(value, []).append(token)
        self.proposals.extend(values)
        return None

    def _answer(self, waiting):
        request = waiting.request
        refusal = waiting.info.get("refusal")
        if refusal is not None:
            return Reply(request.seq, refusal[0], refusal[1], channel=waiting.tag)
        if request.method == units.ADMIN:
            value = next(iter(waiting.decided_values), None)
            ok, text = self._table_results.get(value, (False, "not applied"))
            if not ok:
                return Reply(request.seq, REFUSED, text)
            return Reply(request.seq, Status.OK, text, info={"version": self.table.version, "position": max(waiting.positions)})
        info = {}
        if waiting.positions:
            info["position"] = max(waiting.positions)
        if request.method == units.PUBLISH:
            info["appended"] = waiting.info.get("appended", 0)
            if waiting.info.get("expired"):
                info["expired"] = waiting.info["expired"]
        elif request.method == units.SUBSCRIBE:
            info["qos"] = self.channels[waiting.tag].spec.qos.name
            info["seq"] = self.state.next_seq.get(waiting.tag, 1)
        return Reply(request.seq, Status.OK, channel=waiting.tag, info=info)

    def take_proposals(self):
        """
        Return the values to hand to the ordering protocol, and forget them.
        """
        proposals, self.proposals = self.proposals, []
        return proposals

    def take_answers(self):
        """
        Return C{(token, reply)} pairs for requests the log has answered.
        """
        answers, self._answers = self._answers, []
        return answers

    def apply_decided(self, decided, now):
        """
        Apply decided log entries (C{instance, timestamp, values,
        transferred}) in order.  Every correct replica applies the same
        entries alike: nothing here reads this replica's clock or its local
        queues to decide.  Batches of entries this replica caught up on by
        state transfer are not queued for its subscribers: it cannot know
        what they acknowledged meanwhile, and the replicas that decided
        them serve what they still need.
        """
        state = self.state
        for entry in decided:
            state.instance = entry.instance
            timestamp = entry.timestamp
            queued = not entry.transferred
            for value in entry.values:
                state.position += 1
                position = state.position
                kind = value[0]
                refusal = None
                if kind == BATCH:
                    refusal = self._apply_batch(value, position, timestamp, queued)
                elif kind in (SUBSCRIBE, UNSUBSCRIBE, REGISTER):
                    refusal = self._apply_membership(value)
                elif kind == TABLE:
                    self._apply_table(value)
                self._decided(value, position, refusal)
        # subscribers of several global channels merge them by position: every
        # global stream gets the new watermark
        for tag in self._global_tags:
            self.on_ready(tag)

    def _apply_batch(self, ref, position, timestamp, queued=True):
        """
        Apply a decided batch reference; return C{(status, text)} when the
        table or the ids refuse it at this position (it is then never
        delivered, so whoever waits for it is told so), else C{None}.
        """
        tag = ref[1]
        channel = self.channels.get(tag)
        if channel is None or not channel.ordered:
            self._count("decided-unknown-channel")
            return Status.UNKNOWN_CHANNEL, f"channel {tag!r} was gone when the batch was ordered"
        if not channel.spec.may_publish(ref[2]):
            channel.count("decided-unauthorized", ref[4])
            return (
                Status.UNAUTHORIZED,
                f"client {ref[2]!r} may no longer publish to {tag!r}: the control table changed "
                "before the batch was ordered",
            )
        verdict = self.state.dedup(ref)
        if verdict != "new":
            channel.count("decided-duplicate" if verdict == "duplicate" else f"decided-{verdict}", ref[4])
            if verdict == "duplicate":
                return None
            return Status.BAD_REQUEST, f"event ids {ref[3]}.. of {ref[2]!r} were {verdict} when ordered"
        seq = self.state.next_seq[tag]
        self.state.next_seq[tag] = seq + 1
        channel.apply(ref, position, seq, timestamp, queued)
        if queued and not channel.holds(ref):
            key = (tag,) + ref_key(ref)
            if key not in self.missing:
                self.missing[key] = [ref, None]
                if len(self.missing) > MAX_MISSING:
                    self.missing.popitem(last=False)
                    self._count("missing-forgotten")
        self.on_ready(tag)

    def _apply_membership(self, value):
        """
        Apply a decided subscription, unsubscription or registration; return
        C{(status, text)} when the table refuses it at this position.
        """
        kind, tag, client = value
        channel = self.channels.get(tag)
        if channel is None or not channel.ordered:
            self._count("decided-unknown-channel")
            return Status.UNKNOWN_CHANNEL, f"channel {tag!r} was gone when the request was ordered"
        state = self.state
        if kind == SUBSCRIBE:
            if not channel.spec.may_subscribe(client):
                return Status.UNAUTHORIZED, f"client {client!r} may no longer subscribe to {tag!r}"
            state.subscribers[tag].add(client)
            channel.subscribe(client, True)
            channel.subscribed(client, state.next_seq[tag])
            options = self._replays.pop((tag, client), None)
            if options is not None:
                self._ordered_resume(channel, client, options)
        elif kind == UNSUBSCRIBE:
            state.subscribers[tag].discard(client)
            channel.unsubscribe(client)
        elif channel.spec.may_publish(client):
            state.registered[tag].add(client)
            channel.registered.add(client)
        else:
            return Status.UNAUTHORIZED, f"client {client!r} may no longer publish to {tag!r}"
        return None

    def _decided(self, value, position, refusal=None):
        positions = self._positions
        positions[value] = position
        if len(positions) > POSITIONS_MEMORY:
            positions.popitem(last=False)
        tokens = self._waiting.pop(value, None)
        if tokens:
            self._answer_waiting(tokens, value, position, refusal)
        # every request waiting on a table change got its result
        self._table_results.pop(value, None)

    def _answer_waiting(self, tokens, value, position, refusal=None):
        for token in tokens:
            waiting = self._tokens.get(token)
            if waiting is None:
                continue
            if refusal is not None:
                waiting.info["refusal"] = refusal
            waiting.remaining.discard(value)
            waiting.positions.append(position)
            waiting.decided_values.append(value)
            if not waiting.remaining:
                del self._tokens[token]
                self._answers.append((token, self._answer(waiting)))

    def expire_waiting(self, now):
        """
        Answer requests that waited for the log longer than
        L{ORDER_TIMEOUT}: not ordered (yet), so the client may retry.
        """
        late = [t for t, w in self._tokens.items() if now - w.since > ORDER_TIMEOUT]
        for token in late:
            waiting = self._tokens.pop(token)
            for value in waiting.remaining:
                tokens = self._waiting.get(value)
                if tokens is not None and token in tokens:
                    tokens.remove(token)
                    if not tokens:
                        del self._waiting[value]
            self._count("order-timeout")
            self._answers.append((token, Reply(
                waiting.request.seq, Status.BUSY,
                f"not ordered within {ORDER_TIMEOUT:g} s: the replicas could not agree in time",
                channel=waiting.tag,
            )))

    def missing_to_fetch(self, now):
        """
        Return references of decided batches this replica lacks, to ask its
        peers for (each at most every L{PEER_FETCH_RETRY} seconds).
        """
        wanted = []
        # a batch whose TTL passed is no longer worth fetching: every replica
        # sends its tombstone
        gone = [key for key, (ref, _) in self.missing.items() if not ref[6] + ref[7] > now]
        for key in gone:
            del self.missing[key]
        for entry in self.missing.values():
            ref, asked = entry
            if asked is None or now - asked >= PEER_FETCH_RETRY:
                entry[1] = now
                wanted.append(ref)
                if len(wanted) >= PEER_FETCH_CHUNK:
                    break
        return wanted

    def serve_peer_fetch(self, refs):
        """
        Return the batches among C{refs} (a peer's list, unchecked) this
        replica holds, within L{MAX_FETCH_BYTES}.
        """
        found = []
        size = 0
        if type(refs) not in (list, tuple):
            return found
        for ref in refs[:PEER_FETCH_CHUNK]:
            if type(ref) not in (list, tuple) or len(ref) != 3:
                continue
            tag, publisher, first_id = ref
            channel = self.channels.get(tag) if type(tag) is str else None
            if channel is None or not channel.ordered:
                continue
            batch = channel.body((publisher, first_id)) if type(first_id) is int else None
            if batch is not None:
                found.append((tag, batch))
                size += batch_bytes(batch)
                if size >= MAX_FETCH_BYTES:
                    break
        return found

    def peer_fetched(self, found):
        """
        Keep the batches a peer sent for what this replica lacks, each only
        when it matches the decided digest.
        """
        kept = 0
        for tag, batch in found:
            entry = self.missing.get((tag, batch[0], batch[1]))
            if entry is None:
                continue
            ref = entry[0]
            if batch_digest(batch) != ref[5]:
                self._count("peer-fetch-mismatch")
                continue
            del self.missing[(tag, batch[0], batch[1])]
            channel = self.channels.get(tag)
            if channel is None or not channel.ordered:
                continue  # removed from the table since it was decided
            channel.keep(batch, ref[5])
            kept += 1
        if kept:
            self._count("peer-fetched")
        return kept

    def state_snapshot(self):
        """
        The replicated state as bytes, for a checkpoint.
        """
        return self.state.snapshot()

    def restore_state(self, data):
        """
        Install a replicated state that state transfer brought: subscriber
        queues follow the subscriptions it names (new ones start empty, as
        this replica missed what was decided before).
        """
        state = ReplicatedState.restore(data)
        table = ControlTable.restore(state.table, self.config.classes) if state.table else self.table
        before = self.table.channels
        self.state = state
        self.table = table
        self._follow_table(before)
        for tag, channel in self.channels.items():
            if not channel.ordered:
                continue
            self.state.add_channel(tag)
            subscribers = self.state.subscribers[tag]
            for client in list(channel.queues):
                if client not in subscribers:
                    channel.unsubscribe(client)
            for client in subscribers:
                if client not in channel.queues:
                    queue = channel.queues[client] = channel.new_queue()
                    queue.floor = self.state.next_seq[tag]
            channel.registered |= self.state.registered[tag]
        self._count("state-restored")

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
        channel = self.channels[tag]
        queue = channel.queues.get(client)
        if queue is None:
            return 0
        if type(channel) in (DiskChannel, OrderedDiskChannel):
            return channel.acknowledge(client, _batch_keys(keys), delivered)
        return queue.ack(_batch_keys(keys), delivered)

    def fetch(self, tag, client, keys):
        """
        Return the full batches named by C{keys} that C{client}'s queue holds
        (waiting, or sent and not acknowledged).
        """
        channel = self.channels[tag]
        channel.queue_of(client)
        found = []
        size = 0
        for key in _batch_keys(keys):
            batch = channel.lookup(client, key)
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
        return self.channels[tag].open_stream(client, events, nbytes)

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
                "table": {"version": self.table.version},
            }
        return {
            "table": {"version": self.table.version},
            "channels": {
                tag: channel.snapshot(client)
                for tag, channel in self.channels.items()
                if channel.spec.may_publish(client) or channel.spec.may_subscribe(client)
            },
        }


_THROUGH_LOG = frozenset({units.PUBLISH, units.SUBSCRIBE, units.UNSUBSCRIBE, units.REGISTER})

#: The subscribe option asking a disk channel to replay its log from a time
#: (seconds since the epoch, compared with the publishers' timestamps).
REPLAY_FROM = "from_time"


def _check_replay(channel, since):
    """
    Refuse a replay from C{since} that C{channel} cannot give: only an
    unordered channel kept on disk has a log to replay, from a real time.
    """
    if type(channel) not in (DiskChannel, OrderedDiskChannel):
        raise channel.refuse(
            Status.BAD_REQUEST,
            f"channel {channel.tag!r} is not kept on disk: a replay from a time needs an unordered "
            'channel whose class has persistence = "disk"',
            "replay-not-on-disk",
        )
    if type(since) not in (int, float) or not math.isfinite(since):
        raise channel.refuse(
            Status.BAD_REQUEST,
            f"subscribe option {REPLAY_FROM!r}: expected a time in seconds since the epoch "
            f"(a finite number), found {since!r:.60}",
            "bad-replay-time",
        )


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
