"""Where each entry this node wrote ends in its log ring: the map from the Raft commit index to
`raft.commit.position`, the blp's ring limit.

The replicator is the log ring's one writer in cluster mode and writes entries in index order, so
the ends it records are increasing in both index and position. The blp may read up to the end of
the highest committed entry that is written; the map forgets entries once the commit passes them.
Bounded: it holds only entries written and not yet committed, at most what the ring holds
(capacity / 48-byte record header).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import accumulate, count, islice

__all__ = ["RingPositions"]


class RingPositions:
    """Invariants: `commit_index` <= `written_index`; the ends held are of entries
    `commit_index + 1 .. written_index`, increasing."""

    __slots__ = ("_ends", "commit_index", "commit_position", "written_index")

    def __init__(self, start_index: int, start_position: int) -> None:
        # The entry at `start_index` ends at `start_position` (the ring starts after it).
        self.commit_index = start_index
        self.commit_position = start_position
        self.written_index = start_index
        self._ends: deque[tuple[int, int]] = deque()

    def wrote(self, index: int, end_position: int) -> None:
        """Entry `index` is written to the ring and ends at `end_position`."""
        assert index == self.written_index + 1, (index, self.written_index)
        self.written_index = index
        self._ends.append((index, end_position))

    def wrote_run(self, first_index: int, start_position: int, lengths: Iterable[int]) -> None:
        """Entries `first_index`, ... of these byte lengths are written back to back from
        `start_position` (one copy of a run: no per-entry Python)."""
        assert first_index == self.written_index + 1, (first_index, self.written_index)
        ends = self._ends
        held = len(ends)
        ends.extend(zip(count(first_index), islice(accumulate(lengths, initial=start_position), 1, None)))
        self.written_index = first_index + len(ends) - held - 1

    def commit(self, index: int) -> bool:
        """The Raft commit is at least `index`: move the commit to the highest written entry up to
        it. Returns whether the commit position moved."""
        ends = self._ends
        moved = False
        while ends and ends[0][0] <= index:
            self.commit_index, self.commit_position = ends.popleft()
            moved = True
        return moved

    def drop_after(self, index: int) -> None:
        """Forget the ends of entries after `index` (never below the commit)."""
        assert index >= self.commit_index, (index, self.commit_index)
        ends = self._ends
        while ends and ends[-1][0] > index:
            ends.pop()
        self.written_index = index
