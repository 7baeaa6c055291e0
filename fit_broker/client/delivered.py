"""
What a subscriber handed to its application, kept on disk across restarts.

A restarted subscriber must not hand the application a batch it already
handed before it was killed.  L{DeliveryRecord} keeps, per cluster, client
and channel, one append-only file of JSON lines:

    {"fitbroker-delivered": 1}                      format version, first line
    {"s": [[pub, first_id, urgency], ...],          snapshot: remembered keys,
     "f": [[pub, urgency, floor], ...],             the floors of forgotten ones
     "m": [[pub, first_id, urgency], ...],          and the maybe-repeated ones
     "o": [position, seq]}                          (ordered channels) the last one
    {"h": [[pub, first_id, urgency], ...],          a group is being handed
     "o": [position, seq]}                          (ordered) and where it ends
    {"d": 1}                                        ... and the application took it
    {"o": [position, seq]}                          (ordered) numbers up to here skipped

Only a group followed by its C{d} line counts as delivered; a group whose
C{d} line is missing may or may not have reached the application, so its
keys are delivered again and reported as possible repeats.  On an ordered
channel, L{DeliveryRecord.last_order} is the C{(position, seq)} delivered or
skipped last, where a restarted subscriber resumes.  A file with it says
format 2 in its first line, so that a version reading only format 1 refuses
it rather than resuming ordered channels from the wrong place.
"""

import errno
import json
import os
import tempfile

from twisted.logger import Logger

from fit_broker.dedup import RecentIds
from fit_broker.errors import ConfigError, FitBrokerError

FORMAT = 2
# The format a file without ordered positions is written in.
UNORDERED_FORMAT = 1
HEADER = "fitbroker-delivered"
DEFAULT_WINDOW = 16_384

# Rewrite the file as one snapshot once more than this many windows of
# records, or this many snapshots' worth of bytes, were appended after it.
COMPACT_FACTOR = 4
MIN_COMPACT_BYTES = 64 * 1024

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_DONE = b'{"d":1}\n'


def safe_name(name):
    """
    C{name} as one file name: bytes outside C{[A-Za-z0-9._-]} and a leading
    dot percent-encoded, so distinct names never share a file and none can
    be C{.}, C{..} or hidden.
    """
    if not name:
        raise ConfigError("cannot name a delivery state file after an empty name")
    out = []
    for i, char in enumerate(name):
        if char in _SAFE and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _triples(value):
    """
    C{value} as a list of C{(str, int, int)} tuples, or None if it is not one.
    """
    if type(value) is not list:
        return None
    out = []
    for item in value:
        if type(item) is not list or len(item) != 3:
            return None
        a, b, c = item
        if type(a) is not str or type(b) is not int or type(c) is not int:
            return None
        out.append((a, b, c))
    return out


def _order(value):
    """
    C{value} as a C{(position, seq)} tuple, or None if it is not one.
    """
    if type(value) is not list or len(value) != 2 or not all(type(v) is int and v >= 0 for v in value):
        return None
    return (value[0], value[1])


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(ids, window):
    # RecentIds offers no way to restore floors, so its two dicts are
    # copied directly; both classes live in this package.
    copy = RecentIds(window)
    copy._seen = dict(ids._seen)
    copy._floors = dict(ids._floors)
    return copy


