"""`seqd backup --config FILE --to DIR`: a consistent backup of a running node, cut at an index
known committed.

Theory of operation
-------------------
A node's durable state is a snapshot plus the journal after it. A backup taken from a running
node must be a state the cluster really reached: on a follower or learner the journal may end
with entries not yet committed (a new leader could still replace them), and the segment being
written may be caught mid-batch. So:

1. Read the node's commit index C from its counters (`raft.commit.index` in a cluster,
   `commit.index` on a single node): every record up to C is committed and durable here.
2. Copy the newest valid snapshot at or below C (a snapshot file is written whole, then renamed:
   a copy is never partial), then every journal segment from the one holding the snapshot's
   index + 1 to the last, in order.
3. Open the copied journal (recovery truncates a torn tail: the batch being written), check it
   holds C, and cut it after C. Damage followed by valid records (a write landed behind the
   copy's read position) or a segment that retention deleted meanwhile: copy again, at most
   `COPY_ATTEMPTS_MAX` times.
4. Write `BACKUP.json` (the index, the snapshot's, the node, the time).

The result is the data directory of a single node at index C: `node.data_dir` of a fresh node
(without `[cluster]`) restores it (recovery: the snapshot, then the journal up to C), and its
state hash at C is the cluster's. Take it from a learner or a follower, so the leader does no
extra work. docs/operations.md gives the procedure.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from daemon.config import Config
from daemon.layout import CounterView, attach_counters, commit_index_counter
from ipc.segment import SegmentError
from sequencer import snapshot as snapshots
from sequencer.journal import Journal, JournalError, list_segments

__all__ = ["COPY_ATTEMPTS_MAX", "MANIFEST_NAME", "Backup", "BackupError", "take_backup"]

# A copy is retried when a write or a retention pass raced it; each race needs the node to write
# exactly behind the copy's read position, so three attempts in a row failing means something
# else is wrong (and is reported).
COPY_ATTEMPTS_MAX: Final = 3
MANIFEST_NAME: Final = "BACKUP.json"


class BackupError(Exception):
    """The backup could not be taken; the message says why and what to do."""


@dataclass(frozen=True)
class Backup:
    index: int  # the journal is cut here: the backup's state is the node's at this index
    snapshot_index: int  # the snapshot it starts from (0: the journal from index 1)
    node: str
    taken_at_s: float


def _commit_index(config: Config) -> int:
    try:
        counters = attach_counters(config.node.name)
    except SegmentError as error:
        raise BackupError(
            f"node {config.node.name} is not running ({error}): a stopped node needs no hot "
            "backup; copy its data directory (docs/operations.md, 'Cold')"
        ) from None
    view = CounterView(counters, None)
    try:
        return view[commit_index_counter(config.cluster is not None)].get()
    finally:
        view.close()


def _copy_once(config: Config, target: Path, index: int) -> int:
    """One attempt; returns the snapshot index. Raises JournalError or OSError on a race."""
    if target.exists():
        shutil.rmtree(target)
    (target / "snapshots").mkdir(parents=True)
    (target / "journal").mkdir()
    snapshot_index = 0
    for info in snapshots.list_snapshots(config.snapshot_dir):
        if info.valid and info.index <= index:
            shutil.copy2(info.path, target / "snapshots" / info.path.name)
            snapshot_index = info.index
            break
    segments = list_segments(config.journal_dir)
    first = 0
    for position, (first_index, _path) in enumerate(segments):
        if first_index <= snapshot_index + 1:
            first = position
    if not segments or segments[first][0] > snapshot_index + 1:
        raise JournalError(
            f"the journal has no segment holding index {snapshot_index + 1} (the one after the "
            "snapshot): retention deleted it"
        )
    for _first_index, path in segments[first:]:
        shutil.copy2(path, target / "journal" / path.name)
    journal = Journal.open(target / "journal", segment_bytes=config.journal.segment_bytes, preallocate=False)
    try:
        if journal.last_index < index:
            raise JournalError(f"the copied journal ends at {journal.last_index}, before the commit index {index}")
        journal.truncate_after(index)
    finally:
        journal.close()
    return snapshot_index


def take_backup(config: Config, target: Path | str) -> Backup:
    """Back up the running node of `config` into the new directory `target` (see the module
    docstring).

    Raises:
        BackupError: the node does not run, `target` exists, or every copy attempt raced.
    """
    target = Path(target)
    if target.exists():
        raise BackupError(f"{target} exists: back up into a new directory (a backup is never merged)")
    index = _commit_index(config)
    if index == 0:
        raise BackupError(f"node {config.node.name} has committed nothing yet: nothing to back up")
    problems: list[str] = []
    for _attempt in range(COPY_ATTEMPTS_MAX):
        try:
            snapshot_index = _copy_once(config, target, index)
        except (JournalError, OSError) as error:
            problems.append(str(error))
            continue
        backup = Backup(index, snapshot_index, config.node.name, time.time())
        (target / MANIFEST_NAME).write_text(json.dumps(asdict(backup), indent=2) + "\n")
        return backup
    shutil.rmtree(target, ignore_errors=True)
    raise BackupError(
        f"{COPY_ATTEMPTS_MAX} copies of node {config.node.name}'s journal raced its writes or "
        f"retention: {problems[-1]}; run it again, or take it from a learner under less load"
    )
