"""Crash-safe truncation of the journal's tail: what a Raft follower does on a conflict.

Theory of operation. A follower whose log conflicts with the leader's drops every record after the
last matching one (Raft paper, 5.3), and the drop must be atomic across a crash: once the caller
has been told the log ends at `index`, no record after it may come back, and at no instant may a
record at or below `index` be at risk (the follower may have acknowledged it; the leader counted
it toward a commit). A truncation touches several files (the segments after the cut are deleted,
the segment holding the cut is cut, and a cut inside a batch rewrites that batch shorter, because
its CRC covers all of it), so it is made atomic with a redo record, the *intent*:

    1. write `truncate.intent.tmp`: where to cut, and the replacement batch (the kept records of
       a batch cut inside, re-framed with their own CRC); fsync it
    2. rename it to `truncate.intent`, fsync the directory      <- the commit point
    3. delete the later segments, newest first, fsyncing the directory after each
    4. write the replacement batch over the cut batch in place, cut the file after it, fsync
    5. remove the intent, fsync the directory

A crash before 2 leaves the old log whole (the temp file is removed at the next open; the caller
was never told otherwise). A crash at or after 2 leaves the intent, and `Journal.open` redoes
steps 3 to 5 before it looks at any segment, so the truncation completes. Every redo step is
idempotent: deleting a segment already gone, writing the same bytes at the same offset, cutting
at the same length. Step 4 overwrites the kept records of the cut batch in place, but their copy
in the intent is durable first, so a torn overwrite is rewritten by the redo. Recovery must not
run its torn-tail repair before the redo: a half-overwritten batch followed by old batches looks
like corruption, or worse, like a torn tail whose cut would drop kept records.

Space: only the intent needs new room (at most one batch); the rewrite happens inside bytes the
segment already holds. On a full disk the truncation raises `JournalFullError` before its commit
point and the journal is unchanged: the caller retries later, as with `append`.

The in-memory state of the writer is `writer.py`'s; this module only does the files.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crc32c

from sequencer.journal.errors import JournalCorruptError, JournalError
from sequencer.journal.format import (
    BATCH_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    decode_segment_header,
    segment_name,
)
from sequencer.journal.repair import fsync_directory
from sequencer.journal.scan import list_segments
from sequencer.journal.space import DiskSpace

__all__ = [
    "INTENT_NAME",
    "INTENT_TEMP_NAME",
    "TRUNCATION_STEPS",
    "TruncationIntent",
    "decode_intent",
    "encode_intent",
    "finish_interrupted_truncation",
    "finish_truncation",
    "write_intent",
]

INTENT_NAME = "truncate.intent"
INTENT_TEMP_NAME = "truncate.intent.tmp"
INTENT_MAGIC = b"SQDTRUNC"
INTENT_LAYOUT_VERSION = 1
# magic, layout version, header bytes, replacement batch bytes (0: the cut is at a batch boundary),
# index (the last record kept), term of that record, first index of the segment cut, byte offset
# of the cut in it, journal id, crc32c of the header (crc zeroed) and the replacement batch, pad.
INTENT_HEADER = struct.Struct("<8sHHIQQQQ16sI4x")
INTENT_HEADER_BYTES = 72
INTENT_CRC_OFFSET = 64
assert INTENT_HEADER.size == INTENT_HEADER_BYTES
assert INTENT_HEADER_BYTES % 8 == 0

# Where a crash can land; the test hook is called after each (`Journal.truncation_hook`).
TRUNCATION_STEPS = (
    "intent_written",  # 1: the temp file is written and fsynced; not yet the commit point
    "intent_durable",  # 2: renamed and the directory fsynced: the truncation will complete
    "segment_deleted",  # 3: one later segment deleted (once per segment)
    "batch_rewritten",  # 4a: the replacement batch is written in place, the file not yet cut
    "segment_cut",  # 4b: the segment is cut after it and fsynced
    "intent_removed",  # 5: done
)

StepHook = Callable[[str], None]


@dataclass(frozen=True)
class TruncationIntent:
    """Everything needed to finish a truncation after a crash, with no other state.

    Invariant: the segment `segment_first_index` holds every record from its first through
    `index`, with the batches before `cut_offset` untouched and `replacement` (whole records up
    to `index`, CRC-framed) at `cut_offset`.
    """

    index: int  # the last record kept
    term: int  # its term (the segment's prev term when the segment keeps no record)
    segment_first_index: int
    cut_offset: int
    journal_id: bytes
    replacement: bytes  # a whole batch, or b"" when the cut is at a batch boundary

    def __post_init__(self) -> None:
        assert self.cut_offset >= SEGMENT_HEADER_BYTES, self.cut_offset
        assert self.cut_offset % 8 == 0, self.cut_offset
        assert self.segment_first_index <= self.index + 1, (self.segment_first_index, self.index)
        assert not self.replacement or len(self.replacement) > BATCH_HEADER_BYTES

    @property
    def end_offset(self) -> int:
        """Where the segment ends after the truncation: the next append goes here."""
        return self.cut_offset + len(self.replacement)


def encode_intent(intent: TruncationIntent) -> bytes:
    header = INTENT_HEADER.pack(
        INTENT_MAGIC, INTENT_LAYOUT_VERSION, INTENT_HEADER_BYTES, len(intent.replacement),
        intent.index, intent.term, intent.segment_first_index, intent.cut_offset,
        intent.journal_id, 0,
    )  # fmt: skip
    crc = crc32c.crc32c(intent.replacement, crc32c.crc32c(header))
    header = header[:INTENT_CRC_OFFSET] + struct.pack("<I", crc) + header[INTENT_CRC_OFFSET + 4 :]
    return header + intent.replacement


def decode_intent(data: bytes, where: str) -> TruncationIntent:
    """The intent in `data`, checked.

    Raises:
        JournalCorruptError: bad magic, version, length or CRC. The intent is renamed into place
            only after it was fsynced, so this is damage, not a crash artefact.
    """

    def damaged(what: str) -> JournalCorruptError:
        return JournalCorruptError(
            f"truncation intent {where} is damaged ({what}): a truncation of the journal was "
            "interrupted and cannot be finished safely. Restore the journal from a replica (in a "
            "cluster, remove the node's data and let it catch up) or a backup; do not delete the "
            "file by hand."
        )

    if len(data) < INTENT_HEADER_BYTES:
        raise damaged(f"{len(data)} bytes, shorter than its {INTENT_HEADER_BYTES}-byte header")
    (magic, version, header_bytes, replacement_bytes, index, term, segment_first_index,
     cut_offset, journal_id, crc) = INTENT_HEADER.unpack_from(data)  # fmt: skip
    if magic != INTENT_MAGIC:
        raise damaged(f"magic {magic!r}, expected {INTENT_MAGIC!r}")
    if version != INTENT_LAYOUT_VERSION or header_bytes != INTENT_HEADER_BYTES:
        raise JournalError(
            f"truncation intent {where} has layout version {version} ({header_bytes}-byte "
            f"header); this seqd knows version {INTENT_LAYOUT_VERSION}: open the journal with the "
            "seqd that wrote it, which finishes the truncation"
        )
    if len(data) != INTENT_HEADER_BYTES + replacement_bytes:
        raise damaged(f"{len(data)} bytes, its header says {INTENT_HEADER_BYTES + replacement_bytes}")
    zeroed = data[:INTENT_CRC_OFFSET] + bytes(4) + data[INTENT_CRC_OFFSET + 4 : INTENT_HEADER_BYTES]
    computed = crc32c.crc32c(data[INTENT_HEADER_BYTES:], crc32c.crc32c(zeroed))
    if computed != crc:
        raise damaged(f"CRC-32C mismatch (stored 0x{crc:08x}, computed 0x{computed:08x})")
    return TruncationIntent(
        index, term, segment_first_index, cut_offset, journal_id, data[INTENT_HEADER_BYTES:]
    )


def _no_hook(step: str) -> None:
    pass


def write_intent(
    directory: Path, intent: TruncationIntent, disk: DiskSpace, hook: StepHook = _no_hook
) -> None:
    """Steps 1 and 2: make the intent durable under its final name (the commit point).

    Raises:
        OSError: writing failed (ENOSPC included); the temp file is removed and the journal is
            as it was.
    """
    temp = directory / INTENT_TEMP_NAME
    data = encode_intent(intent)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        disk.grow(fd, directory, len(data))
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    hook("intent_written")
    os.rename(temp, directory / INTENT_NAME)
    fsync_directory(directory)
    hook("intent_durable")


def finish_interrupted_truncation(directory: Path, hook: StepHook = _no_hook) -> int | None:
    """Recovery, before anything looks at a segment: finish a truncation a crash interrupted
    after its commit point; forget one interrupted before it. Returns the index the journal was
    truncated after, or None when there was nothing to finish.

    Raises:
        JournalCorruptError: the intent is damaged, or does not match the segments.
        OSError: the redo failed.
    """
    temp = directory / INTENT_TEMP_NAME
    if temp.exists():  # before the commit point: the old log stands
        temp.unlink()
        fsync_directory(directory)
    path = directory / INTENT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    intent = decode_intent(data, str(path))
    finish_truncation(directory, intent, hook)
    return intent.index


def finish_truncation(directory: Path, intent: TruncationIntent, hook: StepHook = _no_hook) -> None:
    """Steps 3 to 5, once the intent is durable; idempotent, so a crash in the middle of a redo
    is redone too.

    Raises:
        JournalCorruptError: the segment to cut is missing or belongs to another journal.
        OSError: I/O failed; the next open finishes.
    """
    segments = list_segments(directory)
    target = directory / segment_name(intent.segment_first_index)
    if not any(path == target for _, path in segments):
        raise JournalCorruptError(
            f"truncation intent {directory / INTENT_NAME} cuts segment {target.name}, which is not "
            f"in {directory}: the journal changed under an interrupted truncation. Restore it "
            "from a replica or a backup."
        )
    for first_index, path in reversed(segments):
        if first_index > intent.segment_first_index:
            path.unlink()
            fsync_directory(directory)
            hook("segment_deleted")
    fd = os.open(target, os.O_RDWR)
    try:
        _check_journal_id(fd, target, intent)
        if intent.replacement:
            written = os.pwrite(fd, intent.replacement, intent.cut_offset)
            assert written == len(intent.replacement), (written, len(intent.replacement))
            hook("batch_rewritten")
        os.ftruncate(fd, intent.end_offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    hook("segment_cut")
    (directory / INTENT_NAME).unlink()
    fsync_directory(directory)
    hook("intent_removed")


def _check_journal_id(fd: int, path: Path, intent: TruncationIntent) -> None:
    """The segment is the one the intent was written for (the same journal)."""
    header = decode_segment_header(os.pread(fd, SEGMENT_HEADER_BYTES, 0), str(path))
    if header.journal_id != intent.journal_id:
        raise JournalCorruptError(
            f"truncation intent in {path.parent} was written for journal id "
            f"{intent.journal_id.hex()}, but {path} belongs to {header.journal_id.hex()}: a "
            "segment copied in from elsewhere? Restore the journal from a replica or a backup."
        )
