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
from collections.abc import Iterable
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
    """Entries queued for the log ring, in index order. Invariant: `records[0]` is the entry at
    `next_index`, and `next_index - 1` is `positions.written_index` (the last written)."""

    __slots__ = ("index_counter", "next_index", "position_counter", "positions", "records", "writer")

    def __init__(self, writer: RingWriter, positions: RingPositions, index_counter: Counter,
                 position_counter: Counter) -> None:  # fmt: skip
        self.writer = writer
        self.positions = positions
        self.records: deque[bytes] = deque()
        self.next_index = positions.written_index + 1
        self.index_counter = index_counter
        self.position_counter = position_counter
        index_counter.set(positions.written_index)
        position_counter.set(writer.published_position)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def end_index(self) -> int:
        """The index after the last entry queued (or written)."""
        return self.next_index + len(self.records)

    def extend(self, records: Iterable[bytes]) -> None:
        self.records.extend(records)

    def pop_last(self) -> bytes:
        """Unqueue the last entry (replaced before it reached the ring)."""
        return self.records.pop()

    def write(self) -> bool:
        """Write what the ring has room for and publish. Returns whether anything was written."""
        records = self.records
        if not records:
            return False
        writer = self.writer
        positions = self.positions
        run = list(islice(records, WRITE_RUN_RECORDS_MAX))
        start = writer.claim_position
        if writer.try_write_joined(b"".join(run)):
            if len(run) == len(records):
                records.clear()
            else:
                for _ in range(len(run)):
                    records.popleft()
            positions.wrote_run(self.next_index, start, map(len, run))
            self.next_index += len(run)
        else:
            # The run meets the wrap or the gate: entry by entry, this run only. Going on through
            # the whole queue (a follower catching up holds tens of thousands of entries) held the
            # replicator's loop for a large part of a second and published nothing until the ring
            # was full, while the journaller and the blp idled (benches/RESULTS.md, "Catch-up").
            claim = writer.try_claim
            written = 0
            for record in run:
                length, frame_type = FRAME_HEADER.unpack_from(record)
                view = claim(length - 8, frame_type)
                if view is None:
                    break  # the ring is full (the blp or the journaller is behind): next pass
                view[:] = record[8:length]
                positions.wrote(self.next_index, writer.claim_position)
                self.next_index += 1
                written += 1
            if not written:
                return False
            for _ in range(written):
                records.popleft()
            writer.publish()
        # The index first: a reader that sees the position sees an index at least as new.
        self.index_counter.set(positions.written_index)
        self.position_counter.set(writer.published_position)
        return True
