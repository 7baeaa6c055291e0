"""
A replica's agreement journal: the records its ordering protocol asks to
keep (L{fit_broker.interfaces.IJournalledOrdering}), in a checksummed
segment log under the replica's data folder, so that a restart of the
replica, or of every replica at once, neither reuses a log position nor
forgets a vote or a control-table change.

Records are synced before the messages that depend on them are sent
(L{AgreementJournal.sync}), and at the latest on the next tick; a new base
record (a stable checkpoint) lets the segments before it go.
"""

import os

from twisted.logger import Logger

from fit_broker.storage import FileStorage, SegmentLog, StorageError
from fit_broker.storage.segments import MiB

JOURNAL_FOLDER = "agreement"
SEGMENT_BYTES = 8 * MiB
MAX_RECORD_BYTES = 96 * MiB
"""A stable checkpoint's record holds the replicated state (64 MiB at most) and key history."""


class AgreementJournal:
    """
    One replica's journal on C{storage} (an L{fit_broker.storage.IStorage}).

    @ivar records: the payloads found when it was opened, in order, for
        the protocol's C{resume}; empty when there were none or they were
        damaged.
    @ivar damaged: why the records found could not be trusted (an older
        segment failed its checksum), or C{None}: the protocol then
        starts as a replica that forgot its votes.
    @ivar failed: the storage error that stopped the journal, or C{None}.
    @ivar fresh: C{True} when there was no journal to read (its folder was
        made now) or it was damaged: a replica that ran before must then be
        taken to have voted and forgotten.
    """

    log = Logger()

    def __init__(self, storage, now=0.0, existed=True):
        self.storage = storage
        self.failed = None
        self.damaged = None
        self._base = None
        self.segments = self._open_segments()
        recovery = self.segments.recovery
        records = []
        if recovery.lost:
            self.damaged = f"records {recovery.lost} failed their checksum"
        else:
            try:
                records = [payload for _, _, payload in self.segments.read_from(self.segments.first_index)]
            except StorageError as e:
                self.damaged = str(e)
        if self.damaged is not None:
            self.log.error(
                "agreement journal {storage}: {why}; this replica starts as one that forgot its "
                "votes and recovers its log from its peers", storage=storage, why=self.damaged,
            )
            records = []
            self._discard(now)
        self.records = records
        self.fresh = not existed or self.damaged is not None

    @classmethod
    def in_folder(cls, data_folder, now=0.0):
        """
        Open the journal of the replica whose data folder is C{data_folder}.

        @raise StorageError: in one line, when its folder cannot be made.
        """
        folder = os.path.join(data_folder, JOURNAL_FOLDER)
        existed = os.path.isdir(folder)
        return cls(FileStorage(folder), now, existed)

    def _open_segments(self):
        # max_bytes=0: trim() keeps only the segments from the last durable base on
        return SegmentLog.open(
            self.storage, fsync="always", segment_bytes=SEGMENT_BYTES, max_bytes=0,
            max_record_bytes=MAX_RECORD_BYTES,
        )

    def _discard(self, now):
        """
        Drop every record: damaged records cannot be told from good ones.
        """
        for name in list(self.storage.files()):
            self.storage.delete(name)
        self.segments = self._open_segments()

    def append(self, entries, now):
        """
        Append C{(base, record)} pairs; durable only after L{sync}.
        """
        if self.failed is not None:
            return
        try:
            for base, record in entries:
                index = self.segments.append(record, now)
                if base:
                    self._base = index
        except StorageError as e:
            self._fail(e)

    def sync(self, now):
        """
        Make what was appended durable, then drop the segments a durable
        base made useless.  Return C{False} when the journal has failed:
        the caller must not send what depends on it.
        """
        if self.failed is not None:
            return False
        try:
            if self.segments.pending_sync():
                self.segments.sync(now)
            if self._base is not None:
                self.segments.trim(now, keep_after_index=self._base - 1)
                self._base = None
        except StorageError as e:
            self._fail(e)
            return False
        return True

    def _fail(self, error):
        self.failed = error
        self.log.error(
            "agreement journal {storage}: {why}; this replica stops voting until it restarts",
            storage=self.storage, why=error,
        )

    def stats(self):
        stats = dict(self.segments.stats())
        stats["failed"] = str(self.failed) if self.failed is not None else None
        return stats

    def close(self, now):
        if self.failed is None:
            try:
                self.segments.close(now)
            except StorageError as e:
                self._fail(e)
        self.storage.close()
