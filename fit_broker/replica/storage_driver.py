"""
The Twisted side of disk channels: where their files live, and the group
commit that runs each channel's fsyncs off the reactor thread.

A channel appends on the reactor thread (a write to the page cache); its
syncs run in the reactor's thread pool, one at a time per channel, each
covering everything appended before it started, so publishes that arrive
during a sync share the next one.  The syncs of many channels are batched
into one thread-pool job (L{StorageDriver}).  Under C{fsync = "always"} a
publish is answered once a sync covering it completed; under
C{"interval"} one timer per replica syncs every channel with something
pending each C{fsync_interval} ms; under C{"never"} only full segments
(and subscriptions) are synced.
"""

import os

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from fit_broker.broker.disk_channel import folder_name
from fit_broker.storage import FileStorage, StorageError
from fit_broker.storage.files import sync_many


class DataFolder:
    """
    A replica's data folder: a folder per disk channel, holding one for
    its batch log and one for its acknowledgement log.
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __repr__(self):
        return f"<DataFolder {self.path!r}>"

    def channel_folder(self, tag):
        return os.path.join(self.path, folder_name(tag))

    def __call__(self, tag):
        """
        Return the two storages of channel C{tag}, creating their folders.

        @raise StorageError: in one line, when they cannot be created.
        """
        folder = self.channel_folder(tag)
        return FileStorage(os.path.join(folder, "batches")), FileStorage(os.path.join(folder, "acks"))


#: How often the driver looks at channels under C{"never"} (a segment that
#: rolled, a subscription) when no channel runs under C{"interval"}.
TICK = 0.05


class StorageDriver(Service):
    """
    Runs the syncs of a broker's disk channels and hands the publishes they
    answer to C{answer(token, reply)}.

    Syncs are batched per replica, not per channel, so that a thread-pool
    hand-off and a reactor callback cost the same for 50 channels as for
    one:

     - channels under C{"always"} are looked at once per reactor turn that
       handled a request (L{kick}); all of them that are due share one
       batch;
     - the others are looked at by one timer per replica, every
       C{fsync_interval} ms (the shortest of the replica's classes; L{TICK}
       when none is under C{"interval"}), which syncs every channel with
       anything pending: an append is synced at most C{fsync_interval}
       after it was made.  The timer runs only while something is pending.

    A batch is one thread-pool job, which syncs the files of all its
    channels with L{sync_many}: one C{syncfs} for them all where the file
    system allows, else one C{fdatasync} each.  A channel whose files fail
    to sync stops alone (C{storage-failed}); the others of the batch are
    answered.

    @param run_in_thread: a callable running a blocking function and
        returning a Deferred of its result; by default the reactor's thread
        pool (tests pass one that runs it at once).
    """

    logger = Logger()

    def __init__(self, broker, reactor, answer, run_in_thread=None):
        self.broker = broker
        self.reactor = reactor
        self.answer = answer
        if run_in_thread is None:
            def run_in_thread(f):
                return deferToThreadPool(reactor, reactor.getThreadPool(), f)
        self.run_in_thread = run_in_thread
        #: thread-pool jobs started, and the channel syncs they ran
        self.batches = 0
        self.syncs = 0
        self.failed_syncs = 0
        self._soon = None
        self._tick = None
        self._stopping = False

    def kick(self):
        """
        Look at the disk channels at the end of this reactor turn: every
        request of one turn shares the next sync.
        """
        if self._soon is None and not self._stopping:
            self._soon = self.reactor.callLater(0, self._look)

    def _look(self):
        """
        Sync the channels under C{"always"} that wait for it; make sure
        the timer runs when other channels may have appended.
        """
        self._soon = None
        if self._stopping:
            return
        now = self.reactor.seconds()
        due = []
        others = False
        for channel in self.broker.disk_channels():
            if channel.fsync != "always":
                others = True
            elif channel.sync_due(now):
                due.append(channel)
        if due:
            self._start(due, now)
        if others and self._tick is None:
            self._tick = self.reactor.callLater(self._period(), self._on_tick)

    def _period(self):
        intervals = [
            c.spec.qos.fsync_interval / 1000.0 for c in self.broker.disk_channels()
            if c.fsync == "interval"
        ]
        return min(intervals, default=TICK)

    def _on_tick(self):
        """
        Sync every channel with anything pending, and come again while any
        channel holds something not synced or syncs.
        """
        self._tick = None
        if self._stopping:
            return
        now = self.reactor.seconds()
        due = []
        busy = False
        for channel in self.broker.disk_channels():
            if channel.syncing is not None:
                busy = True
            elif channel.sync_due(now) or channel.next_sync_at() is not None:
                due.append(channel)
        if due:
            self._start(due, now)
        if due or busy:
            self._tick = self.reactor.callLater(self._period(), self._on_tick)

    def _start(self, channels, now):
        """
        Begin a sync of every channel in C{channels}, all run by one
        thread-pool job.
        """
        pairs = []
        for channel in channels:
            job = channel.begin_sync(now)
            if job is None:
                self._deliver(channel.end_sync(None))
            else:
                pairs.append((channel, job))
        if not pairs:
            return
        self.batches += 1
        self.syncs += len(pairs)
        d = self.run_in_thread(lambda: _run_batch(pairs))
        d.addBoth(self._done, pairs)

    def _done(self, result, group):
        """
        Answer what each sync of C{group} covered (or refuse it, for a
        channel whose sync failed); a channel whose deadline passed while
        it synced starts its next sync at once.
        """
        if isinstance(result, Failure):  # the job never ran: every sync in it failed
            result = [result] * len(group)
        for (channel, job), failure in zip(group, result):
            error = None
            if failure is not None:
                self.failed_syncs += 1
                error = failure.value
                if not isinstance(error, StorageError):
                    self.logger.failure("disk channel {tag!r}: sync failed", failure, tag=channel.tag)
            self._deliver(channel.end_sync(job, error))
        if self._stopping:
            return
        now = self.reactor.seconds()
        again = [channel for channel, _ in group if channel.sync_due(now)]
        if again:
            self._start(again, now)

    def _deliver(self, answers):
        if not answers:
            return
        self.broker.storage_synced(answers)
        for token, reply in self.broker.take_answers():
            self.answer(token, reply)

    def stopService(self):
        """
        Sync what every disk channel holds and release its files, once the
        syncs under way are done.
        """
        super().stopService()
        self._stopping = True
        for call in (self._soon, self._tick):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._tick = None
        return self._close_when_idle()

    def _close_when_idle(self):
        from twisted.internet.task import deferLater

        if any(c.syncing is not None for c in self.broker.disk_channels()):
            return deferLater(self.reactor, 0.01, self._close_when_idle)
        now = self.reactor.seconds()
        for channel in self.broker.disk_channels():
            self._deliver(channel.close(now))
        return maybeDeferred(lambda: None)


def _run_batch(group):
    """
    Sync the files of every L{SyncJob} of C{group} (C{(channel, job)}
    pairs) on a worker thread; return, for each pair, C{None} or the
    L{Failure} of the first of its files that failed.
    """
    try:
        files = [f for _, job in group for f in job.files]
        errors = iter(sync_many(files))
        results = []
        for _, job in group:
            failed = [e for e in (next(errors) for _ in job.files) if e is not None]
            results.append(Failure(failed[0]) if failed else None)
        return results
    except Exception:
        return [Failure()] * len(group)
