"""Raft consensus without I/O: the node (`core`), its configuration (`config`), elections
(`election`), the leader's replication (`leader`) and per-follower progress (`tracker`), ReadIndex
reads (`read_index`), the log (`log`) and where its older part is read back from (`storage`),
majority arithmetic (`quorum`), the data that crosses the boundary (`messages`), and the peer
protocol (`peer_protocol`: authenticated frames between nodes).

The TCP shell of the peer protocol is `sequencer.raft.transport`, imported on its own so that the
core and its simulator never load asyncio; see docs/consensus.md and docs/peer-transport.md.
"""

from sequencer.raft.config import LEARNERS_MAX
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
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    TermStart,
    TimeoutNow,
)
from sequencer.raft.peer_protocol import (
    PEER_FRAME_BYTES_MAX,
    SECRET_BYTES_MIN,
    ClusterIdentity,
    ForwardedRecord,
    LocalPeerProtocolError,
    PeerConnection,
    PeerProtocolError,
)
from sequencer.raft.quorum import VOTERS_ALLOWED, quorum_index, quorum_size
from sequencer.raft.storage import LogStorage, MemoryLogStorage

__all__ = [
    "LEARNERS_MAX",
    "MESSAGE_DECODER",
    "MESSAGE_TYPES",
    "NO_NODE",
    "PEER_FRAME_BYTES_MAX",
    "SECRET_BYTES_MIN",
    "VOTERS_ALLOWED",
    "AppendEntries",
    "AppendEntriesResponse",
    "ClusterIdentity",
    "DurableState",
    "Entries",
    "ForwardedRecord",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "LocalPeerProtocolError",
    "LogStorage",
    "MemoryLogStorage",
    "Message",
    "NotLeaderError",
    "PeerConnection",
    "PeerProtocolError",
    "ProposalRejected",
    "RaftConfig",
    "RaftCore",
    "RaftLog",
    "RaftRole",
    "ReadIndexRequest",
    "ReadIndexResponse",
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
