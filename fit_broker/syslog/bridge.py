"""
The spool between parsed syslog messages and the cluster's publisher.

Protocols hand the bridge raw datagrams and frames; it parses, routes and
spools them, publishes once per reactor turn per (channel, urgency), and
tells stream readers to stop and start reading as the spool fills and
drains.  It owns no socket: tests drive it with a fake publisher and a
L{Clock}.

Every message ends in exactly one of: acknowledged by the cluster
(C{acked}), refused by it for good (C{failed}), dropped at the door
(C{empty}, C{dropped-udp}, C{spool-full}, C{rate-limited},
C{dropped-malformed}, C{dropped-stopping}), unconfirmed when the adapter stopped
(C{unacked-at-shutdown}), or still in the spool; each has a counter, so
C{received} always equals their sum.
"""

from collections import OrderedDict, defaultdict

from twisted.logger import Logger

from fit_broker.errors import RequestFailed
from fit_broker.syslog.config import SpoolLimits
from fit_broker.syslog.framing import DEFAULT_MAX_SIZE, Frame, trim_datagram
from fit_broker.syslog.parser import RFC3164, RFC5424, UNPARSED, parse

#: Refusals that a retry cannot cure: the configuration must change.
PERMANENT_STATUSES = frozenset(
    {"unauthorized", "unknown-channel", "bad-request", "auth-failed", "unknown-method"}
)

#: Reasons a reader is paused; it reads again once none is left.
SPOOL = "spool"
RATE = "rate"

#: Sender addresses whose token buckets are kept at most.
MAX_BUCKETS = 10_000

RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0

#: Seconds between two warnings that the spool filled.
PAUSE_LOG_INTERVAL = 60.0

_FORMAT_COUNTERS = {RFC5424: "format:rfc5424", RFC3164: "format:rfc3164", UNPARSED: "malformed"}


class TokenBuckets:
    """
    A token bucket per sender address, at most L{MAX_BUCKETS} of them (the
    least recently used is forgotten, which only makes it start full).
    """

    def __init__(self, rate, burst, max_buckets=MAX_BUCKETS):
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets = OrderedDict()

    def _balance(self, key, now):
        entry = self._buckets.get(key)
        if entry is None:
            if len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            return float(self.burst)
        self._buckets.move_to_end(key)
        return min(float(self.burst), entry[0] + (now - entry[1]) * self.rate)

    def take(self, key, count, now):
        """
        Take C{count} tokens for C{key} at time C{now}, going into debt if
        need be; return the balance, negative when C{key} went over its rate.
        """
        balance = self._balance(key, now) - count
        self._buckets[key] = (balance, now)
        return balance

    def try_take(self, key, now):
        """
        Take one token for C{key} if it has one; return whether it had.
        """
        balance = self._balance(key, now)
        if balance < 1.0:
            self._buckets[key] = (balance, now)
            return False
        self._buckets[key] = (balance - 1.0, now)
        return True


