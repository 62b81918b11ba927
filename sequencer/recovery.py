"""Recovery: a snapshot (or genesis), then the journal after it. The one home of replay.

    found = snapshots.newest_valid_snapshot(snapshot_dir, report)   # or earliest_start(...)
    recovered = recover(App, journal_dir, found, to_index, node="n1")
    recovered.processor                                              # at to_index

Used by the blp at start-up (the newest valid snapshot, replay to the index the supervisor found),
`seqd verify` (the earliest start, a rolling hash after each record), `seqd snapshot verify` (each
snapshot rebuilt from the one before) and the benchmarks. Replay is the processor's fast path:
`read_runs` hands one view per journal batch to `Processor.replay_run`, which walks the records
(`record.walk_records`) and applies them; outputs are discarded, and SNAPSHOT records write
nothing (a snapshot met in the replay was written before the crash, or is lost with it; the next
one will come).

This module reads files (snapshots, journal segments); the I/O-free processor never imports it.
Which snapshot to start from is the caller's choice, because it differs: the newest is the
fastest recovery, the earliest replays the most (a determinism check).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sequencer import snapshot as snapshots
from sequencer.journal import list_segments, read_runs
from sequencer.processor import CLIENT_EXPIRY_NS_DEFAULT, Processor
from sequencer.snapshot import LoadedSnapshot
from sequencer.state_machine import StateMachine

__all__ = ["Recovered", "RecoveryError", "earliest_start", "recover", "replay", "restore"]


class RecoveryError(Exception):
    """No starting point covers the journal (its first records went with retention)."""


@dataclass
class Recovered:
    processor: Processor[Any]  # at the last replayed index
    snapshot: LoadedSnapshot | None  # where the replay started; None: genesis
    replayed: int  # records applied from the journal
    restore_s: float  # decoding the snapshot into the processor and the app
    replay_s: float  # reading and applying the journal


def recover(
    app_class: type[StateMachine],
    journal_dir: Path | str,
    snapshot: LoadedSnapshot | None,
    to_index: int | None = None,
    *,
    node: str | None = None,
    debug: bool = False,
    client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
    progress: Callable[[int], object] | None = None,
    after_each: Callable[[Processor[Any]], object] | None = None,
) -> Recovered:
    """Restore `snapshot` (None: a new state), then replay the journal after it to `to_index`.

    Args:
        node, debug, client_expiry_ns: as for `Processor`.
        to_index: the last record to apply; None: whatever the journal holds.
        progress: called with the records replayed so far, after each journal batch.
        after_each: called with the processor after each record (slower; for `seqd verify`).

    Raises:
        JournalError: the journal no longer holds the records after the snapshot, or ends before
            `to_index`; JournalCorruptError for damage in the middle of the log.
        ProcessorError, VersionError: the snapshot cannot be restored by this app.
    """
    started = time.perf_counter()
    processor = restore(app_class, snapshot, node=node, debug=debug,
                        client_expiry_ns=client_expiry_ns)  # fmt: skip
    restored = time.perf_counter()
    replayed = replay(processor, journal_dir, to_index, progress=progress, after_each=after_each)
    return Recovered(processor, snapshot, replayed, restored - started, time.perf_counter() - restored)


def restore(
    app_class: type[StateMachine],
    snapshot: LoadedSnapshot | None,
    *,
    node: str | None = None,
    debug: bool = False,
    client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
) -> Processor[Any]:
    """A processor restored from `snapshot`, or a new one at index 0."""
    if snapshot is None:
        return Processor(app_class, node, debug=debug, client_expiry_ns=client_expiry_ns)
    return Processor.restore(app_class, snapshot.body, node, debug=debug,
                             client_expiry_ns=client_expiry_ns)  # fmt: skip


def replay(
    processor: Processor[Any],
    journal_dir: Path | str,
    to_index: int | None = None,
    *,
    progress: Callable[[int], object] | None = None,
    after_each: Callable[[Processor[Any]], object] | None = None,
) -> int:
    """Apply the journal's records after `processor.applied_index` up to `to_index` (None: to
    the end); returns how many. Raises as `recover`."""
    if to_index is not None and to_index <= processor.applied_index:
        return 0
    replayed = 0
    for run in read_runs(journal_dir, processor.applied_index + 1, to_index):
        replayed += processor.replay_run(run, after_each)
        if progress is not None:
            progress(replayed)
    return replayed


def earliest_start(snapshot_dir: Path | str, journal_dir: Path | str) -> LoadedSnapshot | None:
    """The earliest point the journal can be replayed from: genesis (None) while it still holds
    record 1, else the oldest valid snapshot at or after the record before its first.

    Raises:
        RecoveryError: retention deleted the first records and no valid snapshot covers them.
    """
    segments = list_segments(journal_dir)
    first_index = segments[0][0] if segments else 1
    if first_index <= 1:
        return None
    usable = sorted(
        (info for info in snapshots.list_snapshots(snapshot_dir)
         if info.valid and info.index >= first_index - 1),
        key=lambda info: info.index,
    )  # fmt: skip
    if not usable:
        raise RecoveryError(
            f"the journal {journal_dir} starts at index {first_index} (older segments were "
            f"deleted) and no valid snapshot at or after index {first_index - 1} exists in "
            f"{snapshot_dir}: nothing to replay from. Restore the snapshots or the journal from "
            "a backup or a replica."
        )
    header, body = snapshots.read_snapshot(usable[0].path)
    return LoadedSnapshot(usable[0].path, header, body, [])
