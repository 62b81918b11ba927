"""The replicator's configuration from the node's (the Raft core's and the peer transport's), the
check on a record a follower forwards and the leader's intake of a forwarded batch (or why not),
the fault hooks on forwards (tests), and the exits that restart the pipeline (a truncation, a
snapshot install): parts of `daemon/roles/replicator.py`."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from daemon.config import Config, parse_address
from daemon.fault_hooks import (
    FAULT_MALFORM_COMMAND_PROPOSAL_ENV,
    FAULT_REFUSE_COMMAND_FORWARDS_ENV,
    command_forward_dropper,
    lose_admin_forwards,
    wall_clock_ns,
)
from daemon.incarnation import next_raft_incarnation
from ipc.counters import Counter
from ipc.ring_reader import RingReader
from sequencer.cluster import ForwardInbox, record_from_frame
from sequencer.cluster.ring_entries import LEADER_ONLY_TYPES
from sequencer.raft.config import RaftConfig
from sequencer.raft.core import RaftCore
from sequencer.raft.messages import DurableState
from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX, ForwardedRecord
from sequencer.raft.raft_role import LEADER
from sequencer.raft.storage import LogStorage
from sequencer.raft.transport import PeerTransport, TransportConfig
from sequencer.record import FRAME_HEADER, RECORD_HEADER, RECORD_HEADER_BYTES, RecordType, aligned

__all__ = [
    "PROPOSAL_BYTES_PER_PASS_MAX", "ForwardFaults", "MalformedProposal", "answer_needs_pass", "check_proposals",
    "forwarded_refusal", "is_admin", "is_command", "malformed", "poll_region", "raft_config", "start_raft_core",
    "transport_config",
]  # fmt: skip

log = logging.getLogger("seqd.replicator")

_TERM_START = int(RecordType.TERM_START)
_ADMIN = int(RecordType.ADMIN)
_COMMAND = int(RecordType.COMMAND)


def raft_config(config: Config, storage_read_bytes_max: int, incarnation: int) -> RaftConfig:
    """The Raft core's configuration from the node's: pure (no file, no clock), so it can be built
    anywhere; `incarnation` is this start's (`start_raft_core` takes it)."""
    cluster = config.cluster
    assert cluster is not None
    return RaftConfig(
        node_id=config.node.number,
        voters=cluster.voters,
        learners=cluster.learners,
        cluster_id=cluster.cluster_id,
        election_ticks=cluster.election_ticks,
        heartbeat_ticks=cluster.heartbeat_ticks,
        inflight_bytes_max=cluster.inflight_bytes_max,
        term_start_from_shell=True,
        defer_commit_notices=True,  # the bound: daemon/roles/commit_notices.py
        storage_read_bytes_max=storage_read_bytes_max,
        storage_read_bytes_per_pass_max=cluster.storage_read_bytes_per_pass_max,
        follower_log_retention_entries=cluster.follower_log_retention_entries,
        incarnation=incarnation,
    )


def start_raft_core(
    config: Config, storage_read_bytes_max: int, durable: DurableState, storage: LogStorage
) -> RaftCore:
    """This start's Raft core, in two steps. First the start's Raft incarnation, durable in the
    data directory before it returns: the wall clock's, or the last start's + 1 when the clock is
    not past it, so it grows from one start to the next even after the data directory was wiped
    or the clock stepped back, and a leader tells this start's answers from an earlier one's
    (sequencer/raft/tracker.py, "Incarnations"; daemon/incarnation.py). Then the core, on
    `raft_config`. The core exists only after the first step, so no message carrying the
    incarnation can leave before it is durable.

    Raises:
        FatalError: the incarnation file is damaged or cannot be written (the start stops).
    """
    incarnation = next_raft_incarnation(Path(config.node.data_dir), wall_clock_ns())
    return RaftCore(raft_config(config, storage_read_bytes_max, incarnation), random.Random(), durable, storage=storage)


def transport_config(config: Config) -> TransportConfig:
    cluster = config.cluster
    assert cluster is not None
    number = config.node.number
    host, port = parse_address(cluster.peer_listen or cluster.member(number).peer_address)
    return TransportConfig(
        cluster_id=cluster.cluster_id,
        node_id=number,
        secret=cluster.read_secret(),
        listen_host=host,
        listen_port=port,
        peers={m.id: parse_address(m.peer_address) for m in cluster.members if m.id != number},
        allow_non_loopback=cluster.allow_non_loopback,
        # What the leader keeps unanswered toward a follower (the byte window), plus the one
        # message that may cross it (a frame at most): all a healthy link ever holds unsent. A
        # follower that answers heartbeats but reads slowly gets one more message per heartbeat
        # answer (the tracker frees the oldest of a full window, in case it was lost); beyond
        # this bound they are dropped, as lost, instead of growing this process.
        send_buffer_bytes_max=cluster.inflight_bytes_max + PEER_FRAME_BYTES_MAX,
    )


