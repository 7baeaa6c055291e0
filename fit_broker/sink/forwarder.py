"""
Fan-out of voted events to every sink, each sink at its own pace, holding
the subscriber only when one falls too far behind.

The subscriber hands a channel's events over in groups, up to C{window}
groups whose Deferreds have not fired, and acknowledges each group to the
replicas when its own Deferred fires.  L{Forwarder.forward} returns a
Deferred that fires once every sink holds the group: written to its file,
or handed to a connected syslog transport and kept in a resend window.

Each sink keeps its own queue, so a sink that is down (and retries with
backoff) does not stop the others: they keep taking new groups, and the
down sink's queue grows, until one of two bounds holds everything:

 - the subscriber's window: that many groups per channel are not held by
   every sink, so it hands over no more (the replicas keep the rest, since
   nothing past the window was acknowledged);
 - the sink's backlog, C{backlog_events} and C{backlog_bytes}: while a
   sink holds that much, new groups wait in the forwarder and no sink is
   offered them, so the healthy sinks stay at most one backlog ahead.

Nothing is lost either way; a group offered to a sink below its bounds
may take it past them by that one group.

Each sink counts C{forwarded} (events it took), C{retried} (failed writes
and connections), C{repeats-possible} (events sent again after a
reconnection, which a receiver may see twice), and reports C{held} and
C{held-bytes} (what waits in it now, gauges) and C{state}.
"""

from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from fit_broker.sink._interfaces import ISink
from fit_broker.sink.file import RotatingFile, WriteError
from fit_broker.sink.format import json_line, syslog_frame


class Group:
    """
    Events of one channel as the subscriber handed them over, and the sinks
    that have not taken them yet.
    """

    __slots__ = ("tag", "events", "waiting", "deferred")

    def __init__(self, tag, events, waiting):
        self.tag = tag
        self.events = events
        self.waiting = waiting
        self.deferred = Deferred()


class Backoff:
    """
    Delays between retries: C{initial}, doubling up to C{maximum}; L{reset}
    after a success.
    """

    def __init__(self, initial=0.5, maximum=30.0):
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self):
        delay = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return delay

    def reset(self):
        self.attempt = 0


class Forwarder:
    """
    Hands every group to every sink and fires the group's Deferred when all
    of them took it.

    @ivar forwarded: events every sink took.
    @ivar open_groups: groups handed over and not yet held by every sink.
    @ivar waiting_events: events of groups no sink was offered yet, because
        some sink's backlog is full.
    """

    def __init__(self, sinks):
        self.sinks = list(sinks)
        self.forwarded = 0
        self.open_groups = 0
        self.waiting_events = 0
        self._waiting = deque()
        self._offering = False
        for sink in self.sinks:
            sink.on_taken = self._taken

    def forward(self, tag, events):
        """
        Give C{events} of channel C{tag} to every sink; return a Deferred
        that fires when every sink holds them.
        """
        if not events:
            return succeed(None)
        group = Group(tag, events, {sink.name for sink in self.sinks})
        self.open_groups += 1
        self._waiting.append(group)
        self.waiting_events += len(events)
        self._offer_waiting()
        return group.deferred

    def full(self):
        """
        Return the names of the sinks whose backlog is at its bound.
        """
        return [sink.name for sink in self.sinks if sink.full()]

    def _offer_waiting(self):
        # A sink may take a group (and fire Deferreds, which may hand over
        # more) while it is being offered: one loop offers, in order.
        if self._offering:
            return
        self._offering = True
        try:
            waiting, sinks = self._waiting, self.sinks
            while waiting and not any(sink.full() for sink in sinks):
                group = waiting.popleft()
                self.waiting_events -= len(group.events)
                for sink in sinks:
                    sink.offer(group)
        finally:
            self._offering = False

    def _taken(self, sink, group):
        group.waiting.discard(sink.name)
        if not group.waiting and not group.deferred.called:
            self.forwarded += len(group.events)
            self.open_groups -= 1
            group.deferred.callback(None)
        if self._waiting:
            self._offer_waiting()

    def snapshot(self):
        """
        Return every sink's counters as C{{sink name: {counter: value}}}.
        """
        return {sink.name: sink.snapshot() for sink in self.sinks}


