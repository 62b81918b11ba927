"""The stamping policy: where the index and term of the gateway's records come from.

This is the seam cluster mode builds on (docs/architecture.md, "Cluster mode: the sequencer and
the blp"). On a single node the gateway counts indexes itself from the journal's last and stamps
the recovered term (`SingleNodeStamping`). In a cluster no sequencer stamps: every node's
sequencer writes its records unstamped (index 0, term 0) into its proposal ring, and the leader's
replicator stamps them, the term's TERM_START included (`ClusterStamping`). The gateway asks its
policy once per batch, never per record.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import NamedTuple

__all__ = ["ClusterStamping", "SingleNodeStamping", "Stamp", "StampingPolicy"]


class Stamp(NamedTuple):
    """What a `StampingPolicy` grants one batch of records."""

    term: int
    # Nonzero at the first batch of a term in cluster mode: the index of the term's Raft no-op
    # entry. The gateway sequences a TERM_START record there before anything else and counts on
    # from it; the policy stops asking once told (`term_started`).
    term_start_index: int = 0


class StampingPolicy(abc.ABC):
    """Where the index and term of the records this gateway writes come from.

    The gateway asks `begin` once per batch (a session's frames of one read, a timer pass, a
    retry), never per record, and counts indexes itself within a batch: on a node where this
    gateway is the only writer of the log ring, the next index is always the last one plus one.

    - single node (`SingleNodeStamping`): the gateway's counter, continued from the journal, and
      the recovered term (1 on a new node). Never a TERM_START.
    - cluster, leader or follower alike (`ClusterStamping`): index 0 and term 0 on every record
      (`stamps_indexes` False), into the proposal ring; the leader's replicator stamps them and
      writes each term's TERM_START itself, so `begin` never asks for one. Replies still come
      from the local blp once the record commits.

    A policy with `term_start_index` (a gateway that stamps Raft indexes itself) is still
    supported by the gateway, for a policy that would make the sequencer the writer of the log.
    """

    __slots__ = ()

    # Whether the records carry the indexes the gateway counts (True), or index 0 for a stamper
    # downstream (False: the gateway counts nothing, `next_index` stays 0).
    stamps_indexes: bool = True

    @property
    @abc.abstractmethod
    def leader(self) -> str | None:
        """The name of the node that sequences (WELCOME's `leader`); None when unknown."""

    @abc.abstractmethod
    def begin(self, next_index: int) -> Stamp:
        """The term for a batch whose first record would get `next_index`."""

    def term_started(self, stamp: Stamp) -> None:  # noqa: B027 (a no-op unless a term starts)
        """The TERM_START record of `stamp` is claimed at `stamp.term_start_index`."""

    @property
    def sequences_timers(self) -> bool:
        """Whether this gateway sequences TIMER_FIRED and automatic SNAPSHOT records now. Asked
        when a timer is due or the snapshot policy fires, never per record."""
        return True


class SingleNodeStamping(StampingPolicy):
    """One node sequences alone: the term recovered from the journal, at least 1, forever."""

    __slots__ = ("_leader", "_stamp")

    def __init__(self, recovered_term: int, node_name: str) -> None:
        self._stamp = Stamp(max(1, recovered_term))
        self._leader = node_name

    @property
    def leader(self) -> str:
        return self._leader  # a single node sequences its own commands: it is the leader

    def begin(self, next_index: int) -> Stamp:
        return self._stamp


class ClusterStamping(StampingPolicy):
    """Cluster mode: this node's sequencer proposes, the leader's replicator stamps.

    Every record leaves the gateway with index 0 and term 0 (the proposal ring's records are
    unstamped); the leader's replicator gives each its index, term and a timestamp that never
    goes back, and writes every term's TERM_START itself (`RaftConfig.term_start_from_shell`), so
    `begin` never asks the gateway for one. Only the leader sequences timer fires and automatic
    snapshot requests (`sequences_timers`): every node keeps the timer schedule from its own
    egress, so a new leader fires what is due at once.

    The Raft standing is the replicator's, read through the two callables each time it is asked
    (shared-memory counters in the daemon, plain functions in tests), so a change of leader needs
    no call into the gateway.

    Args:
        leader_number: the current leader's node number (`raft.leader`), 0 when none is known.
        leading: whether this node is the leader now (`raft.role` is LEADER).
        names: node number -> node name, for WELCOME's `leader`; a number not in it is shown as
            its decimal digits.
    """

    __slots__ = ("_leader_number", "_leading", "_names")

    stamps_indexes = False
    _UNSTAMPED = Stamp(0)  # the replicator stamps the term

    def __init__(
        self, leader_number: Callable[[], int], leading: Callable[[], bool], names: Mapping[int, str]
    ) -> None:
        self._leader_number = leader_number
        self._leading = leading
        self._names = names

    @property
    def leader(self) -> str | None:
        number = self._leader_number()
        if not number:
            return None  # an election is under way
        return self._names.get(number, str(number))

    def begin(self, next_index: int) -> Stamp:
        return self._UNSTAMPED

    @property
    def sequences_timers(self) -> bool:
        return self._leading()
