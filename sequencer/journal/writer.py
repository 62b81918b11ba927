"""The writer of one journal directory: recovery at open, append, group commit, roll, truncation
and retention (docs/journal.md has the long form).

Writing. `append` validates the records at the gateway (`format.check_records`: gapless indexes
continuing the log, non-decreasing terms, whole records) and writes header + records with one
`pwritev`. `sync` is one fdatasync for everything appended since the last: group commit. A segment
is preallocated (no file-size metadata change on each append) and the journal rolls to a new one
when a batch does not fit; a batch never spans two segments. A new segment is created as a temp
file, written, fsynced, renamed into place, and the directory fsynced (ALICE: a new name is
durable only after its directory is), and the full segment is fdatasynced *before* the new one
exists, so no crash can leave a later segment behind an earlier one with a lost tail. Room on
the disk is reserved ahead (`space.py`): a full disk is a state, not a failure.

Fail-stop. A failed fsync is never retried (fsyncgate: after a write-back error Linux may mark the
pages clean, and a retried fsync "succeeds" over lost data). The journal raises
`JournalSyncError` and refuses every later call; the node stops and recovers from the journal.

Recovery (`Journal.open`). Zero bytes after the last batch of a preallocated segment are normal.
In the *last* segment, a bad batch (bad magic, implausible header, cut short, CRC mismatch) after
which no valid batch follows is a torn tail: the writer crashed mid-append, before `sync` returned,
so nothing in it was acknowledged. Its bytes are copied to `<segment>.broken-<offset>`, the tail is
cut and the cut made durable, once. Recovery never needs free space: when the disk has no room for
the copy, it cuts without one and says so (and leaves no empty or partial copy behind). Anything
else (a bad batch followed by a valid one, damage in a non-last segment, a gap in the indexes, a
bad segment header) is corruption in the middle of the log and `JournalCorruptError` refuses to
start, naming the file and the byte offset: it cannot be a crash artefact, so repairing it
automatically could drop acknowledged records.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sequencer.journal.errors import (
    JournalError,
    JournalFailedError,
    JournalLockedError,
    JournalSyncError,
    JournalWriteError,
    no_space,
)
from sequencer.journal.format import (
    BATCH_HEADER_BYTES,
    JOURNAL_ID_BYTES,
    LOCK_NAME,
    SEGMENT_BYTES_DEFAULT,
    SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN,
    SEGMENT_HEADER_BYTES,
    SEGMENT_SUFFIX,
    SPARE_NAME,
    TEMP_SUFFIX,
    Batch,
    BatchStatus,
    batch_header,
    batch_records,
    check_records,
    encode_segment_header,
    last_term_of,
    read_batch,
    segment_name,
    split_run,
)
from sequencer.journal.reader import JournalReader, read_records
from sequencer.journal.repair import RecoveryReport, fsync_directory, recover_segments
from sequencer.journal.scan import FileWindow
from sequencer.journal.space import (
    DiskSpace,
    SpaceReservation,
    SpaceShortage,
    disk_space_from_environment,
)
from sequencer.journal.truncate import (
    StepHook,
    TruncationIntent,
    encode_intent,
    finish_interrupted_truncation,
    finish_truncation,
    write_intent,
)

__all__ = ["Journal"]


@dataclass
class _Segment:
    path: Path
    first_index: int
    prev_term: int


def _no_hook(step: str) -> None:
    pass


def _temp_path(final: Path) -> Path:
    return final.with_name(final.name[: -len(SEGMENT_SUFFIX)] + TEMP_SUFFIX)


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
        self._space = SpaceReservation(directory, disk, segment_bytes, preallocate)
        self._segments: list[_Segment] = []
        self._segment_firsts: list[int] = []
        self._journal_id = b""
        self._fd = -1
        self._lock_fd = -1
        self._write_offset = 0
        self._last_index = 0
        self._last_term = 0
        self._durable_index = 0
        self._failure: JournalFailedError | None = None
        self._closed = False
        # Called after each step of a truncation (truncate.TRUNCATION_STEPS): crash-injection
        # tests raise or exit there.
        self.truncation_hook: StepHook = _no_hook

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
        # Before any segment is scanned: a truncation interrupted mid-way leaves bytes that only
        # its intent explains (truncate.py).
        truncated = finish_interrupted_truncation(self.directory)
        scans, torn, removed = recover_segments(self.directory, self._space)
        if not scans:
            self._journal_id = secrets.token_bytes(JOURNAL_ID_BYTES)
            self._create_segment(1, 0)
            self.recovery = RecoveryReport(
                self.directory, [s.path for s in self._segments], 1, 0, 0, True, None, removed
            )
            return
        last = scans[-1]
        self._journal_id = last.journal_id
        self._segments = [_Segment(s.path, s.first_index, s.prev_term) for s in scans]
        self._segment_firsts = [s.first_index for s in scans]
        self._open_active(last.path, last.end_offset)
        self._last_index = last.last_index
        self._last_term = last.last_term
        # Everything found on open is on disk as far as this process can know; a torn tail was
        # cut and the cut fsynced.
        self._durable_index = self._last_index
        self.recovery = RecoveryReport(
            self.directory, [s.path for s in scans], scans[0].first_index, self._last_index,
            self._last_term, False, torn, removed, truncated,
        )  # fmt: skip

    def _open_active(self, path: Path, end_offset: int) -> None:
        fd = os.open(path, os.O_RDWR)
        if self.preallocate and os.fstat(fd).st_size < self.segment_bytes:
            self._space.allocate_if_room(fd, self.segment_bytes)
        self._activate(fd, end_offset)

    def _activate(self, fd: int, write_offset: int) -> None:
        """Make `fd` the active segment, the next batch going at `write_offset`."""
        if self._fd >= 0 and self._fd != fd:
            os.close(self._fd)
        self._fd = fd
        self._write_offset = write_offset
        self._space.activate(fd)

    def _create_segment(self, first_index: int, prev_term: int) -> None:
        """Temp file (the preallocated spare, if reserved), header, fsync, rename, directory fsync;
        then it becomes the active segment.

        Raises:
            JournalFullError: no room for the file; nothing is left behind.
        """
        final = self.directory / segment_name(first_index)
        assert not final.exists(), final
        fd = self._space.take_spare()
        if fd >= 0:
            temp = self.directory / SPARE_NAME
        else:
            temp = _temp_path(final)
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                self._space.allocate_segment(
                    fd, f"creating segment {final.name}", first_segment=not self._segments
                )
            except BaseException:
                os.close(fd)
                temp.unlink(missing_ok=True)
                raise
        try:
            header = encode_segment_header(first_index, prev_term, self._journal_id, time.time_ns())
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.rename(temp, final)
        fsync_directory(self.directory)
        self._activate(fd, SEGMENT_HEADER_BYTES)
        self._segments.append(_Segment(final, first_index, prev_term))
        self._segment_firsts.append(first_index)

    # ---- space ----

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
        try:
            return self._space.reserve_ahead(self._write_offset)
        except OSError as error:
            raise self._write_failed("preallocating the next segment", error) from error

    def free_bytes(self) -> int:
        """Free bytes on the journal's file system (as `reserve_space` counts them)."""
        return self._space.free_bytes()

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
                log without gaps, or a term goes backwards, or a record is larger than a segment
                (nothing is written).
            JournalFullError: no room on the disk. Nothing was written, unless the batch was
                larger than a segment and cut: then the records up to `last_index` were. The
                journal stays usable; append the rest again later.
            JournalWriteError, JournalSyncError: I/O failed; the journal is stopped.
        """
        self._check_usable()
        view = memoryview(records).cast("B")
        if len(view) == 0:
            return self._last_index
        first_index = self._last_index + 1
        last_index, last_term = check_records(view, first_index, self._last_term)
        batch_bytes = BATCH_HEADER_BYTES + len(view)
        if SEGMENT_HEADER_BYTES + batch_bytes > self.segment_bytes:
            capacity = self.segment_bytes - SEGMENT_HEADER_BYTES - BATCH_HEADER_BYTES
            parts = split_run(view, first_index, capacity, self.segment_bytes)
            if self._write_offset > SEGMENT_HEADER_BYTES:
                self._roll()
            for number, part in enumerate(parts):
                if number:
                    self._roll()
                self._write_batch(view[part.start : part.end], part.first_index,
                                  part.last_index, part.last_term)  # fmt: skip
        else:
            if self._write_offset + batch_bytes > self.segment_bytes:
                self._roll()
            self._write_batch(view, first_index, last_index, last_term)
        assert self._last_index == last_index, (self._last_index, last_index)
        return self._last_index

    def _write_batch(self, view: memoryview, first_index: int, last_index: int, last_term: int) -> None:
        length = len(view)
        assert first_index == self._last_index + 1, (first_index, self._last_index)
        assert self._write_offset + BATCH_HEADER_BYTES + length <= max(
            self.segment_bytes, SEGMENT_HEADER_BYTES + BATCH_HEADER_BYTES + length
        ), (self._write_offset, length)
        header = batch_header(view, last_index - first_index + 1, first_index, last_index)
        offset = self._write_offset
        total = BATCH_HEADER_BYTES + length
        space = self._space
        if offset + total > space.allocated_bytes:  # else preallocated: no call, no message
            try:
                space.ensure_room(offset + total, f"records {first_index}..{last_index}")
            except OSError as error:
                raise self._write_failed("preallocating the active segment", error) from error
        try:
            written = os.pwritev(self._fd, [header, view], offset)
            while written < total:  # a short write: only near a full disk or on a signal
                rest = (header + bytes(view))[written:]
                step = os.pwrite(self._fd, rest, offset + written)
                if step == 0:
                    raise OSError(f"pwrite made no progress at offset {offset + written}")
                written += step
        except OSError as error:
            what = f"records {first_index}..{last_index}"
            if not no_space(error):
                raise self._write_failed(f"writing {what}", error) from error
            self._cut_back(offset, what)
            raise space.full_error(what, total) from error
        space.wrote(offset + total)
        self._write_offset = offset + total
        self._last_index = last_index
        self._last_term = last_term

    def _cut_back(self, offset: int, what: str) -> None:
        """The disk filled between the check and the write (another writer on the same file
        system). ENOSPC is not a write-back error: the bytes before `offset` are intact, so
        cutting the file back to `offset` undoes this write, and nothing is torn."""
        try:
            os.ftruncate(self._fd, offset)
        except OSError as truncate_error:
            raise self._write_failed(
                f"cutting back a write of {what} that found the disk full", truncate_error
            ) from truncate_error
        self._space.cut_back(offset)

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
        durably and atomically, before returning.

        Crash-safe at every step (`truncate.py`): an intent naming the cut, and holding the kept
        records of a batch cut inside, is made durable first; a crash after that point is
        finished by the next `Journal.open`, a crash before it leaves the old log whole. Records
        up to `index` are never at risk, and no record after it comes back once this returns.

        Raises:
            JournalError: `index` is before the first record the journal still holds.
            JournalFullError: no room for the intent (at most one batch); nothing changed, the
                journal stays usable: free space and call again.
            JournalWriteError: I/O failed; the journal is stopped (the next open finishes or
                forgets the truncation).
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
        segment = self._segments[position]
        cut, split, term_before = self._locate(segment, target)
        replacement = b""
        if split is not None:
            kept = batch_records(split)[: index - split.first_index + 1]
            payload = b"".join(bytes(r.raw) for r in kept)
            replacement = batch_header(memoryview(payload), len(kept), split.first_index, index)
            replacement += payload
        intent = TruncationIntent(
            index, term_before, segment.first_index, cut, self._journal_id, replacement
        )
        try:
            write_intent(self.directory, intent, self.disk, self.truncation_hook)
        except OSError as error:
            if no_space(error):
                raise self._space.full_error(f"the truncation after index {index}",
                                             len(encode_intent(intent))) from error  # fmt: skip
            raise self._write_failed(f"writing the intent to truncate after {index}", error) from error
        # The commit point is behind us: from here a failure leaves the next open to finish.
        self._close_active()
        del self._segments[position + 1 :]
        del self._segment_firsts[position + 1 :]
        try:
            finish_truncation(self.directory, intent, self.truncation_hook)
            fd = os.open(segment.path, os.O_RDWR)
        except OSError as error:
            raise self._write_failed(f"truncating after index {index}", error) from error
        if self.preallocate:
            try:
                self._space.allocate_if_room(fd, max(self.segment_bytes, intent.end_offset))
            except OSError as error:
                os.close(fd)
                raise self._write_failed("preallocating the cut segment", error) from error
        self._activate(fd, intent.end_offset)
        self._last_index = index
        self._last_term = term_before
        # The cut segment was fsynced whole and every earlier one before its successor existed.
        self._durable_index = index

    def _close_active(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _locate(self, segment: _Segment, target: int) -> tuple[int, Batch | None, int]:
        """(offset of the batch holding `target`, that batch if `target` is inside it rather than
        its first record, term of record target - 1)."""
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            window = FileWindow(fd)
            offset = SEGMENT_HEADER_BYTES
            term_before = segment.prev_term
            while True:
                batch = read_batch(window.view, offset)
                assert batch.status == BatchStatus.OK, (segment.path, offset, batch.reason)
                if batch.first_index == target:
                    return offset, None, term_before
                if batch.first_index < target <= batch.last_index:
                    records = batch_records(batch)
                    return offset, batch, records[target - batch.first_index - 1].term
                term_before = last_term_of(batch)
                offset = batch.end
        finally:
            os.close(fd)

    def restart_after(self, index: int, term: int) -> None:
        """Discard every record and begin the journal after `index` (the entry of `term`): a
        follower that installed a snapshot at `index` from its leader (docs/cluster.md, "Catch-up
        through a snapshot").

        Not atomic by itself: the caller holds a durable request (`raft.install`) and calls this
        again after a crash, so each step only has to leave a journal that opens. The segments go
        newest first (what is left is always a valid journal, a prefix of the old one), then the
        new one is created (temp file, rename, directory fsync). Done already: nothing happens.

        Raises:
            JournalFullError: no room for the new segment; call again once there is.
            JournalWriteError: I/O failed (fail-stop).
        """
        self._check_usable()
        segments = self._segments
        if (len(segments) == 1 and segments[0].first_index == index + 1
                and segments[0].prev_term == term and self._last_index == index):
            return
        self._close_active()
        try:
            while segments:
                doomed = segments.pop()
                self._segment_firsts.pop()
                doomed.path.unlink(missing_ok=True)
                fsync_directory(self.directory)
            self._create_segment(index + 1, term)
        except OSError as error:
            raise self._write_failed(f"restarting the journal after index {index}", error) from error
        self._last_index = index
        self._last_term = term
        self._durable_index = index

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
                fsync_directory(self.directory)
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
        self._space.release()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
