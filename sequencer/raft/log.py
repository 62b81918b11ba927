"""The in-memory Raft log: entry terms and payloads after a snapshot boundary.

The log is two parallel lists, `terms` and `payloads`, for the indices `snapshot_index + 1 ..
last_index`. Parallel lists instead of one object per entry keep the hot paths (append a batch,
slice a batch for a message, compare a run of terms) inside C: `list.extend`, slicing and `==` on
lists. An entry is `(index, term, payload)`; its index is implied by its position.

Invariants (asserted where they are established):
- terms never decrease along the log (Raft: a leader only appends entries of its current term, and
  terms only grow), so the first and last index of a term are found by bisection;
- `terms` and `payloads` have the same length;
- the entry at `snapshot_index` is known only by its term (`snapshot_term`); entries at or before it
  are compacted into the caller's snapshot.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["RaftLog"]


class RaftLog:
    """Entries `snapshot_index + 1 .. last_index`; `index` 1-based, 0 meaning none."""

    __slots__ = ("payloads", "snapshot_index", "snapshot_term", "terms")

    def __init__(self, snapshot_index: int = 0, snapshot_term: int = 0) -> None:
        assert snapshot_index >= 0, snapshot_index
        assert snapshot_term >= 0, snapshot_term
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.terms: list[int] = []
        self.payloads: list[bytes] = []

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.terms)

    @property
    def last_term(self) -> int:
        return self.terms[-1] if self.terms else self.snapshot_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, or None when it is compacted or beyond the end."""
        offset = index - self.snapshot_index
        if offset == 0:
            return self.snapshot_term
        if offset < 0 or offset > len(self.terms):
            return None
        return self.terms[offset - 1]

    def slice(self, start_index: int, end_index: int) -> tuple[list[int], list[bytes]]:
        """Terms and payloads of the entries `start_index .. end_index - 1` (copies)."""
        assert start_index > self.snapshot_index, (start_index, self.snapshot_index)
        assert end_index <= self.last_index + 1, (end_index, self.last_index)
        low = start_index - self.snapshot_index - 1
        high = end_index - self.snapshot_index - 1
        return self.terms[low:high], self.payloads[low:high]

    def append(self, terms: list[int], payloads: list[bytes]) -> None:
        assert len(terms) == len(payloads), (len(terms), len(payloads))
        if terms:
            assert terms[0] >= self.last_term, (terms[0], self.last_term)
            self.terms.extend(terms)
            self.payloads.extend(payloads)

    def append_run(self, term: int, payloads: list[bytes]) -> None:
        """Append entries all of one term (a leader's proposals)."""
        assert term >= self.last_term, (term, self.last_term)
        self.terms.extend([term] * len(payloads))
        self.payloads.extend(payloads)

    def merge(self, previous_index: int, terms: list[int], payloads: list[bytes]) -> int:
        """Make the entries after `previous_index` agree with `terms`/`payloads`.

        The caller has checked that the log matches the leader at `previous_index`. Entries that
        already agree (same index and term: by Log Matching, the same entry) are kept, so a
        duplicated or reordered older message never truncates newer entries; from the first entry
        that conflicts, the log is replaced (Raft paper, 5.3, receiver implementation step 3).

        Returns:
            The first index that changed, or 0 when the log already held every entry.
        """
        assert previous_index >= self.snapshot_index, (previous_index, self.snapshot_index)
        assert previous_index <= self.last_index, (previous_index, self.last_index)
        assert len(terms) == len(payloads), (len(terms), len(payloads))
        count = len(terms)
        if count == 0:
            return 0
        start = previous_index - self.snapshot_index
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
        self.append(terms[first:], payloads[first:])
        return previous_index + 1 + first

    def truncate_after(self, index: int) -> None:
        """Drop the entries after `index`."""
        assert index >= self.snapshot_index, (index, self.snapshot_index)
        keep = index - self.snapshot_index
        del self.terms[keep:]
        del self.payloads[keep:]

    def first_index_of_term(self, term: int) -> int:
        """The first retained index whose term is `term` (the log must hold one)."""
        position = bisect_left(self.terms, term)
        assert position < len(self.terms), (term, self.last_term)
        assert self.terms[position] == term, (term, self.terms[position])
        return self.snapshot_index + 1 + position

    def last_index_of_term(self, term: int) -> int:
        """The last retained index whose term is `term`, or 0 when the log holds none."""
        position = bisect_right(self.terms, term)
        if position == 0 or self.terms[position - 1] != term:
            return 0
        return self.snapshot_index + position

    def compact(self, index: int) -> None:
        """Forget the entries up to `index` (the caller's snapshot now covers them)."""
        assert self.snapshot_index < index <= self.last_index, (index, self.snapshot_index)
        term = self.term_at(index)
        assert term is not None, index
        drop = index - self.snapshot_index
        del self.terms[:drop]
        del self.payloads[:drop]
        self.snapshot_index = index
        self.snapshot_term = term

    def restore(self, snapshot_index: int, snapshot_term: int) -> None:
        """Discard the whole log: a snapshot at `snapshot_index` replaces it."""
        assert snapshot_index >= 0, snapshot_index
        self.terms.clear()
        self.payloads.clear()
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
