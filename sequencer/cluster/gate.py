"""When the replicator may take proposals (its sequencer's records, followers' forwards).

A leader proposes only once the TERM_START of the term it leads now has committed (Raft 8: the
no-op at the start of a term; until it commits, the new leader does not know what is committed,
and the TERM_START must take the term's first index). A node that led an earlier term remembers
that term's start: it must not take it for the current one, or its proposals would take the
index the new TERM_START is due at. A follower forwards once it knows a leader.
"""

from __future__ import annotations

from sequencer.raft.config import NO_NODE

__all__ = ["may_propose"]


def may_propose(leading: bool, term: int, leader_id: int, term_started: tuple[int, int],
                commit_index: int) -> bool:  # fmt: skip
    """Args:
        leading: this node leads `term`.
        term, leader_id: the node's current term and the leader it knows (NO_NODE: none).
        term_started: (term, index) of the last TERM_START this node proposed as leader.
        commit_index: the highest index this node knows committed (and holds durably).
    """
    if not leading:
        return leader_id != NO_NODE
    started_term, started_index = term_started
    return started_term == term and commit_index >= started_index
