"""The errors the Raft core raises at its caller: a request at the wrong node, or refused.

Each says what happened and what to do; `sequencer.raft.core` re-exports them.
"""

from __future__ import annotations

from sequencer.raft.config import NO_NODE

__all__ = ["NotLeaderError", "ProposalRejected", "StampMismatch"]


class NotLeaderError(Exception):
    """A proposal or read went to a node that is not the leader."""

    def __init__(self, node_id: int, leader_id: int, term: int) -> None:
        self.node_id = node_id
        self.leader_id = leader_id
        self.term = term
        hint = f"node {leader_id}" if leader_id != NO_NODE else "unknown (election under way)"
        super().__init__(
            f"node {node_id} is not the Raft leader in term {term} (leader: {hint}); "
            "send the request to the leader, or retry after the election"
        )


class ProposalRejected(Exception):
    """A leader refused a proposal (too many uncommitted entries, or an empty payload)."""


class StampMismatch(ProposalRejected):
    """Records stamped with a term and indexes the core would not give them.

    The leader's sequencer stamps records before the core sees them (one log); a stamp is stale
    when the core's term moved on (it lost and maybe regained leadership) or its log did.
    """

    def __init__(self, stamped_term: int, stamped_index: int, term: int, next_index: int) -> None:
        self.stamped_term = stamped_term
        self.stamped_index = stamped_index
        self.term = term
        self.next_index = next_index
        super().__init__(
            f"records stamped term {stamped_term} from index {stamped_index}, but the leader is "
            f"in term {term} and its next index is {next_index}: discard the stamped records "
            "after the last one the core accepted and restamp from the next TermStart"
        )
