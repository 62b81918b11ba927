"""The journal: append-only segment files that make log records durable.

Theory of operation (docs/journal.md has the long form).

A journal is a directory of segment files named after their first index
(`00000000000000000001.seg`). Each segment starts with a 64-byte header (magic, layout version,
first index, the term before it, a random journal id, CRC-32C) and then holds batches, 8-byte
aligned, back to back:

    batch = [magic u32][length u32][crc32c u32][count u32][first_index u64][last_index u64]
            [records: `length` bytes, a run of whole records exactly as they sat in the ring]

The CRC covers the 32-byte batch header (with its crc field zeroed) and the record bytes. It is
not chained from batch to batch: order is proven by the indexes instead (each batch's first index
is the previous batch's last index + 1, and a segment's header names its first index), so every
batch can be verified on its own, a reader can start anywhere, and a batch's bytes can be shipped
to a follower as they are.

Writing. `append` validates the records at the gateway (gapless indexes continuing the log,
non-decreasing terms, whole records) and writes header + records with one `pwritev`. `sync` is one
fdatasync for everything appended since the last: group commit. A segment is preallocated (no
file-size metadata change on each append) and the journal rolls to a new one when a batch does not
fit; a batch never spans two segments. A new segment is created as a temp file, written, fsynced,
renamed into place, and the directory fsynced (ALICE: a new name is durable only after its
directory is), and the full segment is fdatasynced *before* the new one exists, so no crash can
leave a later segment behind an earlier one with a lost tail.

A full disk is a state, not a failure. The journal reserves room ahead of need: with preallocation
it preallocates a spare segment file (`next.seg.tmp`) once the active segment is half full, and the
next roll renames it into place; without, it checks that the file system keeps half a segment
free. `reserve_space` reports a shortage (`SpaceShortage`) while half a segment of room is still
there, so the node can stop taking new records before a write has to fail. A write that does not
fit anyway raises `JournalFullError` before anything is written (a write that still meets ENOSPC
is cut back to where it started); the journal stays usable and the caller retries later.
`SEQD_FAULT_DISK_BYTES` shrinks the file system for tests (`LimitedDiskSpace`).

Fail-stop. A failed fsync is never retried (fsyncgate: after a write-back error Linux may mark the
pages clean, and a retried fsync "succeeds" over lost data). The journal raises
`JournalSyncError` and refuses every later call; the node stops and recovers from the journal.

Recovery (`Journal.open`). Zero bytes after the last batch of a preallocated segment are normal.
In the *last* segment, a bad batch (bad magic, implausible header, cut short, CRC mismatch) after
which no valid batch follows is a torn tail: the writer crashed mid-append, before `sync` returned,
so nothing in it was acknowledged. Its bytes are copied to `<segment>.broken-<offset>`, the tail is
cut and the cut made durable, once. Recovery never needs free space: when the disk has no room for
the copy, it cuts without one and says so (and leaves no empty or partial copy behind). Anything else (a bad batch followed by a valid one, damage in a
non-last segment, a gap in the indexes, a bad segment header) is corruption in the middle of the
log and `JournalCorruptError` refuses to start, naming the file and the byte offset: it cannot be a
crash artefact, so repairing it automatically could drop acknowledged records.

Readers (`read_records`, `JournalReader`) use no lock and only ever return complete, CRC-valid
batches, so they can follow a journal another process is appending to.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import crc32c

from sequencer.record import RECORD_HEADER, RECORD_HEADER_BYTES, RecordType

__all__ = [
    "BATCH_HEADER",
    "BATCH_HEADER_BYTES",
    "BATCH_MAGIC",
    "FAULT_DISK_BYTES_ENV",
    "RESERVE_AHEAD_AT_FRACTION",
    "SEGMENT_BYTES_DEFAULT",
    "SEGMENT_BYTES_MAX",
    "SEGMENT_BYTES_MIN",
    "SEGMENT_HEADER",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_LAYOUT_VERSION",
    "SEGMENT_MAGIC",
    "SPARE_NAME",
    "WRITE_SLACK_BYTES",
    "Damage",
    "DiskSpace",
    "Journal",
    "JournalCorruptError",
    "JournalError",
    "JournalFailedError",
    "JournalFullError",
    "JournalLockedError",
    "JournalReader",
    "JournalSyncError",
    "JournalWriteError",
    "LimitedDiskSpace",
    "Record",
    "RecoveryReport",
    "SegmentScan",
    "SpaceShortage",
    "TornTail",
    "disk_space_from_environment",
    "list_segments",
    "read_records",
    "read_runs",
    "scan_segment",
    "segment_name",
]

# -- formats -------------------------------------------------------------------------------------

SEGMENT_MAGIC = b"SEQDJRNL"
SEGMENT_LAYOUT_VERSION = 1
# magic, layout version, header bytes, flags (0), first index, term of the record before the first
# (0: none), journal id (random, the same in every segment of one journal), created (wall clock,
# for operators only), crc32c of the 56 bytes before it, pad.
SEGMENT_HEADER = struct.Struct("<8sHHIQQ16sqI4x")
SEGMENT_HEADER_BYTES = 64
SEGMENT_HEADER_CRC_OFFSET = 56

BATCH_MAGIC = int.from_bytes(b"SQBT", "little")
BATCH_MAGIC_BYTES = b"SQBT"
# magic, length of the record bytes, crc32c, record count, first index, last index
BATCH_HEADER = struct.Struct("<IIIIQQ")
BATCH_HEADER_BYTES = 32
_ZERO_BATCH_HEADER = bytes(BATCH_HEADER_BYTES)

SEGMENT_BYTES_DEFAULT = 64 << 20  # etcd's size: a roll (fsync + rename + dir fsync) every 64 MiB
SEGMENT_BYTES_MIN = 4096  # a header and a few small batches: the floor for tests
# The batch length field is a u32 and a batch never spans segments; 1 GiB keeps a segment's
# recovery scan and a truncate_after copy bounded.
SEGMENT_BYTES_MAX = 1 << 30
# Readers pull the file through one buffer this large and hand out views into it: large enough
# that the syscall is amortised over thousands of records, small enough that following a live
# tail re-reads little.
READ_CHUNK_BYTES = 1 << 20
# Recovery reads the zero tail of a preallocated segment in chunks this large.
TAIL_SCAN_CHUNK_BYTES = 4 << 20

# Room is reserved for the next segment once the active one is this full, so a full disk is
# known while the rest of the active segment (half a segment: 32 MiB at the default size, twice
# the default log ring) can still take what the log ring holds.
RESERVE_AHEAD_AT_FRACTION = 0.5
# A write that grows a file (no preallocation) goes ahead only if this much more is free: the file
# system needs blocks of its own to grow a file (extent tree, its journal).
WRITE_SLACK_BYTES = 256 << 10
FAULT_DISK_BYTES_ENV = "SEQD_FAULT_DISK_BYTES"

SEGMENT_SUFFIX = ".seg"
TEMP_SUFFIX = ".seg.tmp"
# The preallocated spare that the next roll renames into place. It ends in TEMP_SUFFIX, so a seqd
# that does not know it removes it as an unfinished roll; it never holds a record.
SPARE_NAME = "next" + TEMP_SUFFIX
LOCK_NAME = "journal.lock"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")

assert SEGMENT_HEADER.size == SEGMENT_HEADER_BYTES
assert BATCH_HEADER.size == BATCH_HEADER_BYTES
assert SEGMENT_HEADER_BYTES % 8 == 0
assert BATCH_HEADER_BYTES % 8 == 0
assert SEGMENT_BYTES_MIN >= SEGMENT_HEADER_BYTES + BATCH_HEADER_BYTES + RECORD_HEADER_BYTES
assert SEGMENT_BYTES_MAX < 1 << 32
assert TAIL_SCAN_CHUNK_BYTES % 8 == 0
assert 0 < RESERVE_AHEAD_AT_FRACTION < 1
assert not _SEGMENT_NAME.match(SPARE_NAME)
assert BATCH_MAGIC_BYTES == BATCH_MAGIC.to_bytes(4, "little")

# length, type, index, term: what `append` validates in each record
_RECORD_KEY = struct.Struct("<IH2xQQ")
_RECORD_TERM = struct.Struct("<Q")
_RECORD_TERM_OFFSET = 16
_PADDING = int(RecordType.PADDING)


# -- errors --------------------------------------------------------------------------------------


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


def _no_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


# -- disk space ----------------------------------------------------------------------------------


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


# -- records as read back ------------------------------------------------------------------------


class Record(NamedTuple):
    """One record read from the journal: the header fields, the payload, and the whole record.

    `payload` and `raw` are views into the reader's buffer (no copy); `raw` includes the zero
    padding, so concatenated raws are again a run of whole records (what a follower receives).
    """

    length: int
    type: int
    version: int
    index: int  # type: ignore[assignment]  # shadows tuple.index: the log word wins
    term: int
    timestamp_ns: int
    session_id: int
    request_id: int
    payload: memoryview
    raw: memoryview


# -- names ---------------------------------------------------------------------------------------


def segment_name(first_index: int) -> str:
    return f"{first_index:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path | str) -> list[tuple[int, Path]]:
    """(first index, path) of every segment file, oldest first; other files are ignored."""
    directory = Path(directory)
    found = []
    if not directory.is_dir():
        raise JournalError(f"no journal at {directory}: not a directory")
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _SEGMENT_NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), directory / entry.name))
    found.sort()
    return found


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading -------------------------------------------------------------------------------------


class _FileWindow:
    """Reads a file through one large buffer and hands out views into it, not copies.

    Views handed out keep their buffer alive after the window moves on. A reader of a live file
    calls `invalidate()` before looking again at bytes it saw as not yet written.
    """

    def __init__(self, fd: int, chunk_bytes: int = READ_CHUNK_BYTES) -> None:
        self.fd = fd
        self.chunk_bytes = chunk_bytes
        self._start = 0
        self._view = memoryview(b"")

    def view(self, offset: int, size: int) -> memoryview:
        """[offset, offset + size) of the file, shorter at the end of the file."""
        begin = offset - self._start
        if begin >= 0 and begin + size <= len(self._view):
            return self._view[begin : begin + size]
        self._view = memoryview(os.pread(self.fd, max(size, self.chunk_bytes), offset))
        self._start = offset
        return self._view[:size]

    def invalidate(self) -> None:
        self._view = memoryview(b"")


_OK, _END, _BAD = 0, 1, 2


class _Batch(NamedTuple):
    status: int  # _OK: complete and CRC-valid; _END: zero header or end of file; _BAD: see reason
    offset: int
    length: int  # record bytes
    record_count: int
    first_index: int
    last_index: int
    records: memoryview
    reason: str

    @property
    def end(self) -> int:
        return self.offset + BATCH_HEADER_BYTES + self.length


def _batch_crc(
    length: int, count: int, first_index: int, last_index: int, records: memoryview
) -> int:
    header = BATCH_HEADER.pack(BATCH_MAGIC, length, 0, count, first_index, last_index)
    return crc32c.crc32c(records, crc32c.crc32c(header))


_EMPTY = memoryview(b"")


def _read_batch(window: _FileWindow, offset: int) -> _Batch:
    """The batch at `offset`, checked: header plausible, complete, CRC-valid. Never raises on bad
    bytes: the caller decides between torn tail and corruption."""
    header = window.view(offset, BATCH_HEADER_BYTES)
    if len(header) < BATCH_HEADER_BYTES:
        if not any(header):
            return _Batch(_END, offset, 0, 0, 0, 0, _EMPTY, "end of file")
        return _Batch(
            _BAD, offset, 0, 0, 0, 0, _EMPTY,
            f"the file ends {len(header)} bytes into a batch header",
        )  # fmt: skip
    if header == _ZERO_BATCH_HEADER:
        return _Batch(_END, offset, 0, 0, 0, 0, _EMPTY, "zero bytes")
    magic, length, crc, count, first_index, last_index = BATCH_HEADER.unpack(header)
    if magic != BATCH_MAGIC:
        return _Batch(
            _BAD, offset, 0, 0, 0, 0, _EMPTY,
            f"no batch magic (found 0x{magic:08x}, expected 0x{BATCH_MAGIC:08x})",
        )  # fmt: skip
    if (
        length == 0
        or length % 8
        or count == 0
        or length < count * RECORD_HEADER_BYTES
        or first_index == 0
        or last_index - first_index + 1 != count
    ):
        return _Batch(
            _BAD, offset, 0, 0, first_index, last_index, _EMPTY,
            f"implausible batch header (length {length}, count {count}, indexes "
            f"{first_index}..{last_index})",
        )  # fmt: skip
    records = window.view(offset + BATCH_HEADER_BYTES, length)
    if len(records) < length:
        return _Batch(
            _BAD, offset, length, count, first_index, last_index, _EMPTY,
            f"the file ends {len(records)} bytes into the batch's {length} record bytes",
        )  # fmt: skip
    computed = _batch_crc(length, count, first_index, last_index, records)
    if computed != crc:
        return _Batch(
            _BAD, offset, length, count, first_index, last_index, _EMPTY,
            f"CRC-32C mismatch (stored 0x{crc:08x}, computed 0x{computed:08x})",
        )  # fmt: skip
    return _Batch(_OK, offset, length, count, first_index, last_index, records, "")


_new_record = tuple.__new__
_unpack_header = RECORD_HEADER.unpack_from


def _batch_records(batch: _Batch) -> list[Record]:
    """Every record of a CRC-valid batch, as views. Checked per batch, not per record: the CRC
    vouches for the bytes and the writer validated them before writing."""
    records = batch.records
    out: list[Record] = []
    append = out.append
    position = 0
    for _ in range(batch.record_count):
        fields = _unpack_header(records, position)
        length = fields[0]
        end = position + ((length + 7) & -8)
        # Tuple concatenation: measured ~25% faster here than `(*fields, ...)` (RUF005).
        payload = records[position + 48 : position + length]
        append(_new_record(Record, fields + (payload, records[position:end])))  # noqa: RUF005
        position = end
    if (
        position != batch.length
        or out[0].index != batch.first_index
        or out[-1].index != batch.last_index
    ):
        raise JournalCorruptError(
            f"batch at offset {batch.offset} (records {batch.first_index}..{batch.last_index}) "
            f"passes its CRC but its records do not match its header (walked {position} of "
            f"{batch.length} bytes, indexes {out[0].index}..{out[-1].index}): a writer bug. "
            "Keep the file for diagnosis; restore the journal from a replica or a backup."
        )
    return out


_LENGTH = struct.Struct("<I")


def _offset_of(records: memoryview, first_index: int, index: int) -> int:
    """Byte offset of record `index` in a run of whole records starting at `first_index`."""
    position = 0
    for _ in range(index - first_index):
        position += (_LENGTH.unpack_from(records, position)[0] + 7) & -8
    return position


def _last_term_of(batch: _Batch) -> int:
    """The term of a CRC-valid batch's last record (walks the record lengths)."""
    records = batch.records
    position = 0
    last = 0
    for _ in range(batch.record_count):
        last = position
        position += (_unpack_header(records, position)[0] + 7) & -8
    (term,) = _RECORD_TERM.unpack_from(records, last + _RECORD_TERM_OFFSET)
    return int(term)


