"""`seqd status` in a cluster: the node's Raft standing, its commit, and the leader's followers.

Every value is the replicator's (its `raft.*` counters, daemon/layout.py); `daemon.status` calls
`raft_status` on a sample and renders the result with `raft_lines` and `raft_json`. Slot k = 1..
holds `raft.peer<k>.node` (another member's node number, 0 for an empty slot) and
`raft.peer<k>.last_contact_ms` (when that member was last heard from, wall-clock ms, one value
per message heard: `daemon.roles.replicator_ops.contact_wall_ms`) on every node;
on the leader also `raft.peer<k>.match_index` and `raft.peer<k>.inflight_bytes_peak` (the most
payload bytes it had unanswered at once this term: how close its catch-up came to
`cluster.inflight_bytes_max`). Only a leader tracks matches (a follower's slots say 0), so only a
leader's status lists followers with a match and a lag; every node lists its peers' last
contacts. The members are this node (`node.number`) and the slots'.
Elections, step-downs, peer refusals and the last leadership transfer's outcome are counters of
the replicator too (docs/cluster.md, "Operating a cluster"), as are the forward stream's faults:
records dropped and resent, streams broken (this node's, to the leader) and refused (followers',
by this node as leader); docs/cluster.md, "What failures look like in `seqd status`".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from daemon import layout
from sequencer.raft.raft_role import RaftRole

__all__ = [
    "PeerSlot", "RaftFollower", "RaftPeer", "RaftStatus", "lists_followers", "peer_slots", "raft_json", "raft_lines",
    "raft_status",
]  # fmt: skip

_LEADER = layout.RAFT_ROLE.value_name(RaftRole.LEADER)  # as `raft_status` shows it


@dataclass(frozen=True)
class RaftFollower:
    """On a cluster's leader: how far one follower's log agrees with the leader's."""

    node: int  # its node number
    match_index: int | None  # the last index it holds durably in agreement with the leader
    lag: int | None  # records behind the leader's last index
    last_contact_ms: int | None = None  # how long ago the leader last heard from it; None: never
    # The most payload bytes it had in unanswered AppendEntries at once, this term: at most
    # cluster.inflight_bytes_max plus one message (a catch-up that reached the window).
    inflight_bytes_peak: int | None = None


@dataclass(frozen=True)
class RaftPeer:
    """Another member, as any node sees it: when it was last heard from."""

    node: int  # its node number
    last_contact_ms: int | None  # how long ago this node last heard from it; None: never


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
    peers: list[RaftPeer] | None = None  # the other members, on every node of a cluster
    # On the leader: the journal is held from here for a follower catching up after a snapshot
    # (0: no hold).
    retain_index: int | None = None
    members: list[int] | None = None  # node numbers, this node's first
    elections: int | None = None  # elections this node stood in since it started
    step_downs: int | None = None  # times it stopped leading
    peer_refused: int | None = None  # peer connections and frames refused (errors.peer_refused)
    transfer_outcome: str | None = None  # of the last leadership transfer: started, done, ...
    forwards_dropped: int | None = None  # forwarded records dropped (sent on a broken stream, not taken)
    forward_streams_broken: int | None = None  # this node's forward streams ended by a drop
    forward_streams_refused: int | None = None  # followers' connections closed: a batch not taken
    forwards_resent: int | None = None  # pending records sent again (new leader, resend age)


class PeerSlot(NamedTuple):
    """One occupied peer slot (`raft.peer<k>.*`) of a sample; None: not in the sample."""

    node: int  # the member's node number
    match_index: int | None  # the leader's; a node that does not lead says 0
    last_contact_ms: int | None  # wall clock ms when this node last heard from it; 0: never
    inflight_bytes_peak: int | None  # the leader's; a node that does not lead says 0


def peer_slots(values: Mapping[str, int]) -> list[PeerSlot]:
    """Every occupied peer slot of a sample, for `seqd status` and the metrics alike."""
    return [
        PeerSlot(node, values.get(match.name), values.get(contact.name), values.get(peak.name))
        for node_spec, match, contact, peak in zip(
            layout.RAFT_PEER_NODE, layout.RAFT_PEER_MATCH_INDEX, layout.RAFT_PEER_LAST_CONTACT_MS,
            layout.RAFT_PEER_INFLIGHT_BYTES_PEAK, strict=True)
        if (node := values.get(node_spec.name))
    ]  # fmt: skip


def lists_followers(values: Mapping[str, int]) -> bool:
    """Whether a sample's slots are followers with a match: only a leader tracks matches (its
    replicator fills the same slots on a follower, with 0), so only a leader lists followers."""
    return values.get(layout.RAFT_ROLE.name) == RaftRole.LEADER


