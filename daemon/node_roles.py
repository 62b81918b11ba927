"""The node's processes and segments: `Role` (start phase, drain rank, single-node or cluster
only), the readers of each ring and the segments' names. Split from daemon/layout.py, which
re-exports every name here; import them from there."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from ipc.segment import segment_name

__all__ = [
    "EGRESS_POLLABLE", "EGRESS_READERS", "LOG_READERS", "PROPOSAL_POLLABLE", "PROPOSAL_READERS", "Role",
    "counters_name", "drain_order", "egress_name", "log_name", "node_roles", "proposal_name",
]


class Role(StrEnum):
    """A process of the node's pipeline (never the supervisor, never a Raft standing)."""

    SEQUENCER = "sequencer"
    JOURNALLER = "journaller"
    BLP = "blp"
    REPLICATOR = "replicator"

    @property
    def single_node(self) -> bool:
        """Whether a single node runs this role: the replicator runs only in a cluster."""
        return self is not Role.REPLICATOR

    @property
    def start_phase(self) -> int:
        """0: a reader of the log ring, started first (the blp recovers before anything new is
        sequenced); 1: the sequencer, started once every phase-0 role runs (it opens the socket)."""
        return 1 if self is Role.SEQUENCER else 0

    @property
    def drain_rank(self) -> int:
        """Position in the drain: the sequencer stops accepting and waits until what it sequenced
        is applied and replied; then the journaller takes the last records and fsyncs; then the
        replicator ships them; the blp applies up to the commit and goes last."""
        return _DRAIN_ORDER.index(self)


_DRAIN_ORDER = (Role.SEQUENCER, Role.JOURNALLER, Role.REPLICATOR, Role.BLP)
assert set(_DRAIN_ORDER) == set(Role), _DRAIN_ORDER


def node_roles(clustered: bool = False) -> tuple[Role, ...]:
    """The roles a node runs, in `Role` order (the supervisor starts them by `start_phase`)."""
    return tuple(role for role in Role if clustered or role.single_node)


def drain_order(roles: Iterable[Role]) -> tuple[Role, ...]:
    return tuple(sorted(roles, key=lambda role: role.drain_rank))


# The readers of each ring, named after the roles that read them (a ring knows names, not roles).
LOG_READERS: tuple[Role, ...] = (Role.JOURNALLER, Role.BLP)
EGRESS_READERS: tuple[Role, ...] = (Role.SEQUENCER,)
# Readers that wait in an event loop, so their doorbell is a FIFO the loop watches
# (`ipc.doorbell_fifo`): the sequencer, egress's reader, and the replicator, the proposals'.
EGRESS_POLLABLE: tuple[Role, ...] = (Role.SEQUENCER,)
PROPOSAL_POLLABLE: tuple[Role, ...] = (Role.REPLICATOR,)
PROPOSAL_READERS: tuple[Role, ...] = (Role.REPLICATOR,)


def log_name(node: str) -> str:
    return segment_name(node, "log")


def egress_name(node: str) -> str:
    return segment_name(node, "egress")


def proposal_name(node: str) -> str:
    """Cluster mode: the ring the sequencer writes its records to (unstamped), which the
    replicator reads and proposes (leader) or forwards (follower)."""
    return segment_name(node, "proposal")


def counters_name(node: str) -> str:
    return segment_name(node, "counters")