class _SegmentHeader(NamedTuple):
    first_index: int
    prev_term: int
    journal_id: bytes
    created_ns: int


def _read_segment_header(path: Path, window: _FileWindow) -> _SegmentHeader:
    data = window.view(0, SEGMENT_HEADER_BYTES)
    what = (
        "Segment headers are written before the file is renamed into place, so this is not a "
        "crash artefact: restore the journal from a replica or a backup; do not delete the file."
    )
    if len(data) < SEGMENT_HEADER_BYTES:
        raise JournalCorruptError(
            f"journal segment {path} is {len(data)} bytes, shorter than its header. {what}"
        )
    (
        magic,
        layout_version,
        header_bytes,
        _flags,
        first_index,
        prev_term,
        journal_id,
        created_ns,
        crc,
    ) = SEGMENT_HEADER.unpack(data)
    if magic != SEGMENT_MAGIC:
        raise JournalCorruptError(
            f"journal segment {path} at offset 0: magic {magic!r}, expected {SEGMENT_MAGIC!r}: "
            f"not a seqd journal segment. {what}"
        )
    computed = crc32c.crc32c(data[:SEGMENT_HEADER_CRC_OFFSET])
    if computed != crc:
        raise JournalCorruptError(
            f"journal segment {path} at offset 0: header CRC-32C mismatch (stored 0x{crc:08x}, "
            f"computed 0x{computed:08x}). {what}"
        )
    if layout_version != SEGMENT_LAYOUT_VERSION or header_bytes != SEGMENT_HEADER_BYTES:
        raise JournalError(
            f"journal segment {path} has layout version {layout_version} (header {header_bytes} "
            f"bytes); this seqd reads version {SEGMENT_LAYOUT_VERSION} ({SEGMENT_HEADER_BYTES} "
            "bytes). Run the seqd version that wrote it."
        )
    match = _SEGMENT_NAME.match(path.name)
    if match is not None and int(match.group(1)) != first_index:
        raise JournalCorruptError(
            f"journal segment {path} is named for index {int(match.group(1))} but its header says "
            f"{first_index}: renamed by hand? Restore the journal from a replica or a backup."
        )
    return _SegmentHeader(first_index, prev_term, journal_id, created_ns)


