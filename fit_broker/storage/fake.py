"""
L{IStorage} in memory, which forgets on a crash what a real disk may forget.

SIGKILL does not test fsync (the page cache survives a killed process);
this fake does: L{FakeStorage.crash} keeps only what was synced.
"""

import errno

from zope.interface import implementer

from fit_broker.interfaces import IStorage
from fit_broker.storage.seam import StorageError, check_name


@implementer(IStorage)
class FakeStorage:
    """
    Files as byte arrays, with what a power loss would leave of each.

    The model, one file at a time: what was synced (file and folder entry)
    survives a crash; the unsynced tail is lost, or with an rng a random
    prefix of it survives (a torn write); a file never synced is forgotten
    with its folder entry.  Truncation and deletion are durable when they
    return, as L{FileStorage} makes them.

    @ivar syncs: how many times L{sync} was called, per file name.
    @ivar reads: the sizes of every read asked for, for tests bounding them.
    """

    def __init__(self):
        self._data = {}
        self._durable = {}
        self._room = None
        self._sync_error = None
        self.syncs = {}
        self.reads = []

    def __repr__(self):
        return f"<FakeStorage {len(self._data)} files>"

    def _file(self, name):
        data = self._data.get(check_name(name))
        if data is None:
            raise StorageError(f"cannot open {name}: no such file", errno=errno.ENOENT)
        return data

    # -- IStorage

    def files(self):
        return sorted(self._data)

    def append(self, name, data):
        file = self._data.get(check_name(name))
        if file is None:
            file = self._data[name] = bytearray()
        data = bytes(data)
        if self._room is not None and len(data) > self._room:
            # A full disk takes what fits, as a short write() does, then fails.
            file += data[: self._room]
            self._room = 0
            raise StorageError(
                f"cannot append to {name}: No space left on device", errno=errno.ENOSPC
            )
        file += data
        if self._room is not None:
            self._room -= len(data)

    def sync(self, name):
        file = self._file(name)
        if self._sync_error is not None:
            raise StorageError(f"cannot sync {name}: {self._sync_error}", errno=errno.EIO)
        self._durable[name] = bytes(file)
        self.syncs[name] = self.syncs.get(name, 0) + 1

    def read(self, name, offset, size):
        if offset < 0 or size < 0:
            raise ValueError(f"read of {name!r} at {offset} for {size} bytes")
        self.reads.append(size)
        return bytes(self._file(name)[offset : offset + size])

    def size(self, name):
        return len(self._file(name))

    def truncate(self, name, size):
        if size < 0:
            raise ValueError(f"truncate of {name!r} to {size} bytes")
        file = self._file(name)
        del file[size:]
        # FileStorage.truncate syncs: the cut is durable, and so is a
        # shrunk file's length; the bytes before the cut keep their state.
        durable = self._durable.get(name)
        if durable is not None:
            self._durable[name] = durable[:size]

    def delete(self, name):
        self._data.pop(check_name(name), None)
        self._durable.pop(name, None)

    def close(self):
        pass

    # -- faults

    def crash(self, rng=None):
        """
        Lose what a power loss may lose.

        Every file keeps what was synced; without C{rng} its unsynced tail
        is lost, with C{rng} (a seeded C{random.Random}) a random prefix of
        that tail survives, as a torn write leaves it.  Files never synced
        are forgotten.
        """
        survivors = {}
        for name, data in self._data.items():
            durable = self._durable.get(name)
            if durable is None:
                continue
            kept = bytearray(durable)
            if rng is not None and data[: len(durable)] == durable:
                tail = data[len(durable) :]
                kept += tail[: rng.randrange(len(tail) + 1)]
            survivors[name] = kept
        self._data = survivors
        self._durable = {name: bytes(data) for name, data in survivors.items()}

    def full_after(self, n_bytes):
        """
        Let appends write C{n_bytes} more bytes, then fail like ENOSPC
        (writing what fits first); C{None} gives the room back.
        """
        self._room = n_bytes

    def fail_syncs(self, reason="Input/output error"):
        """
        Make every L{sync} fail like an EIO from fsync; C{None} heals.
        """
        self._sync_error = reason

    def damage(self, name, offset, data):
        """
        Overwrite bytes of C{name} at C{offset} in place, synced ones too,
        as bit rot or a bad sector would.
        """
        file = self._file(name)
        file[offset : offset + len(data)] = data
        durable = self._durable.get(name)
        if durable is not None and offset < len(durable):
            part = data[: len(durable) - offset]
            durable = bytearray(durable)
            durable[offset : offset + len(part)] = part
            self._durable[name] = bytes(durable)

    def durable(self, name):
        """
        Return the bytes of C{name} a crash now would keep at least.
        """
        return self._durable.get(name)
