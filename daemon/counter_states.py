"""The values of the node's enum counters (`daemon/layout.py` declares which counter holds which).

`Kind.ENUM` counters hold an IntEnum's values: `seqd status` and the metrics print their names.
Re-exported by `daemon.layout`.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["DiskState", "IdleCode", "NodeState", "RoleState", "TransferOutcome"]


class NodeState(IntEnum):
    """`node.state`, written by the supervisor."""

    STARTING = 0
    RECOVERING = 1
    SERVING = 2
    DRAINING = 3
    STOPPED = 4
    # Cluster mode, before DRAINING: a leader's replicator hands leadership over while the node
    # is in this state, and only then (daemon/handover.py): were it for the whole drain, nodes
    # stopped together would hand it to each other for as long as their drains last.
    HANDING_OVER = 5


class RoleState(IntEnum):
    """`<role>.state`, written by the role."""

    STARTING = 0  # also what a fresh segment holds before the role runs
    RECOVERING = 1
    RUNNING = 2
    DRAINED = 3


class DiskState(IntEnum):
    """`journal.disk_full`: whether the journal has room ahead (written by the journaller only)."""

    ROOM = 0
    SHORT = 1  # no room reserved ahead: new commands and sessions are refused (disk_full)
    FULL = 2  # not even room for what the log ring holds: those records wait there, unacknowledged


class IdleCode(IntEnum):
    """`<role>.idle`: the idle strategy the supervisor started the role with (`roles.<role>.idle`)."""

    SPIN = 0
    YIELD = 1
    BACKOFF = 2
    BLOCKING = 3


class TransferOutcome(IntEnum):
    """`raft.transfer.outcome`: what became of the last leadership transfer the replicator was
    asked for (`seqd cluster transfer-leader`, or its own node's drain), written by the replicator."""

    NONE = 0
    STARTED = 1  # catching the target up, then TimeoutNow; proposals wait meanwhile
    DONE = 2  # this node no longer leads
    NOT_LEADER = 3  # refused: this node did not lead when asked
    UNKNOWN_TARGET = 4  # refused: the target is not another member
    ABORTED = 5  # no new leader within an election timeout: this node leads again and accepts
    NO_FOLLOWER = 6  # refused: no other member is connected to hand over to