def _slots(values: Mapping[str, int], now_ms: int) -> list[RaftFollower]:
    """Every occupied peer slot, its match and lag as the counters say (0 and the whole log when
    this node does not lead)."""
    last_index = values.get(layout.RAFT_LAST_INDEX.name)
    slots = []
    for node, match_index, contact_ms, peak in peer_slots(values):
        lag = None if last_index is None or match_index is None else last_index - match_index
        ago_ms = max(0, now_ms - contact_ms) if contact_ms else None
        slots.append(RaftFollower(node, match_index, lag, ago_ms, peak))
    return slots


def _members(values: Mapping[str, int]) -> list[int] | None:
    number = values.get(layout.NODE_NUMBER.name)
    if number is None:
        return None
    return [number, *(node for spec in layout.RAFT_PEER_NODE if (node := values.get(spec.name)))]


def raft_status(known: Mapping[str, int], clustered: bool, now_ms: int | None = None) -> RaftStatus:
    """The Raft status in a sample whose unknown counters are left out (`known_values`), taken
    at wall-clock `now_ms` (default: now)."""
    if not clustered:
        return RaftStatus()
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    role_value = known.get(layout.RAFT_ROLE.name)
    role = None if role_value is None else layout.RAFT_ROLE.value_name(role_value)
    outcome = known.get(layout.RAFT_TRANSFER_OUTCOME.name)
    slots = _slots(known, now_ms)
    return RaftStatus(
        role=role,
        term=known.get(layout.RAFT_TERM.name),
        leader=known.get(layout.RAFT_LEADER.name),
        commit_index=known.get(layout.RAFT_COMMIT_INDEX.name),
        last_index=known.get(layout.RAFT_LAST_INDEX.name),
        pending_forwards=known.get(layout.RAFT_PENDING_FORWARDS.name),
        retain_index=known.get(layout.RAFT_RETAIN_INDEX.name),
        followers=slots if lists_followers(known) else [],
        peers=[RaftPeer(slot.node, slot.last_contact_ms) for slot in slots],
        members=_members(known),
        elections=known.get(layout.RAFT_ELECTIONS.name),
        step_downs=known.get(layout.RAFT_STEP_DOWNS.name),
        peer_refused=known.get(layout.ERRORS_PEER_REFUSED.name),
        transfer_outcome=None if outcome is None else layout.RAFT_TRANSFER_OUTCOME.value_name(outcome),
        forwards_dropped=known.get(layout.RAFT_FORWARDS_DROPPED.name),
        forward_streams_broken=known.get(layout.RAFT_FORWARD_STREAMS_BROKEN.name),
        forward_streams_refused=known.get(layout.RAFT_FORWARD_STREAMS_REFUSED.name),
        forwards_resent=known.get(layout.RAFT_FORWARDS_RESENT.name),
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
    members = "-" if raft.members is None else ", ".join(map(str, raft.members))
    lines.append(f"  raft members {members}  elections {cell(raft.elections)}  step-downs {cell(raft.step_downs)}"
                 f"  peer refusals {cell(raft.peer_refused)}  last transfer {cell(raft.transfer_outcome)}")
    lines.append(f"  raft forwards dropped {cell(raft.forwards_dropped)}  resent {cell(raft.forwards_resent)}"
                 f"  streams broken {cell(raft.forward_streams_broken)}"
                 f"  refused {cell(raft.forward_streams_refused)}")
    lines += [f"  follower {f.node}: match {cell(f.match_index)}  lag {cell(f.lag)}  last contact "
              f"{_ago(f.last_contact_ms)}  in flight peak {cell(f.inflight_bytes_peak)} bytes"
              for f in raft.followers or ()]  # fmt: skip
    if raft.role != _LEADER and raft.peers:
        lines.append("  raft heard from " + ", ".join(f"node {p.node} {_ago(p.last_contact_ms)}" for p in raft.peers))
    return header, lines


def _ago(ms: int | None) -> str:
    return "never" if ms is None else f"{ms} ms ago"


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
            {"node": f.node, "match_index": f.match_index, "lag": f.lag, "last_contact_ms": f.last_contact_ms,
             "inflight_bytes_peak": f.inflight_bytes_peak}
            for f in followers
        ],
        "peers": None if raft.peers is None else [
            {"node": p.node, "last_contact_ms": p.last_contact_ms} for p in raft.peers
        ],
        "members": raft.members,
        "elections": raft.elections,
        "step_downs": raft.step_downs,
        "peer_refused": raft.peer_refused,
        "transfer_outcome": raft.transfer_outcome,
        "forwards_dropped": raft.forwards_dropped,
        "forward_streams_broken": raft.forward_streams_broken,
        "forward_streams_refused": raft.forward_streams_refused,
        "forwards_resent": raft.forwards_resent,
    }  # fmt: skip
