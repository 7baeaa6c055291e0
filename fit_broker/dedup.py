"""
Remembering which batches were already seen, within a bound.
"""


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
