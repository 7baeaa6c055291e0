"""
Remembering which batches were already seen, within a bound.
"""

from bisect import bisect_left, bisect_right
from collections import deque


class RecentIds:
    """
    The last C{window} batch identities seen, oldest forgotten first.

    Keys are C{(publisher, first_id)}, or a bare first id where the
    publisher is implied.  With C{floors} on (keys must then be pairs),
    forgetting a batch raises a floor per C{(publisher, urgency)}: an unseen
    identity at or below its floor is reported as stale.  Within one urgency
    level every correct replica forwards a publisher's batches in id order,
    so a first copy can never arrive after a later batch of the same level
    was forgotten; what the floor catches are the stale copies of a replica
    that was paused, or replays from a faulty one.
    """

    __slots__ = ("window", "_seen", "_floors")

    def __init__(self, window=65_536, floors=True):
        self.window = window
        self._seen = {}
        self._floors = {} if floors else None

    def __len__(self):
        return len(self._seen)

    def __contains__(self, key):
        return key in self._seen

    def is_stale(self, publisher, urgency, first_id):
        floors = self._floors
        if not floors:
            return False
        floor = floors.get((publisher, urgency))
        return floor is not None and first_id <= floor

    def add(self, key, urgency):
        """
        Remember C{key} seen at C{urgency}.
        """
        seen = self._seen
        seen[key] = urgency
        if len(seen) > self.window:
            self._forget(len(seen) - self.window)

    def _forget(self, count):
        seen = self._seen
        floors = self._floors
        it = iter(seen)
        old = [next(it) for _ in range(count)]
        for key in old:
            urgency = seen.pop(key)
            if floors is not None:
                level = (key[0], urgency)
                if floors.get(level, -1) < key[1]:
                    floors[level] = key[1]


class IdRanges:
    """
    The id ranges of one publisher's last C{window} batches, so that no
    event id is delivered twice with different contents.

    A batch covers ids C{first_id .. first_id + count - 1} and has a digest.
    Keying on the first id alone lets a hostile publisher send overlapping
    batches that share ids; here any overlap that is not an exact copy is a
    conflict.  A correct publisher's ids only increase, so the common check
    compares with the highest id ever remembered (O(1)); the rest bisect a
    sorted list of starts (O(log n)).  Remembered ranges never overlap, so
    the one starting last at or before a range's end is the only candidate.

    With C{floors} on, forgetting a range raises a floor to its last id and
    an unremembered range starting at or below the floor is stale.  Memory
    is bounded by C{window} ranges: a start, an end and a digest each (about
    250 bytes with a 32-byte digest, 2 MiB at the default window).
    """

    __slots__ = ("window", "floor", "_starts", "_ranges", "_order", "_top")

    def __init__(self, window=8192, floors=True):
        if window < 1:
            raise ValueError(f"window: expected a positive number of ranges, found {window}")
        self.window = window
        # The highest last id forgotten, or None; -1 stands for "none yet"
        # while floors are on so the comparison needs no None test.
        self.floor = -1 if floors else None
        self._starts = []
        self._ranges = {}
        self._order = deque()
        # Highest last id ever remembered: anything starting above it is new.
        self._top = -1

    def __len__(self):
        return len(self._ranges)

    def __contains__(self, first_id):
        return first_id in self._ranges

    def check(self, first_id, count, digest):
        """
        Classify a batch without remembering it.

        @return: C{"new"}, C{"duplicate"} (this exact range and digest is
            remembered), C{"conflict"} (it overlaps a remembered range
            otherwise) or C{"stale"} (at or below the floor, unremembered).
        @raise ValueError: if C{count} is below 1.
        """
        if count < 1:
            raise ValueError(f"count: expected at least 1 event, found {count}")
        if first_id > self._top:
            # Above everything remembered and, as floors come from
            # remembered ends, above the floor as well.
            return "new"
        ranges = self._ranges
        known = ranges.get(first_id)
        last = first_id + count - 1
        if known is not None:
            if known[0] == last and known[1] == digest:
                return "duplicate"
            return "conflict"
        starts = self._starts
        i = bisect_right(starts, last)
        if i and ranges[starts[i - 1]][0] >= first_id:
            return "conflict"
        floor = self.floor
        if floor is not None and first_id <= floor:
            return "stale"
        return "new"

    def add(self, first_id, count, digest):
        """
        Remember a batch that L{check} found new, forgetting the oldest
        range when more than C{window} are remembered.

        @raise ValueError: if the batch is not new.
        """
        if first_id <= self._top or count < 1:
            status = self.check(first_id, count, digest)
            if status != "new":
                raise ValueError(f"ids {first_id}+{count}: expected a new range, found {status}")
        last = first_id + count - 1
        starts = self._starts
        if first_id > self._top:
            starts.append(first_id)
            self._top = last
        else:
            starts.insert(bisect_left(starts, first_id), first_id)
            if last > self._top:
                # Possible without floors, past a forgotten range's end.
                self._top = last
        self._ranges[first_id] = (last, digest)
        order = self._order
        order.append(first_id)
        if len(order) > self.window:
            self._forget(order.popleft())

    def export(self):
        """
        Return C{(floor, top, ranges)}, ranges as C{(first_id, count,
        digest)} oldest first: all that L{restored} needs to rebuild an
        equal memory, so replicas can hand it over in state transfer.
        """
        return (
            self.floor,
            self._top,
            [(first, self._ranges[first][0] - first + 1, self._ranges[first][1]) for first in self._order],
        )

    @classmethod
    def restored(cls, window, exported):
        """
        Rebuild what L{export} returned.
        """
        floor, top, ranges = exported
        memory = cls(window)
        for first_id, count, digest in ranges:
            memory.add(first_id, count, digest)
        memory.floor = floor
        memory._top = max(top, memory._top)
        return memory

    def _forget(self, start):
        end, _ = self._ranges.pop(start)
        starts = self._starts
        if starts[0] == start:
            del starts[0]
        else:
            del starts[bisect_left(starts, start)]
        if self.floor is not None and end > self.floor:
            self.floor = end
