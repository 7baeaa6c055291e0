"""
The Twisted side of disk channels: where their files live, and the group
commit that runs each channel's fsyncs off the reactor thread.

A channel appends on the reactor thread (a write to the page cache); its
syncs run in the reactor's thread pool, one at a time per channel, each
covering everything appended before it started, so publishes that arrive
during a sync share the next one.  Under C{fsync = "always"} a publish is
answered once a sync covering it completed; under C{"interval"} a timer
starts a sync C{fsync_interval} ms after the oldest unsynced append; under
C{"never"} only full segments are synced.
"""

import os

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from fit_broker.broker.disk_channel import folder_name
from fit_broker.storage import FileStorage, StorageError


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


class StorageDriver(Service):
    """
    Runs the syncs of a broker's disk channels and hands the publishes they
    answer to C{answer(token, reply)}.

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
        self.syncs = 0
        self.failed_syncs = 0
        self._soon = None
        self._timer = None
        self._timer_at = None
        self._stopping = False

    def kick(self):
        """
        Look at the disk channels at the end of this reactor turn: every
        request of one turn shares its channel's next sync.
        """
        if self._soon is None and not self._stopping:
            self._soon = self.reactor.callLater(0, self._look)

    def _look(self):
        self._soon = None
        now = self.reactor.seconds()
        wake = None
        for channel in self.broker.disk_channels():
            if channel.sync_due(now):
                self._start(channel, now)
            at = channel.next_sync_at()
            if at is not None and (wake is None or at < wake):
                wake = at
        if wake is not None and not self._stopping:
            self._wake_at(wake, now)

    def _wake_at(self, at, now):
        if self._timer is not None and self._timer.active():
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.reactor.callLater(max(0.0, at - now), self._look)

    def _start(self, channel, now):
        job = channel.begin_sync(now)
        if job is None:
            self._deliver(channel.end_sync(None))
            return
        self.syncs += 1
        d = self.run_in_thread(job.run)
        d.addBoth(self._done, channel, job)

    def _done(self, result, channel, job):
        error = None
        if isinstance(result, Failure):
            self.failed_syncs += 1
            error = result.value
            if not isinstance(error, StorageError):
                self.logger.failure("disk channel {tag!r}: sync failed", result, tag=channel.tag)
        self._deliver(channel.end_sync(job, error))
        self.kick()

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
        for call in (self._soon, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._soon = self._timer = None
        return self._close_when_idle()

    def _close_when_idle(self):
        from twisted.internet.task import deferLater

        if any(c.syncing is not None for c in self.broker.disk_channels()):
            return deferLater(self.reactor, 0.01, self._close_when_idle)
        now = self.reactor.seconds()
        for channel in self.broker.disk_channels():
            self._deliver(channel.close(now))
        return maybeDeferred(lambda: None)
