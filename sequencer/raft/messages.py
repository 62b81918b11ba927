"""Plain data that crosses the Raft core's boundary: peer messages, persisted state, readies.

Every type is a msgspec Struct, so the replication role can encode a message with one call
(`msgspec.msgpack.encode(message)`) and decode any of them with `MESSAGE_DECODER`; the struct tag
is the class name. Each message carries the cluster id and the source and target node ids, which
the transport authenticates (HMAC) and the core checks again.

Entries travel as a run: the index of the first one plus parallel lists of terms and payloads
(see `sequencer.raft.log`), never as one object per entry: batching 100 entries then costs a
couple of list slices, not 100 allocations.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

__all__ = [
    "MESSAGE_DECODER",
    "MESSAGE_TYPES",
    "TRANSFER_MESSAGE_TYPES",
    "AppendEntries",
    "AppendEntriesResponse",
    "DurableState",
    "Entries",
    "HardState",
    "Heartbeat",
    "HeartbeatResponse",
    "InstallSnapshot",
    "Message",
    "ReadIndexRequest",
    "ReadIndexResponse",
    "ReadState",
    "Ready",
    "RequestVote",
    "RequestVoteResponse",
    "Snapshot",
    "SnapshotChunk",
    "SnapshotChunkAck",
    "TermStart",
    "TimeoutNow",
]


class Snapshot(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """The caller's state machine at `index` (opaque `data`), the entry at `index` of `term`."""

    index: int
    term: int
    data: bytes


class HardState(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """What must survive a crash besides the log (Raft paper, Figure 2, "Persistent state").

    `commit_index` is persisted too (as etcd does) so a restarted node can apply what it knows to
    be committed without waiting for a leader; losing it would only cost time, never safety.
    """

    term: int
    vote: int
    commit_index: int


class Entries(msgspec.Struct, array_like=True, gc=False):
    """A run of consecutive entries starting at `first_index`."""

    first_index: int
    terms: list[int]
    payloads: list[bytes]

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.terms) - 1

    def __len__(self) -> int:
        return len(self.terms)

    def items(self) -> Iterator[tuple[int, int, bytes]]:
        """(index, term, payload) for each entry; an empty payload is a term's no-op entry."""
        return zip(
            range(self.first_index, self.first_index + len(self.terms)),
            self.terms,
            self.payloads,
            strict=True,
        )


class DurableState(msgspec.Struct, gc=False):
    """What a node finds on its disk after a crash, to build a core from.

    `terms`/`payloads` are the durable entries from `first_index` to the end of the log. With the
    default `first_index` (0) they start right after the snapshot (at index 1 without one). A
    caller with a `LogStorage` may load only the tail: entries from the snapshot up to
    `first_index - 1` stay in storage, and must all be committed (`first_index - 1 <=
    hard_state.commit_index`).

    `applied_index`: what the caller's state machine holds already (at most the commit index);
    the core hands out committed entries only after it. The default (0) means the snapshot's
    index: a state machine rebuilt from the snapshot, which applies every committed entry after
    it again. A caller that loads from `first_index` and applied up to `first_index - 1` says so
    here, and a restart then reads nothing back from storage whatever the journal holds.
    """

    hard_state: HardState
    snapshot: Snapshot | None = None
    terms: list[int] = msgspec.field(default_factory=list)
    payloads: list[bytes] = msgspec.field(default_factory=list)
    first_index: int = 0
    applied_index: int = 0


