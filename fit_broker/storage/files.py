"""
L{IStorage} on a folder of real files, with the fsyncs that make it durable.

Blocking system calls: the caller decides on which thread to run them.
"""

import os
from collections import OrderedDict

from zope.interface import implementer

from fit_broker.interfaces import IStorage
from fit_broker.storage.seam import StorageError, check_name

# fdatasync flushes the data and the size an append changed, and skips the
# timestamps fsync would also write; where it is missing, fsync does both.
_datasync = getattr(os, "fdatasync", os.fsync)

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


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
    """

    def __init__(self, folder, *, max_open=32, mode=0o600):
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

    def __repr__(self):
        return f"<FileStorage {self.folder!r}>"

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
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
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

    def close(self):
        while self._handles:
            _, fd = self._handles.popitem()
            os.close(fd)
