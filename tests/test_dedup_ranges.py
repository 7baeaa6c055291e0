"""
Deduplication by id range: overlapping batches from one publisher are conflicts, not new events.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fit_broker.dedup import IdRanges

A = b"a" * 32
B = b"b" * 32


class Model:
    """
    The same rules by brute force: a list of remembered ranges and a floor.
    """

    def __init__(self, window, floors):
        self.window = window
        self.floors = floors
        self.ranges = []
        self.floor = -1

    def check(self, first, count, digest):
        last = first + count - 1
        for f, c, d in self.ranges:
            if f == first:
                return "duplicate" if (c, d) == (count, digest) else "conflict"
        for f, c, d in self.ranges:
            if f <= last and first <= f + c - 1:
                return "conflict"
        if self.floors and first <= self.floor:
            return "stale"
        return "new"

    def add(self, first, count, digest):
        self.ranges.append((first, count, digest))
        if len(self.ranges) > self.window:
            f, c, _ = self.ranges.pop(0)
            self.floor = max(self.floor, f + c - 1)


batches = st.lists(
    st.tuples(st.integers(0, 80), st.integers(1, 8), st.sampled_from([A, B])),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(batches, st.integers(1, 6), st.booleans())
def test_matches_brute_force_model(ops, window, floors):
    """On random batches every check answer, length and membership matches a brute-force model."""
    ranges = IdRanges(window, floors=floors)
    model = Model(window, floors)
    for first, count, digest in ops:
        expected = model.check(first, count, digest)
        assert ranges.check(first, count, digest) == expected
        if expected == "new":
            ranges.add(first, count, digest)
            model.add(first, count, digest)
        assert len(ranges) == len(model.ranges)
        assert all(f in ranges for f, _, _ in model.ranges)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=80), st.integers(1, 10))
def test_increasing_batches_are_new_then_duplicates(counts, window):
    """A correct publisher's increasing batches are all new, and each remembered one replays as a duplicate."""
    ranges = IdRanges(window)
    first = 0
    added = []
    for count in counts:
        assert ranges.check(first, count, A) == "new"
        ranges.add(first, count, A)
        added.append((first, count))
        first += count
    for first, count in added[-window:]:
        assert ranges.check(first, count, A) == "duplicate"
    for first, count in added[:-window]:
        assert ranges.check(first, count, A) == "stale"


@pytest.mark.parametrize(
    "first, count, digest, expected",
    [
        (10, 5, A, "duplicate"),
        (10, 5, B, "conflict"),      # same ids, other contents
        (10, 4, A, "conflict"),      # same start, shorter
        (10, 6, A, "conflict"),      # same start, longer
        (12, 1, A, "conflict"),      # inside
        (8, 3, A, "conflict"),       # covers the first id
        (14, 3, A, "conflict"),      # covers the last id
        (5, 20, A, "conflict"),      # covers the whole range
        (5, 5, A, "new"),            # ends just before
        (15, 1, A, "new"),           # starts just after
        (16, 1, A, "conflict"),      # inside the range after it
    ],
)
def test_overlaps(first, count, digest, expected):
    """Only an exact copy is a duplicate; any other overlap, even of one id, is a conflict."""
    ranges = IdRanges()
    ranges.add(10, 5, A)    # ids 10..14
    ranges.add(16, 4, A)    # ids 16..19
    assert ranges.check(first, count, digest) == expected


def test_check_does_not_change_state():
    """Checking a new range does not remember it."""
    ranges = IdRanges()
    assert ranges.check(3, 2, A) == "new"
    assert ranges.check(3, 2, A) == "new"
    assert len(ranges) == 0 and 3 not in ranges


def test_window_eviction_and_floor():
    """Past the window the oldest range is forgotten, the floor rises to its last id, and older ids are stale."""
    ranges = IdRanges(window=2)
    ranges.add(0, 10, A)    # 0..9
    ranges.add(20, 5, A)    # 20..24
    assert ranges.floor == -1
    ranges.add(30, 1, A)    # forgets 0..9
    assert len(ranges) == 2 and 0 not in ranges and 20 in ranges
    assert ranges.floor == 9
    assert ranges.check(0, 10, A) == "stale"
    assert ranges.check(9, 1, A) == "stale"
    assert ranges.check(10, 5, A) == "new"       # a gap above the floor
    assert ranges.check(8, 5, A) == "stale"
    assert ranges.check(5, 20, A) == "conflict"  # reaches a remembered range
    assert ranges.check(20, 5, A) == "duplicate"


def test_eviction_is_by_insertion_not_by_id():
    """The range added first is forgotten first even when a later one has lower ids."""
    ranges = IdRanges(window=2)
    ranges.add(50, 5, A)    # 50..54
    ranges.add(10, 5, A)    # 10..14
    ranges.add(70, 1, A)    # forgets 50..54
    assert 50 not in ranges and 10 in ranges
    assert ranges.floor == 54
    assert ranges.check(10, 5, A) == "duplicate"
    assert ranges.check(30, 1, A) == "stale"


def test_without_floors_nothing_is_stale():
    """With floors off a forgotten range can be accepted again, but remembered ones still conflict."""
    ranges = IdRanges(window=1, floors=False)
    ranges.add(0, 10, A)
    ranges.add(20, 1, A)
    assert ranges.floor is None
    assert ranges.check(0, 10, B) == "new"
    assert ranges.check(15, 10, A) == "conflict"
    ranges.add(0, 15, B)    # forgets 20
    ranges.add(15, 10, A)   # 15..24, past every id seen before; forgets 0..14
    assert ranges.check(24, 1, A) == "conflict"
    assert ranges.check(0, 15, B) == "new"


def test_add_refuses_what_is_not_new():
    """Adding a range that is not new raises a one-line error naming the status."""
    ranges = IdRanges()
    ranges.add(0, 4, A)
    with pytest.raises(ValueError, match="found duplicate"):
        ranges.add(0, 4, A)
    with pytest.raises(ValueError, match="found conflict"):
        ranges.add(2, 4, A)
    assert len(ranges) == 1


def test_bad_count_and_window():
    """A count below one or a window below one is refused with a clear error."""
    with pytest.raises(ValueError, match="count: expected at least 1"):
        IdRanges().check(0, 0, A)
    with pytest.raises(ValueError, match="window: expected a positive"):
        IdRanges(0)


def test_many_increasing_adds():
    """A hundred thousand increasing batches go through the window with its size and floor kept right."""
    ranges = IdRanges()
    for first in range(0, 300_000, 3):
        assert ranges.check(first, 3, A) == "new"
        ranges.add(first, 3, A)
    assert len(ranges) == 8192
    oldest = 300_000 - 3 * 8192
    assert ranges.floor == oldest - 1
    assert ranges.check(oldest, 3, A) == "duplicate"
    assert ranges.check(oldest - 3, 3, A) == "stale"
    assert ranges.check(oldest + 1, 3, A) == "conflict"
