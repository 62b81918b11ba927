"""A node's Raft standing (`raft_role`): follower, pre-candidate, candidate or leader."""

from __future__ import annotations

import enum

__all__ = ["CANDIDATE", "FOLLOWER", "LEADER", "PRE_CANDIDATE", "RaftRole"]


class RaftRole(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1  # asking whether an election could be won, without raising the term (9.6)
    CANDIDATE = 2
    LEADER = 3


# Module constants: the core compares with `is` on its hot paths, cheaper than an enum lookup.
FOLLOWER = RaftRole.FOLLOWER
PRE_CANDIDATE = RaftRole.PRE_CANDIDATE
CANDIDATE = RaftRole.CANDIDATE
LEADER = RaftRole.LEADER
