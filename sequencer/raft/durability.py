"""How far a node's durable log agrees with its log: the entry writes in progress (Raft thesis
10.2.1, asynchronous storage writes).

The core hands out entry writes in its readies and the caller reports each durable later (or at
once, a synchronous caller). Writes complete in the order they are handed out, so a report of one
write vouches for every write before it. `stable_index` is the index up to which the durable log
agrees with the core's log: a leader counts itself toward a majority only up to it, a follower
acknowledges only up to it, and only entries up to it are applied.

The "ABA" rule (etcd-io/raft's asynchronous writes): a conflict may truncate the log below the
end of a write still in progress, and the same (index, term) may then be written again. Each
outstanding write is remembered with its agreed index, how far it will still agree with the log
once it lands: its last index, lowered when a change of the log begins at or below it. A late
report of a write that a newer one overwrites therefore vouches only for what survives.
"""

from __future__ import annotations

from collections import deque

__all__ = ["DurableWrites"]


class DurableWrites:
    """The durable index and the entry writes handed out and not yet reported durable."""

    __slots__ = ("_writes", "stable_index")

    def __init__(self, stable_index: int) -> None:
        # Invariant: stable_index <= the log's last index.
        self.stable_index = stable_index
        # Oldest first: [last index, last term, agreed index, first index].
        self._writes: deque[list[int]] = deque()

    def started(self, first_index: int, last_index: int, last_term: int) -> None:
        """A ready handed out the write of entries `first_index`..`last_index`."""
        writes = self._writes
        # Nothing changed the log since the ready was built (nothing steps while it is
        # outstanding), so the write agrees with the log up to its last index; a later change
        # lowers that.
        assert not writes or writes[-1][2] < first_index, (writes[-1], first_index)
        writes.append([last_index, last_term, last_index, first_index])

    def written(self, first_index: int, last_index: int) -> None:
        """A synchronous caller wrote entries `first_index`..`last_index` durably: so is every
        write before it (writes complete in order), so the durable log is the log up to there."""
        writes = self._writes
        assert not writes or writes[-1][2] < first_index, (writes[-1], first_index)
        writes.clear()
        self.stable_index = last_index

    def landed(self, index: int, term: int) -> bool:
        """The write that ended at (`index`, `term`) is durable, and every write before it.

        Raises `stable_index` to what that write left agreeing with the log. Returns whether an
        outstanding write ended there (False: a report superseded by a snapshot).
        """
        writes = self._writes
        if len(writes) == 1:
            # The common case (a synchronous caller, or an idle moment): no search.
            write = writes[0]
            if write[0] != index or write[1] != term:
                return False
            writes.clear()
            if write[2] > self.stable_index:
                self.stable_index = write[2]
            return True
        count = 0
        for write in writes:
            count += 1
            if write[0] == index and write[1] == term:
                break
        else:
            return False
        for _ in range(count):
            write = writes.popleft()
        if write[2] > self.stable_index:
            self.stable_index = write[2]
        return True

    def landed_through(self, index: int) -> None:
        """The oldest write in progress is durable up to `index`, not yet to its end (every write
        before it was reported with `landed`): a caller whose writes land in parts.

        Raises `stable_index` to what that part left agreeing with the log; the write stays
        outstanding. A report outside the oldest write's entries changes nothing.
        """
        writes = self._writes
        if not writes:
            return
        last_index, _term, agreed_index, first_index = writes[0]
        if first_index <= index < last_index:
            reached = min(index, agreed_index)
            if reached > self.stable_index:
                self.stable_index = reached

    def overwritten_from(self, changed: int) -> None:
        """The log changed from index `changed` on (a conflict truncated it there)."""
        if changed <= self.stable_index:
            self.stable_index = changed - 1
        # Writes in progress that reach `changed` will be overwritten by the write of the new
        # entries: once durable, they agree with the log only below it (the ABA rule).
        for write in self._writes:
            if write[2] >= changed:
                write[2] = changed - 1

    def superseded(self, snapshot_index: int) -> None:
        """A snapshot at `snapshot_index` replaced the log: writes in progress no longer count
        (the caller finishes them before it writes the snapshot, and their reports are ignored)."""
        self.stable_index = min(self.stable_index, snapshot_index)
        self._writes.clear()

    def snapshot_durable(self, snapshot_index: int) -> None:
        """The snapshot at `snapshot_index` is durable: the log agrees with it up to there."""
        self.stable_index = max(self.stable_index, snapshot_index)
