"""Room on the journal's file system: a full disk is a state of the journal, not a failure.

The journal reserves room ahead of need (docs/journal.md, "A full disk"): with preallocation it
preallocates a spare segment file (`next.seg.tmp`) once the active segment is half full, and the
next roll renames it into place; without, it checks that the file system keeps half a segment
free. A shortage (`SpaceShortage`) is reported while half a segment of room is still there, so the
node can stop taking new records before a write has to fail. A write that does not fit anyway
raises `JournalFullError` before anything is written.

`DiskSpace` is the one place the journal asks the file system about space, so a test can shrink
the disk (`LimitedDiskSpace`, `SEQD_FAULT_DISK_BYTES`). `SpaceReservation` is the writer's policy
over it: what is allocated in the active segment, the spare, and the errors that say what to do.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from sequencer.journal.errors import JournalFullError, no_space
from sequencer.journal.format import SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES, SPARE_NAME

__all__ = [
    "FAULT_DISK_BYTES_ENV",
    "RESERVE_AHEAD_AT_FRACTION",
    "WRITE_SLACK_BYTES",
    "DiskSpace",
    "LimitedDiskSpace",
    "SpaceReservation",
    "SpaceShortage",
    "disk_space_from_environment",
]

# Room is reserved for the next segment once the active one is this full, so a full disk is
# known while the rest of the active segment (half a segment: 32 MiB at the default size, twice
# the default log ring) can still take what the log ring holds.
RESERVE_AHEAD_AT_FRACTION = 0.5
# A write that grows a file (no preallocation) goes ahead only if this much more is free: the file
# system needs blocks of its own to grow a file (extent tree, its journal).
WRITE_SLACK_BYTES = 256 << 10
FAULT_DISK_BYTES_ENV = "SEQD_FAULT_DISK_BYTES"

assert 0 < RESERVE_AHEAD_AT_FRACTION < 1


class DiskSpace:
    """The file system under a journal: how much is free, and allocating it. The one place the
    journal asks about space, so a test can shrink the disk (`LimitedDiskSpace`)."""

    def free_bytes(self, directory: Path) -> int:
        """Bytes an unprivileged writer may still use (f_bavail: root's reserve is not counted)."""
        stats = os.statvfs(directory)
        return stats.f_bavail * stats.f_frsize

    def total_bytes(self, directory: Path) -> int:
        stats = os.statvfs(directory)
        return stats.f_blocks * stats.f_frsize

    def allocate(self, fd: int, directory: Path, length: int) -> None:
        """Allocate the file's first `length` bytes (posix_fallocate).

        Raises:
            OSError: ENOSPC when the file system has no room.
        """
        os.posix_fallocate(fd, 0, length)

    def grow(self, fd: int, directory: Path, growth_bytes: int) -> None:
        """Called before a write that grows a file by `growth_bytes`. A real file system needs
        nothing here: the write itself raises ENOSPC."""


class LimitedDiskSpace(DiskSpace):
    """A file system only as large as the number in `capacity_path` (for tests without root).

    Every regular file in the journal directory counts as used with its apparent size. While
    `capacity_path` does not exist the real file system applies, so a test frees space by
    writing a larger number or removing the file.
    """

    def __init__(self, capacity_path: Path) -> None:
        self.capacity_path = capacity_path

    def _capacity(self) -> int | None:
        try:
            return int(self.capacity_path.read_text())
        except FileNotFoundError:
            return None

    def _free(self, directory: Path, capacity: int) -> int:
        used = 0
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_size
        return max(0, capacity - used)

    def free_bytes(self, directory: Path) -> int:
        capacity = self._capacity()
        if capacity is None:
            return super().free_bytes(directory)
        return self._free(directory, capacity)

    def total_bytes(self, directory: Path) -> int:
        capacity = self._capacity()
        return super().total_bytes(directory) if capacity is None else capacity

    def allocate(self, fd: int, directory: Path, length: int) -> None:
        self.grow(fd, directory, length - os.fstat(fd).st_size)
        super().allocate(fd, directory, length)

    def grow(self, fd: int, directory: Path, growth_bytes: int) -> None:
        capacity = self._capacity()
        if capacity is not None and growth_bytes > self._free(directory, capacity):
            raise OSError(errno.ENOSPC, f"No space left on device (limited to {capacity} bytes by "
                          f"{FAULT_DISK_BYTES_ENV}={self.capacity_path})")


def disk_space_from_environment() -> DiskSpace:
    """The real file system, or, with `SEQD_FAULT_DISK_BYTES=PATH` set, one limited to the number
    of bytes in that file (a fault-injection hook for tests)."""
    setting = os.environ.get(FAULT_DISK_BYTES_ENV)
    return LimitedDiskSpace(Path(setting)) if setting else DiskSpace()


@dataclass(frozen=True)
class SpaceShortage:
    """The journal could not reserve room ahead (`Journal.reserve_space`): the node should take no
    new records until there is room. What is already in flight still fits."""

    directory: Path
    needed_bytes: int
    free_bytes: int
    total_bytes: int
    segment_bytes: int
    what: str  # what the room is for

    def __str__(self) -> str:
        text = (
            f"journal {self.directory}: {self.free_bytes} bytes free on its file system (of "
            f"{self.total_bytes}), {self.needed_bytes} needed to {self.what}"
        )
        if self.total_bytes < 2 * self.segment_bytes:
            text += (
                f"; the file system holds fewer than two segments of {self.segment_bytes} bytes: "
                "lower journal.segment_bytes"
            )
        return text + ". Free space on it; the node resumes by itself."


class SpaceReservation:
    """The writer's room: the bytes allocated in its active segment and the spare next segment.

    Invariant: `allocated_bytes` is the active segment's file size as last seen; a write that
    ends at or below it needs no new space (it was preallocated).
    """

    def __init__(
        self, directory: Path, disk: DiskSpace, segment_bytes: int, preallocate: bool
    ) -> None:
        self.directory = directory
        self.disk = disk
        self.segment_bytes = segment_bytes
        self.preallocate = preallocate
        self.allocated_bytes = 0
        self._active_fd = -1
        self._spare_fd = -1  # the preallocated next segment (SPARE_NAME), once reserved

    def activate(self, fd: int) -> None:
        """`fd` is now the active segment."""
        self._active_fd = fd
        self.allocated_bytes = os.fstat(fd).st_size

    def wrote(self, end: int) -> None:
        self.allocated_bytes = max(self.allocated_bytes, end)

    def cut_back(self, offset: int) -> None:
        """The active segment was cut back to `offset` (a write that met ENOSPC)."""
        self.allocated_bytes = offset

    def free_bytes(self) -> int:
        return self.disk.free_bytes(self.directory)

    def full_error(self, what: str, needed_bytes: int, first_segment: bool = False) -> JournalFullError:
        free = self.disk.free_bytes(self.directory)
        total = self.disk.total_bytes(self.directory)
        if first_segment:
            suggestion = 1 << ((total // 4).bit_length() - 1) if total >= 4 * SEGMENT_BYTES_MIN else 0
            advice = (
                f"lower journal.segment_bytes (for example to {suggestion}) or give the journal a "
                "larger file system"
                if suggestion
                else "give the journal a larger file system"
            )
            return JournalFullError(
                f"journal {self.directory} cannot create its first segment: "
                f"journal.segment_bytes={self.segment_bytes} but its file system has {free} "
                f"bytes free (of {total}): {advice}.",
                needed_bytes, free,
            )  # fmt: skip
        return JournalFullError(
            f"journal {self.directory}: no room for {what} ({needed_bytes} bytes needed, {free} "
            f"free of {total}); nothing was written. Free space on the file system: the node "
            "takes no new commands meanwhile and resumes by itself.",
            needed_bytes, free,
        )  # fmt: skip

    def _check_growth(self, growth_bytes: int, what: str, first_segment: bool = False) -> None:
        """Without preallocation: raise JournalFullError unless a write growing a file by
        `growth_bytes` fits, with WRITE_SLACK_BYTES to spare, so ENOSPC never comes mid-batch."""
        if self.disk.free_bytes(self.directory) < growth_bytes + WRITE_SLACK_BYTES:
            raise self.full_error(what, growth_bytes + WRITE_SLACK_BYTES, first_segment)

    def take_spare(self) -> int:
        """The spare next segment's fd (its file is SPARE_NAME), or -1 when none is reserved."""
        fd, self._spare_fd = self._spare_fd, -1
        return fd

    def allocate_segment(self, fd: int, what: str, first_segment: bool) -> None:
        """Room for a new segment file `fd`: preallocated whole, or the room to grow it.

        Raises:
            JournalFullError: no room; the caller removes the file.
            OSError: allocating failed for another reason.
        """
        if not self.preallocate:
            self._check_growth(SEGMENT_HEADER_BYTES, what, first_segment)
            return
        try:
            self.disk.allocate(fd, self.directory, self.segment_bytes)
        except OSError as error:
            if no_space(error):
                raise self.full_error(what, self.segment_bytes, first_segment) from error
            raise

    def allocate_if_room(self, fd: int, length: int) -> None:
        """Preallocate where recovery can do without it: on a full disk the file stays shorter and
        `ensure_room` allocates before a write needs the space."""
        try:
            self.disk.allocate(fd, self.directory, length)
        except OSError as error:
            if not no_space(error):
                raise

    def ensure_room(self, end: int, what: str) -> None:
        """Before a write up to byte `end` of the active segment: the space is allocated, or there
        is room to grow the file.

        Raises:
            JournalFullError: no room; nothing was written.
            OSError: preallocating failed for another reason (the writer stops).
        """
        if end <= self.allocated_bytes:
            return
        if not self.preallocate:
            self._check_growth(end - self.allocated_bytes, what)
            return
        try:
            self.disk.allocate(self._active_fd, self.directory, max(self.segment_bytes, end))
        except OSError as error:
            # A failed fallocate may keep a part.
            self.allocated_bytes = os.fstat(self._active_fd).st_size
            if no_space(error):
                raise self.full_error(what, end - self.allocated_bytes) from error
            raise
        self.allocated_bytes = os.fstat(self._active_fd).st_size

    def reserve_ahead(self, write_offset: int) -> SpaceShortage | None:
        """`Journal.reserve_space`, given where the next batch goes in the active segment.

        Raises:
            OSError: preallocating the spare failed for another reason than space.
        """
        ahead_bytes = int(self.segment_bytes * RESERVE_AHEAD_AT_FRACTION)
        if not self.preallocate:
            needed = ahead_bytes + WRITE_SLACK_BYTES
            free = self.disk.free_bytes(self.directory)
            if free >= needed:
                return None
            return self._shortage(needed, free, "keep room ahead for the journal")
        if self._spare_fd >= 0 or write_offset < ahead_bytes:
            return None
        free = self.disk.free_bytes(self.directory)
        if free >= self.segment_bytes:  # else do not even try: a failed fallocate churns blocks
            path = self.directory / SPARE_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                self.disk.allocate(fd, self.directory, self.segment_bytes)
            except OSError as error:
                os.close(fd)
                path.unlink(missing_ok=True)
                if not no_space(error):
                    raise
                free = self.disk.free_bytes(self.directory)
            else:
                self._spare_fd = fd
                return None
        return self._shortage(self.segment_bytes, free, "preallocate the next segment")

    def _shortage(self, needed_bytes: int, free_bytes: int, what: str) -> SpaceShortage:
        return SpaceShortage(
            self.directory, needed_bytes, free_bytes, self.disk.total_bytes(self.directory),
            self.segment_bytes, what,
        )  # fmt: skip

    def release(self) -> None:
        """Give the spare's space back; the next writer reserves it again."""
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
            (self.directory / SPARE_NAME).unlink(missing_ok=True)