def malformed(record: bytes) -> str | None:
    """What makes `record` no record a follower may forward, None when it is one: one whole
    record, 8-byte aligned, and not one only a leader or the ring makes (TERM_START, PADDING).
    The leader checks every forwarded record with it, and every node every record it takes from
    its proposal ring (`check_proposals`), so a node of the same build never forwards one that
    its leader refuses."""
    if len(record) < RECORD_HEADER_BYTES:
        return f"{len(record)} bytes, shorter than a record header ({RECORD_HEADER_BYTES} bytes)"
    if len(record) % 8:
        return f"{len(record)} bytes, not a multiple of 8"
    length, frame_type = FRAME_HEADER.unpack_from(record)
    if aligned(length) != len(record):
        return f"its header says {length} bytes, but it holds {len(record)}"
    record_type = frame_type & 0xFFFF
    if record_type in LEADER_ONLY_TYPES:
        return f"a {RecordType(record_type).name} record, which only a leader or the ring writes"
    return None


class MalformedProposal(Exception):
    """A record this node's sequencer wrote to its proposal ring is malformed (`malformed`)."""


_VIEW_BYTES_MIN = RECORD_HEADER_BYTES - FRAME_HEADER.size  # a ring frame's bytes after its header


def check_proposals(frames: list[tuple[int, memoryview]], node: int) -> None:
    """Raises MalformedProposal for a frame of the proposal ring that is not a record a follower
    may forward. A ring frame keeps its record's length (`record_from_frame`), so only a frame
    too short for a header or of a leader's or the ring's type can be one.

    Only this node's sequencer writes the ring, after checking each client frame, so such a
    record is a bug or memory corruption on this node. Forwarded, the leader would refuse it,
    and the stream it is in, again at every resend: every client of the node would stall, for
    good. Dropped, the later records of its session would be applied before it, and a resend of
    it answered DUPLICATE without ever being applied. So the replicator stops (fail-stop): the
    supervisor restarts the node's pipeline from the journal with a new proposal ring, the
    clients reconnect and resend what was not acknowledged, in order, and nothing acknowledged
    is lost (supervisor.restarts counts it; the log says what was wrong)."""
    for frame_type, view in frames:
        if len(view) < _VIEW_BYTES_MIN or frame_type & 0xFFFF in LEADER_ONLY_TYPES:
            record = record_from_frame(frame_type, view)
            session_id, request_id = RECORD_HEADER.unpack_from(record)[6:] if len(record) >= RECORD_HEADER_BYTES else (0, 0)
            raise MalformedProposal(
                f"node {node}'s sequencer wrote a malformed record to its proposal ring ({malformed(record)}; "
                f"session {session_id:#x}, request {request_id}): a bug or memory corruption on this node. "
                "The replicator stops rather than forward it (the leader would refuse it, and every record "
                "behind it, at each resend): the node's pipeline restarts from its journal, and its clients "
                "reconnect and resend what was not acknowledged. If it happens again, report it with this log"
            )


def is_admin(record: bytes) -> bool:
    """An ADMIN record (a node_start, a raise_version): what the SEQD_FAULT_LOSE_ADMIN_FORWARDS
    hook loses."""
    return FRAME_HEADER.unpack_from(record)[1] & 0xFFFF == _ADMIN


def is_command(record: bytes) -> bool:
    """A COMMAND record: what the SEQD_FAULT_DROP_COMMAND_FORWARD hook drops."""
    return FRAME_HEADER.unpack_from(record)[1] & 0xFFFF == _COMMAND


class ForwardFaults:
    """The fault hooks on forwarded records (tests; daemon/fault_hooks.py), each None when unset:
    a follower that loses its ADMIN forwards or drops one COMMAND forward as a full socket would,
    a leader that refuses one batch holding a COMMAND as a full inbox would."""

    def __init__(self, node: int = 0) -> None:
        self.node = node  # named in a MalformedProposal
        self.lose_admin = lose_admin_forwards()
        self.drop_command = command_forward_dropper()
        self.refuse_command = command_forward_dropper(FAULT_REFUSE_COMMAND_FORWARDS_ENV)
        self.malform_command = command_forward_dropper(FAULT_MALFORM_COMMAND_PROPOSAL_ENV, once=True)

    def check(self, frames: list[tuple[int, memoryview]]) -> None:
        """`check_proposals` of the frames taken from the proposal ring, one of them made a
        TERM_START first by the SEQD_FAULT_MALFORM_COMMAND_PROPOSAL hook (a short one would stop
        the role as well: `record_key` asserts a whole header)."""
        malform = self.malform_command
        if malform is not None:
            for offset, (frame_type, view) in enumerate(frames):
                if frame_type & 0xFFFF == _COMMAND and malform():
                    frames[offset] = (frame_type ^ _COMMAND ^ _TERM_START, view)
        check_proposals(frames, self.node)

    def region(self, region: memoryview) -> memoryview:
        """`region`, a run of whole proposal ring frames the leader stamps in one walk (checked
        there: `stamped_region`), or a copy of it with a COMMAND made a TERM_START by the
        SEQD_FAULT_MALFORM_COMMAND_PROPOSAL hook (the ring itself is this role's to read only)."""
        malform = self.malform_command
        if malform is None or not region:
            return region
        copy = bytearray(region)
        offset = 0
        while offset + FRAME_HEADER.size <= len(copy):
            length, frame_type = FRAME_HEADER.unpack_from(copy, offset)
            if frame_type & 0xFFFF == _COMMAND and malform():
                FRAME_HEADER.pack_into(copy, offset, length, frame_type ^ _COMMAND ^ _TERM_START)
            offset += aligned(max(length, FRAME_HEADER.size))
        return memoryview(copy)

    def refuses(self, batch: list[bytes]) -> bool:
        refuse = self.refuse_command
        return refuse is not None and any(is_command(record) for record in batch) and refuse()

    def forward(self, transport: PeerTransport, leader: int, stream: int, records: list[bytes]) -> None:
        """`transport.forward` of `records` on `stream`, through the follower's hooks."""
        lose = self.lose_admin
        if lose is not None and lose():
            records = [record for record in records if not is_admin(record)]  # lost on the way
        drop = self.drop_command
        if drop is not None:
            for offset, record in enumerate(records):
                if is_command(record) and drop():
                    transport.forward(leader, [ForwardedRecord(before) for before in records[:offset]], stream)
                    transport.drop_forwards(leader, 1)
                    records = records[offset + 1 :]
                    break
        transport.forward(leader, [ForwardedRecord(record) for record in records], stream)


