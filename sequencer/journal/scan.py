"""Reading segment files and diagnosing damage: the checks behind recovery and `seqd log check`.

`scan_segment` walks one segment (header, every batch, then the bytes after the last) and reports
the first bad bytes as `Damage`, never raising on them: whether they are a torn tail (cut at
start-up) or corruption (refuse to start) depends on where the segment sits in the journal, which
the writer's recovery and `logtools.check` decide with `segments_join` and `Damage`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sequencer.journal.errors import JournalCorruptError, JournalError
from sequencer.journal.format import (
    BATCH_MAGIC_BYTES,
    SEGMENT_HEADER_BYTES,
    Batch,
    BatchStatus,
    SegmentHeader,
    batch_records,
    continuing,
    decode_segment_header,
    last_term_of,
    read_batch,
    segment_first_index,
)

__all__ = [
    "READ_CHUNK_BYTES",
    "Damage",
    "FileWindow",
    "SegmentScan",
    "corrupt",
    "corrupt_before_a_valid_batch",
    "list_segments",
    "read_segment_header",
    "scan_segment",
    "segments_join",
]

# Readers pull the file through one buffer this large and hand out views into it: large enough
# that the syscall is amortised over thousands of records, small enough that following a live
# tail re-reads little.
READ_CHUNK_BYTES = 1 << 20
# Recovery reads the zero tail of a preallocated segment in chunks this large.
TAIL_SCAN_CHUNK_BYTES = 4 << 20
assert TAIL_SCAN_CHUNK_BYTES % 8 == 0


class FileWindow:
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


def list_segments(directory: Path | str) -> list[tuple[int, Path]]:
    """(first index, path) of every segment file, oldest first; other files are ignored."""
    directory = Path(directory)
    found = []
    if not directory.is_dir():
        raise JournalError(f"no journal at {directory}: not a directory")
    with os.scandir(directory) as entries:
        for entry in entries:
            first_index = segment_first_index(entry.name)
            if first_index is not None:
                found.append((first_index, directory / entry.name))
    found.sort()
    return found


def read_segment_header(path: Path, window: FileWindow) -> SegmentHeader:
    """The header of segment `path`, checked, and its name checked against it.

    Raises:
        JournalCorruptError: a bad header, or a name that is not its first index.
        JournalError: another layout version.
    """
    header = decode_segment_header(window.view(0, SEGMENT_HEADER_BYTES), str(path))
    named = segment_first_index(path.name)
    if named is not None and named != header.first_index:
        raise JournalCorruptError(
            f"journal segment {path} is named for index {named} but its header says "
            f"{header.first_index}: renamed by hand? Restore the journal from a replica or a backup."
        )
    return header


@dataclass(frozen=True)
class Damage:
    """The first bad bytes found in a segment."""

    path: Path
    offset: int  # where the bad batch (or the stray bytes) starts
    end_offset: int  # end of the non-zero bytes from `offset`: what a repair copies aside
    reason: str
    claimed_indexes: tuple[int, int] | None  # what the bad header claims, when it claims anything
    valid_batch_offset: int | None  # a CRC-valid batch after the damage: not a torn tail

    @classmethod
    def at(cls, path: Path, batch: Batch) -> Damage:
        """The damage a bad batch is, as a reader sees it (no look beyond it)."""
        return cls(path, batch.offset, batch.offset, batch.reason, batch.claimed_indexes, None)

    def describe(self) -> str:
        claimed = (
            f" (the batch header claims records {self.claimed_indexes[0]}..{self.claimed_indexes[1]})"
            if self.claimed_indexes
            else ""
        )
        return f"{self.path} at byte offset {self.offset}{claimed}: {self.reason}"


def corrupt(damage: Damage, context: str) -> JournalCorruptError:
    """The error for damage that is not a torn tail: what to do, and what not to."""
    return JournalCorruptError(
        f"journal corrupt in {damage.describe()}. {context} This is not a torn tail from a crash, so "
        "seqd will not repair it: restore this node's journal from a replica (remove the node's "
        "data and let it catch up from the cluster) or from a backup. Do not delete or truncate "
        "the file by hand; `seqd log check` reports the first damaged offset."
    )


def corrupt_before_a_valid_batch(damage: Damage | None) -> JournalCorruptError | None:
    """The error for `damage` that a valid batch follows (corruption wherever it is: neither a
    torn tail nor a write in progress, which have nothing valid after them), else None."""
    if damage is None or damage.valid_batch_offset is None:
        return None
    return corrupt(damage, f"A valid batch follows at byte offset {damage.valid_batch_offset}.")


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


def segments_join(previous: SegmentScan, scan: SegmentScan) -> bool:
    """`scan` continues `previous`: its first index and the term before it follow on."""
    return scan.first_index == previous.last_index + 1 and scan.prev_term == previous.last_term


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
        window = FileWindow(fd, TAIL_SCAN_CHUNK_BYTES)
        file_bytes = os.fstat(fd).st_size
        header = read_segment_header(path, window)
        valid, batches, records, stop = _valid_batches(window, header.first_index, walk_records)
        offset = stop.offset
        expected = valid.last_index + 1 if valid is not None else header.first_index
        damage = _damage_after(path, window, stop, expected, file_bytes)
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
            last_term=last_term_of(valid) if valid is not None else header.prev_term,
            damage=damage,
        )
    finally:
        os.close(fd)


def _valid_batches(
    window: FileWindow, first_index: int, walk_records: bool
) -> tuple[Batch | None, int, int, Batch]:
    """Follow the valid batches from the segment header: (the last valid batch, batches,
    records, the batch that stopped the walk: END or BAD)."""
    offset = SEGMENT_HEADER_BYTES
    expected = first_index
    batches = records = 0
    last_valid: Batch | None = None
    while True:
        batch = continuing(read_batch(window.view, offset), expected)
        if batch.status == BatchStatus.OK and walk_records:
            try:
                batch_records(batch)
            except JournalCorruptError as error:
                batch = batch._replace(status=BatchStatus.BAD, reason=str(error))
        if batch.status != BatchStatus.OK:
            return last_valid, batches, records, batch
        batches += 1
        records += batch.record_count
        expected = batch.last_index + 1
        offset = batch.end
        last_valid = batch


def _damage_after(
    path: Path, window: FileWindow, stop: Batch, expected: int, file_bytes: int
) -> Damage | None:
    """What is wrong from `stop` (the batch that ended the walk) on, if anything.

    Whatever stopped the walk, the bytes from there on must be zeros for the segment to be clean;
    if they are not, look for a valid batch further on (which makes it corruption). A batch
    written after the damaged one continues the log: with the damaged header intact its
    successor is exactly last_index + 1 (the log is gapless).
    """
    offset = stop.offset
    bad = stop.status == BatchStatus.BAD
    successor = (
        stop.last_index + 1
        if bad and stop.first_index == expected and stop.last_index >= expected
        else None
    )
    nonzero_end, valid_after = _scan_tail(window, offset, file_bytes, expected, successor)
    if bad and stop.records:
        # The batch passed its CRC (it kept its record view) yet does not belong here: bytes
        # written whole, so not a torn write.
        valid_after = offset
    if not bad and nonzero_end <= offset:
        return None
    reason = stop.reason if bad else "non-zero bytes after the last batch"
    return Damage(path, offset, max(nonzero_end, offset), reason, stop.claimed_indexes, valid_after)


def _scan_tail(
    window: FileWindow, start: int, file_bytes: int, expected_index: int, successor: int | None
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
    probe = FileWindow(window.fd)
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
                        found = read_batch(probe.view, candidate)
                        if found.status == BatchStatus.OK and (
                            found.first_index == successor if successor is not None
                            else found.first_index >= expected_index
                        ):
                            valid_after = candidate
                            break
                    hit = chunk.find(BATCH_MAGIC_BYTES, hit + 1, used)
        position += len(chunk)
    return nonzero_end, valid_after
