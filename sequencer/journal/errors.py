"""What the journal raises. `JournalError` is the base; a `JournalFailedError` stops the journal
(fail-stop), every other error leaves it usable."""

from __future__ import annotations

import errno

__all__ = [
    "JournalCorruptError",
    "JournalError",
    "JournalFailedError",
    "JournalFullError",
    "JournalLockedError",
    "JournalSyncError",
    "JournalWriteError",
    "no_space",
]


class JournalError(Exception):
    """Base of every journal error."""


class JournalCorruptError(JournalError):
    """Damage that is not a torn tail: the journal refuses to open or read past it."""


class JournalLockedError(JournalError):
    """Another process holds the journal's writer lock (one journaller per node)."""


class JournalFailedError(JournalError):
    """An I/O failure stopped the journal; every later call raises again (fail-stop)."""


class JournalSyncError(JournalFailedError):
    """fsync/fdatasync failed. Never retried: the pages may already be marked clean (fsyncgate)."""


class JournalWriteError(JournalFailedError):
    """A write, truncate, rename or unlink failed; the file's state is unknown, so stop."""


class JournalFullError(JournalError):
    """The disk has no room for a write. Nothing of it was written and the journal stays usable
    (it is not fail-stop): call again once space is freed."""

    def __init__(self, message: str, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


def no_space(error: OSError) -> bool:
    """The error says the file system (or the user's quota) is full: a state, not a failure."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
