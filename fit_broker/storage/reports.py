"""
What a segment log tells its caller it found, cut or dropped.
"""

import attrs


@attrs.frozen
class Damage:
    """
    Records a recovery found damaged or missing in one segment.

    @ivar segment: the segment file's name.
    @ivar offset: where its good records end (and the file now ends).
    @ivar bytes_cut: how many bytes were cut from there.
    @ivar first_index: the first record index lost.
    @ivar end_index: one past the last index lost.  For the tail of the last
        segment this is an estimate from the cut bytes' length fields.
    @ivar reason: C{"short header"}, C{"past end"} (a record cut short),
        C{"too long"}, C{"checksum"}, C{"overlap"} (records past the next
        segment's first index) or C{"gap"} (a segment ends before the next
        one starts: a segment damaged earlier, or a missing file).
    @ivar tail: C{True} for the last segment's tail (records that were
        appended last, possibly never synced), C{False} for an older
        segment (records that were synced: the caller recovers them from
        peers).
    """

    segment: str
    offset: int
    bytes_cut: int
    first_index: int
    end_index: int
    reason: str
    tail: bool

    @property
    def records(self):
        return self.end_index - self.first_index

    def describe(self):
        where = "tail of the last segment" if self.tail else "older segment"
        return (
            f"{self.reason} in {where} {self.segment} at byte {self.offset}:"
            f" cut {self.bytes_cut} bytes, records [{self.first_index}, {self.end_index}) lost"
        )


@attrs.frozen
class Recovery:
    """
    What opening a segment log found.

    @ivar damage: a L{Damage} per damaged segment, oldest first.
    @ivar ignored: names in the storage that are not segment files.
    """

    segments: int
    records: int
    bytes: int
    first_index: int
    next_index: int
    damage: tuple = ()
    ignored: tuple = ()

    @property
    def clean(self):
        return not self.damage

    @property
    def cut(self):
        """
        The damage cut from the tail of the last segment, or C{None}.
        """
        for damage in self.damage:
            if damage.tail:
                return damage
        return None

    @property
    def lost(self):
        """
        The index ranges C{(first, end)} lost from older segments.
        """
        return tuple((d.first_index, d.end_index) for d in self.damage if not d.tail and d.records)


@attrs.frozen
class Trimmed:
    """
    What one retention pass dropped: whole segments, oldest first.

    Records dropped because they outlived C{max_age} are C{expired}; those
    dropped to bring the log under C{max_bytes} are C{overflow}, which the
    caller counts as such under its channel's policy.  Indexes from
    C{first_index} to C{end_index} are gone (some may have been missing
    before).  C{error} says why a segment could not be deleted (the pass
    stopped there; what it dropped before is counted).
    """

    segments: int = 0
    first_index: int = 0
    end_index: int = 0
    expired: int = 0
    expired_bytes: int = 0
    overflow: int = 0
    overflow_bytes: int = 0
    error: str = None

    @property
    def records(self):
        return self.expired + self.overflow

    @property
    def bytes(self):
        return self.expired_bytes + self.overflow_bytes
