"""The Raft log: the tail held in memory, the rest read back from the caller's storage.

The in-memory part is two parallel lists, `terms` and `payloads`, for the indices
`offset_index + 1 .. last_index`. Parallel lists instead of one object per entry keep the hot paths
(append a batch, slice a batch for a message, compare a run of terms) inside C: `list.extend`,
slicing and `==` on lists. An entry is `(index, term, payload)`; its index is implied by its
position.

Three boundaries, in order, `snapshot_index <= offset_index <= last_index`:
- up to `snapshot_index` the entries are compacted into the caller's snapshot; the entry at
  `snapshot_index` is known only by its term (`snapshot_term`);
- `snapshot_index + 1 .. offset_index` are durable and dropped from memory (`drop_to`): the
  caller's `LogStorage` holds them, and `term_at` and `read` go there for them;
- `offset_index + 1 .. last_index` are in memory (the entry at `offset_index` is known by its
  term, `offset_term`, for the consistency check of the next one).
Without a storage nothing is ever dropped, and `offset_index` follows `snapshot_index`.

Invariants (asserted where they are established):
- terms never decrease along the log (Raft: a leader only appends entries of its current term, and
  terms only grow), so the first and last index of a term are found by bisection;
- `terms` and `payloads` have the same length;
- only the in-memory part changes (`merge`, `append`): the core drops from memory only entries that
  are committed, applied and durable, which never change again.

So the term of the last entry read from storage is kept (`stored_last`): a leader feeding a
lagging follower sends range after range, and each AppendEntries needs the term of the entry
before its first, the last one the previous read returned. Asking the storage for it again cost the
journal a seek per message (`sequencer.journal.log_storage`: batch headers, each checksummed, from
the start of the segment), so a catch-up was quadratic in the follower's lag and blocked the
leader's loop for longer than an election timeout (benches/RESULTS.md, "Catch-up").
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from sequencer.raft.storage import LogStorage

__all__ = ["RaftLog"]


class RaftLog:
    """Entries `snapshot_index + 1 .. last_index`; `index` 1-based, 0 meaning none."""

    __slots__ = (
        "last_index",
        "offset_index",
        "offset_term",
        "payloads",
        "snapshot_index",
        "snapshot_term",
        "storage",
        "stored_last",
        "terms",
    )

    def __init__(
        self, snapshot_index: int = 0, snapshot_term: int = 0, storage: LogStorage | None = None
    ) -> None:
        assert snapshot_index >= 0, snapshot_index
        assert snapshot_term >= 0, snapshot_term
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.offset_index = snapshot_index
        self.offset_term = snapshot_term
        self.storage = storage
        # (index, term) of the last entry `read` returned from storage (committed: it never
        # changes); (0, 0) before any read.
        self.stored_last = (0, 0)
        self.terms: list[int] = []
        self.payloads: list[bytes] = []
        # Invariant: last_index == offset_index + len(terms). A field, not a property: the core
        # reads it ~12 times for each AppendEntries a follower takes, and a property read cost
        # ~1.4k instructions on CPython 3.11 (benches/RESULTS.md, "follrec2").
        self.last_index = snapshot_index

    @property
    def last_term(self) -> int:
        return self.terms[-1] if self.terms else self.offset_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, or None when it is compacted or beyond the end."""
        offset = index - self.offset_index
        if offset > 0:
            return self.terms[offset - 1] if offset <= len(self.terms) else None
        if offset == 0:
            return self.offset_term
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index:
            return None
        stored_index, stored_term = self.stored_last
        if index == stored_index:
            return stored_term
        assert self.storage is not None, (index, self.offset_index)
        # None: the caller's retention deleted it (a snapshot covers it) before the caller told
        # the core (`RaftCore.compact`); a leader then waits for that (`Leader._send_snapshot`).
        return self.storage.term(index)

    def slice(self, start_index: int, end_index: int) -> tuple[list[int], list[bytes]]:
        """Terms and payloads of the in-memory entries `start_index .. end_index - 1` (copies)."""
        assert start_index > self.offset_index, (start_index, self.offset_index)
        assert end_index <= self.last_index + 1, (end_index, self.last_index)
        low = start_index - self.offset_index - 1
        high = end_index - self.offset_index - 1
        return self.terms[low:high], self.payloads[low:high]

    def read(
        self, start_index: int, end_index: int, bytes_max: int
    ) -> tuple[list[int], list[bytes]]:
        """Entries from `start_index`, at most up to `end_index - 1`, from memory or storage.

        From memory it returns them all (a message is bounded by entry count); from storage at
        least one and at most about `bytes_max` payload bytes, stopping where memory begins, so the
        caller sends what it got and continues from there.
        """
        if start_index > self.offset_index:
            return self.slice(start_index, end_index)
        assert start_index > self.snapshot_index, (start_index, self.snapshot_index)
        assert self.storage is not None, (start_index, self.offset_index)
        last_index = min(end_index - 1, self.offset_index)
        terms, payloads = self.storage.entries(start_index, last_index, bytes_max)
        assert 0 < len(terms) <= last_index - start_index + 1, (start_index, len(terms))
        self.stored_last = (start_index + len(terms) - 1, terms[-1])
        return terms, payloads

    def append(self, terms: list[int], payloads: list[bytes]) -> None:
        assert len(terms) == len(payloads), (len(terms), len(payloads))
        if terms:
            assert terms[0] >= self.last_term, (terms[0], self.last_term)
            self.terms.extend(terms)
            self.payloads.extend(payloads)
            self.last_index += len(terms)

    def append_run(self, term: int, payloads: list[bytes]) -> None:
        """Append entries all of one term (a leader's proposals)."""
        assert term >= self.last_term, (term, self.last_term)
        self.terms.extend([term] * len(payloads))
        self.payloads.extend(payloads)
        self.last_index += len(payloads)

    def merge(self, previous_index: int, terms: list[int], payloads: list[bytes]) -> int:
        """Make the entries after `previous_index` agree with `terms`/`payloads`.

        The caller has checked that the log matches the leader at `previous_index`. Entries that
        already agree (same index and term: by Log Matching, the same entry) are kept, so a
        duplicated or reordered older message never truncates newer entries; from the first entry
        that conflicts, the log is replaced (Raft paper, 5.3, receiver implementation step 3).

        Returns:
            The first index that changed, or 0 when the log already held every entry.
        """
        assert previous_index >= self.offset_index, (previous_index, self.offset_index)
        assert previous_index <= self.last_index, (previous_index, self.last_index)
        assert len(terms) == len(payloads), (len(terms), len(payloads))
        count = len(terms)
        if count == 0:
            return 0
        start = previous_index - self.offset_index
        held = len(self.terms)
        if start == held:
            self.append(terms, payloads)
            return previous_index + 1
        overlap = min(count, held - start)
        if self.terms[start : start + overlap] == terms[:overlap]:
            if count == overlap:
                return 0
            self.append(terms[overlap:], payloads[overlap:])
            return previous_index + 1 + overlap
        first = 0
        while self.terms[start + first] == terms[first]:
            first += 1
        del self.terms[start + first :]
        del self.payloads[start + first :]
        self.last_index = previous_index + first
        self.append(terms[first:], payloads[first:])
        return previous_index + 1 + first

    def first_index_of_term(self, term: int) -> int:
        """The first in-memory index whose term is `term` (memory must hold one)."""
        position = bisect_left(self.terms, term)
        assert position < len(self.terms), (term, self.last_term)
        assert self.terms[position] == term, (term, self.terms[position])
        return self.offset_index + 1 + position

    def last_index_of_term(self, term: int) -> int:
        """The last index of `term` in memory (or at `offset_index`), or 0 when there is none.

        0 also when the term ends below the in-memory part; the caller then falls back to a
        slower but still correct guess (5.3: any next index above the match works).
        """
        position = bisect_right(self.terms, term)
        if position == 0:
            return self.offset_index if self.offset_term == term and self.offset_index else 0
        if self.terms[position - 1] != term:
            return 0
        return self.offset_index + position

    def drop_to(self, index: int) -> None:
        """Forget the in-memory entries up to `index`: durable, read back from storage if needed."""
        assert self.storage is not None, index
        assert self.offset_index < index <= self.last_index, (index, self.offset_index)
        self._forget(index, self.terms[index - self.offset_index - 1])

    def compact(self, index: int) -> None:
        """Forget the entries up to `index` (the caller's snapshot now covers them)."""
        assert self.snapshot_index < index <= self.last_index, (index, self.snapshot_index)
        term = self.term_at(index)
        assert term is not None, index
        if index > self.offset_index:
            self._forget(index, term)
        self.snapshot_index = index
        self.snapshot_term = term

    def _forget(self, index: int, term: int) -> None:
        drop = index - self.offset_index
        del self.terms[:drop]
        del self.payloads[:drop]
        self.offset_index = index
        self.offset_term = term

    def start_after(self, index: int, term: int) -> None:
        """Begin the in-memory part after `index` (of `term`), leaving what precedes in storage:
        a restart that loads only the tail of the durable log."""
        assert self.storage is not None, index
        assert not self.terms, len(self.terms)
        assert index >= self.snapshot_index, (index, self.snapshot_index)
        self.offset_index = self.last_index = index
        self.offset_term = term

    def restore(self, snapshot_index: int, snapshot_term: int) -> None:
        """Discard the whole log: a snapshot at `snapshot_index` replaces it."""
        assert snapshot_index >= 0, snapshot_index
        self.terms.clear()
        self.payloads.clear()
        self.snapshot_index = self.offset_index = self.last_index = snapshot_index
        self.snapshot_term = self.offset_term = snapshot_term
        self.stored_last = (0, 0)  # the storage now holds nothing below the snapshot
