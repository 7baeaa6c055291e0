"""
A file of JSON lines that rotates by size, as logrotate would: C{path}
becomes C{path.1}, C{path.1} becomes C{path.2}, up to C{keep} old files.

Plain blocking file I/O of small appends, which the page cache absorbs;
only C{fsync = true} waits for the disk.
"""

import os


class WriteError(OSError):
    """
    An append failed after C{written} of the lines given were in the file.
    """

    def __init__(self, written, cause):
        super().__init__(cause.errno, cause.strerror)
        self.written = written
        self.cause = cause


class RotatingFile:
    """
    Appends lines to C{path}, starting a new file before a line would take
    it past C{max_bytes} (a single longer line gets a file of its own).

    @ivar rotations: how many times the file was rotated.
    """

    def __init__(self, path, max_bytes, keep, fsync=False):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self.rotations = 0
        self._fd = None
        self._size = 0
        self._torn = False

    def _open(self):
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def rotate(self):
        """
        Move the current file aside and start a new one.
        """
        self.close()
        if self.keep == 0:
            if os.path.exists(self.path):
                os.unlink(self.path)
        else:
            for index in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            if os.path.exists(self.path):
                os.replace(self.path, f"{self.path}.1")
        self.rotations += 1
        self._open()

    def _write_all(self, data):
        view = memoryview(data)
        start = self._size
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError:
            self._torn = self._size != start
            raise

    def append(self, lines):
        """
        Append C{lines} (bytes, each ending in a newline), rotating as needed.

        @raise WriteError: saying how many lines are in the file; a line cut
            by the error is ended by a newline before the next append, so
            it stands alone as one unparsable line.
        """
        written = 0
        try:
            if self._fd is None:
                self._open()
            if self._torn:
                self._write_all(b"\n")
                self._torn = False
            chunk, size = [], self._size
            for line in lines:
                if size and size + len(line) > self.max_bytes:
                    if chunk:
                        self._write_all(b"".join(chunk))
                        written += len(chunk)
                        chunk = []
                    self.rotate()
                    size = 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write_all(b"".join(chunk))
                written += len(chunk)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            self.close()
            raise WriteError(written, e) from None
        return written
