"""
A disk channel that lost part of its batch log gets it back from its peers.

A replica whose data folder was new although it ran before, or whose batch
log recovery cut records, asks every other replica for the batches of that
channel it still logs, page by page (C{disk-sync} with a cursor in that
peer's own log; C{disk-batches} back, at most L{PAGE_BATCHES} batches and
L{PAGE_BYTES} bytes of them).  Each replica logs batches in the order it
received them, so the cursors are per peer and a batch is known by
C{(publisher, first_id)} and its digest, not by a position.

A batch is taken once enough distinct peers sent the same
C{(publisher, first_id, digest)}: one on a crash-tolerant channel (crashed
replicas do not lie), f+1 on a Byzantine one (at least one of them is
correct).  It is appended to the log (what the log holds, what expired or
what the publisher's ids say is a duplicate is left out), not queued for
subscribers (the replica forgot what they acknowledged; the others serve
them), and counted as C{recovered-from-peers}.  The recovery of a channel ends when every peer it
heard from answered its last page and the others were given up (silent
for L{PEER_WAIT} seconds, or L{MAX_SILENT} requests in a row), or after
L{MAX_SECONDS} at most; one line says what it brought.

Until then the channel says it is recovering (status, and its replies to
peers that recover too), refuses replays and answers no fetch of a batch it
lacks: it never claims to hold what it no longer holds.

Sans-IO: the replica feeds peer frames and the time, and gives a
C{send(to, kind, body)} that returns C{False} for a frame not written.
Whatever a peer sends that is malformed, too large or out of turn is a
counted drop; votes waiting for more copies are bounded per peer in keys
and bytes, and one peer votes once per batch.
"""

import msgpack
from twisted.logger import Logger

from fit_broker.broker.disk_channel import DiskChannel
from fit_broker.storage import StorageError
from fit_broker.units import batch_bytes, batch_digest, payload_count
from fit_broker.wire.framing import DEFAULT_MAX_FRAME

SYNC = "disk-sync"
BATCHES = "disk-batches"
KINDS = frozenset({SYNC, BATCHES})

#: A page: at most this many batches ...
PAGE_BATCHES = 512
#: ... and this many bytes of log records (one batch, whatever its size).
PAGE_BYTES = 4 * 1024 * 1024
#: What a page's encoding adds to its records, at most.
PAGE_SLACK = 64 * 1024
#: The largest reply taken at all (a page of one large batch): what a peer
#: frame carries (L{fit_broker.replica.peers.MAX_BODY}).
MAX_REPLY_BYTES = DEFAULT_MAX_FRAME - 1024
#: The largest request.
MAX_REQUEST_BYTES = 4096

#: Seconds a peer has to answer a page before it is asked again.
REQUEST_TIMEOUT = 5.0
#: Seconds between two requests to a peer that is down or recovering too.
RETRY_INTERVAL = 1.0
#: Seconds a recovery waits for a peer it never heard from.
PEER_WAIT = 15.0
#: Unanswered requests in a row after which a peer heard from is given up.
MAX_SILENT = 3
#: Seconds after which a recovery ends, whatever it still waits for.
MAX_SECONDS = 300.0

#: Byzantine channels: a peer whose unconfirmed batches reach this many
#: waits for the others before its next page ...
PACE_KEYS = 4 * PAGE_BATCHES
#: ... and votes past these bounds (per peer) are dropped and counted.
MAX_PENDING_KEYS = 65_536
MAX_PENDING_BYTES = 64 * 1024 * 1024

#: What a page says of the peer's log.
MORE, END, RECOVERING, UNAVAILABLE, UNKNOWN = "more", "end", "recovering", "unavailable", "unknown"
_STATES = frozenset({MORE, END, RECOVERING, UNAVAILABLE, UNKNOWN})

_pack = msgpack.Packer(use_bin_type=True).pack

#: The request id of a request that could not be sent (no reply matches it).
_UNSENT = -1


class BadMessage(Exception):
    """
    A peer message that is dropped, with the counter it goes to.
    """


