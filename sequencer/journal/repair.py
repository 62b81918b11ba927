"""What `Journal.open` does to the files before the writer takes over: recovery of the journal.

Zero bytes after the last batch of a preallocated segment are normal. In the *last* segment, a
bad batch after which no valid batch follows is a torn tail: the writer crashed mid-append,
before `sync` returned, so nothing in it was acknowledged. Its bytes are copied to
`<segment>.broken-<offset>`, the tail is cut and the cut made durable, once. Recovery never needs
free space: when the disk has no room for the copy, it cuts without one and says so (and leaves
no empty or partial copy behind). Anything else (a bad batch followed by a valid one, damage in a
non-last segment, a gap in the indexes, a bad segment header) is corruption in the middle of the
log: `JournalCorruptError` refuses to start, naming the file and the byte offset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sequencer.journal.errors import JournalCorruptError, no_space
from sequencer.journal.format import SPARE_NAME, TEMP_SUFFIX
from sequencer.journal.scan import (
    Damage,
    SegmentScan,
    corrupt,
    corrupt_before_a_valid_batch,
    list_segments,
    scan_segment,
    segments_join,
)
from sequencer.journal.space import SpaceReservation

__all__ = ["RecoveryReport", "TornTail", "fsync_directory", "recover_segments"]


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
    # An interrupted truncation this open finished (truncate.py): the index it kept up to.
    truncation_finished: int | None = None

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
        if self.truncation_finished is not None:
            text += f"; finished an interrupted truncation after index {self.truncation_finished}"
        return text


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries durable (ALICE: a new or removed name is durable only after
    its directory is)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_segments(
    directory: Path, space: SpaceReservation
) -> tuple[list[SegmentScan], TornTail | None, list[Path]]:
    """Check the segments of `directory` and cut a torn tail: (the scans, oldest first, as they
    are after the repair; the torn tail cut; unfinished files removed). No scans: a new journal.

    Raises:
        JournalCorruptError: damage other than a torn tail; names the file and offset.
        OSError: reading, cutting or copying failed.
    """
    removed = _remove_unfinished(directory)
    scans = [scan_segment(path) for _, path in list_segments(directory)]
    if not scans:
        return scans, None, removed
    _check_chain(directory, scans)
    last = scans[-1]
    if last.damage is None:
        return scans, None, removed
    if (error := corrupt_before_a_valid_batch(last.damage)) is not None:
        raise error
    return scans, _repair_torn_tail(last.damage, space), removed


def _remove_unfinished(directory: Path) -> list[Path]:
    """Delete the spare (it holds no record; it is reserved again when needed) and the temp
    files of rolls that crashed before their rename (never part of the journal)."""
    (directory / SPARE_NAME).unlink(missing_ok=True)
    removed = []
    for temp in sorted(directory.glob("*" + TEMP_SUFFIX)):
        temp.unlink()
        removed.append(temp)
    if removed:
        fsync_directory(directory)
    return removed


def _check_chain(directory: Path, scans: list[SegmentScan]) -> None:
    """The segments are one journal and one log; damage only in the last may be a torn tail.

    Raises:
        JournalCorruptError: naming the segment and what is wrong.
    """
    journal_id = scans[0].journal_id
    previous: SegmentScan | None = None
    for scan in scans:
        if scan.journal_id != journal_id:
            raise JournalCorruptError(
                f"journal segment {scan.path} belongs to another journal (id "
                f"{scan.journal_id.hex()}, expected {journal_id.hex()} as in "
                f"{scans[0].path}): a file copied in from elsewhere? Move it out of "
                f"{directory} (or restore the journal from a replica or a backup)."
            )
        if previous is not None and not segments_join(previous, scan):
            raise JournalCorruptError(
                f"journal segment {scan.path} starts at index {scan.first_index} after term "
                f"{scan.prev_term}, but {previous.path} ends at index {previous.last_index} in "
                f"term {previous.last_term}: records are missing between them. Restore the "
                "journal from a replica or a backup; do not delete files by hand."
            )
        if scan.damage is not None and scan is not scans[-1]:
            raise corrupt(scan.damage, "The damage is in a segment that is not the last one.")
        previous = scan


def _repair_torn_tail(damage: Damage, space: SpaceReservation) -> TornTail:
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
        copy_error = _keep_copy(broken, damaged, space) if damaged else "nothing to copy"
        os.ftruncate(fd, damage.offset)
        if space.preallocate:
            space.allocate_if_room(fd, max(space.segment_bytes, damage.offset))
        os.fsync(fd)
    finally:
        os.close(fd)
    kept = broken if copy_error is None else None
    return TornTail(damage.path, damage.offset, len(damaged), kept, damage.reason, copy_error)


def _keep_copy(broken: Path, damaged: bytes, space: SpaceReservation) -> str | None:
    """Write `damaged` to `broken` and make it durable. Returns None, or why there is no copy:
    the disk had no room. Either way no empty or partial copy is left behind: it would pass
    for evidence that is not there.

    Raises:
        OSError: the copy failed for another reason than space (the copy is removed too).
    """
    directory = space.directory
    try:
        copy = os.open(broken, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except OSError as error:
        if no_space(error):
            return str(error)
        raise
    try:
        space.disk.grow(copy, directory, len(damaged))
        written = 0
        while written < len(damaged):
            written += os.write(copy, damaged[written:])
        os.fsync(copy)
    except OSError as error:
        os.close(copy)
        broken.unlink(missing_ok=True)
        fsync_directory(directory)
        if no_space(error):
            return str(error)
        raise
    os.close(copy)
    fsync_directory(directory)
    return None
