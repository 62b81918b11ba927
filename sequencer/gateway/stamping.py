"""The stamping policy: where the index and term of the gateway's records come from.

This is the seam cluster mode builds on (docs/architecture.md, "The gateway and cluster mode").
On a single node the gateway counts indexes itself from the journal's last and stamps the
recovered term; in a cluster the leader's term and the start of each term come from Raft, and a
follower does not stamp at all. The gateway asks its policy once per batch, never per record.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

__all__ = ["SingleNodeStamping", "Stamp", "StampingPolicy"]


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
    - cluster leader (not built yet): the term is the Raft core's. At the first batch of a new term
      `begin` returns `term_start_index`, the index of the term's no-op entry (Raft section 8);
      the gateway writes TERM_START there and calls `term_started`. The leader is the only writer
      of its log ring, so the indexes the gateway counts are the indexes of the Raft log.
    - cluster follower (not built yet): the gateway must not stamp. Its policy will say so with a
      third outcome of `begin`, and the gateway will hand that batch's HELLOs and COMMANDs to a
      forwarding port (to the leader) instead of claiming records; replies still come from the
      local blp once the command commits.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def leader(self) -> str | None:
        """The name of the node that sequences (WELCOME's `leader`); None when unknown."""

    @abc.abstractmethod
    def begin(self, next_index: int) -> Stamp:
        """The term for a batch whose first record would get `next_index`."""

    def term_started(self, stamp: Stamp) -> None:  # noqa: B027 (a no-op unless a term starts)
        """The TERM_START record of `stamp` is claimed at `stamp.term_start_index`."""


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