def _decode(body, limit, max_array):
    if len(body) > limit:
        raise BadMessage("too-large")
    try:
        return msgpack.unpackb(
            body, raw=False, use_list=False, strict_map_key=True,
            max_array_len=max_array, max_map_len=0, max_ext_len=0,
        )
    except Exception:
        raise BadMessage("undecodable") from None


def _check_batch(batch):
    """
    Whether C{batch} has a wire batch's shape.
    """
    if type(batch) is not tuple or len(batch) != 7:
        return False
    publisher, first_id, timestamp, ttl, urgency, body, proof = batch
    return (
        type(publisher) is str and type(first_id) is int and type(urgency) is int
        and type(timestamp) in (int, float) and type(ttl) in (int, float)
        and type(body) is bytes and type(proof) is bytes and payload_count(body) > 0
    )


class _Peer:
    """
    One peer as the recovery of one channel sees it.

    @ivar cursor: where its next page starts in its log (C{None}: its start).
    @ivar request: the id of the request it has to answer, or C{None}.
    @ivar pending_keys: batches it voted for that wait for more copies ...
    @ivar pending_bytes: ... and the bytes of the copies it brought first.
    """

    __slots__ = (
        "index", "cursor", "request", "asked_at", "last_try", "heard", "done", "gone", "silent",
        "pages", "batches", "pending_keys", "pending_bytes",
    )

    def __init__(self, index):
        self.index = index
        self.cursor = None
        self.request = None
        self.asked_at = None
        self.last_try = None
        self.heard = False
        self.done = False
        self.gone = False
        self.silent = 0
        self.pages = 0
        self.batches = 0
        self.pending_keys = 0
        self.pending_bytes = 0

    @property
    def live(self):
        return not (self.done or self.gone)


class ChannelRecovery:
    """
    The recovery of one disk channel: its peers' cursors and the votes on
    batches that wait for more copies.

    @ivar votes: C{(publisher, first_id)} -> C{(copies, voters)}, C{copies}
        being digest -> C{[batch, voters of it, peer that brought it, bytes]}.
    """

    def __init__(self, channel, threshold, peers, why, now):
        self.channel = channel
        self.tag = channel.tag
        self.threshold = threshold
        self.why = why
        self.started = now
        self.peers = {j: _Peer(j) for j in peers}
        self.votes = {}
        self.counters = dict.fromkeys(
            ("recovered", "recovered-events", "held", "expired", "duplicate", "conflict", "bad",
             "failed", "votes-dropped", "repeat-votes", "dropped", "timeouts"),
            0,
        )
        self.progress = {"since": now, "why": why, "copies_needed": threshold}
        channel.recovering = self.progress
        self.update()

    def count(self, name, n=1):
        self.counters[name] += n

    def update(self):
        """
        Refresh what the channel's status shows of this recovery.
        """
        self.progress.update(
            recovered=self.counters["recovered"],
            waiting_for_copies=len(self.votes),
            peers={
                str(p.index): (
                    "done" if p.done else "given up" if p.gone
                    else f"page {p.pages + 1}" if p.heard else "not heard"
                )
                for p in self.peers.values()
            },
        )


