"""The journal as the Raft log's storage: entries and terms by index, read back from segment files.

One log (docs/contracts.md): a record's index in the ring, the journal and the Raft log is one
number, and an entry's payload is the whole record, header and padding included, exactly as the
journal holds it (concatenated payloads are again a run of whole records, which a follower writes
into its log ring as they are). An entry's term is not stored beside the record: the record header
carries it (`sequencer/record.py`: length, type, version, index, **term**, timestamp, session id,
request id), stamped by the leader's sequencer, so the term of an index is read from its record.

`JournalLogStorage` has the shape of the Raft core's `LogStorage` interface (being written on the
raftasync branch: `term(index) -> int | None`, `entries(first_index, last_index, bytes_max) ->
(terms, payloads)`), so the replication role can hand it to the core as it is, or wrap it.

A leader feeding a lagging follower reads forwards, range after range: the storage keeps one
`JournalReader` and only seeks (a bisect over segment names, then batch headers followed to the
index) when a read does not continue the last one, or when the segment it has open was deleted
since (retention, or a truncation). Reads take no lock and return only CRC-valid batches.
"""

from __future__ import annotations

import os
from pathlib import Path

from sequencer.journal.errors import JournalError
from sequencer.journal.reader import JournalReader
from sequencer.journal.scan import FileWindow, list_segments, read_segment_header

__all__ = ["JournalLogStorage"]


class JournalLogStorage:
    """Read access to the durable log in a journal directory, by index (Raft paper, Figure 2,
    "log[]"). The caller asks only about durable indexes (at most the journal's durable index).
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._reader = JournalReader(self.directory)
        self.seeks = 0  # how often a read did not continue the previous one (for tests, metrics)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> JournalLogStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def first_index(self) -> int:
        """The first index the journal still holds (earlier ones went with retention); 1 for an
        empty journal."""
        segments = list_segments(self.directory)
        return segments[0][0] if segments else 1

    def term(self, index: int) -> int | None:
        """The term of the entry at `index` (0 for index 0), or None when the journal no longer
        holds it (retention deleted it: a snapshot covers it). `first_index - 1` is answered from
        the first segment's header (its prev term), as the Raft consistency check needs.

        Raises:
            JournalError: `index` is past the end of the journal (not durable: a caller bug), or
                the journal is damaged.
        """
        assert index >= 0, index
        if index == 0:
            return 0
        segments = list_segments(self.directory)
        if not segments or index < segments[0][0] - 1:
            return None
        if index == segments[0][0] - 1:
            return self._prev_term(segments[0][1])
        terms, _payloads = self.entries(index, index, 1)
        return terms[0]

    def entries(
        self, first_index: int, last_index: int, bytes_max: int
    ) -> tuple[list[int], list[bytes]]:
        """Terms and payloads (whole records) of the entries `first_index .. last_index`.

        Returns at least one entry, and stops early after the entry that reaches `bytes_max`
        payload bytes, so one read (one AppendEntries) stays bounded however large the records.

        Raises:
            JournalError: `first_index` went with retention (send a snapshot), or the journal
                ends before `first_index` (not durable yet: a caller bug).
        """
        assert 1 <= first_index <= last_index, (first_index, last_index)
        assert bytes_max >= 1, bytes_max
        terms, payloads = self._read(first_index, last_index, bytes_max)
        if not terms:
            # The reader may sit where a truncation rewrote the segment; find the index afresh.
            self._seek(first_index)
            terms, payloads = self._read(first_index, last_index, bytes_max)
        if not terms:
            raise JournalError(
                f"journal {self.directory} does not hold index {first_index} yet (it ends before "
                "it): only durable entries can be read back"
            )
        assert len(terms) == len(payloads), (len(terms), len(payloads))
        return terms, payloads

    def _read(self, first_index: int, last_index: int, bytes_max: int) -> tuple[list[int], list[bytes]]:
        reader = self._reader
        if reader.next_index != first_index or reader.on_deleted_segment():
            self._seek(first_index)
        terms: list[int] = []
        payloads: list[bytes] = []
        total_bytes = 0
        for record in reader.read(last_index):
            terms.append(record.term)
            payloads.append(bytes(record.raw))
            total_bytes += len(record.raw)
            if total_bytes >= bytes_max:
                break
        return terms, payloads

    def _seek(self, index: int) -> None:
        self.seeks += 1
        self._reader.seek(index)

    def _prev_term(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            return read_segment_header(path, FileWindow(fd)).prev_term
        finally:
            os.close(fd)
