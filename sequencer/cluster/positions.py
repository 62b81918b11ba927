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
from collections.abc import Sequence, Sized
from itertools import accumulate

__all__ = ["RingPositions"]


class _Run:
    """Entries `first .. last` written back to back, the last ending at `end`."""

    __slots__ = ("end", "ends", "first", "last", "records", "start")

    def __init__(
        self, first: int, last: int, end: int, start: int, records: Sequence[Sized]
    ) -> None:
        self.first = first
        self.last = last
        self.end = end
        self.start = start  # where the first begins
        self.records = records  # what `len` measures: each entry's ring bytes
        # The end of each entry from the first: worked out only when a commit or a cut falls
        # inside the run.
        self.ends: list[int] | None = None

    def end_of(self, index: int) -> int:
        """The end of entry `index` of the run."""
        ends = self.ends
        if ends is None:
            ends = self.ends = list(accumulate(map(len, self.records), initial=self.start))
        return ends[index - self.first + 1]


class RingPositions:
    """Invariants: `commit_index` <= `written_index`; the runs held cover the entries
    `commit_index + 1 .. written_index`, back to back (the first may begin with committed ones).

    Held by run, as written (a run of a proposal batch or an AppendEntries, tens to hundreds of
    entries under load), each with the end of its last entry: the commit moves by run, so a pass
    costs per run, not per entry (one (index, end) pair held and popped per entry cost 1,598
    instructions an entry, by run 410: benches.replicator_paths). The end of each entry of a run
    is needed only when the commit or a cut falls inside it, and is worked out from the run's
    records then, once: a list of every run's ends cost ~500 instructions an entry more.
    """

    __slots__ = ("_runs", "commit_index", "commit_position", "written_index")

    def __init__(self, start_index: int, start_position: int) -> None:
        # The entry at `start_index` ends at `start_position` (the ring starts after it).
        self.commit_index = start_index
        self.commit_position = start_position
        self.written_index = start_index
        self._runs: deque[_Run] = deque()

    def wrote(self, index: int, end_position: int) -> None:
        """Entry `index` is written to the ring and ends at `end_position`."""
        assert index == self.written_index + 1, (index, self.written_index)
        self.written_index = index
        self._runs.append(_Run(index, index, end_position, end_position, ()))

    def wrote_run(self, first_index: int, start_position: int, end_position: int,
                  records: Sequence[Sized]) -> None:  # fmt: skip
        """Entries `first_index`, ... are `records`, written back to back from `start_position` to
        `end_position` (one copy of a run: no per-entry Python). The list is kept as it is, not
        copied, until the commit passes it: the caller must not change it."""
        assert first_index == self.written_index + 1, (first_index, self.written_index)
        if records:
            last_index = first_index + len(records) - 1
            self._runs.append(_Run(first_index, last_index, end_position, start_position, records))
            self.written_index = last_index

    def commit(self, index: int) -> bool:
        """The Raft commit is at least `index`: move the commit to the highest written entry up to
        it. Returns whether the commit position moved."""
        runs = self._runs
        moved = False
        while runs:
            run = runs[0]
            last = run.last
            if index >= last:  # the whole run is committed
                runs.popleft()
                if last > self.commit_index:  # not if a cut left only committed ones
                    self.commit_index = last
                    self.commit_position = run.end
                    moved = True
                continue
            if index > self.commit_index:  # inside the run (the runs begin at most one past it)
                self.commit_index = index
                self.commit_position = run.end_of(index)
                moved = True
            break
        return moved

    def drop_after(self, index: int) -> None:
        """Forget the ends of entries after `index` (never below the commit)."""
        assert index >= self.commit_index, (index, self.commit_index)
        runs = self._runs
        while runs and runs[-1].first > index:
            runs.pop()
        if runs:
            run = runs[-1]
            if run.last > index:
                run.end = run.end_of(index)
                run.last = index
        self.written_index = index