class DiskRecovery:
    """
    Replica C{index}'s side of disk channel recovery: it serves pages of
    its logs to peers, and recovers its own channels that need it.

    @param channels: tag -> channel (the broker's); only L{DiskChannel}s
        are served or recovered.
    @param send: C{send(to, kind, body)}, returning C{False} when the frame
        was not written (the link is down or full).
    @param on_ready: called with a channel's tag when recovered batches
        were logged (to be synced).
    @param unreachable: peers no link reaches (no way to authenticate them).
    """

    log = Logger()

    def __init__(
        self, index, replicas, faults, channels, send, on_ready=lambda tag: None, unreachable=(),
        *, request_timeout=REQUEST_TIMEOUT, retry_interval=RETRY_INTERVAL, peer_wait=PEER_WAIT,
        max_silent=MAX_SILENT, max_seconds=MAX_SECONDS, pace_keys=PACE_KEYS,
        max_pending_keys=MAX_PENDING_KEYS, max_pending_bytes=MAX_PENDING_BYTES,
    ):
        self.index = index
        self.faults = faults
        self.peers = [j for j in range(replicas) if j != index and j not in unreachable]
        self.channels = channels
        self.send = send
        self.on_ready = on_ready
        self.request_timeout = request_timeout
        self.retry_interval = retry_interval
        self.peer_wait = peer_wait
        self.max_silent = max_silent
        self.max_seconds = max_seconds
        self.pace_keys = pace_keys
        self.max_pending_keys = max_pending_keys
        self.max_pending_bytes = max_pending_bytes
        self.recovering = {}  # tag -> ChannelRecovery
        self.finished = {}  # tag -> what its recovery brought
        self.counters = {"pages-served": 0, "batches-served": 0}
        self._next_request = 0

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def _drop(self, sender, reason):
        self.count(f"dropped:{reason}")
        self.count(f"dropped:replica-{sender}")

    def threshold(self, channel):
        """
        How many peers must send the same copy of a batch: one on a
        crash-tolerant channel, f+1 otherwise.
        """
        return 1 if channel.spec.qop == "cft" else self.faults + 1

    # -- starting

    def begin(self, needed, now):
        """
        Start recovering the channels C{needed} names (tag -> why).
        """
        for tag, why in needed.items():
            channel = self.channels.get(tag)
            if type(channel) is not DiskChannel or tag in self.recovering:
                continue
            rec = ChannelRecovery(channel, self.threshold(channel), self.peers, why, now)
            self.recovering[tag] = rec
            self.log.info(
                "disk channel {tag!r}: recovering its batch log from replicas {peers} ({why}); "
                "copies needed per batch: {copies}",
                tag=tag, peers=self.peers, why=why, copies=rec.threshold,
            )
            self._advance(rec, now)

    @staticmethod
    def needed(channels, fresh=(), ran_before=False):
        """
        Return tag -> why, for the disk channels among C{channels} that
        need recovery: those in C{fresh} (their folder was new) when the
        replica ran before, and those whose log recovery cut records.
        """
        needed = {}
        for channel in channels:
            if type(channel) is not DiskChannel:
                continue
            if ran_before and channel.tag in fresh:
                needed[channel.tag] = "its data folder was new, and this replica ran before"
            elif channel.lost_records:
                needed[channel.tag] = f"its log lost {channel.lost_records} records to damage"
        return needed

    # -- the clock

    def tick(self, now):
        """
        Ask again what timed out, give up silent peers, end what is done.
        """
        for rec in list(self.recovering.values()):
            if now - rec.started >= self.max_seconds:
                self._finish(rec, now, f"gave up after {self.max_seconds:g} s")
                continue
            for peer in rec.peers.values():
                if not peer.live:
                    continue
                if peer.request is not None and now - peer.asked_at >= self.request_timeout:
                    peer.request = None
                    rec.count("timeouts")
                    self.count("request-timeouts")
                    if peer.heard:
                        peer.silent += 1
                        if peer.silent >= self.max_silent:
                            self._give_up(rec, peer, f"{peer.silent} requests unanswered")
                if peer.live and not peer.heard and now - rec.started >= self.peer_wait:
                    self._give_up(rec, peer, f"not heard from in {self.peer_wait:g} s")
            self._advance(rec, now)

    def _give_up(self, rec, peer, why):
        peer.gone = True
        peer.request = None
        self.log.warn(
            "disk channel {tag!r}: recovery goes on without replica {peer}: {why}",
            tag=rec.tag, peer=peer.index, why=why,
        )

    def _may_ask(self, rec, peer, now):
        if not peer.live or peer.request is not None:
            return False
        if peer.last_try is not None and now - peer.last_try < self.retry_interval:
            return False
        if peer.pending_keys < self.pace_keys:
            return True
        # far ahead of the others: wait while another peer can still send
        # the copies its batches wait for
        return not any(
            other is not peer and other.live and other.heard
            and (other.request is not None or other.pending_keys < self.pace_keys)
            for other in rec.peers.values()
        )

    def _advance(self, rec, now):
        """
        Ask each peer that may be asked for its next page; end the
        recovery once no peer is left to wait for.
        """
        for peer in rec.peers.values():
            if self._may_ask(rec, peer, now):
                self._next_request += 1
                body = _pack((rec.tag, self._next_request, peer.cursor))
                if self.send(peer.index, SYNC, body) is False:
                    if peer.heard:
                        # its link is down: counts as a request unanswered
                        peer.request, peer.asked_at = _UNSENT, now
                    else:
                        peer.last_try = now
                    continue
                peer.request = self._next_request
                peer.asked_at = now
                peer.last_try = None
        rec.update()
        if not any(p.live for p in rec.peers.values()):
            self._finish(rec, now)

    def _finish(self, rec, now, why=None):
        del self.recovering[rec.tag]
        c = rec.counters
        unconfirmed = len(rec.votes)
        rec.votes = {}
        rec.channel.recovering = None
        answered = sorted(p.index for p in rec.peers.values() if p.done)
        pages = sum(p.pages for p in rec.peers.values())
        self.finished[rec.tag] = {
            "recovered": c["recovered"], "events": c["recovered-events"], "peers": answered,
            "pages": pages, "unconfirmed": unconfirmed, "seconds": round(now - rec.started, 3),
            "complete": why is None and len(answered) >= rec.threshold,
            **{k: c[k] for k in ("held", "expired", "duplicate", "conflict", "bad", "failed",
                                  "votes-dropped", "dropped")},
        }
        short = "" if len(answered) >= rec.threshold else (
            f"; fewer than the {rec.threshold} peers needed answered"
        )
        self.log.info(
            "disk channel {tag!r}: recovery from peers {how}: {events} events in {batches} "
            "batches from replicas {peers} ({pages} pages, {seconds:.1f} s); {unconfirmed} "
            "batches unconfirmed (copies needed per batch: {copies}), {expired} expired, "
            "{dropped} peer messages dropped{short}",
            tag=rec.tag, how=why or "done", events=c["recovered-events"], batches=c["recovered"],
            peers=answered, pages=pages, seconds=now - rec.started, unconfirmed=unconfirmed,
            copies=rec.threshold, expired=c["expired"], dropped=c["dropped"], short=short,
        )

    # -- peer messages

    def received(self, sender, kind, body, now):
        """
        Take one authenticated frame of kind C{disk-sync} or
        C{disk-batches} from peer C{sender}; a bad one is counted and
        dropped.
        """
        try:
            if type(body) is not bytes:
                raise BadMessage("not-bytes")
            if kind == SYNC:
                self._serve(sender, body)
            elif kind == BATCHES:
                self._page(sender, body, now)
            else:
                raise BadMessage("unknown-kind")
        except BadMessage as e:
            self._drop(sender, str(e))

    def _serve(self, sender, body):
        request = _decode(body, MAX_REQUEST_BYTES, 8)
        if type(request) is not tuple or len(request) != 3:
            raise BadMessage("bad-request")
        tag, request_id, cursor = request
        if type(tag) is not str or type(request_id) is not int or not (
            cursor is None or (type(cursor) is int and cursor >= 0)
        ):
            raise BadMessage("bad-request")
        channel = self.channels.get(tag)
        batches, next_cursor, state = (), cursor, UNKNOWN
        if type(channel) is DiskChannel:
            state = RECOVERING if channel.recovering is not None else UNAVAILABLE
        if state == UNAVAILABLE and channel.failed is None:
            try:
                batches, next_cursor, end = channel.read_batches(cursor or 0, PAGE_BATCHES, PAGE_BYTES)
            except StorageError as e:
                self.count("serve-failed")
                self.log.warn(
                    "disk channel {tag!r}: cannot serve replica {peer} its log: {error}",
                    tag=tag, peer=sender, error=str(e),
                )
            else:
                state = END if end else MORE
        reply = _pack((tag, request_id, next_cursor, state, batches))
        if len(reply) > MAX_REPLY_BYTES:
            # one batch too large for a frame: skip it rather than stall
            self.count("serve-oversize", len(batches))
            reply = _pack((tag, request_id, next_cursor, state, ()))
        self.send(sender, BATCHES, reply)
        self.count("pages-served")
        self.count("batches-served", len(batches))

    def _page(self, sender, body, now):
        if len(body) > MAX_REPLY_BYTES:
            raise BadMessage("too-large")
        page = _decode(body, MAX_REPLY_BYTES, PAGE_BATCHES + 1)
        if type(page) is not tuple or len(page) != 5:
            raise BadMessage("bad-page")
        tag, request_id, next_cursor, state, batches = page
        if (
            type(tag) is not str or type(request_id) is not int or state not in _STATES
            or not (next_cursor is None or (type(next_cursor) is int and next_cursor >= 0))
            or type(batches) is not tuple
        ):
            raise BadMessage("bad-page")
        rec = self.recovering.get(tag)
        peer = rec.peers.get(sender) if rec is not None else None
        if peer is None or peer.request != request_id or request_id == _UNSENT:
            self.count("late-pages")  # asked again since, or the recovery ended
            return
        try:
            self._check_page(peer, body, next_cursor, state, batches)
        except BadMessage:
            rec.count("dropped")
            peer.request = None
            peer.last_try = now
            raise
        peer.request = None
        recovered = rec.counters["recovered"]
        if state in (RECOVERING, UNAVAILABLE):
            peer.last_try = now  # ask again in a while
        else:
            peer.heard = True
            peer.silent = 0
            if state == UNKNOWN:
                peer.done = True  # it keeps no such channel: nothing to recover from it
            else:
                peer.pages += 1
                peer.batches += len(batches)
                peer.cursor = next_cursor
                peer.done = state == END
                for batch in batches:
                    self._vote(rec, peer, batch, now)
        if rec.counters["recovered"] > recovered:
            self.on_ready(rec.tag)
        self._advance(rec, now)

    def _check_page(self, peer, body, next_cursor, state, batches):
        if len(batches) > PAGE_BATCHES:
            raise BadMessage("too-many-batches")
        if len(batches) > 1 and len(body) > PAGE_BYTES + PAGE_SLACK:
            raise BadMessage("too-large")
        if state in (MORE, END):
            before = -1 if peer.cursor is None else peer.cursor
            if next_cursor is None or next_cursor < before or (state == MORE and next_cursor <= before):
                raise BadMessage("bad-cursor")
            if not all(_check_batch(batch) for batch in batches):
                raise BadMessage("bad-batch")
        elif batches:
            raise BadMessage("bad-page")

    def _vote(self, rec, peer, batch, now):
        channel = rec.channel
        key = (batch[0], batch[1])
        if channel.holds(key):
            return
        if rec.threshold <= 1:
            self._take(rec, batch, now)
            return
        entry = rec.votes.get(key)
        if entry is not None and peer.index in entry[1]:
            rec.count("repeat-votes")
            return
        digest = batch_digest(batch)
        copy = None if entry is None else entry[0].get(digest)
        size = 0 if copy is not None else batch_bytes(batch)
        if (
            peer.pending_keys >= self.max_pending_keys
            or peer.pending_bytes + size > self.max_pending_bytes
        ):
            rec.count("votes-dropped")
            return
        if entry is None:
            entry = rec.votes[key] = ({}, set())
        if copy is None:
            copy = entry[0][digest] = [batch, set(), peer.index, size]
            peer.pending_bytes += size
        copy[1].add(peer.index)
        entry[1].add(peer.index)
        peer.pending_keys += 1
        if len(copy[1]) >= rec.threshold:
            self._release(rec, key)
            self._take(rec, copy[0], now)

    def _release(self, rec, key):
        copies, _ = rec.votes.pop(key)
        for _, voters, bringer, size in copies.values():
            rec.peers[bringer].pending_bytes -= size
            for j in voters:
                rec.peers[j].pending_keys -= 1

    def _take(self, rec, batch, now):
        outcome = rec.channel.add_recovered(batch, now)
        rec.count(outcome)
        if outcome == "recovered":
            rec.count("recovered-events", payload_count(batch[5]))

    # -- status

    def status(self):
        """
        What the replica's status shows: each recovery under way or done.
        """
        return {
            "recovering": {tag: dict(rec.progress) for tag, rec in self.recovering.items()},
            "finished": {tag: dict(done) for tag, done in self.finished.items()},
            "counters": dict(self.counters),
        }
