"""Events from a node's journal, by applying its records in-process (the offline and rebuild path).

The journal holds commands, not events: the events are what the app publishes when it applies
them. So this source runs the app itself, a `Processor` fed record by record from the journal
(as the blp and the history checker do), and hands on each event it publishes with the
record's index and timestamp. The app is deterministic, so these are the events the node
published, in the same order, bit for bit.

To start after index 1 it restores the newest valid snapshot before `from_index` (if a snapshot
directory is given) and replays the records up to it without decoding events.

Following a live journal (`follow=True`): at the end of what is written it yields `None`,
waits `poll_s` and reads on. A record written but not yet fsynced could vanish in a power loss
and its index be reused by the restarted node, so a live node's records are read only up to
`commit_index()` when given (the node's `commit.index` counter); on a cluster node, records
past the commit index may also be truncated by a new leader, so there it is required.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sequencer import snapshot as snapshots
from sequencer.egress import EVENT_HEADER, EgressKind
from sequencer.journal import JournalReader
from sequencer.processor import Processor
from sequencer.projection.projection import ProjectionError, SourceEvent
from sequencer.record import FRAME_HEADER_BYTES
from sequencer.recovery import earliest_start, replay, restore
from sequencer.snapshot import LoadedSnapshot
from sequencer.state_machine import StateMachine

__all__ = ["POLL_S_DEFAULT", "JournalSource"]

POLL_S_DEFAULT = 0.01  # between reads at the end of a live journal: latency vs wake-ups
# A node name no node has: the processor then emits no replies (only events are wanted).
_NO_NODE = " projector"
_EVENT = int(EgressKind.EVENT)
_EVENT_OMITTED = int(EgressKind.EVENT_OMITTED)


class JournalSource:
    """See the module docstring.

    Args:
        app_class: the node's StateMachine.
        journal_dir: the node's journal directory.
        snapshot_dir: its snapshot directory, to start late indexes fast (None: replay from 1).
        follow: keep reading as the journal grows; else stop at its end.
        commit_index: the highest index safe to read (a live node's commit index; None from
            it: no limit).
        poll_s: the wait at the end of a live journal.
    """

    def __init__(
        self,
        app_class: type[StateMachine],
        journal_dir: Path | str,
        snapshot_dir: Path | str | None = None,
        *,
        follow: bool = False,
        commit_index: Callable[[], int | None] | None = None,
        poll_s: float = POLL_S_DEFAULT,
    ) -> None:
        self.app_class = app_class
        self.journal_dir = Path(journal_dir)
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.follow = follow
        self.commit_index = commit_index
        self.poll_s = poll_s

    def _start(self, from_index: int) -> Processor[Any]:
        """A processor at the record before `from_index`."""
        start: LoadedSnapshot | None = None
        if self.snapshot_dir is not None:
            start = earliest_start(self.snapshot_dir, self.journal_dir)
            usable = [info for info in snapshots.list_snapshots(self.snapshot_dir)
                      if info.valid and info.index < from_index]  # fmt: skip
            if usable:
                newest = max(usable, key=lambda info: info.index)
                if start is None or newest.index > start.header.index:
                    header, body = snapshots.read_snapshot(newest.path)
                    start = LoadedSnapshot(newest.path, header, body, [])
            if start is not None and start.header.index >= from_index:
                raise ProjectionError(
                    f"the journal {self.journal_dir} no longer holds index {from_index} and the "
                    f"oldest usable snapshot is at {start.header.index}: the projection cannot "
                    "resume from the journal; rebuild it from a source that still has its events"
                )
        processor = restore(self.app_class, start, node=_NO_NODE)
        if from_index > 1:
            replay(processor, self.journal_dir, from_index - 1)
        return processor

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        """Every event at index >= from_index; see the module docstring.

        Raises:
            JournalError: the journal no longer holds the records needed (retention) or is
                damaged; ProjectionError: an event was too large to publish.
        """
        assert from_index >= 1, from_index
        processor = self._start(from_index)
        decode_event = processor.schema.decode_event
        reader = JournalReader(self.journal_dir, processor.applied_index + 1)
        try:
            while True:
                limit = None if self.commit_index is None else self.commit_index()
                for record in reader.read(limit):
                    raw = record.raw
                    processor.apply_frame(record.type | record.version << 16,
                                          raw[FRAME_HEADER_BYTES : record.length])  # fmt: skip
                    processor.snapshot_requested = False  # a source writes no snapshots
                    outputs = processor.drain_outputs()
                    if not outputs:
                        continue
                    index, timestamp_ns = record.index, record.timestamp_ns
                    for kind, frame in outputs:
                        if kind == _EVENT:
                            _index, version = EVENT_HEADER.unpack_from(frame, 0)
                            event = decode_event(version, frame[EVENT_HEADER.size :])
                            yield SourceEvent(index, timestamp_ns, event)
                        elif kind == _EVENT_OMITTED:
                            raise ProjectionError(
                                f"the event at index {index} is larger than an event may be "
                                "(sequencer.egress.EVENT_PAYLOAD_BYTES_MAX), so the node published "
                                "an EVENT_OMITTED marker instead: no read model can include it. "
                                "Publish smaller events"
                            )
                if not self.follow:
                    return
                yield None
                time.sleep(self.poll_s)
        finally:
            reader.close()