def _segment_header_bytes(first_index: int, prev_term: int, journal_id: bytes) -> bytes:
    assert len(journal_id) == 16, journal_id
    fields = (SEGMENT_MAGIC, SEGMENT_LAYOUT_VERSION, SEGMENT_HEADER_BYTES, 0, first_index, prev_term, journal_id,
              time.time_ns(), 0)  # fmt: skip
    crc = crc32c.crc32c(SEGMENT_HEADER.pack(*fields)[:SEGMENT_HEADER_CRC_OFFSET])
    return SEGMENT_HEADER.pack(*fields[:-1], crc)


# -- scanning (recovery and `seqd log check`) ------------------------------------------------------


@dataclass(frozen=True)
class Damage:
    """The first bad bytes found in a segment."""

    path: Path
    offset: int  # where the bad batch (or the stray bytes) starts
    end_offset: int  # end of the non-zero bytes from `offset`: what a repair copies aside
    reason: str
    claimed_indexes: tuple[int, int] | None  # what the bad header claims, when it claims anything
    valid_batch_offset: int | None  # a CRC-valid batch after the damage: not a torn tail

    def describe(self) -> str:
        claimed = (
            f" (the batch header claims records {self.claimed_indexes[0]}..{self.claimed_indexes[1]})"
            if self.claimed_indexes
            else ""
        )
        return f"{self.path} at byte offset {self.offset}{claimed}: {self.reason}"


@dataclass(frozen=True)
class SegmentScan:
    path: Path
    first_index: int
    prev_term: int
    journal_id: bytes
    file_bytes: int
    end_offset: int  # just after the last valid batch: where the next append goes
    batches: int
    records: int
    last_index: int  # first_index - 1 when the segment holds no batch
    last_term: int  # prev_term when the segment holds no batch
    damage: Damage | None