class DeliveryRecord:
    """
    The persistent record of the batches one subscriber handed to its
    application, for one cluster, client and channel.

    Call L{handing} just before a group goes to the application and
    L{handed} just after it returns.  L{seen} is the voter's memory of
    decided batches, rebuilt at open from the groups that were handed;
    L{maybe_repeated} holds the keys of a group that was being handed when
    the process died.

    Writes are plain C{write()} calls, not fsync'd: a SIGKILLed process
    leaves its writes in the page cache, which the kernel still writes out.
    Only a crash of the whole machine can lose the last groups, and then
    they are delivered again.  The file is rewritten (fsync'd, atomically)
    as one snapshot at open and after every C{4 * window} batches, so it
    stays O(window) in size; that rewrite blocks for one fsync.
    """

    log = Logger()

    def __init__(self, path, window=DEFAULT_WINDOW):
        """
        An empty record; use L{open} to load and write one.
        """
        if type(window) is not int or window < 1:
            raise ConfigError(f"delivery state window must be a positive integer, not {window!r}")
        self.path = path
        self.window = window
        self.seen = RecentIds(window)
        self.counters = {"corrupt-lines": 0, "torn-lines": 0, "compactions": 0, "compaction-failures": 0}
        self._durable = RecentIds(window)
        self._maybe = {}
        self._pending = None
        self._pending_order = None
        self._order = None
        self._fd = None
        self._size = 0
        self._since = 0
        self._appended = 0
        self._compact_bytes = MIN_COMPACT_BYTES

    # -- opening --------------------------------------------------------

    @staticmethod
    def default_path(cluster_name, client, channel):
        """
        C{$XDG_STATE_HOME/fitbroker/<cluster>/<client>/<channel>.delivered},
        under C{~/.local/state} when XDG_STATE_HOME is unset or relative.
        """
        from fit_broker.state_home import state_home

        return os.path.join(
            state_home(), safe_name(cluster_name), safe_name(client), safe_name(channel) + ".delivered"
        )

    @classmethod
    def open(cls, path, window=DEFAULT_WINDOW):
        """
        Load the record in C{path} (a new one if there is none) and rewrite
        it as one snapshot, so that a torn or garbage tail is gone and the
        folder is known to be writable.

        @raise ConfigError: the file cannot be read or written, or is not a
            delivery state file.
        """
        path = os.path.abspath(os.fspath(path))
        record = cls(path, window)
        try:
            try:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            except FileExistsError:
                # A file stands where a folder should be.
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
            record._remove_temporaries()
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                pass
            else:
                with f:
                    record._load(f)
            record._compact()
        except OSError as e:
            record.close()
            raise ConfigError(f"cannot use delivery state file {path}: {e.strerror or e}") from None
        record.seen = _copy(record._durable, window)
        return record

    def _temporary_prefix(self):
        return "." + os.path.basename(self.path) + "."

    def _remove_temporaries(self):
        """
        Remove the snapshots a process killed mid-rewrite left behind.
        """
        folder = os.path.dirname(self.path)
        prefix = self._temporary_prefix()
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass

    def _load(self, f):
        first = True
        for line in f:
            if not line.endswith(b"\n"):
                # Killed mid-write: the only line that can be torn is the last.
                self.counters["torn-lines"] += 1
                break
            if first:
                self._check_header(line)
                first = False
            elif not self._apply(line):
                self.counters["corrupt-lines"] += 1
        if self._pending is not None:
            self._abandon()

    def _check_header(self, line):
        try:
            header = json.loads(line)
        except (ValueError, RecursionError):
            header = None
        version = header.get(HEADER) if type(header) is dict else None
        if type(version) is not int:
            raise ConfigError(
                f"{self.path} is not a delivery state file (bad first line); move it away to start afresh"
            )
        if version > FORMAT:
            raise ConfigError(f"{self.path} has delivery state format {version}; this version reads {FORMAT}")

    def _apply(self, line):
        """
        Replay one line; False if it is not a valid record.
        """
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if type(record) is not dict:
            return False
        if "h" in record and set(record) <= {"h", "o"}:
            group = _triples(record["h"])
            order = _order(record["o"]) if "o" in record else None
            if group is None or ("o" in record and order is None):
                return False
            if self._pending is not None:
                self._abandon()
            self._pending = group
            self._pending_order = order
            return True
        if record == {"d": 1}:
            if self._pending is not None:
                self._commit(self._pending)
                self._pending = None
            return True
        if set(record) == {"o"}:
            order = _order(record["o"])
            if order is None:
                return False
            self._order = order
            return True
        if "s" in record and set(record) <= {"s", "f", "m", "o"}:
            keys = _triples(record["s"])
            floors = _triples(record.get("f", []))
            maybe = _triples(record.get("m", []))
            order = _order(record["o"]) if "o" in record else None
            if keys is None or floors is None or maybe is None or ("o" in record and order is None):
                return False
            self._order = order
            durable = self._durable = RecentIds(self.window)
            for publisher, urgency, floor in floors:
                durable._floors[publisher, urgency] = floor
            for publisher, first_id, urgency in keys:
                durable.add((publisher, first_id), urgency)
            self._maybe = {(publisher, first_id): urgency for publisher, first_id, urgency in maybe}
            self._pending = None
            self._pending_order = None
            return True
        return False

    def _commit(self, group):
        if self._pending_order is not None:
            self._order = self._pending_order
            self._pending_order = None
        durable = self._durable
        maybe = self._maybe
        for publisher, first_id, urgency in group:
            key = (publisher, first_id)
            durable.add(key, urgency)
            if maybe:
                maybe.pop(key, None)

    def _abandon(self):
        """
        The pending group may or may not have reached the application.
        """
        durable = self._durable
        for publisher, first_id, urgency in self._pending:
            key = (publisher, first_id)
            if key not in durable:
                self._maybe[key] = urgency
        self._pending = None
        self._pending_order = None

    # -- writing --------------------------------------------------------

    def handing(self, batches, order=None):
        """
        Record that the group C{batches}, a list of C{(publisher, first_id,
        urgency)}, is about to be handed to the application: one line, one
        C{write()} (no fsync; a SIGKILL keeps the page cache).

        @param order: on an ordered channel, the C{(position, seq)} of the
            group's last batch: L{last_order} once it is L{handed}.
        @raise FitBrokerError: the line cannot be written; do not hand the group.
        """
        if self._pending is not None:
            # The previous group's callback never returned normally.
            self._abandon()
        if type(batches) is not list:
            batches = list(batches)
        line = '{"h":' + json.dumps(batches, separators=(",", ":"))
        if order is not None:
            order = (int(order[0]), int(order[1]))
            line += f',"o":[{order[0]},{order[1]}]'
        self._append((line + "}\n").encode())
        self._pending = batches
        self._pending_order = order

    def skipped(self, position, seq):
        """
        Record that an ordered channel's numbers up to C{seq} were skipped
        (tombstones): L{last_order} becomes C{(position, seq)} at once.

        @raise FitBrokerError: the line cannot be written.
        """
        order = (int(position), int(seq))
        self._append(f'{{"o":[{order[0]},{order[1]}]}}\n'.encode())
        self._order = order

    @property
    def last_order(self):
        """
        C{(position, seq)} of what an ordered channel delivered or skipped
        last, or C{None}.
        """
        return self._order

    def handed(self):
        """
        Record that the application took the group of the last L{handing}.

        @raise FitBrokerError: the line cannot be written.
        """
        group = self._pending
        if group is None:
            return
        self._append(_DONE)
        self._pending = None
        self._commit(group)
        self._since += len(group)
        if self._since > COMPACT_FACTOR * self.window or self._appended > self._compact_bytes:
            try:
                self._compact()
            except OSError as e:
                # The log itself is intact; try again after as many records.
                self._since = 0
                self._appended = 0
                self.counters["compaction-failures"] += 1
                self.log.warn(
                    "Cannot compact delivery state {path}: {error}", path=self.path, error=e.strerror or e
                )

    def _append(self, data):
        fd = self._fd
        if fd is None:
            raise FitBrokerError(f"delivery state {self.path} is closed")
        try:
            _write_all(fd, data)
        except OSError as e:
            # Cut a partial line off, so the next line starts clean.
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                pass
            raise FitBrokerError(f"cannot write delivery state {self.path}: {e.strerror or e}") from None
        self._size += len(data)
        self._appended += len(data)

    def _snapshot(self):
        durable = self._durable
        maybe = [
            [publisher, first_id, urgency]
            for (publisher, first_id), urgency in self._maybe.items()
            if (publisher, first_id) not in durable and not durable.is_stale(publisher, urgency, first_id)
        ][-self.window :]
        self._maybe = {(p, i): u for p, i, u in maybe}
        snapshot = {
            "s": [[publisher, first_id, urgency] for (publisher, first_id), urgency in durable._seen.items()],
            "f": [[publisher, urgency, floor] for (publisher, urgency), floor in durable._floors.items()],
            "m": maybe,
        }
        if self._order is not None:
            snapshot["o"] = list(self._order)
        header = json.dumps({HEADER: FORMAT if self._order is not None else UNORDERED_FORMAT})
        return (header + "\n" + json.dumps(snapshot, separators=(",", ":")) + "\n").encode()

    def _compact(self):
        """
        Replace the file by one snapshot: temporary file, fsync, rename, fsync
        of the folder, so a kill at any point leaves the old or the new file.
        A group being handed is written again after the snapshot.
        """
        folder = os.path.dirname(self.path)
        data = self._snapshot()
        pending = self._pending
        if pending is not None:
            line = '{"h":' + json.dumps(pending, separators=(",", ":"))
            if self._pending_order is not None:
                line += f',"o":[{self._pending_order[0]},{self._pending_order[1]}]'
            data += (line + "}\n").encode()
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=self._temporary_prefix(), suffix=".tmp")
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        old, self._fd = self._fd, None
        if old is not None:
            os.close(old)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            # Past the rename the old descriptor is useless: stop recording.
            raise ConfigError(f"cannot reopen delivery state {self.path}: {e.strerror or e}") from None
        self._size = len(data)
        self._since = 0
        self._appended = 0
        self._compact_bytes = max(COMPACT_FACTOR * len(data), MIN_COMPACT_BYTES)
        self.counters["compactions"] += 1
        _fsync_folder(folder)

    # -- reading --------------------------------------------------------

    @property
    def maybe_repeated(self):
        """
        The keys (a set-like view) of batches that were being handed when
        the previous process died: they may have reached the application.
        """
        return self._maybe.keys()

    def was_maybe_repeated(self, key):
        """
        Whether C{key} may already have reached the application before a
        restart; forgets it, so each such key is reported once.
        """
        return self._maybe.pop(key, None) is not None

    def describe(self):
        return f"delivery state in {self.path} ({len(self._durable)} batches remembered)"

    def close(self):
        """
        Close the file; a group handed but not yet L{handed} stays unknown.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
