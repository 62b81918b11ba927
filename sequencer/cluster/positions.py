"""Where each entry this node wrote ends in its log ring: the map from the Raft commit index to
`raft.commit.position`, the blp's ring limit.

The replicator is the log ring's one writer in cluster mode and writes entries in index order, so
the ends it records are increasing in both index and position. The blp may read up to the end of
the highest committed entry that is written; the map forgets entries once the commit passes them.
Bounded: it holds only entries written and not yet committed, at most what the ring holds
(capacity / 48-byte record header), in at most as many runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import accumulate

__all__ = ["RingPositions"]


class RingPositions:
    """Invariants: `commit_index` <= `written_index`; the ends held are of entries
    `commit_index + 1 .. written_index`, increasing.

    Held by run, as written (a run of a proposal batch or an AppendEntries, ~40-110 entries under
    load): each run is its first index and the list of its entries' ends, and the commit moves by
    run and by offset into a run, so a pass costs per run, not per entry (one (index, end) pair
    held and popped per entry cost 1,598 instructions an entry, by run 410: benches.replicator_paths).
    """

    __slots__ = ("_committed_in_first", "_runs", "commit_index", "commit_position", "written_index")

    def __init__(self, start_index: int, start_position: int) -> None:
        # The entry at `start_index` ends at `start_position` (the ring starts after it).
        self.commit_index = start_index
        self.commit_position = start_position
        self.written_index = start_index
        # (first index, [end of each entry from the first]); entries of the first run before
        # `_committed_in_first` are committed already.
        self._runs: deque[tuple[int, list[int]]] = deque()
        self._committed_in_first = 0

    def wrote(self, index: int, end_position: int) -> None:
        """Entry `index` is written to the ring and ends at `end_position`."""
        assert index == self.written_index + 1, (index, self.written_index)
        self.written_index = index
        self._runs.append((index, [end_position]))

    def wrote_run(self, first_index: int, start_position: int, lengths: Iterable[int]) -> None:
        """Entries `first_index`, ... of these byte lengths are written back to back from
        `start_position` (one copy of a run: no per-entry Python)."""
        assert first_index == self.written_index + 1, (first_index, self.written_index)
        ends = list(accumulate(lengths, initial=start_position))
        del ends[0]
        if ends:
            self._runs.append((first_index, ends))
            self.written_index = first_index + len(ends) - 1

    def commit(self, index: int) -> bool:
        """The Raft commit is at least `index`: move the commit to the highest written entry up to
        it. Returns whether the commit position moved."""
        runs = self._runs
        moved = False
        while runs:
            first, ends = runs[0]
            offset = index - first  # of the entry at `index` in this run
            if offset >= len(ends) - 1:  # the whole run is committed
                runs.popleft()
                if len(ends) > self._committed_in_first:  # not if a cut left only committed ones
                    self.commit_index = first + len(ends) - 1
                    self.commit_position = ends[-1]
                    moved = True
                self._committed_in_first = 0
                continue
            if offset >= self._committed_in_first:
                self._committed_in_first = offset + 1
                self.commit_index = index
                self.commit_position = ends[offset]
                moved = True
            break
        return moved

    def drop_after(self, index: int) -> None:
        """Forget the ends of entries after `index` (never below the commit)."""
        assert index >= self.commit_index, (index, self.commit_index)
        runs = self._runs
        while runs and runs[-1][0] > index:
            runs.pop()
        if runs:
            first, ends = runs[-1]
            del ends[index - first + 1 :]
        self.written_index = index
