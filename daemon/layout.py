"""The shared-memory layout of one node: segment names, ring readers and the counter names.

The supervisor creates every segment before it starts a role; roles only attach. A counter has one
writer, named in the comment beside it; everyone else only reads it.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "COUNTER_NAMES",
    "EGRESS_READERS",
    "IDLE_CODES",
    "LOG_READERS",
    "DiskState",
    "NodeState",
    "RoleState",
    "counters_name",
    "egress_name",
    "log_name",
]

LOG_READERS = ("journaller", "blp")
EGRESS_READERS = ("sequencer",)

IDLE_CODES = {"spin": 0, "yield": 1, "backoff": 2, "blocking": 3}


class NodeState(IntEnum):
    STARTING = 0
    RECOVERING = 1
    SERVING = 2
    DRAINING = 3
    STOPPED = 4


class DiskState(IntEnum):
    """`journal.disk_full`: whether the journal has room ahead (written by the journaller only)."""

    ROOM = 0
    SHORT = 1  # no room reserved ahead: new commands and sessions are refused (disk_full)
    FULL = 2  # not even room for what the log ring holds: those records wait there, unacknowledged


class RoleState(IntEnum):
    STARTING = 0
    RECOVERING = 1
    RUNNING = 2
    DRAINED = 3


def log_name(node: str) -> str:
    return f"/seqd.{node}.log"


def egress_name(node: str) -> str:
    return f"/seqd.{node}.egress"


def counters_name(node: str) -> str:
    return f"/seqd.{node}.counters"


# stop: set by the supervisor. start_time_ms: the role process's start time (psutil create_time,
# ms since the epoch), set by the supervisor with the pid, so that a later supervisor can tell a
# role left running by a killed predecessor from an unrelated process that reuses its pid.
_ROLE_COUNTERS = ("pid", "start_time_ms", "cpu", "idle", "heartbeat", "state", "stop")

COUNTER_NAMES: tuple[str, ...] = (
    # supervisor
    "supervisor.pid",
    "supervisor.heartbeat",
    "supervisor.restarts",
    "node.state",
    "node.number",
    "node.incarnation",
    "recovery.records",
    "recovery.last.index",
    "recovery.last.term",
    "recovery.last.timestamp_ns",
    # one block per role, each written by that role (pid/cpu/idle by the supervisor before start)
    *(f"{role}.{name}" for role in ("sequencer", "journaller", "blp", "replicator") for name in _ROLE_COUNTERS),
    # sequencer
    "log.published.position",
    "log.published.index",
    "sessions.open",
    "sessions.total",
    "commands.total",
    "errors.protocol",
    "errors.security",
    "errors.slow_client",
    "errors.disk_full",  # sessions and commands refused while the journal's disk is short
    "sequencer.parked",
    "timers.pending",
    "egress.consumed.position",
    # journaller
    "journal.durable.position",
    "journal.durable.index",
    "journal.syncs",
    "errors.journal",
    "journal.disk_full",  # DiskState; the sequencer refuses new work while it is not ROOM
    "journal.free_bytes",  # free bytes on the journal's file system, refreshed about every second
    # blp
    "blp.applied.position",
    "blp.applied.index",
    "blp.rolling_hash",
    "clients.expired",
    "outputs.too_large",  # replies and events no client frame can carry, replaced (replay included)
    "egress.published.position",
    "snapshot.last.index",
    "snapshot.oldest.index",  # the oldest valid snapshot kept: the journal may go before it
    "snapshot.writes",
    "errors.snapshot",
    # commit: on a single node the journal's durable position is the commit position
    "commit.position",
    "commit.index",
    "errors.total",
    "raft.role",
    "raft.term",
    "raft.leader",
)