# The leader takes its proposals as one region of the ring, stamped in one walk
# (`stamped_region`): bounded by bytes, ~3,500 ledger records of ~150 bytes (~8,000 of the
# smallest, 64), about one to two PROPOSALS_PER_PASS_MAX, so one pass stays a few milliseconds.
PROPOSAL_BYTES_PER_PASS_MAX = 1 << 19


def poll_region(proposals: RingReader, faults: ForwardFaults) -> memoryview:
    """The leader's new proposals: whole frames of its proposal ring as one region, up to
    PROPOSAL_BYTES_PER_PASS_MAX, or one larger record alone (the next frame did not fit: polled
    to its own length, so the records behind it wait for the next pass, not a whole lap of the
    ring in one); through the fault hooks (`ForwardFaults.region`)."""
    region = proposals.poll_region(PROPOSAL_BYTES_PER_PASS_MAX)[1]
    if not region and (frame_bytes := proposals.next_frame_bytes()):
        region = proposals.poll_region(frame_bytes)[1]
    return faults.region(region)


def answer_needs_pass(core: RaftCore) -> bool:
    """Whether the replicator's pass must follow the peer messages `core` just stepped. On a
    leader, only when they left it work (`has_ready`: a commit, entries or a probe due, a read
    confirmed, a new term): the answer of the follower that is not needed for the majority moves
    nothing, and was a pass of the whole loop for nothing (~1 in 3 of the leader's passes under
    load, benches/RESULTS.md "leadring"). Proposals and the journal's fdatasync ring the doorbell
    themselves, and ticks run the rest of the pass. A follower's are left as they were."""
    return core.raft_role is not LEADER or core.has_ready()


def forwarded_refusal(peer: int, batch: list[bytes], faults: ForwardFaults, inbox: ForwardInbox,
                      core: RaftCore, errors: Counter) -> str | None:  # fmt: skip
    """Take `batch`, forwarded by node `peer`, whole into `inbox` (None), or say why not: a
    sentence the leader logs (a malformed record, also counted in `errors`) and sends back to
    `peer` (the transport's REFUSED frame), whose log then says it (issue 11: before, a follower
    saw only its connection close, again at every resend, and could not tell why)."""
    node = core.id
    for offset, record in enumerate(batch):
        if (wrong := malformed(record)) is not None:
            errors.add(1)
            log.error("node %d forwarded a malformed record (%s), refused: check it runs this seqd build", peer, wrong)
            return (f"record {offset + 1} of {len(batch)} it forwarded is malformed ({wrong}), so node {node} "
                    "refused the batch: run the same seqd build on every node")  # fmt: skip
    if faults.refuses(batch):  # a fault hook: a full inbox, once
        inbox.records_dropped += len(batch)
        return f"node {node} refused the batch (the SEQD_FAULT_REFUSE_COMMAND_FORWARDS hook, a test)"
    leading = core.raft_role is LEADER
    if inbox.take(peer, batch, leading):
        return None
    if not leading:
        return f"node {node} does not lead (term {core.term}, leader {core.leader_id or 'unknown'})"
    return (f"node {node}'s inbox holds {len(inbox)} forwarded records: no room for {len(batch)} more "
            f"(INBOX_RECORDS_MAX {inbox.records_max}) until its next pass")  # fmt: skip


class InstallRequired(Exception):
    """The core took a snapshot from the leader: exit, install it, restart on it."""

    def __init__(self, index: int) -> None:
        super().__init__(f"the leader's snapshot at index {index} replaces this node's log")
        self.index = index


class TruncateRequired(Exception):
    """A conflict replaces entries this node already holds after `index`: exit, cut, restart."""

    def __init__(self, index: int) -> None:
        super().__init__(f"the leader's log conflicts with this node's after index {index}")
        self.index = index