class TermStart(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """This node leads `term` from now on, and the term's first entry (its no-op, Raft paper 8)
    is at `index`.

    The leader's sequencer stamps from here: a TERM_START record at `index`, then the term's
    records at `index + 1, ...` (docs/contracts.md, "one log").
    """

    term: int
    index: int


class ReadState(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A confirmed ReadIndex request: answer it once the state machine has applied `index`."""

    request_id: int
    index: int


class Message(msgspec.Struct, tag=True, array_like=True, gc=False, frozen=True):
    """Common header of every peer message."""

    cluster_id: int
    source: int
    target: int
    term: int


class RequestVote(Message, frozen=True):
    """A (pre-)candidate asks for a vote in `term` (for a PreVote, the term it would start).

    `transfer`: the candidate campaigns because the leader asked it to (TimeoutNow), so voters
    that still hear from that leader grant it anyway (thesis 3.10, 4.2.3).
    """

    last_index: int
    last_term: int
    pre_vote: bool
    transfer: bool = False


class RequestVoteResponse(Message, frozen=True):
    granted: bool
    pre_vote: bool


class AppendEntries(Message, frozen=True):
    """Entries after `previous_index`; with no entries, a probe that carries the commit index.

    `notice`: it carries no entries and was sent only for its commit index, to a follower the
    leader streams to (not a probe, not a resynchronisation after a heartbeat showed the follower
    behind). A follower whose log matches at `previous_index` and who has acknowledged that far
    already does not answer it: the answer would repeat one it sent. One that has not (its write
    is still in progress) answers as to any AppendEntries, and one whose log does not match
    refuses it as any. If the acknowledgement it repeats was lost, the next heartbeat's answer
    finds the follower's match short of the leader's log, and the leader's resynchronising probe
    (no notice) is answered. Last, with a default, so a node of an earlier release decodes it (and
    answers it, as it always did).
    """

    previous_index: int
    previous_term: int
    commit_index: int
    terms: list[int]
    payloads: list[bytes]
    notice: bool = False


class AppendEntriesResponse(Message, frozen=True):
    """The answer to AppendEntries and InstallSnapshot.

    On success `index` is the last index the follower holds (durably) in agreement with the
    leader. On rejection `index` is the rejected `previous_index`, and the hint lets the leader skip
    a whole term per round trip (fast log backtracking, Raft paper 5.3, "the follower can include
    the term of the conflicting entry and the first index it stores for that term"):
    `hint_term` is the follower's term at `index` (0 when its log is shorter) and `hint_index` the
    first index it holds of that term (or its last index + 1 when shorter).

    `last_index` is the last index of the follower's log when it answered and `incarnation` the
    start of the follower that answered (`RaftConfig.incarnation`): a follower that restarted with
    less than it had acknowledged (its data was lost) tells its leader so, and an answer from an
    earlier start is told from a current one (`sequencer.raft.tracker`, "Incarnations").
    """

    success: bool
    index: int
    hint_index: int
    hint_term: int
    last_index: int = 0
    incarnation: int = 0


class Heartbeat(Message, frozen=True):
    """Leader liveness; `commit_index` is at most what the target is known to hold.

    `read_sequence` numbers the ReadIndex round this heartbeat confirms (Raft thesis 6.4).
    """

    commit_index: int
    read_sequence: int


class HeartbeatResponse(Message, frozen=True):
    """`last_index` and `incarnation` as in `AppendEntriesResponse`."""

    read_sequence: int
    last_index: int = 0
    incarnation: int = 0


class InstallSnapshot(Message, frozen=True):
    """The leader's snapshot, for a follower that needs entries the leader has compacted."""

    snapshot: Snapshot


class TimeoutNow(Message, frozen=True):
    """The leader hands over leadership: the target, whose log matches the leader's, starts an
    election at once, as if its election timer had fired (thesis 3.10)."""


class ReadIndexRequest(Message, frozen=True):
    """A follower or learner asks its leader for a read point (thesis 6.4: "the follower issues
    a request to the leader to obtain the current readIndex"); `request_id` is the asker's."""

    request_id: int


class ReadIndexResponse(Message, frozen=True):
    """The leader's answer: its commit index when the request arrived, confirmed by a heartbeat
    round that a majority of voters answered after that. The asker answers its read once it has
    applied `index`."""

    request_id: int
    index: int


class SnapshotChunk(Message, frozen=True):
    """A piece of the leader's snapshot file, for a follower the core sent an InstallSnapshot.

    The core's InstallSnapshot names a snapshot; the replication role, not the core, moves the
    file: in chunks of bounded size, a bounded number unacknowledged (daemon/snapshot_install.py).
    `index`, `snapshot_term` and `file_bytes` name the transfer; the chunk holds the file's bytes
    from `offset`.
    """

    index: int
    snapshot_term: int
    file_bytes: int
    offset: int
    data: bytes


class SnapshotChunkAck(Message, frozen=True):
    """The follower holds the first `received_bytes` bytes of the snapshot file at `index` (all of
    them: the transfer is done, or the follower needs that snapshot no longer)."""

    index: int
    received_bytes: int


# Messages between replication roles that the core never sees (the transport carries them with
# the core's: authenticated the same way).
TRANSFER_MESSAGE_TYPES = (SnapshotChunk, SnapshotChunkAck)

MESSAGE_TYPES = (
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
)

MESSAGE_DECODER = msgspec.msgpack.Decoder(
    RequestVote
    | RequestVoteResponse
    | AppendEntries
    | AppendEntriesResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)


class Ready(msgspec.Struct, gc=False):
    """One batch of work for the caller, in the order it must be done.

    1. `snapshot`: persist it, discard the durable log, restore the state machine from it (after
       the entry writes still in progress: writes are done in the order they are handed out).
    2. `hard_state`: persist it. When `sync_before_send` is set (the term or vote changed, or a
       snapshot came), make it and the snapshot durable (fsync) before step 4: every message
       carries the term, and a vote is a promise.
    3. `entries`: start the write: truncate the durable log after `entries.first_index - 1`,
       append them. Writes complete in the order they are handed out. The write need not be
       durable before step 4 (Raft thesis 10.2.1): nothing in `messages` promises these entries
       (a follower's acknowledgement comes from the core only once they are durable).
    4. `messages`: send them.
    5. `committed`: apply them in order (an entry with an empty payload is the core's no-op).
    6. `reads`: answer each once the state machine has applied its index.
    7. `term_start`: this node now leads a new term; stamp from its index on.
    8. Call `core.advance(ready)` if the entries' write is durable by now (a synchronous caller),
       or `core.advance(ready, entries_durable=False)` and, once it is,
       `core.durable(entries.last_index, entries.terms[-1])`.
    """

    messages: list[Message]
    snapshot: Snapshot | None = None
    entries: Entries | None = None
    hard_state: HardState | None = None
    committed: Entries | None = None
    reads: list[ReadState] | None = None
    sync_before_send: bool = False
    term_start: TermStart | None = None