def scan_segment(path: Path | str, *, walk_records: bool = False) -> SegmentScan:
    """Check every batch of one segment (header, indexes, CRC) and what follows the last one.

    Read-only. Bad bytes are reported in `damage`, never raised: whether they are a torn tail or
    corruption depends on where the segment sits in the journal. With `walk_records`, the records
    of every batch are walked too (`seqd log check`); otherwise only the last batch's.

    Raises:
        JournalCorruptError: a bad segment header.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        window = _FileWindow(fd, TAIL_SCAN_CHUNK_BYTES)
        file_bytes = os.fstat(fd).st_size
        header = _read_segment_header(path, window)
        offset = SEGMENT_HEADER_BYTES
        expected = header.first_index
        batches = records = 0
        last_valid: _Batch | None = None
        damage: Damage | None = None
        while True:
            batch = _read_batch(window, offset)
            if batch.status == _OK and batch.first_index != expected:
                reason = (
                    f"CRC-valid batch of records {batch.first_index}..{batch.last_index} where "
                    f"index {expected} was expected (stale or misplaced bytes, not a torn write)"
                )
                batch = batch._replace(status=_BAD, reason=reason)
            if batch.status == _OK and walk_records:
                try:
                    _batch_records(batch)
                except JournalCorruptError as error:
                    batch = batch._replace(status=_BAD, reason=str(error))
            if batch.status != _OK:
                break
            batches += 1
            records += batch.record_count
            expected = batch.last_index + 1
            offset = batch.end
            last_valid = batch
        # Whatever stopped the walk, the bytes from here on must be zeros for the segment to be
        # clean; if they are not, look for a valid batch further on (which makes it corruption).
        # A batch written after the damaged one continues the log: with the damaged header intact
        # its successor is exactly last_index + 1 (the log is gapless).
        successor = (
            batch.last_index + 1
            if batch.status == _BAD and batch.first_index == expected and batch.last_index >= expected
            else None
        )
        nonzero_end, valid_after = _scan_tail(window, offset, file_bytes, expected, successor)
        if batch.status == _BAD and batch.records:
            # The batch passed its CRC (it kept its record view) yet does not belong here: bytes
            # written whole, so not a torn write.
            valid_after = offset
        if batch.status == _BAD or nonzero_end > offset:
            claimed = (batch.first_index, batch.last_index) if batch.first_index else None
            reason = batch.reason if batch.status == _BAD else "non-zero bytes after the last batch"
            damage = Damage(path, offset, max(nonzero_end, offset), reason, claimed, valid_after)
        last_term = _last_term_of(last_valid) if last_valid is not None else header.prev_term
        return SegmentScan(
            path=path,
            first_index=header.first_index,
            prev_term=header.prev_term,
            journal_id=header.journal_id,
            file_bytes=file_bytes,
            end_offset=offset,
            batches=batches,
            records=records,
            last_index=expected - 1,
            last_term=last_term,
            damage=damage,
        )
    finally:
        os.close(fd)


def _scan_tail(
    window: _FileWindow, start: int, file_bytes: int, expected_index: int, successor: int | None
) -> tuple[int, int | None]:
    """(end of the non-zero bytes at or after `start`, offset of a CRC-valid batch after `start`).

    A candidate counts only if it continues the log (first index >= `expected_index`): a batch's
    bytes embedded in a command payload inside the torn batch must not turn a repairable torn
    tail into a refusal; when the damaged batch's header is intact, only its exact `successor`
    counts. (The declared end of the damaged batch is not used as a bound: its length field may be
    the damaged part, and skipping past a real later batch would truncate committed records.) A
    crafted payload that fakes the exact successor still makes a torn tail look like corruption:
    the node then refuses to start, which is the safe side."""
    nonzero_end = start
    valid_after: int | None = None
    probe = _FileWindow(window.fd)
    position = start
    while position < file_bytes:
        chunk = os.pread(window.fd, TAIL_SCAN_CHUNK_BYTES, position)
        if not chunk:
            break
        used = len(chunk.rstrip(b"\0"))
        if used:
            nonzero_end = position + used
            if valid_after is None:
                hit = chunk.find(BATCH_MAGIC_BYTES, 1 if position == start else 0, used)
                while hit != -1:
                    candidate = position + hit
                    if candidate % 8 == 0:
                        found = _read_batch(probe, candidate)
                        if found.status == _OK and (
                            found.first_index == successor if successor is not None
                            else found.first_index >= expected_index
                        ):
                            valid_after = candidate
                            break
                    hit = chunk.find(BATCH_MAGIC_BYTES, hit + 1, used)
        position += len(chunk)
    return nonzero_end, valid_after


# -- the writer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TornTail:
    path: Path  # the segment
    offset: int  # where it was cut
    damaged_bytes: int  # how many bytes were cut off
    broken_path: Path | None  # the copy of them; None when the disk had no room for one
    reason: str
    copy_error: str | None = None  # why no copy was kept

    def __str__(self) -> str:
        where = f"torn tail in {self.path} at byte offset {self.offset} ({self.reason}): "
        if self.broken_path is None:
            return (
                f"{where}{self.damaged_bytes} bytes cut off WITHOUT a copy: no room on the disk "
                f"for one ({self.copy_error}). They were never acknowledged (a crash mid-append)."
            )
        return f"{where}{self.damaged_bytes} bytes copied to {self.broken_path} and cut off"


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


@dataclass(frozen=True)
class RecoveryReport:
    """What `Journal.open` found. A torn tail is reported by the open that repairs it, only."""

    directory: Path
    segments: list[Path]
    first_index: int
    last_index: int
    last_term: int
    created: bool  # the directory held no segment: a new journal was started
    torn_tail: TornTail | None
    removed_temp_files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"journal {self.directory}: {len(self.segments)} segment(s), records "
            f"{self.first_index}..{self.last_index}, last term {self.last_term}"
        )
        if self.created:
            text += ", newly created"
        if self.torn_tail is not None:
            text += f"; {self.torn_tail}"
        if self.removed_temp_files:
            text += (
                f"; removed unfinished segment files {[str(p) for p in self.removed_temp_files]}"
            )
        return text


@dataclass
class _Segment:
    path: Path
    first_index: int
    prev_term: int


def _corrupt(damage: Damage, context: str) -> JournalCorruptError:
    return JournalCorruptError(
        f"journal corrupt in {damage.describe()}. {context} This is not a torn tail from a crash, so "
        "seqd will not repair it: restore this node's journal from a replica (remove the node's "
        "data and let it catch up from the cluster) or from a backup. Do not delete or truncate "
        "the file by hand; `seqd log check` reports the first damaged offset."
    )


class Journal:
    """The writer of one journal directory (one per node; an exclusive lock enforces it).

    Invariants: durable_index <= last_index; first_index <= last_index + 1; the active segment is
    the last one, and `_write_offset` is just after its last batch.
    """

    def __init__(
        self, directory: Path, segment_bytes: int, preallocate: bool, disk: DiskSpace
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.preallocate = preallocate
        self.disk = disk
        self.recovery: RecoveryReport | None = None
        self._segments: list[_Segment] = []
        self._segment_firsts: list[int] = []
        self._journal_id = b""
        self._fd = -1
        self._lock_fd = -1
        self._spare_fd = -1  # the preallocated next segment (SPARE_NAME), once reserved
        self._write_offset = 0
        # The active segment's file size: writes below it need no new space (preallocated).
        self._allocated_bytes = 0
        self._last_index = 0
        self._last_term = 0
        self._durable_index = 0
        self._failure: JournalFailedError | None = None
        self._closed = False

    # ---- opening and recovery ----

    @classmethod
    def open(
        cls,
        directory: Path | str,
        segment_bytes: int = SEGMENT_BYTES_DEFAULT,
        preallocate: bool = True,
        disk: DiskSpace | None = None,
    ) -> Journal:
        """Open (creating if needed) the journal in `directory` and recover it.

        Args:
            disk: the file system's space; by default the real one, or the test hook's
                (`disk_space_from_environment`).

        Raises:
            JournalCorruptError: damage other than a torn tail; names the file and offset.
            JournalFullError: a new journal's first segment does not fit the file system; the
                message names both sizes and the setting to change.
            JournalError: another process holds the journal, or a bad argument.
        """
        if not SEGMENT_BYTES_MIN <= segment_bytes <= SEGMENT_BYTES_MAX or segment_bytes % 8:
            raise JournalError(
                f"segment_bytes={segment_bytes} must be a multiple of 8 within "
                f"[SEGMENT_BYTES_MIN={SEGMENT_BYTES_MIN}, SEGMENT_BYTES_MAX={SEGMENT_BYTES_MAX}]"
            )
        directory = Path(directory)
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        journal = cls(directory, segment_bytes, preallocate, disk or disk_space_from_environment())
        try:
            journal._lock()
            journal._recover()
            # Records a crashed writer left in the page cache are readable now but not yet
            # durable; make them durable before anyone replays or continues after them.
            if journal._fd >= 0:
                os.fdatasync(journal._fd)
        except OSError as error:
            journal._release()
            raise JournalError(
                f"opening journal {directory} failed: {error}. Check the directory's permissions, "
                "the disk, and that it is not full."
            ) from error
        except BaseException:
            journal._release()
            raise
        return journal

    def _lock(self) -> None:
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalLockedError(
                f"journal {self.directory} is open for writing in another process (it holds "
                f"{self.directory / LOCK_NAME}); one journaller per node. Stop the other seqd, or "
                "use `seqd log` commands, which only read."
            ) from None

    def _recover(self) -> None:
        # A spare next segment holds no record; it is reserved again when needed.
        (self.directory / SPARE_NAME).unlink(missing_ok=True)
        removed = []
        for temp in sorted(self.directory.glob("*" + TEMP_SUFFIX)):
            # A roll that crashed before its rename: never part of the journal.
            temp.unlink()
            removed.append(temp)
        if removed:
            _fsync_directory(self.directory)
        found = list_segments(self.directory)
        if not found:
            self._journal_id = secrets.token_bytes(16)
            self._create_segment(1, 0)
            self.recovery = RecoveryReport(
                self.directory, [s.path for s in self._segments], 1, 0, 0, True, None, removed
            )
            return
        scans = [scan_segment(path) for _, path in found]
        self._journal_id = scans[0].journal_id
        previous: SegmentScan | None = None
        for scan in scans:
            if scan.journal_id != self._journal_id:
                raise JournalCorruptError(
                    f"journal segment {scan.path} belongs to another journal (id "
                    f"{scan.journal_id.hex()}, expected {self._journal_id.hex()} as in "
                    f"{scans[0].path}): a file copied in from elsewhere? Move it out of "
                    f"{self.directory} (or restore the journal from a replica or a backup)."
                )
            if previous is not None and (
                scan.first_index != previous.last_index + 1 or scan.prev_term != previous.last_term
            ):
                raise JournalCorruptError(
                    f"journal segment {scan.path} starts at index {scan.first_index} after term "
                    f"{scan.prev_term}, but {previous.path} ends at index {previous.last_index} in "
                    f"term {previous.last_term}: records are missing between them. Restore the "
                    "journal from a replica or a backup; do not delete files by hand."
                )
            if scan.damage is not None and scan is not scans[-1]:
                raise _corrupt(scan.damage, "The damage is in a segment that is not the last one.")
            previous = scan
        last = scans[-1]
        torn: TornTail | None = None
        if last.damage is not None:
            if last.damage.valid_batch_offset is not None:
                raise _corrupt(
                    last.damage,
                    f"A valid batch follows at byte offset {last.damage.valid_batch_offset}.",
                )
            torn = self._repair_torn_tail(last.damage)
        self._segments = [_Segment(s.path, s.first_index, s.prev_term) for s in scans]
        self._segment_firsts = [s.first_index for s in scans]
        self._open_active(last.path, last.end_offset)
        self._last_index = last.last_index
        self._last_term = last.last_term
        # Everything found on open is on disk as far as this process can know; a torn tail was
        # cut and the cut fsynced.
        self._durable_index = self._last_index
        self.recovery = RecoveryReport(
            self.directory,
            [s.path for s in scans],
            scans[0].first_index,
            self._last_index,
            self._last_term,
            False,
            torn,
            removed,
        )

    def _repair_torn_tail(self, damage: Damage) -> TornTail:
        """Copy the damaged bytes aside (fsynced), then cut the segment there (fsynced). Once: the
        next open finds a clean journal."""
        broken = damage.path.with_name(f"{damage.path.name}.broken-{damage.offset}")
        copies = 0
        while broken.exists():  # an earlier repair at the same offset: keep that evidence too
            copies += 1
            broken = damage.path.with_name(f"{damage.path.name}.broken-{damage.offset}.{copies}")
        fd = os.open(damage.path, os.O_RDWR)
        try:
            damaged = os.pread(fd, damage.end_offset - damage.offset, damage.offset)
            copy_error = self._keep_copy(broken, damaged) if damaged else "nothing to copy"
            os.ftruncate(fd, damage.offset)
            if self.preallocate:
                self._allocate_if_room(fd, max(self.segment_bytes, damage.offset))
            os.fsync(fd)
        finally:
            os.close(fd)
        kept = broken if copy_error is None else None
        return TornTail(damage.path, damage.offset, len(damaged), kept, damage.reason, copy_error)

    def _keep_copy(self, broken: Path, damaged: bytes) -> str | None:
        """Write `damaged` to `broken` and make it durable. Returns None, or why there is no copy:
        the disk had no room. Either way no empty or partial copy is left behind: it would pass
        for evidence that is not there.

        Raises:
            OSError: the copy failed for another reason than space (the copy is removed too).
        """
        try:
            copy = os.open(broken, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as error:
            if _no_space(error):
                return str(error)
            raise
        try:
            self.disk.grow(copy, self.directory, len(damaged))
            written = 0
            while written < len(damaged):
                written += os.write(copy, damaged[written:])
            os.fsync(copy)
        except OSError as error:
            os.close(copy)
            broken.unlink(missing_ok=True)
            _fsync_directory(self.directory)
            if _no_space(error):
                return str(error)
            raise
        os.close(copy)
        _fsync_directory(self.directory)
        return None

    def _allocate_if_room(self, fd: int, length: int) -> None:
        """Preallocate where recovery can do without it: on a full disk the file stays shorter and
        `_ensure_room` allocates before a write needs the space."""
        try:
            self.disk.allocate(fd, self.directory, length)
        except OSError as error:
            if not _no_space(error):
                raise

    def _open_active(self, path: Path, end_offset: int) -> None:
        fd = os.open(path, os.O_RDWR)
        if self.preallocate and os.fstat(fd).st_size < self.segment_bytes:
            self._allocate_if_room(fd, self.segment_bytes)
        self._activate(fd, end_offset)

    def _activate(self, fd: int, write_offset: int) -> None:
        """Make `fd` the active segment, the next batch going at `write_offset`."""
        if self._fd >= 0 and self._fd != fd:
            os.close(self._fd)
        self._fd = fd
        self._write_offset = write_offset
        self._allocated_bytes = os.fstat(fd).st_size

    def _create_segment(self, first_index: int, prev_term: int) -> None:
        """Temp file (the preallocated spare, if reserved), header, fsync, rename, directory fsync;
        then it becomes the active segment.

        Raises:
            JournalFullError: no room for the file; nothing is left behind.
        """
        final = self.directory / segment_name(first_index)
        assert not final.exists(), final
        if self._spare_fd >= 0:
            fd, temp = self._spare_fd, self.directory / SPARE_NAME
            self._spare_fd = -1
        else:
            temp = final.with_name(final.name[: -len(SEGMENT_SUFFIX)] + TEMP_SUFFIX)
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                if self.preallocate:
                    self.disk.allocate(fd, self.directory, self.segment_bytes)
                else:
                    self._check_growth(SEGMENT_HEADER_BYTES, f"creating segment {final.name}")
            except BaseException as error:
                os.close(fd)
                temp.unlink(missing_ok=True)
                if isinstance(error, OSError) and _no_space(error):
                    raise self._full_error(
                        f"creating segment {final.name}", self.segment_bytes
                    ) from error
                raise
        try:
            header = _segment_header_bytes(first_index, prev_term, self._journal_id)
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.rename(temp, final)
        _fsync_directory(self.directory)
        self._activate(fd, SEGMENT_HEADER_BYTES)
        self._segments.append(_Segment(final, first_index, prev_term))
        self._segment_firsts.append(first_index)

    # ---- space ----

    def _full_error(self, what: str, needed_bytes: int) -> JournalFullError:
        free = self.disk.free_bytes(self.directory)
        total = self.disk.total_bytes(self.directory)
        if not self._segments:
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

    def _check_growth(self, growth_bytes: int, what: str) -> None:
        """Without preallocation: raise JournalFullError unless a write growing a file by
        `growth_bytes` fits, with WRITE_SLACK_BYTES to spare, so ENOSPC never comes mid-batch."""
        if self.disk.free_bytes(self.directory) < growth_bytes + WRITE_SLACK_BYTES:
            raise self._full_error(what, growth_bytes + WRITE_SLACK_BYTES)

    def _ensure_room(self, end: int, what: str) -> None:
        """Before a write up to byte `end` of the active segment: the space is allocated, or there
        is room to grow the file; otherwise JournalFullError, with nothing written."""
        if end <= self._allocated_bytes:
            return
        if not self.preallocate:
            self._check_growth(end - self._allocated_bytes, what)
            return
        try:
            self.disk.allocate(self._fd, self.directory, max(self.segment_bytes, end))
        except OSError as error:
            self._allocated_bytes = os.fstat(self._fd).st_size  # a failed fallocate may keep a part
            if _no_space(error):
                raise self._full_error(what, end - self._allocated_bytes) from error
            raise self._write_failed("preallocating the active segment", error) from error
        self._allocated_bytes = os.fstat(self._fd).st_size

    def reserve_space(self) -> SpaceShortage | None:
        """Reserve room for the next segment before it is needed, so that a full disk shows while
        there is still room to write what is in flight.

        With preallocation, once the active segment is RESERVE_AHEAD_AT_FRACTION full, a spare
        segment file is preallocated (the next roll renames it into place). Without, the file
        system must keep that fraction of a segment (plus WRITE_SLACK_BYTES) free. Cheap when
        nothing has changed: call it after every append, and while it reports a shortage, now
        and then until it does not.

        Returns:
            None when the room ahead is there; otherwise what is missing. The journal still takes
            every write that fits; `append` raises JournalFullError only for one that does not.

        Raises:
            JournalWriteError: preallocating failed for another reason than space (fail-stop).
        """
        self._check_usable()
        ahead_bytes = int(self.segment_bytes * RESERVE_AHEAD_AT_FRACTION)
        if not self.preallocate:
            needed = ahead_bytes + WRITE_SLACK_BYTES
            free = self.disk.free_bytes(self.directory)
            if free >= needed:
                return None
            return self._shortage(needed, free, "keep room ahead for the journal")
        if self._spare_fd >= 0 or self._write_offset < ahead_bytes:
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
                if not _no_space(error):
                    raise self._write_failed("preallocating the next segment", error) from error
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

    def free_bytes(self) -> int:
        """Free bytes on the journal's file system (as `reserve_space` counts them)."""
        return self.disk.free_bytes(self.directory)

    # ---- state ----

    @property
    def first_index(self) -> int:
        """The first index the journal still holds (earlier ones went with retention)."""
        return self._segments[0].first_index

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def last_term(self) -> int:
        return self._last_term

    @property
    def durable_index(self) -> int:
        """Every record up to here has been fdatasynced."""
        return self._durable_index

    @property
    def segments(self) -> list[Path]:
        return [s.path for s in self._segments]

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(
                f"journal {self.directory} stopped after an earlier failure and takes no more calls "
                f"(fail-stop, never retried): {self._failure} Restart the node; it recovers from "
                "the journal."
            )
        if self._closed:
            raise JournalError(f"journal {self.directory} is closed")

    def _stop(self, error: JournalFailedError) -> JournalFailedError:
        self._failure = error
        return error

    def _sync_failed(self, what: str, error: OSError) -> JournalFailedError:
        return self._stop(
            JournalSyncError(
                f"{what} failed in journal {self.directory}: {error}. Records after index "
                f"{self._durable_index} may not be on disk, and a retried fsync could report "
                "success over lost pages (fsyncgate), so the journal stops here."
            )
        )

    def _write_failed(self, what: str, error: OSError) -> JournalFailedError:
        return self._stop(
            JournalWriteError(
                f"{what} failed in journal {self.directory}: {error}. The file's state is "
                "unknown, so the journal stops here (fail-stop); check the disk (space, errors)."
            )
        )

    # ---- appending ----

    def append(self, records: bytes | bytearray | memoryview) -> int:
        """Append one batch of whole records that continue the log; returns the new last index.

        Normally one batch and one `pwritev`; the journal rolls to a new segment first when the
        batch does not fit, and cuts a batch larger than a whole segment at record boundaries.
        Not durable until `sync`.

        Raises:
            JournalError: the bytes are not whole records, or their indexes do not continue the
                log without gaps, or a term goes backwards (nothing is written).
            JournalFullError: no room on the disk. Nothing was written, unless the batch was
                larger than a segment and cut: then the records up to `last_index` were. The
                journal stays usable; append the rest again later.
            JournalWriteError, JournalSyncError: I/O failed; the journal is stopped.
        """
        self._check_usable()
        view = memoryview(records).cast("B")
        total = len(view)
        if total == 0:
            return self._last_index
        first_index = self._last_index + 1
        expected = first_index
        term = self._last_term
        position = 0
        unpack = _RECORD_KEY.unpack_from
        while position < total:
            if position + RECORD_HEADER_BYTES > total:
                raise JournalError(
                    f"batch of {total} bytes does not end on a record boundary: {total - position} "
                    f"bytes left at offset {position} are too few for a record header"
                )
            length, record_type, index, record_term = unpack(view, position)
            if index != expected:
                raise JournalError(
                    f"record at byte {position} of the batch has index {index}, expected {expected} "
                    f"(journal last index {self._last_index}): a batch must continue the log "
                    "without gaps"
                )
            if length < RECORD_HEADER_BYTES or position + ((length + 7) & -8) > total:
                raise JournalError(
                    f"record {index} at byte {position} of a {total}-byte batch has length {length}: "
                    f"not a whole record (header {RECORD_HEADER_BYTES} bytes, must end in the batch)"
                )
            if record_term < term:
                raise JournalError(
                    f"record {index} has term {record_term} < {term}, the term before it: terms never "
                    "go backwards in a log"
                )
            if record_type == _PADDING:
                raise JournalError(
                    f"record {index} at byte {position} is ring PADDING, not a record"
                )
            term = record_term
            position += (length + 7) & -8
            expected += 1
        last_index = expected - 1
        batch_bytes = BATCH_HEADER_BYTES + total
        if (
            self._write_offset + batch_bytes > self.segment_bytes
            and self._write_offset > SEGMENT_HEADER_BYTES
        ):
            self._roll()
        if SEGMENT_HEADER_BYTES + batch_bytes > self.segment_bytes:
            self._append_split(view, first_index)
        else:
            self._write_batch(view, last_index - first_index + 1, first_index, last_index, term)
        assert self._last_index == last_index, (self._last_index, last_index)
        return self._last_index

    def _append_split(self, view: memoryview, first_index: int) -> None:
        """A batch larger than a segment: cut it at record boundaries into batches that fit."""
        capacity = self.segment_bytes - SEGMENT_HEADER_BYTES - BATCH_HEADER_BYTES
        assert self._write_offset == SEGMENT_HEADER_BYTES, self._write_offset  # rolled if not
        start = position = 0
        index = first_index
        start_index = first_index
        term = previous_term = self._last_term
        while position < len(view):
            length, _type, _index, term = _RECORD_KEY.unpack_from(view, position)
            step = (length + 7) & -8
            if step > capacity:
                raise JournalError(
                    f"record {index} of {step} bytes cannot fit a segment of {self.segment_bytes} "
                    f"bytes (room for {capacity}); raise segment_bytes"
                )
            if position + step - start > capacity:
                self._write_batch(
                    view[start:position], index - start_index, start_index, index - 1, previous_term
                )
                self._roll()
                start, start_index = position, index
            previous_term = term
            position += step
            index += 1
        self._write_batch(view[start:position], index - start_index, start_index, index - 1, term)

    def _write_batch(
        self, view: memoryview, count: int, first_index: int, last_index: int, last_term: int
    ) -> None:
        length = len(view)
        assert first_index == self._last_index + 1, (first_index, self._last_index)
        assert self._write_offset + BATCH_HEADER_BYTES + length <= max(
            self.segment_bytes, SEGMENT_HEADER_BYTES + BATCH_HEADER_BYTES + length
        ), (self._write_offset, length)
        crc = _batch_crc(length, count, first_index, last_index, view)
        header = BATCH_HEADER.pack(BATCH_MAGIC, length, crc, count, first_index, last_index)
        offset = self._write_offset
        total = BATCH_HEADER_BYTES + length
        what = f"records {first_index}..{last_index}"
        self._ensure_room(offset + total, what)
        try:
            written = os.pwritev(self._fd, [header, view], offset)
            while written < total:  # a short write: only near a full disk or on a signal
                rest = (header + bytes(view))[written:]
                step = os.pwrite(self._fd, rest, offset + written)
                if step == 0:
                    raise OSError(f"pwrite made no progress at offset {offset + written}")
                written += step
        except OSError as error:
            if not _no_space(error):
                raise self._write_failed(f"writing {what}", error) from error
            # The disk filled between the check and the write (another writer on the same file
            # system). ENOSPC is not a write-back error: the bytes before `offset` are intact,
            # so cutting the file back to `offset` undoes this write, and nothing is torn.
            try:
                os.ftruncate(self._fd, offset)
            except OSError as truncate_error:
                raise self._write_failed(
                    f"cutting back a write of {what} that found the disk full", truncate_error
                ) from truncate_error
            self._allocated_bytes = offset
            raise self._full_error(what, total) from error
        self._allocated_bytes = max(self._allocated_bytes, offset + total)
        self._write_offset = offset + total
        self._last_index = last_index
        self._last_term = last_term

    def _roll(self) -> None:
        """Start a new segment. The full one is made durable first, so a later segment never exists
        behind an earlier one with a lost tail (which recovery would read as corruption)."""
        try:
            os.fdatasync(self._fd)
        except OSError as error:
            raise self._sync_failed("fdatasync of the full segment before a roll", error) from error
        self._durable_index = self._last_index
        try:
            self._create_segment(self._last_index + 1, self._last_term)  # JournalFullError: retry
        except OSError as error:
            raise self._write_failed("creating a new segment", error) from error

    def sync(self) -> int:
        """One fdatasync covering everything appended since the last; returns the durable index.

        Raises:
            JournalSyncError: the fdatasync failed. Never retried; every later call raises too.
        """
        self._check_usable()
        if self._durable_index != self._last_index:
            try:
                os.fdatasync(self._fd)
            except OSError as error:
                raise self._sync_failed("fdatasync", error) from error
            self._durable_index = self._last_index
        return self._durable_index

    # ---- truncation and retention ----

    def truncate_after(self, index: int) -> None:
        """Drop every record after `index` (a Raft follower whose log conflicts with the leader's),
        durably, before returning.

        Later segments are deleted newest first, each deletion fsynced, so a crash leaves a prefix
        of the old log. Cutting inside a batch rewrites the segment into a temp file that is
        renamed over it: the records up to `index` are never at risk.

        Raises:
            JournalError: `index` is before the first record the journal still holds.
        """
        self._check_usable()
        if index >= self._last_index:
            return
        if index < self.first_index - 1:
            raise JournalError(
                f"cannot truncate after index {index}: the journal starts at {self.first_index} "
                "(earlier records went with retention); install a snapshot instead"
            )
        target = index + 1
        position = bisect.bisect_right(self._segment_firsts, target) - 1
        assert position >= 0, (target, self._segment_firsts)
        try:
            while len(self._segments) > position + 1:
                doomed = self._segments.pop()
                self._segment_firsts.pop()
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                doomed.path.unlink()
                _fsync_directory(self.directory)
            segment = self._segments[position]
            cut, split, term_before = self._locate(segment, target)
            if split is None:
                fd = os.open(segment.path, os.O_RDWR)
                self._close_active()
                self._fd = fd
                os.ftruncate(fd, cut)
                if self.preallocate:
                    self._allocate_if_room(fd, max(self.segment_bytes, cut))
                os.fsync(fd)
                self._activate(fd, cut)
            else:
                self._rewrite_with_prefix(segment, cut, split, index)
        except OSError as error:
            raise self._write_failed(f"truncating after index {index}", error) from error
        self._last_index = index
        self._last_term = term_before
        self._durable_index = min(self._durable_index, index)

    def _close_active(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _locate(self, segment: _Segment, target: int) -> tuple[int, _Batch | None, int]:
        """(offset of the batch holding `target`, that batch if `target` is inside it rather than
        its first record, term of record target - 1)."""
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            window = _FileWindow(fd)
            offset = SEGMENT_HEADER_BYTES
            term_before = segment.prev_term
            while True:
                batch = _read_batch(window, offset)
                assert batch.status == _OK, (segment.path, offset, batch.reason)
                if batch.first_index == target:
                    return offset, None, term_before
                if batch.first_index < target <= batch.last_index:
                    records = _batch_records(batch)
                    return offset, batch, records[target - batch.first_index - 1].term
                term_before = _last_term_of(batch)
                offset = batch.end
        finally:
            os.close(fd)

    def _rewrite_with_prefix(self, segment: _Segment, cut: int, batch: _Batch, index: int) -> None:
        """Replace `segment` by a copy holding everything before `cut` plus the records of `batch`
        up to `index`, via temp file + fsync + rename + directory fsync."""
        records = _batch_records(batch)
        kept = records[: index - batch.first_index + 1]
        payload = b"".join(bytes(r.raw) for r in kept)
        crc = _batch_crc(len(payload), len(kept), batch.first_index, index, memoryview(payload))
        header = BATCH_HEADER.pack(
            BATCH_MAGIC, len(payload), crc, len(kept), batch.first_index, index
        )
        temp = segment.path.with_name(segment.path.name[: -len(SEGMENT_SUFFIX)] + TEMP_SUFFIX)
        source = os.open(segment.path, os.O_RDONLY)
        target = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            if self.preallocate:
                self.disk.allocate(target, self.directory, self.segment_bytes)
            copied = 0
            while copied < cut:
                chunk = os.pread(source, min(READ_CHUNK_BYTES, cut - copied), copied)
                assert chunk, (segment.path, copied)
                os.pwrite(target, chunk, copied)
                copied += len(chunk)
            end = cut + len(header) + len(payload)
            os.pwritev(target, [header, payload], cut)
            os.fsync(target)
        except BaseException:
            os.close(target)
            raise
        finally:
            os.close(source)
        self._close_active()
        os.rename(temp, segment.path)
        _fsync_directory(self.directory)
        self._activate(target, end)

    def delete_segments_before(self, index: int) -> list[Path]:
        """Retention: delete the segments whose records all come before `index` (a snapshot covers
        them), oldest first; never the active segment. Returns the deleted paths."""
        self._check_usable()
        deleted = []
        try:
            while len(self._segments) > 1 and self._segments[1].first_index - 1 < index:
                doomed = self._segments.pop(0)
                self._segment_firsts.pop(0)
                doomed.path.unlink()
                _fsync_directory(self.directory)
                deleted.append(doomed.path)
        except OSError as error:
            raise self._write_failed("deleting a segment", error) from error
        return deleted

    # ---- reading back ----

    def reader(self, from_index: int = 1) -> JournalReader:
        """A reader from `from_index` (it reads the files; it does not share the writer's state)."""
        return JournalReader(self.directory, from_index)

    def term_at(self, index: int) -> int:
        """The term of record `index` (for Raft's consistency check); `first_index - 1` gives the
        term before the first retained record.

        Raises:
            JournalError: `index` is outside [first_index - 1, last_index].
        """
        self._check_usable()
        if index == self._last_index:
            return self._last_term
        if index == self.first_index - 1:
            return self._segments[0].prev_term
        if not self.first_index <= index <= self._last_index:
            raise JournalError(
                f"index {index} is outside the journal ({self.first_index}..{self._last_index})"
            )
        for record in read_records(self.directory, index, index):
            return record.term
        raise AssertionError(f"record {index} not found in {self.directory}")

    def close(self) -> None:
        """Close the files and release the lock. Does not sync: call `sync` first."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        self._close_active()
        if self._spare_fd >= 0:  # give the space back; the next writer reserves it again
            os.close(self._spare_fd)
            self._spare_fd = -1
            (self.directory / SPARE_NAME).unlink(missing_ok=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- replay --------------------------------------------------------------------------------------


class JournalReader:
    """Reads records in index order from `from_index`, following a journal that may be live.

    Returns only complete, CRC-valid batches. At the end of the last segment, bad or unfinished
    bytes are taken as a write in progress and read again on the next call; once a newer segment
    exists the older one is complete, so bad bytes there are corruption. No lock is taken; the
    writer's `truncate_after` can drop records a reader has already returned (the blp reads only
    up to the commit index, which truncation never crosses).
    """

    def __init__(self, directory: Path | str, from_index: int = 1) -> None:
        assert from_index >= 1, from_index
        self.directory = Path(directory)
        self.next_index = from_index  # the next record this reader returns
        self._fd = -1
        self._path: Path | None = None
        self._first_index = 0
        self._window: _FileWindow | None = None
        self._offset = 0  # the batch holding next_index, or where it will be written
        self._expected = 0  # the first index of the batch at `_offset`
        self.stopped_at: Damage | None = (
            None  # bad bytes at the live end, if the last read hit some
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self, path: Path, first_index: int) -> None:
        self.close()
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise JournalError(
                f"journal segment {path} disappeared while reading (retention deleted it?); "
                "start again from a snapshot at or after its records"
            ) from None
        self._path = path
        self._window = _FileWindow(self._fd)
        header = _read_segment_header(path, self._window)
        assert header.first_index == first_index, (path, header.first_index, first_index)
        self._first_index = first_index
        self._offset = SEGMENT_HEADER_BYTES
        self._expected = first_index

    def _start(self) -> bool:
        segments = list_segments(self.directory)
        if not segments:
            return False
        firsts = [first for first, _ in segments]
        position = bisect.bisect_right(firsts, self.next_index) - 1
        if position < 0:
            raise JournalError(
                f"record {self.next_index} is no longer in journal {self.directory}: it starts at "
                f"{firsts[0]} (earlier segments went with retention); start from a snapshot"
            )
        self._open(segments[position][1], firsts[position])
        return True

    def _newer_segment(self) -> tuple[int, Path] | None:
        for first, path in list_segments(self.directory):
            if first > self._first_index:
                return first, path
        return None

    def read(self, to_index: int | None = None) -> Iterator[Record]:
        """Every record from `next_index` up to `to_index` (or the end) available now.

        Records are views into the reader's buffers, valid while referenced. Call again later to
        continue where this stopped. Breaking out of the loop loses nothing: `next_index` counts
        only records handed out.

        Raises:
            JournalCorruptError: damage in a segment that a newer segment follows, or a gap.
        """
        for batch in self._batches(to_index):
            records = _batch_records(batch)
            begin = self.next_index - batch.first_index
            end = len(records) if to_index is None else to_index - batch.first_index + 1
            for record in records[begin:end]:
                self.next_index = record[3] + 1  # record.index; an item is faster
                yield record

    def read_runs(self, to_index: int | None = None) -> Iterator[memoryview]:
        """Like `read`, but one view per batch of the whole records it holds in range.

        The replay fast path: no per-record objects here; the caller walks the run (each
        record's first word is its length). Same guarantees and errors as `read`.
        """
        for batch in self._batches(to_index):
            records = batch.records
            begin = _offset_of(records, batch.first_index, self.next_index)
            last = batch.last_index if to_index is None or to_index >= batch.last_index else to_index
            end = batch.length if last == batch.last_index else _offset_of(records, batch.first_index, last + 1)
            self.next_index = last + 1
            yield records[begin:end]

    def _batches(self, to_index: int | None) -> Iterator[_Batch]:
        """CRC-valid batches holding `next_index` onwards, in order; the consumer advances
        `next_index` past what it takes from each."""
        if self._fd < 0 and not self._start():
            return
        assert self._window is not None
        self._window.invalidate()
        self.stopped_at = None
        while to_index is None or self.next_index <= to_index:
            batch = _read_batch(self._window, self._offset)
            if batch.status == _OK and batch.first_index != self._expected:
                reason = (
                    f"batch of records {batch.first_index}..{batch.last_index} where index "
                    f"{self._expected} was expected"
                )
                batch = batch._replace(status=_BAD, reason=reason)
            if batch.status == _OK:
                if batch.last_index >= self.next_index:
                    yield batch  # the consumer advances next_index past what it took
                    if to_index is not None and self.next_index > to_index:
                        return
                self._offset = batch.end
                self._expected = batch.last_index + 1
                continue
            newer = self._newer_segment()
            if newer is None:
                if batch.status == _BAD:
                    assert self._path is not None
                    claimed = (batch.first_index, batch.last_index) if batch.first_index else None
                    self.stopped_at = Damage(
                        self._path, batch.offset, batch.offset, batch.reason, claimed, None
                    )
                return
            # The writer finished this segment before it created the next: look once more.
            self._window.invalidate()
            again = _read_batch(self._window, self._offset)
            if again.status == _OK:
                continue
            if again.status == _BAD:
                assert self._path is not None
                claimed = (again.first_index, again.last_index) if again.first_index else None
                damage = Damage(self._path, again.offset, again.offset, again.reason, claimed, None)
                raise _corrupt(damage, "A newer segment follows, so this segment is complete.")
            first, path = newer
            if first != self._expected:
                raise JournalCorruptError(
                    f"journal segment {path} starts at index {first}, but {self._path} ends at "
                    f"index {self._expected - 1}: records are missing. Restore the journal from a "
                    "replica or a backup."
                )
            self._open(path, first)


def read_records(
    directory: Path | str, from_index: int = 1, to_index: int | None = None
) -> Iterator[Record]:
    """Replay records `from_index`..`to_index` (or to the end) of the journal in `directory`.

    Safe on a journal another process is appending to: only complete, CRC-valid batches are read.
    With `to_index`, every record up to it must be there.

    Raises:
        JournalCorruptError: damage in the middle of the log.
        JournalError: `from_index` went with retention; or `to_index` was asked for and the
            journal ends (or is damaged) before it.
    """
    yield from _replay(directory, from_index, to_index, JournalReader.read)


def read_runs(
    directory: Path | str, from_index: int = 1, to_index: int | None = None
) -> Iterator[memoryview]:
    """`read_records` as runs of whole records, one view per batch: the replay fast path
    (`JournalReader.read_runs`). Same guarantees and errors."""
    yield from _replay(directory, from_index, to_index, JournalReader.read_runs)


_Item = TypeVar("_Item")


def _replay(
    directory: Path | str,
    from_index: int,
    to_index: int | None,
    read: Callable[[JournalReader, int | None], Iterator[_Item]],
) -> Iterator[_Item]:
    reader = JournalReader(directory, from_index)
    with contextlib.closing(reader):
        yield from read(reader, to_index)
        if to_index is not None and reader.next_index <= to_index:
            where = f": bad bytes at {reader.stopped_at.describe()}" if reader.stopped_at else ""
            raise JournalError(
                f"journal {directory} ends before index {to_index} (the next record would be "
                f"{reader.next_index}){where}"
            )
