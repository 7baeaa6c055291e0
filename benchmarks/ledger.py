"""
What every benchmark client process records, whichever system it drives.

A publisher keeps the ids it saw acknowledged and a subscriber the ids it
delivered, both per channel, as sorted ranges in a small JSON file (the
"ledger").  The harness compares the two to count events lost (acknowledged
and never delivered) without any process holding a set of every event.

Peer brokers carry opaque payloads, so their events start with a 16-byte
header (publisher clock, per-channel id) that the subscriber reads back; FIT
Broker events carry both in their own fields.
"""

import json
import struct
import sys
import threading
import time
from array import array

HEADER = struct.Struct("<dQ")


def payload_filler(size):
    """
    Return C{size} bytes that do not compress to nothing.
    """
    block = bytes(range(251)) * (size // 251 + 1)
    return block[:size]


class Ranges:
    """
    Ids seen in increasing runs, kept as C{[first, last]} pairs.

    Adding ids in order (the common case) costs one comparison; anything
    else is sorted out by L{normalised}.
    """

    __slots__ = ("pairs",)

    def __init__(self):
        self.pairs = []

    def add_run(self, first, last):
        pairs = self.pairs
        if pairs and pairs[-1][1] + 1 == first:
            pairs[-1][1] = last
        else:
            pairs.append([first, last])

    def normalised(self):
        return merge(self.pairs)


def merge(pairs):
    """
    Return C{pairs} sorted with overlapping and adjacent runs joined.
    """
    out = []
    for first, last in sorted(pairs):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1][1] = last
        else:
            out.append([first, last])
    return out


def ids_to_ranges(ids):
    """
    Turn an C{array} of ids into (sorted ranges, number of repeated ids).
    """
    ordered = sorted(ids)
    pairs = []
    repeats = 0
    previous = None
    for value in ordered:
        if value == previous:
            repeats += 1
            continue
        if pairs and pairs[-1][1] + 1 == value:
            pairs[-1][1] = value
        else:
            pairs.append([value, value])
        previous = value
    return pairs, repeats


def count(pairs):
    return sum(last - first + 1 for first, last in pairs)


def missing(wanted, have):
    """
    Count the ids in the ranges C{wanted} that are not in the ranges C{have}.
    """
    wanted = merge(wanted)
    have = merge(have)
    lost = 0
    j = 0
    for first, last in wanted:
        position = first
        while j < len(have) and have[j][1] < position:
            j += 1
        k = j
        while position <= last:
            if k >= len(have) or have[k][0] > last:
                lost += last - position + 1
                break
            if have[k][0] > position:
                lost += have[k][0] - position
            position = max(position, have[k][1] + 1)
            k += 1
    return lost


def lost_events(published, delivered):
    """
    Count acknowledged events missing from a subscriber's ledger.

    @param published: channel -> acknowledged ranges.
    @param delivered: channel -> delivered ranges.
    """
    return sum(missing(pairs, delivered.get(tag, [])) for tag, pairs in published.items())


def write_ledger(path, ledger):
    with open(path, "w") as f:
        json.dump(ledger, f)


def read_ledger(path):
    with open(path) as f:
        return json.load(f)


def percentile(sorted_values, fraction):
    if not len(sorted_values):
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


class Delivered:
    """
    A subscriber's record: ids per channel, latencies, first and last arrival.
    """

    def __init__(self):
        self.ids = {}
        self.latencies = array("d")
        self.count = 0
        self.first = None
        self.last = None

    def channel(self, tag):
        ids = self.ids.get(tag)
        if ids is None:
            ids = self.ids[tag] = array("q")
        return ids

    def arrived(self, n):
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += n

    def summary(self, ledger_path=None):
        ledger = {}
        repeats = 0
        unique = 0
        for tag, ids in self.ids.items():
            pairs, again = ids_to_ranges(ids)
            ledger[tag] = pairs
            repeats += again
            unique += len(ids) - again
        if ledger_path:
            write_ledger(ledger_path, ledger)
        span = (self.last - self.first) if self.first is not None else 0.0
        latencies = sorted(self.latencies)
        p50 = percentile(latencies, 0.5)
        p99 = percentile(latencies, 0.99)
        return {
            "role": "subscriber",
            "delivered": unique,
            "duplicates": repeats,
            "seconds": round(span, 3),
            "delivered_per_s": round(unique / span, 1) if span > 0 else None,
            "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
        }


class Expectation:
    """
    The number of events a subscriber should end up with, read from stdin.

    The harness writes the publisher's acknowledged count as one line once
    the publisher is done; until then the subscriber cannot know when to
    stop.  A thread reads it so that any event loop can poll L{value}.
    """

    def __init__(self, notify=None):
        self.value = None
        self.notify = notify
        thread = threading.Thread(target=self._read, daemon=True)
        thread.start()

    def _read(self):
        line = sys.stdin.readline()
        try:
            value = int(line.strip() or "0")
        except ValueError:
            value = 0
        self.value = value
        if self.notify is not None:
            self.notify()


def say_ready():
    print("ready", file=sys.stderr, flush=True)


def emit(summary):
    print(json.dumps(summary), flush=True)
