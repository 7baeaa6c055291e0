"""
Warnings a peer can trigger at will, logged without letting the peer flood the log.

Sans-IO: the caller passes a logger and a clock (anything with C{seconds()}).
"""

MAX_FIELD = 200


def shorten(value, limit=MAX_FIELD):
    """
    Return C{value} cut to C{limit} characters (bytes for C{bytes}) when it
    is text a peer may have chosen; other values are returned unchanged.
    """
    if type(value) in (str, bytes) and len(value) > limit:
        return value[:limit] + ("..." if type(value) is str else b"...")
    return value


class RateLimitedLog:
    """
    Log the first C{burst} warnings of each reason, then at most one per
    C{interval} seconds per reason, saying how many were left out since the
    last one.  String fields are cut to L{MAX_FIELD} characters, since peers
    choose them.

    @ivar suppressed: reason -> warnings not logged since the last logged one.
    """

    def __init__(self, logger, clock, burst=20, interval=10.0):
        self.logger = logger
        self.clock = clock
        self.burst = burst
        self.interval = interval
        self.seen = {}
        self.suppressed = {}
        self._last = {}

    def warn(self, reason, format, /, **fields):
        """
        Log C{format} with C{fields} unless C{reason} was logged too often
        lately.  Return whether a line was written.
        """
        seen = self.seen.get(reason, 0) + 1
        self.seen[reason] = seen
        now = self.clock.seconds()
        fields = {key: shorten(value) for key, value in fields.items()}
        if seen <= self.burst:
            self._last[reason] = now
            self.logger.warn(format, **fields)
            return True
        if now - self._last.get(reason, now) < self.interval:
            self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
            return False
        self._last[reason] = now
        left_out = self.suppressed.pop(reason, 0)
        self.logger.warn(
            format + " ({log_suppressed} more {log_reason!r} warnings left out "
            "since the last one; {log_seen} in all)",
            log_suppressed=left_out,
            log_reason=reason,
            log_seen=seen,
            **fields,
        )
        return True