class SyslogBridge:
    """
    Parses, routes and spools syslog messages and publishes them.

    A reader (a stream protocol) provides C{pause_reading(reason)},
    C{resume_reading(reason)} and a C{framer} whose counters the bridge
    reports.

    @ivar publisher: has C{publish_many(channel, contents, urgency)}
        returning a Deferred; until it is set, messages wait in the spool.
    @ivar counters: reason -> count; see C{docs/syslog.md}.
    @ivar spooled_events: messages accepted and not yet acknowledged,
        refused or lost.
    @ivar spooled_bytes: their size as event contents.
    """

    log = Logger()

    def __init__(
        self,
        router,
        clock,
        publisher=None,
        spool=SpoolLimits(),
        max_size=DEFAULT_MAX_SIZE,
        local_tz=None,
        rate_limit=None,
        max_connections=1000,
        urgency_levels=None,
    ):
        """
        @param rate_limit: a L{fit_broker.syslog.config.RateLimit}, or C{None}.
        @param urgency_levels: channel -> its number of urgency levels;
            a higher urgency is lowered to the channel's top level.
        """
        self.router = router
        self.clock = clock
        self.publisher = publisher
        self.max_size = max_size
        self.local_tz = local_tz
        self.max_connections = max_connections
        self.urgency_levels = dict(urgency_levels or {})
        self.buckets = None if rate_limit is None else TokenBuckets(rate_limit.rate, rate_limit.burst)
        self.max_events = spool.max_events
        self.max_bytes = spool.max_bytes
        self.high_events = max(1, int(spool.max_events * spool.high_water))
        self.high_bytes = max(1, int(spool.max_bytes * spool.high_water))
        self.low_events = int(spool.max_events * spool.low_water)
        self.low_bytes = int(spool.max_bytes * spool.low_water)
        self.spooled_events = 0
        self.spooled_bytes = 0
        self.paused = False
        self.readers = set()
        self.counters = defaultdict(int)
        self._closed_framers = {}
        self._pending = {}
        self._flush_call = None
        self._retries = []
        self._drain_waiters = []
        self._closed = False
        self._now = None
        self._pause_logged = float("-inf")

    # Counters.

    def count(self, reason, n=1):
        self.counters[reason] += n

    def snapshot(self):
        """
        Return every counter: the bridge's, the router's (C{routing:*}), the
        framers' of open and closed connections (C{framing:*}), and the
        spool's level.
        """
        result = dict(self.counters)
        for name, value in self.router.counters.items():
            result[f"routing:{name}"] = value
        framing = dict(self._closed_framers)
        for reader in self.readers:
            for name, value in reader.framer.counters.items():
                framing[name] = framing.get(name, 0) + value
        for name, value in framing.items():
            result[f"framing:{name}"] = value
        result["spool-events"] = self.spooled_events
        result["spool-bytes"] = self.spooled_bytes
        result["connections-open"] = len(self.readers)
        return result

    # Readers.

    def add_reader(self, reader):
        """
        Admit a new stream reader; return C{False} when the connection cap
        is reached (the caller closes it).
        """
        if len(self.readers) >= self.max_connections:
            self.count("connections-refused")
            return False
        self.readers.add(reader)
        self.count("connections")
        if self.paused:
            reader.pause_reading(SPOOL)
        return True

    def remove_reader(self, reader):
        """
        Forget a reader whose connection closed, keeping its framer counters.
        """
        if reader in self.readers:
            self.readers.discard(reader)
            for name, value in reader.framer.counters.items():
                self._closed_framers[name] = self._closed_framers.get(name, 0) + value

    # Input.

    def receive_datagram(self, data, source, host):
        """
        Take one UDP datagram from C{source} (C{host} is its address, the
        rate limit's key).  Datagrams that find the spool at its high-water
        mark are dropped and counted.
        """
        self.count("received")
        self.count("received-udp")
        if self._closed:
            self.count("dropped-stopping")
            return
        data = trim_datagram(data)
        if not data:
            self.count("empty")
            return
        now = self._turn_time()
        if self.buckets is not None and not self.buckets.try_take(host, now):
            self.count("rate-limited")
            return
        if self.spooled_events >= self.high_events or self.spooled_bytes >= self.high_bytes:
            self.count("dropped-udp")
            return
        self._accept_frames((Frame(data),), source, now)

    def receive_frames(self, frames, source, host, reader):
        """
        Take the frames one read of C{reader}'s connection completed.

        They were read already, so they are kept up to the spool's hard
        bounds (beyond them, counted C{spool-full}); the reader is paused
        when the spool passes its high-water mark, or for as long as its
        sender went over the rate limit.
        """
        n = len(frames)
        self.count("received", n)
        self.count("received-stream", n)
        if self._closed:
            self.count("dropped-stopping", n)
            return
        now = self._turn_time()
        if self.buckets is not None:
            balance = self.buckets.take(host, n, now)
            if balance < 0:
                self.count("rate-limited-pauses")
                reader.pause_reading(RATE)
                self.clock.callLater(-balance / self.buckets.rate, reader.resume_reading, RATE)
        self._accept_frames(frames, source, now)

    def _turn_time(self):
        """
        Return the reception time of this reactor turn's messages, and make
        sure the turn ends with a flush.  One time per turn lets the parser
        reuse the timestamps a burst of messages shares.
        """
        now = self._now
        if now is None:
            now = self._now = self.clock.seconds()
            if self._flush_call is None:
                self._flush_call = self.clock.callLater(0, self.flush)
        return now

    def _accept_frames(self, frames, source, now):
        """
        Parse, route and spool C{frames} up to the spool's hard bounds, in
        one loop: the spool level, the counters and the lookups stay in
        locals for the whole read (the level is written back before anything
        outside the bridge can look at it).
        """
        counters = self.counters
        route = self.router.route
        levels_of = self.urgency_levels.get
        pending = self._pending
        max_size, local_tz = self.max_size, self.local_tz
        max_events, max_bytes = self.max_events, self.max_bytes
        high_events, high_bytes = self.high_events, self.high_bytes
        events, size = self.spooled_events, self.spooled_bytes
        try:
            for frame in frames:
                if events >= max_events or size >= max_bytes:
                    counters["spool-full"] += 1
                    continue
                msg = parse(frame.data, source, now, max_size, local_tz, frame.truncated)
                counters[_FORMAT_COUNTERS[msg.format]] += 1
                if msg.truncated:
                    counters["truncated"] += 1
                if msg.reason is not None:
                    prefix = "malformed:" if msg.format == UNPARSED else "lenient:"
                    for reason in msg.reasons:
                        counters[prefix + reason] += 1
                channel, urgency = route(msg)
                if channel is None:
                    counters["dropped-malformed"] += 1
                    continue
                levels = levels_of(channel)
                if levels is not None and urgency >= levels:
                    urgency = levels - 1
                content = msg.to_json_bytes()
                events += 1
                size += len(content)
                counters["accepted"] += 1
                key = (channel, urgency)
                contents = pending.get(key)
                if contents is None:
                    contents = pending[key] = []
                contents.append(content)
                if not self.paused and (events >= high_events or size >= high_bytes):
                    self.spooled_events, self.spooled_bytes = events, size
                    self._pause()
        finally:
            self.spooled_events, self.spooled_bytes = events, size

    # Output.

    def attach(self, publisher):
        """
        Start publishing through C{publisher}, beginning with what waited.
        """
        self.publisher = publisher
        if self._pending and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self):
        """
        Hand everything pending to the publisher, one call per (channel,
        urgency); normally run once per reactor turn.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._now = None
        if self.publisher is None:
            return
        pending, self._pending = self._pending, {}
        for (channel, urgency), contents in pending.items():
            self._publish(channel, urgency, contents, sum(map(len, contents)))

    def _publish(self, channel, urgency, contents, size, attempt=0):
        n = len(contents)
        self.count("published", n)
        try:
            d = self.publisher.publish_many(channel, contents, urgency)
        except Exception as e:
            self._failed_for_good(e, n, size)
            return
        d.addCallbacks(
            self._acked,
            self._failed,
            callbackArgs=(n, size),
            errbackArgs=(channel, urgency, contents, size, attempt),
        )

    def _acked(self, ids, n, size):
        if self._closed:
            return
        self.count("acked", n)
        self._release(n, size)

    def _failed(self, failure, channel, urgency, contents, size, attempt):
        if self._closed:
            return
        error = failure.value
        if isinstance(error, RequestFailed) and error.status in PERMANENT_STATUSES:
            self._failed_for_good(error, len(contents), size)
            return
        # No quorum in time, a full queue, a lost link: try again later.  The
        # messages stay in the spool meanwhile, so readers stay paused once
        # it fills.  A retry gets new event ids: delivery is at least once.
        self.count("retried", len(contents))
        delay = min(MAX_RETRY_DELAY, RETRY_DELAY * 2**attempt)
        if attempt == 0:
            self.log.warn(
                "publishing {n} syslog event(s) to {channel!r} failed ({error}); "
                "retrying in {delay} s and backing off",
                n=len(contents),
                channel=channel,
                error=error,
                delay=delay,
            )
        self._retries = [call for call in self._retries if call.active()]
        self._retries.append(
            self.clock.callLater(
                delay, self._publish, channel, urgency, contents, size, attempt + 1
            )
        )

    def _failed_for_good(self, error, n, size):
        self.count("failed", n)
        status = getattr(error, "status", type(error).__name__)
        self.count(f"failed:{status}", n)
        self.log.error("the cluster refused {n} syslog event(s): {error}", n=n, error=error)
        self._release(n, size)

    # Spool level.

    def _release(self, n, size):
        self.spooled_events -= n
        self.spooled_bytes -= size
        if self.paused and self.spooled_events <= self.low_events and self.spooled_bytes <= self.low_bytes:
            self._resume()
        if not self.spooled_events and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter()

    def _pause(self):
        self.paused = True
        self.count("pauses")
        now = self.clock.seconds()
        if now - self._pause_logged >= PAUSE_LOG_INTERVAL:
            # Under sustained overload the spool fills again and again: say
            # so now and then; the pauses counter has the rest.
            self._pause_logged = now
            self.log.warn(
                "syslog spool at {events} events / {size} bytes: stream listeners stop "
                "reading and UDP datagrams are dropped until it drains (pauses so far: "
                "{pauses})",
                events=self.spooled_events,
                size=self.spooled_bytes,
                pauses=self.counters["pauses"],
            )
        for reader in list(self.readers):
            reader.pause_reading(SPOOL)

    def _resume(self):
        self.paused = False
        self.count("resumes")
        for reader in list(self.readers):
            reader.resume_reading(SPOOL)

    def when_drained(self, callback):
        """
        Call C{callback} once the spool is empty (now, if it is).
        """
        if not self.spooled_events:
            callback()
        else:
            self._drain_waiters.append(callback)

    def abandon(self):
        """
        Stop: count what is still spooled as C{unacked-at-shutdown} (some
        of it may have reached the cluster), cancel retries and ignore
        later outcomes; return how many.
        """
        self._closed = True
        for call in self._retries:
            if call.active():
                call.cancel()
        self._retries = []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        unacked = self.spooled_events
        if unacked:
            self.count("unacked-at-shutdown", unacked)
        self._pending = {}
        self.spooled_events = 0
        self.spooled_bytes = 0
        return unacked
