"""
What every storage shares: the error it raises and the names it accepts.

A storage is a flat folder of append-only files (see
L{fit_broker.interfaces.IStorage}); L{fit_broker.storage.files.FileStorage}
keeps it on disk, L{fit_broker.storage.fake.FakeStorage} in memory for
crash tests.
"""

import errno as _errno

from fit_broker.errors import FitBrokerError

#: errno values that mean the disk (or the user's quota) is full.
FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})

#: The longest file name most file systems accept, in bytes.
MAX_NAME_BYTES = 255


class StorageError(FitBrokerError):
    """
    A storage operation failed; the message is one line naming the file.

    @ivar errno: the operating system's error number, or C{None}.
    @ivar full: C{True} when the disk or quota is full (ENOSPC, EDQUOT):
        the caller refuses new writes rather than losing old ones.
    """

    def __init__(self, message, *, errno=None, full=None):
        super().__init__(message)
        self.errno = errno
        self.full = (errno in FULL_ERRNOS) if full is None else full


def check_name(name):
    """
    Return C{name} if it is a plain file name, else raise C{ValueError}.

    Names are chosen by code, never by peers, but a bad one must not
    escape the folder: no separators, no C{.}/C{..}, no NUL, not empty.
    """
    if not isinstance(name, str):
        raise ValueError(f"storage file name must be a str, not {type(name).__name__}")
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
    ):
        raise ValueError(f"invalid storage file name {name!r}")
    return name
