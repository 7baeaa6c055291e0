"""
L{IStorage} on a folder of real files, with the fsyncs that make it durable.

Blocking system calls: the caller decides on which thread to run them.
"""

import ctypes
import os
import sys
from collections import OrderedDict

from zope.interface import implementer

from fit_broker.interfaces import IStorage
from fit_broker.storage.seam import StorageError, check_name

# fdatasync flushes the data and the size an append changed, and skips the
# timestamps fsync would also write; where it is missing, fsync does both.
_datasync = getattr(os, "fdatasync", os.fsync)

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)

#: L{sync_many} makes the files of one file system durable with a single
#: C{syncfs} (one journal commit) once a batch holds this many of them;
#: below, one C{fdatasync} each costs less than flushing the whole file
#: system.
SYNCFS_MIN_FILES = 4

#: File systems whose C{syncfs} writes back and commits every file as
#: C{fdatasync} would (not network or FUSE ones, where it may do less).
SYNCFS_FILE_SYSTEMS = frozenset({"ext4", "xfs", "btrfs"})


def _load_syncfs():
    """
    Return libc's C{syncfs}, or C{None} where it cannot be trusted: not
    Linux, or a kernel before 5.8 (whose C{syncfs} reports no write-back
    errors, so a failed write would pass for durable).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
        if release < (5, 8):
            return None
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError, ValueError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


_syncfs = _load_syncfs()


_fs_types = {}


def _file_system_type(dev):
    """
    Return the type of the file system mounted from device C{dev} (an
    C{st_dev}), or C{None} when C{/proc/self/mountinfo} does not say.
    """
    if dev not in _fs_types:
        _fs_types[dev] = _read_file_system_type(dev)
    return _fs_types[dev]


def _read_file_system_type(dev):
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == wanted and "-" in fields:
                    return fields[fields.index("-") + 1]
    except OSError:
        return None
    return None


def _error(what, path, exc):
    return StorageError(f"cannot {what} {path}: {exc.strerror or exc}", errno=exc.errno)


@implementer(IStorage)
class FileStorage:
    """
    The files of one folder, each opened once and kept open while in use.

    @param folder: the folder, created (with its parents) if missing.
    @param max_open: how many file handles stay open at most; the least
        recently used one is closed first.
    @param mode: permission bits of new files (default: the owner only).
    @param syncfs: let L{sync_many} make this storage's files durable with
        one C{syncfs} of their file system, where it can be trusted.
    @ivar syncfs_fd: the folder, open for as long as the storage is, when
        C{syncfs} on it may be used: open from the start, it hears of
        every write-back error since.
    """

    def __init__(self, folder, *, max_open=32, mode=0o600, syncfs=True):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, not {max_open}")
        self.folder = os.fspath(folder)
        self.max_open = max_open
        self.mode = mode
        self._handles = OrderedDict()
        # Files created since the folder was last synced: their directory
        # entries are not durable until it is.
        self._created = set()
        try:
            created = not os.path.isdir(self.folder)
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            if created:
                self._sync_folder(os.path.dirname(os.path.abspath(self.folder)))
        except OSError as e:
            raise _error("create the folder", self.folder, e) from None
        if not os.path.isdir(self.folder):
            raise StorageError(f"cannot use {self.folder}: not a folder")
        self.syncfs_fd = self._open_syncfs_fd() if syncfs else None

    def __repr__(self):
        return f"<FileStorage {self.folder!r}>"

    def _open_syncfs_fd(self):
        if _syncfs is None:
            return None
        try:
            fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            if _file_system_type(os.fstat(fd).st_dev) in SYNCFS_FILE_SYSTEMS:
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def _path(self, name):
        return os.path.join(self.folder, check_name(name))

    def _handle(self, name, create=False):
        fd = self._handles.get(name)
        if fd is not None:
            self._handles.move_to_end(name)
            return fd
        path = self._path(name)
        try:
            if create:
                try:
                    fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, self.mode)
                    self._created.add(name)
                except FileExistsError:
                    fd = os.open(path, _OPEN_FLAGS)
            else:
                fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise StorageError(f"cannot open {path}: no such file", errno=2) from None
        except OSError as e:
            raise _error("open", path, e) from None
        self._handles[name] = fd
        while len(self._handles) > self.max_open:
            _, old = self._handles.popitem(last=False)
            os.close(old)
        return fd

    def _forget(self, name):
        fd = self._handles.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _sync_folder(self, folder=None):
        folder = folder or self.folder
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            raise _error("open the folder", folder, e) from None
        try:
            os.fsync(fd)
        except OSError as e:
            raise _error("sync the folder", folder, e) from None
        finally:
            os.close(fd)

    def files(self):
        try:
            with os.scandir(self.folder) as entries:
                return sorted(e.name for e in entries if e.is_file())
        except OSError as e:
            raise _error("list", self.folder, e) from None

    def append(self, name, data):
        fd = self._handle(name, create=True)
        try:
            written = os.write(fd, data)
            if written < len(data):  # rare: a signal, or a nearly full disk
                view = memoryview(data)[written:]
                while view:
                    view = view[os.write(fd, view):]
        except OSError as e:
            raise _error("append to", self._path(name), e) from None

    def sync(self, name):
        fd = self._handle(name)
        try:
            _datasync(fd)
        except OSError as e:
            # After a failed fsync the kernel may have dropped the dirty
            # pages: the caller must treat the file as unknown, not retry.
            raise _error("sync", self._path(name), e) from None
        if name in self._created:
            self._sync_folder()
            self._created.discard(name)

    def read(self, name, offset, size):
        if offset < 0 or size < 0:
            raise ValueError(f"read of {name!r} at {offset} for {size} bytes")
        fd = self._handle(name)
        try:
            return os.pread(fd, size, offset)
        except OSError as e:
            raise _error("read", self._path(name), e) from None

    def size(self, name):
        fd = self._handle(name)
        try:
            return os.fstat(fd).st_size
        except OSError as e:
            raise _error("stat", self._path(name), e) from None

    def truncate(self, name, size):
        if size < 0:
            raise ValueError(f"truncate of {name!r} to {size} bytes")
        fd = self._handle(name)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as e:
            raise _error("truncate", self._path(name), e) from None

    def delete(self, name):
        path = self._path(name)
        self._forget(name)
        self._created.discard(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _error("delete", path, e) from None
        self._sync_folder()

    def synced_by_syncfs(self, name):
        """
        Note that a C{syncfs} covering this storage's file system succeeded
        after C{name} was written: its data and its directory entry are
        durable.
        """
        self._created.discard(name)

    def close(self):
        while self._handles:
            _, fd = self._handles.popitem()
            os.close(fd)
        if self.syncfs_fd is not None:
            os.close(self.syncfs_fd)
            self.syncfs_fd = None


def sync_many(files):
    """
    Make every C{(storage, name)} of C{files} durable, at less cost than
    one C{storage.sync} each: the L{FileStorage} files of one file system
    go with a single C{syncfs} (write-back and one journal commit for all)
    once there are L{SYNCFS_MIN_FILES}; the rest are synced one by one.

    Blocking: call it off the reactor thread.  Return a list holding, for
    each file in order, C{None} or the L{StorageError} of its failed sync.
    When C{syncfs} fails (a write-back error anywhere on that file system
    since the storage opened), each file is synced on its own instead,
    which reports the error to the files it concerns only.
    """
    errors = [None] * len(files)
    groups = {}  # st_dev -> [(index, storage, name)] that syncfs may cover
    alone = []
    for k, (storage, name) in enumerate(files):
        fd = getattr(storage, "syncfs_fd", None)
        if fd is None or _syncfs is None:
            alone.append(k)
            continue
        try:
            dev = os.fstat(fd).st_dev
        except OSError:
            alone.append(k)
            continue
        groups.setdefault(dev, []).append(k)
    for members in groups.values():
        if len(members) < SYNCFS_MIN_FILES:
            alone.extend(members)
            continue
        storage = files[members[0]][0]
        if _syncfs(storage.syncfs_fd) != 0:
            alone.extend(members)  # find out which file the error was for
            continue
        for k in members:
            storage, name = files[k]
            storage.synced_by_syncfs(name)
    for k in sorted(alone):
        storage, name = files[k]
        try:
            storage.sync(name)
        except StorageError as e:
            errors[k] = e
    return errors
