"""Raft consensus without I/O: the node (`core`), its configuration (`config`), elections
(`election`), the leader's replication (`leader`) and per-follower progress (`tracker`), ReadIndex
reads (`read_index`), the log (`log`) and where its older part is read back from (`storage`),
majority arithmetic (`quorum`) and the data that crosses the boundary (`messages`).

The transport (TCP, HMAC) belongs to the replication role; see docs/consensus.md.
"""

from sequencer.raft.core import (
    NO_NODE,
    NotLeaderError,
    ProposalRejected,
    RaftConfig,
    RaftCore,
    RaftRole,
    StampMismatch,
)
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import (
    MESSAGE_DECODER,
    MESSAGE_TYPES,
    AppendEntries,
    AppendEntriesResponse,
    DurableState,
    Entries,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    TermStart,
    TimeoutNow,
)
from sequencer.raft.quorum import VOTERS_ALLOWED, quorum_index, quorum_size
from sequencer.raft.storage import LogStorage, MemoryLogStorage

__all__ = [
    "MESSAGE_DECODER",
    "MESSAGE_TYPES",
    "NO_NODE",
    "VOTERS_ALLOWED",
    "AppendEntries",
    "AppendEntriesResponse",
    "DurableState",
    "Entries",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "LogStorage",
    "MemoryLogStorage",
    "Message",
    "NotLeaderError",
    "ProposalRejected",
    "RaftConfig",
    "RaftCore",
    "RaftLog",
    "RaftRole",
    "ReadState",
    "Ready",
    "RequestVote",
    "RequestVoteResponse",
    "Snapshot",
    "StampMismatch",
    "TermStart",
    "TimeoutNow",
    "quorum_index",
    "quorum_size",
]
