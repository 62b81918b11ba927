"""The replicator's side of the log ring: entries waiting for room in it, written in runs.

In cluster mode the replicator is the log ring's one writer (docs/cluster.md). Every entry the core
hands out (its own stamped proposals on a leader, a leader's entries on a follower, the journal's
tail at start) is a whole record, padded to 8 bytes, exactly as the ring holds it: a stamped
proposal keeps its record's length, a forwarded record is checked whole (`malformed`), a
journal read returns each record's raw bytes with their pad. So a run of them is copied into the
ring with one join and one copy (`RingWriter.try_write_joined`) and its ring ends recorded without
per-entry Python (`RingPositions.wrote_run`); only a run that meets the wrap or the gate goes entry
by entry up to there. One `write` writes one run at most, so a long queue is written over several
passes of the replicator's loop (it schedules the next pass itself while entries wait and the ring
takes them), each published at once for the journaller and the blp. This was ~15.7k instructions
per entry written entry by entry, ~2.1k in runs.

The log ring's writer owns `log.published.*` (`CounterSpec.cluster_owner`), so this is where they
are written: the index written last, then the ring's cursor.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

from ipc.counters import Counter
from ipc.ring_writer import RingWriter
from sequencer.cluster import RingPositions
from sequencer.record import FRAME_HEADER

__all__ = ["WRITE_RUN_RECORDS_MAX", "RingFeed"]

# Records joined into one copy into the log ring: 512 records of ~100-200 bytes is under 128 KiB
# (a log ring holds MiBs), several group commits' worth under load.
WRITE_RUN_RECORDS_MAX = 512


class RingFeed:
    """Entries queued for the log ring, in index order, as the lists they were handed in (a
    ready's entries: one AppendEntries or proposal batch each), so an entry is neither copied nor
    moved on its way to the ring but by the join. Invariant: `runs[0][head]` is the entry at
    `next_index`, `next_index - 1` is `positions.written_index` (the last written), and the runs
    hold `end_index - next_index` entries after it."""

    __slots__ = ("end_index", "head", "index_counter", "next_index", "owned_tail", "position_counter", "positions",
                 "runs", "writer")  # fmt: skip

    def __init__(self, writer: RingWriter, positions: RingPositions, index_counter: Counter,
                 position_counter: Counter) -> None:  # fmt: skip
        self.writer = writer
        self.positions = positions
        self.runs: deque[list[bytes]] = deque()
        self.head = 0  # entries of `runs[0]` written already
        self.owned_tail: list[bytes] | None = None  # the last run, when it is this feed's own copy
        self.next_index = positions.written_index + 1
        self.end_index = self.next_index  # the index after the last entry queued (or written)
        self.index_counter = index_counter
        self.position_counter = position_counter
        index_counter.set(positions.written_index)
        position_counter.set(writer.published_position)

    def __len__(self) -> int:
        return self.end_index - self.next_index

    def extend(self, records: list[bytes]) -> None:
        """Queue `records` after the rest. The list itself is kept (and then held by `positions`
        until committed), not copied: the caller must not change it afterwards."""
        if records:
            self.runs.append(records)
            self.end_index += len(records)

    def pop_last(self) -> bytes:
        """Unqueue the last entry (replaced before it reached the ring)."""
        runs = self.runs
        tail = runs[-1]
        if tail is not self.owned_tail:  # the caller's list: copied once, not changed
            tail = runs[-1] = self.owned_tail = tail[:]
        record = tail.pop()
        self.end_index -= 1
        if len(tail) == (self.head if len(runs) == 1 else 0):  # nothing of it left to write
            runs.pop()
            self.owned_tail = None
            if not runs:
                self.head = 0
        return record

    def write(self) -> bool:
        """Write what the ring has room for and publish. Returns whether anything was written."""
        runs = self.runs
        if not runs:
            return False
        writer = self.writer
        positions = self.positions
        run = runs[0]
        if self.head or len(runs) > 1 or len(run) > WRITE_RUN_RECORDS_MAX:
            run = self._gather()
        start = writer.claim_position
        if writer.try_write_joined(b"".join(run)):
            positions.wrote_run(self.next_index, start, writer.claim_position, run)
            self._written(len(run))
        else:
            # The run meets the wrap or the gate: entry by entry, this run only. Going on through
            # the whole queue (a follower catching up holds tens of thousands of entries) held the
            # replicator's loop for a large part of a second and published nothing until the ring
            # was full, while the journaller and the blp idled (benches/RESULTS.md, "Catch-up").
            claim = writer.try_claim
            index = self.next_index
            for record in run:
                length, frame_type = FRAME_HEADER.unpack_from(record)
                view = claim(length - 8, frame_type)
                if view is None:
                    break  # the ring is full (the blp or the journaller is behind): next pass
                view[:] = record[8:length]
                positions.wrote(index, writer.claim_position)
                index += 1
            if index == self.next_index:
                return False
            self._written(index - self.next_index)
            writer.publish()
        # The index first: a reader that sees the position sees an index at least as new.
        self.index_counter.set(positions.written_index)
        self.position_counter.set(writer.published_position)
        return True

    def _gather(self) -> list[bytes]:
        """The next run to write as one list: up to WRITE_RUN_RECORDS_MAX entries from `head`,
        across the lists queued (a copy: the lists stay as they are)."""
        runs = self.runs
        run = runs[0][self.head : self.head + WRITE_RUN_RECORDS_MAX]
        for more in islice(runs, 1, None):
            room = WRITE_RUN_RECORDS_MAX - len(run)
            if room <= 0:
                break
            run += more[:room]
        return run

    def _written(self, count: int) -> None:
        """The next `count` entries are in the ring: unqueue them."""
        self.next_index += count
        runs = self.runs
        head = self.head + count
        while runs and head >= len(runs[0]):
            head -= len(runs.popleft())
        if not runs:
            self.owned_tail = None
        self.head = head
