"""`seqd status` in a cluster: the node's Raft standing, its commit, and the leader's followers.

Every value is the replicator's (its `raft.*` counters, daemon/layout.py); `daemon.status` calls
`raft_status` on a sample and renders the result with `raft_lines` and `raft_json`. On the
leader, follower slot k = 1.. holds `raft.peer<k>.node` (its node number, 0 for an empty slot)
and `raft.peer<k>.match_index`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon import layout

__all__ = ["RaftFollower", "RaftStatus", "raft_json", "raft_lines", "raft_status"]


@dataclass(frozen=True)
class RaftFollower:
    """On a cluster's leader: how far one follower's log agrees with the leader's."""

    node: int  # its node number
    match_index: int | None  # the last index it holds durably in agreement with the leader
    lag: int | None  # records behind the leader's last index


@dataclass(frozen=True)
class RaftStatus:
    """The Raft part of a node's status; every field None on a single node (no replicator)."""

    role: str | None = None  # follower, pre-candidate, candidate, leader
    term: int | None = None
    leader: int | None = None  # the leader's node number, 0 during an election
    commit_index: int | None = None  # committed and durable here: what the blp applies up to
    last_index: int | None = None  # the last index of this node's log
    pending_forwards: int | None = None  # records this node sequenced, not yet seen committed
    followers: list[RaftFollower] | None = None  # the leader's; empty elsewhere
    # On the leader: the journal is held from here for a follower catching up after a snapshot
    # (0: no hold).
    retain_index: int | None = None


def _followers(values: Mapping[str, int]) -> list[RaftFollower]:
    last_index = values.get(layout.RAFT_LAST_INDEX.name)
    followers = []
    for node_spec, match_spec in zip(layout.RAFT_PEER_NODE, layout.RAFT_PEER_MATCH_INDEX, strict=True):
        node = values.get(node_spec.name)
        if not node:
            continue
        match_index = values.get(match_spec.name)
        lag = None if last_index is None or match_index is None else last_index - match_index
        followers.append(RaftFollower(node, match_index, lag))
    return followers


def raft_status(known: Mapping[str, int], clustered: bool) -> RaftStatus:
    """The Raft status in a sample whose unknown counters are left out (`known_values`)."""
    if not clustered:
        return RaftStatus()
    role = known.get(layout.RAFT_ROLE.name)
    return RaftStatus(
        role=None if role is None else layout.RAFT_ROLE.value_name(role),
        term=known.get(layout.RAFT_TERM.name),
        leader=known.get(layout.RAFT_LEADER.name),
        commit_index=known.get(layout.RAFT_COMMIT_INDEX.name),
        last_index=known.get(layout.RAFT_LAST_INDEX.name),
        pending_forwards=known.get(layout.RAFT_PENDING_FORWARDS.name),
        followers=_followers(known),
        retain_index=known.get(layout.RAFT_RETAIN_INDEX.name),
    )


def raft_lines(raft: RaftStatus, cell: Callable[[object], str]) -> tuple[str, list[str]]:
    """(what the header line gets, the lines under it); nothing on a single node."""
    if raft.role is None:
        return "", []
    header = f"  raft {raft.role} term {cell(raft.term)} leader {cell(raft.leader)}"
    lines = [
        f"  raft commit {cell(raft.commit_index)}  last {cell(raft.last_index)}"
        f"  pending forwards {cell(raft.pending_forwards)}"
        + (f"  journal held from {raft.retain_index}" if raft.retain_index else "")
    ]
    lines += [f"  follower {f.node}: match {cell(f.match_index)}  lag {cell(f.lag)}" for f in raft.followers or ()]
    return header, lines


def raft_json(raft: RaftStatus) -> dict[str, Any]:
    followers = raft.followers
    return {
        "role": raft.role,
        "term": raft.term,
        "leader": raft.leader,
        "commit_index": raft.commit_index,
        "last_index": raft.last_index,
        "pending_forwards": raft.pending_forwards,
        "retain_index": raft.retain_index,
        "followers": None if followers is None else [
            {"node": f.node, "match_index": f.match_index, "lag": f.lag} for f in followers
        ],
    }  # fmt: skip
