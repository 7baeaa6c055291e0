"""
RateLimitedLog: peers cannot flood the log through warnings they trigger.
"""

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs

from fit_broker.ratelimit import RateLimitedLog, shorten

log = Logger()


def _texts(events):
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


def test_burst_then_one_line_per_interval_per_reason():
    """The first burst of a reason is logged, then one line per interval that says how many were left out."""
    clock = Clock()
    limited = RateLimitedLog(log, clock, burst=3, interval=10.0)
    with capturedLogs() as events:
        written = [limited.warn("bad-frame", "bad frame {n}", n=n) for n in range(100)]
    assert written[:3] == [True, True, True] and not any(written[3:])
    assert len(events) == 3
    assert limited.suppressed["bad-frame"] == 97
    clock.advance(10)
    with capturedLogs() as events:
        assert limited.warn("bad-frame", "bad frame {n}", n=100)
        assert not limited.warn("bad-frame", "bad frame {n}", n=101)
    [text] = _texts(events)
    assert "bad frame 100" in text and "97 more 'bad-frame' warnings left out" in text
    assert "101 in all" in text


def test_reasons_are_limited_separately():
    """A flood of one reason does not hide the first warnings of another."""
    limited = RateLimitedLog(log, Clock(), burst=2)
    with capturedLogs() as events:
        for _ in range(50):
            limited.warn("a", "a")
        limited.warn("b", "b")
    assert _texts(events) == ["a", "a", "b"]


def test_string_fields_are_cut():
    """Peer-chosen text longer than 200 characters is cut before it reaches the log."""
    limited = RateLimitedLog(log, Clock())
    with capturedLogs() as events:
        limited.warn("x", "replica says {text}", text="A" * 10_000, raw=b"B" * 10_000, n=5)
    [event] = events
    assert len(event["text"]) == 203 and event["text"].endswith("...")
    assert len(event["raw"]) == 203
    assert event["n"] == 5
    assert shorten("short") == "short" and shorten(7) == 7


def test_a_field_may_be_called_reason():
    """A field may be called reason, like warn's first parameter, and is logged as given."""
    limited = RateLimitedLog(log, Clock())
    with capturedLogs() as events:
        limited.warn("bad-frame", "dropped: {reason}", reason="why")
    assert _texts(events) == ["dropped: why"]
