"""Where the Raft log lives once the core has dropped it from memory: the `LogStorage` interface.

The core keeps in memory only the tail of its log: the entries not yet committed, applied and
durable, plus a retention window below them (`RaftConfig.log_retention_entries`), so a follower a
little behind is served without reading the disk. Entries below that are dropped from memory and
read back through the caller's `LogStorage` when a lagging follower needs them (`Leader` builds an
AppendEntries from it) or when a term at an old index is asked for (the 5.3 consistency check).

The core only reads storage, and only at indexes it knows are durable (at most its stable index,
above its snapshot): the caller writes the log through `Ready.entries`, as before. In the daemon
the journal is the storage (one log: a record's index in the ring, the journal and the Raft log is
one number, and the payload is the record); `MemoryLogStorage` is the in-memory implementation the
simulator uses as its disk.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["LogStorage", "MemoryLogStorage"]


class LogStorage(Protocol):
    """Read access to the durable log (Raft paper, Figure 2, "log[]"), by index.

    Both methods are asked only about durable entries above the latest snapshot the core knows;
    an index outside what the storage holds is a programmer error of the caller.
    """

    def term(self, index: int) -> int | None:
        """The term of the durable entry at `index`, or None when the storage no longer holds it
        (compacted into a snapshot)."""
        ...

    def entries(
        self, first_index: int, last_index: int, bytes_max: int
    ) -> tuple[list[int], list[bytes]]:
        """Terms and payloads of the entries `first_index .. last_index` (inclusive).

        Returns at least one entry and stops early, after the entry that reaches `bytes_max`
        payload bytes, so one read (and one AppendEntries) stays bounded however large the
        records are.
        """
        ...


class MemoryLogStorage:
    """A `LogStorage` in lists: entries `snapshot_index + 1 .. last_index`.

    The simulator's disk. `write` has the semantics of one `Ready.entries` made durable: truncate
    after `first_index - 1`, then append.
    """

    __slots__ = ("payloads", "snapshot_index", "terms")

    def __init__(self) -> None:
        self.snapshot_index = 0
        self.terms: list[int] = []
        self.payloads: list[bytes] = []

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.terms)

    def term(self, index: int) -> int | None:
        offset = index - self.snapshot_index
        if offset <= 0 or offset > len(self.terms):
            return None
        return self.terms[offset - 1]

    def entries(
        self, first_index: int, last_index: int, bytes_max: int
    ) -> tuple[list[int], list[bytes]]:
        assert self.snapshot_index < first_index <= last_index, (first_index, last_index)
        assert last_index <= self.last_index, (last_index, self.last_index)
        low = first_index - self.snapshot_index - 1
        high = last_index - self.snapshot_index
        payloads = self.payloads
        end = low
        total_bytes = 0
        while end < high:
            total_bytes += len(payloads[end])
            end += 1
            if total_bytes >= bytes_max:
                break
        return self.terms[low:end], payloads[low:end]

    def write(self, first_index: int, terms: list[int], payloads: list[bytes]) -> None:
        """Truncate after `first_index - 1`, then append (one durable write of a ready)."""
        keep = first_index - 1 - self.snapshot_index
        assert 0 <= keep <= len(self.terms), (first_index, self.snapshot_index, len(self.terms))
        del self.terms[keep:]
        del self.payloads[keep:]
        self.terms.extend(terms)
        self.payloads.extend(payloads)

    def compact(self, index: int) -> None:
        """Drop the entries up to `index`: a durable snapshot covers them."""
        drop = index - self.snapshot_index
        assert 0 < drop <= len(self.terms), (index, self.snapshot_index, len(self.terms))
        del self.terms[:drop]
        del self.payloads[:drop]
        self.snapshot_index = index

    def restore(self, snapshot_index: int) -> None:
        """Discard every entry: a snapshot at `snapshot_index` replaces the log."""
        self.snapshot_index = snapshot_index
        self.terms = []
        self.payloads = []