class _Counting:
    def _init_counters(self):
        self.counters = {"forwarded": 0, "retried": 0, "repeats-possible": 0}

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def snapshot(self):
        counters = dict(self.counters)
        counters["held"] = self.held()
        counters["held-bytes"] = self.held_bytes()
        counters["state"] = self.state()
        return counters

    def full(self):
        spec = self.spec
        return self.held() >= spec.backlog_events or self.held_bytes() >= spec.backlog_bytes


@implementer(ISink)
class FileSink(_Counting):
    """
    Appends each group as JSON lines to a L{RotatingFile}; a failed write
    (disk full, permissions) is retried with backoff from the first line
    not written.
    """

    log = Logger()

    def __init__(self, spec, clock, backoff=None):
        self.name = spec.name
        self.spec = spec
        self.clock = clock
        self.file = RotatingFile(spec.path, spec.max_bytes, spec.keep, spec.fsync)
        self.backoff = backoff or Backoff()
        self.on_taken = lambda sink, group: None
        self._queue = deque()
        self._held = 0
        self._held_bytes = 0
        self._retry = None
        self._error = None
        self._init_counters()

    def offer(self, group):
        lines = [json_line(group.tag, e) for e in group.events]
        self._queue.append([group, lines])
        self._held += len(lines)
        self._held_bytes += sum(map(len, lines))
        if self._retry is None:
            self._drain()

    def _drain(self):
        self._retry = None
        while self._queue:
            entry = self._queue[0]
            group, lines = entry
            try:
                self.file.append(lines)
            except WriteError as e:
                entry[1] = lines[e.written :]
                self._held -= e.written
                self._held_bytes -= sum(map(len, lines[: e.written]))
                self.count("retried")
                delay = self.backoff.next_delay()
                if self._error != e.strerror:
                    self.log.warn(
                        "sink {sink}: cannot write {path}: {error}; retrying",
                        sink=self.name, path=self.spec.path, error=e.strerror,
                    )
                self._error = e.strerror
                self._retry = self.clock.callLater(delay, self._drain)
                return
            if self._error is not None:
                self.log.info("sink {sink}: writing {path} again", sink=self.name, path=self.spec.path)
                self._error = None
            self.backoff.reset()
            self._queue.popleft()
            self._held -= len(lines)
            self._held_bytes -= sum(map(len, lines))
            self.count("forwarded", len(group.events))
            self.on_taken(self, group)

    def held(self):
        return self._held

    def held_bytes(self):
        return self._held_bytes

    def state(self):
        return "retrying" if self._error is not None else "up"

    def stop(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.file.close()


class StreamWindow:
    """
    Sans-IO: what a syslog stream sends, and what it sends again after its
    connection was lost.

    Frames wait in C{pending} (per group) until the connection takes them;
    then they stay in the window until C{confirm_after} seconds passed on a
    connection that stayed up (plain TCP syslog has no acknowledgement),
    and are sent again first on the next connection.  The window holds at
    most C{max_events} events and C{max_bytes} bytes: when full, nothing
    more is sent until older frames are confirmed.
    """

    def __init__(self, max_events, max_bytes, confirm_after):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.confirm_after = confirm_after
        self.pending = deque()
        self.pending_events = 0
        self.pending_bytes = 0
        self.sent = deque()
        self.sent_events = 0
        self.sent_bytes = 0

    def add(self, token, frames):
        """
        Queue C{frames} (bytes) of a group identified by C{token}.
        """
        self.pending.append([token, frames, 0])
        self.pending_events += len(frames)
        self.pending_bytes += sum(map(len, frames))

    def confirm(self, now):
        """
        Forget frames sent at least C{confirm_after} seconds before C{now}.
        """
        limit = now - self.confirm_after
        sent = self.sent
        while sent and sent[0][0] <= limit:
            _, data, count = sent.popleft()
            self.sent_events -= count
            self.sent_bytes -= len(data)

    def take(self, now):
        """
        Return C{(data, tokens)}: the bytes to write now, and the tokens of
        groups whose frames are all in C{data} or sent before.
        """
        self.confirm(now)
        out, tokens = [], []
        events, size = self.sent_events, self.sent_bytes
        while self.pending:
            entry = self.pending[0]
            token, frames, index = entry
            while index < len(frames):
                frame = frames[index]
                if events and (events >= self.max_events or size + len(frame) > self.max_bytes):
                    break
                out.append(frame)
                events += 1
                size += len(frame)
                index += 1
            entry[2] = index
            if index < len(frames):
                break
            self.pending.popleft()
            tokens.append(token)
        data = b"".join(out)
        if out:
            self.sent.append((now, data, len(out)))
            self.sent_events, self.sent_bytes = events, size
            self.pending_events -= len(out)
            self.pending_bytes -= len(data)
        return data, tokens

    def resend(self, now):
        """
        Return C{(data, count)}: every frame of the window, to send first
        on a new connection, and how many events that is.
        """
        data = b"".join(chunk for _, chunk, _ in self.sent)
        count = self.sent_events
        if data:
            self.sent = deque([(now, data, count)])
        return data, count

    def blocked(self):
        """
        Whether frames wait because the window is full.
        """
        return bool(self.pending) and (
            self.sent_events >= self.max_events or self.sent_bytes >= self.max_bytes
            or self.pending[0][2] < len(self.pending[0][1])
        )

    def held(self):
        """
        Return how many events wait to be sent.
        """
        return self.pending_events


class _SyslogConnection(Protocol):
    """
    Moves a syslog sink's bytes; the receiver says nothing back.
    """

    def __init__(self, sink):
        self.sink = sink

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.sink.connected(self)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        self.sink.disconnected(self, reason)

    def pauseProducing(self):
        self.sink.paused = True

    def resumeProducing(self):
        self.sink.paused = False
        self.sink.flush()

    def stopProducing(self):
        pass


class SyslogConnectionFactory(Factory):
    noisy = False

    def __init__(self, sink):
        self.sink = sink

    def buildProtocol(self, addr):
        return _SyslogConnection(self.sink)


@implementer(ISink)
class SyslogSink(_Counting):
    """
    Writes each group as octet-counted RFC 5424 frames to a stream that a
    C{ClientService} keeps connected (see L{SyslogConnectionFactory}).

    A group is taken once its bytes were handed to a connected transport
    that is not asking us to pause; the window is sent again on the next
    connection, so a receiver that restarts sees every event, possibly
    twice (counted as C{repeats-possible}).
    """

    log = Logger()

    def __init__(self, spec, hostname, clock):
        self.name = spec.name
        self.spec = spec
        self.hostname = hostname
        self.clock = clock
        self.window = StreamWindow(spec.window_events, spec.window_bytes, spec.confirm_after)
        self.connection = None
        self.paused = False
        self.on_taken = lambda sink, group: None
        self._wakeup = None
        self._was_connected = False
        self._stopped = False
        self._init_counters()

    def offer(self, group):
        spec = self.spec
        self.window.add(
            group,
            [
                syslog_frame(group.tag, event, self.hostname, spec.app_name, spec.facility)
                for event in group.events
            ],
        )
        self.flush()

    def flush(self):
        """
        Write what the window lets through to the connection, if there is one.
        """
        if self.connection is None or self.paused:
            return
        data, taken = self.window.take(self.clock.seconds())
        if data:
            self.connection.transport.write(data)
        for group in taken:
            self.count("forwarded", len(group.events))
            self.on_taken(self, group)
        if self.window.blocked() and (self._wakeup is None or not self._wakeup.active()):
            self._wakeup = self.clock.callLater(self.spec.confirm_after, self.flush)

    def connected(self, connection):
        self.connection = connection
        self.paused = False
        data, count = self.window.resend(self.clock.seconds())
        if count:
            self.count("repeats-possible", count)
            self.log.info(
                "sink {sink}: connected to {where}; sending {count} event(s) again",
                sink=self.name, where=self.spec.connect, count=count,
            )
            connection.transport.write(data)
        elif not self._was_connected:
            self.log.info("sink {sink}: connected to {where}", sink=self.name, where=self.spec.connect)
        self._was_connected = True
        self.flush()

    def disconnected(self, connection, reason):
        if connection is not self.connection:
            return
        self.connection = None
        self.window.confirm(self.clock.seconds())
        if self._stopped:
            return
        self.count("retried")
        self.log.warn(
            "sink {sink}: lost {where} ({why}); {count} event(s) to send again",
            sink=self.name, where=self.spec.connect,
            why=reason.getErrorMessage(), count=self.window.sent_events,
        )

    def connect_failed(self, failure):
        self.count("retried")
        return failure

    def held(self):
        return self.window.held()

    def held_bytes(self):
        return self.window.pending_bytes

    def state(self):
        return "up" if self.connection is not None else "down"

    def stop(self):
        self._stopped = True
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
