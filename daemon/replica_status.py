"""The query replicas' part of `seqd status` (daemon/status.py): applied index, lag, load; and
the snapshotter's (`snapshot.writer = "replica"`): applied index, lag, the last snapshot it wrote.

A replica's counters are its own block (`replica<k>.*`, daemon/layout.py); a replica the
supervisor has not started (its pid 0, and never restarted) is not shown at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.layout import REPLICA_COUNTERS, SNAPSHOTTER_COUNTERS, ReplicaCounters, committed_index
from daemon.text_table import cell, table

__all__ = [
    "ReplicaStatus", "SnapshotterStatus", "replica_statuses", "replicas_json", "replicas_table",
    "snapshotter_json", "snapshotter_status", "snapshotter_table",
]


@dataclass(frozen=True)
class ReplicaStatus:
    """A query replica (`[replicas]`): how far it has applied and what it serves."""

    name: str  # replica<k>
    pid: int | None
    running: bool | None
    applied_index: int | None
    lag_records: int | None  # commit.index - applied index
    subscribers: int | None
    queries: int | None
    restarts: int | None
    errors: int | None


def _status(
    block: ReplicaCounters, values: Mapping[str, int], supervisor_alive: bool,
    pid_alive: Callable[[int], bool],
) -> ReplicaStatus:  # fmt: skip
    pid = values.get(block.pid.name) or None
    running = None if pid is None else supervisor_alive and pid_alive(pid)

    def own(name: str) -> int | None:
        return values.get(name) if pid is not None else None

    applied = own(block.applied_index.name)
    commit = committed_index(values)
    return ReplicaStatus(
        name=block.owner,
        pid=pid,
        running=running,
        applied_index=applied,
        lag_records=None if applied is None or commit is None else max(commit - applied, 0),
        subscribers=own(block.subscribers.name),
        queries=own(block.queries.name),
        restarts=values.get(block.restarts.name),
        errors=own(block.errors.name),
    )


def replica_statuses(
    values: Mapping[str, int], supervisor_alive: bool, pid_alive: Callable[[int], bool]
) -> list[ReplicaStatus]:
    """One status per replica the supervisor started (now or before a restart)."""
    return [
        _status(block, values, supervisor_alive, pid_alive)
        for block in REPLICA_COUNTERS
        if values.get(block.pid.name, 0) > 0 or values.get(block.restarts.name, 0) > 0
    ]


def replicas_table(replicas: list[ReplicaStatus]) -> list[str]:
    if not replicas:
        return []
    rows = [["replica", "pid", "running", "applied", "lag", "subscribers", "queries", "restarts", "errors"]]
    for replica in replicas:
        rows.append([
            replica.name, cell(replica.pid), cell(replica.running), cell(replica.applied_index),
            cell(replica.lag_records), cell(replica.subscribers), cell(replica.queries),
            cell(replica.restarts), cell(replica.errors),
        ])  # fmt: skip
    return table(rows)


def replicas_json(replicas: list[ReplicaStatus]) -> dict[str, dict[str, Any]]:
    return {
        replica.name: {
            "pid": replica.pid,
            "running": replica.running,
            "applied_index": replica.applied_index,
            "lag_records": replica.lag_records,
            "subscribers": replica.subscribers,
            "queries": replica.queries,
            "restarts": replica.restarts,
            "errors": replica.errors,
        }
        for replica in replicas
    }


@dataclass(frozen=True)
class SnapshotterStatus:
    """The snapshotter: how far behind the commit index it is, the last snapshot it wrote."""

    pid: int | None
    running: bool | None
    applied_index: int | None
    lag_records: int | None  # commit.index - applied index: it falls behind while it writes
    snapshot_index: int | None  # the newest snapshot it wrote (0: none since it started)
    writes: int | None
    restarts: int | None
    errors: int | None


def snapshotter_status(
    values: Mapping[str, int], supervisor_alive: bool, pid_alive: Callable[[int], bool]
) -> SnapshotterStatus | None:
    """None when the supervisor never started one (`snapshot.writer = "fork"`)."""
    block = SNAPSHOTTER_COUNTERS
    if values.get(block.pid.name, 0) <= 0 and values.get(block.restarts.name, 0) <= 0:
        return None
    pid = values.get(block.pid.name) or None
    applied = values.get(block.applied_index.name)
    commit = committed_index(values)
    return SnapshotterStatus(
        pid=pid,
        running=None if pid is None else supervisor_alive and pid_alive(pid),
        applied_index=applied,
        lag_records=None if applied is None or commit is None else max(commit - applied, 0),
        snapshot_index=values.get(block.snapshot_index.name),
        writes=values.get(block.writes.name),
        restarts=values.get(block.restarts.name),
        errors=values.get(block.errors.name),
    )


def snapshotter_table(snapshotter: SnapshotterStatus | None) -> list[str]:
    if snapshotter is None:
        return []
    s = snapshotter
    return table([
        ["snapshotter", "pid", "running", "applied", "lag", "snapshot", "writes", "restarts", "errors"],
        ["snapshotter", cell(s.pid), cell(s.running), cell(s.applied_index), cell(s.lag_records),
         cell(s.snapshot_index), cell(s.writes), cell(s.restarts), cell(s.errors)],
    ])  # fmt: skip


def snapshotter_json(snapshotter: SnapshotterStatus | None) -> dict[str, Any] | None:
    if snapshotter is None:
        return None
    return dataclasses.asdict(snapshotter)
