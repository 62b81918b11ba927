"""Reading records back: replay, `seqd log`, and (cluster mode) entries for lagging followers.

Readers use no lock and only ever return complete, CRC-valid batches, so they can follow a
journal another process is appending to. A reader reads an index range: `seek(index)` (forwards
or backwards), then `read(to_index)` for `Record`s or `read_runs(to_index)` for the raw bytes of
whole records, one view per batch (the replay fast path, and what a leader ships to a follower).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sequencer.journal.errors import JournalCorruptError, JournalError
from sequencer.journal.format import (
    SEGMENT_HEADER_BYTES,
    Batch,
    BatchStatus,
    Record,
    batch_records,
    continuing,
    offset_of,
    read_batch,
)
from sequencer.journal.scan import Damage, FileWindow, corrupt, list_segments, read_segment_header

__all__ = ["JournalReader", "read_records", "read_runs"]


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
        self._window: FileWindow | None = None
        self._offset = 0  # the batch holding next_index, or where it will be written
        self._expected = 0  # the first index of the batch at `_offset`
        self.stopped_at: Damage | None = None  # bad bytes at the live end, if the last read hit some

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def on_deleted_segment(self) -> bool:
        """The segment this reader has open was deleted since (retention, or a truncation that
        removed it; a new segment may now have its name): its bytes are no longer the journal's,
        so `seek` before reading on."""
        return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0

    def seek(self, index: int) -> None:
        """Read from record `index` next, before or after where this reader is.

        The next read finds the segment by its name (a bisect) and follows batch headers (one CRC
        each) to the batch holding `index`.
        """
        assert index >= 1, index
        self.close()
        self.next_index = index

    def read(self, to_index: int | None = None) -> Iterator[Record]:
        """Every record from `next_index` up to `to_index` (or the end) available now.

        Records are views into the reader's buffers, valid while referenced. Call again later to
        continue where this stopped. Breaking out of the loop loses nothing: `next_index` counts
        only records handed out.

        Raises:
            JournalCorruptError: damage in a segment that a newer segment follows, or a gap.
            JournalError: `next_index` went with retention, or its segment was deleted meanwhile.
        """
        for batch in self._batches(to_index):
            records = batch_records(batch)
            begin = self.next_index - batch.first_index
            end = len(records) if to_index is None else to_index - batch.first_index + 1
            for record in records[begin:end]:
                self.next_index = record[3] + 1  # record.index; an item is faster
                yield record

    def read_runs(self, to_index: int | None = None) -> Iterator[memoryview]:
        """Like `read`, but one view per batch of the whole records it holds in range.

        The replay fast path: no per-record objects here; the caller walks the run
        (`record.walk_records`). Same guarantees and errors as `read`.
        """
        for batch in self._batches(to_index):
            records = batch.records
            begin = offset_of(records, batch.first_index, self.next_index)
            last = batch.last_index if to_index is None or to_index >= batch.last_index else to_index
            end = batch.length if last == batch.last_index else offset_of(records, batch.first_index, last + 1)
            self.next_index = last + 1
            yield records[begin:end]

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
        self._window = FileWindow(self._fd)
        header = read_segment_header(path, self._window)
        assert header.first_index == first_index, (path, header.first_index, first_index)
        self._first_index = first_index
        self._offset = SEGMENT_HEADER_BYTES
        self._expected = first_index

    def _start(self) -> bool:
        """Open the segment holding `next_index`; False when the journal has no segment yet."""
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

    def _batches(self, to_index: int | None) -> Iterator[Batch]:
        """CRC-valid batches holding `next_index` onwards, in order; the consumer advances
        `next_index` past what it takes from each."""
        if self._fd < 0 and not self._start():
            return
        assert self._window is not None
        self._window.invalidate()
        self.stopped_at = None
        while to_index is None or self.next_index <= to_index:
            batch = continuing(read_batch(self._window.view, self._offset), self._expected)
            if batch.status == BatchStatus.OK:
                if batch.last_index >= self.next_index:
                    yield batch  # the consumer advances next_index past what it took
                    if to_index is not None and self.next_index > to_index:
                        return
                self._offset = batch.end
                self._expected = batch.last_index + 1
                continue
            if not self._next_segment(batch):
                return

    def _next_segment(self, batch: Batch) -> bool:
        """At a batch that is not (yet) valid: move on to the next segment if there is one and
        this one is complete. False: the live end of the journal (`stopped_at` says when there
        are bad bytes there).

        Raises:
            JournalCorruptError: bad bytes in a complete segment, or a gap before the next.
        """
        assert self._path is not None and self._window is not None
        newer = self._newer_segment()
        if newer is None:
            if batch.status == BatchStatus.BAD:
                self.stopped_at = Damage.at(self._path, batch)
            return False
        # The writer finished this segment before it created the next: look once more.
        self._window.invalidate()
        again = continuing(read_batch(self._window.view, self._offset), self._expected)
        if again.status == BatchStatus.OK:
            return True
        if again.status == BatchStatus.BAD:
            damage = Damage.at(self._path, again)
            raise corrupt(damage, "A newer segment follows, so this segment is complete.")
        first, path = newer
        if first != self._expected:
            raise JournalCorruptError(
                f"journal segment {path} starts at index {first}, but {self._path} ends at "
                f"index {self._expected - 1}: records are missing. Restore the journal from a "
                "replica or a backup."
            )
        self._open(path, first)
        return True


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
