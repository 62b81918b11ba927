"""The replicator's configuration from the node's (the Raft core's and the peer transport's), the
check on a record a follower forwards, the fault hooks on forwards (tests), and the exits that
restart the pipeline (a truncation, a snapshot install): parts of `daemon/roles/replicator.py`."""

from __future__ import annotations

import time

from daemon.config import Config, parse_address
from daemon.fault_hooks import (
    FAULT_REFUSE_COMMAND_FORWARDS_ENV,
    command_forward_dropper,
    lose_admin_forwards,
)
from sequencer.raft.config import RaftConfig
from sequencer.raft.peer_protocol import ForwardedRecord
from sequencer.raft.transport import PeerTransport, TransportConfig
from sequencer.record import FRAME_HEADER, RECORD_HEADER_BYTES, RecordType, aligned

__all__ = ["ForwardFaults", "is_admin", "is_command", "raft_config", "transport_config", "whole_record"]

_TERM_START = int(RecordType.TERM_START)
_PADDING = int(RecordType.PADDING)
_ADMIN = int(RecordType.ADMIN)
_COMMAND = int(RecordType.COMMAND)


def raft_config(config: Config, storage_read_bytes_max: int) -> RaftConfig:
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
        storage_read_bytes_max=storage_read_bytes_max,
        # Grows from one start of this role to the next, even after the data directory was
        # wiped (which resets every file): a leader tells this start's answers from an earlier
        # one's (sequencer/raft/tracker.py, "Incarnations"). A wall clock stepped back by more
        # than the time between two starts would make a start look older: its answers would be
        # dropped until the leader changes.
        incarnation=time.time_ns(),
    )


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
    )


def whole_record(record: bytes) -> bool:
    """A forwarded record is one whole record, 8-byte aligned, and not one only a leader or the
    ring makes (TERM_START, PADDING)."""
    if len(record) < RECORD_HEADER_BYTES or len(record) % 8:
        return False
    length, frame_type = FRAME_HEADER.unpack_from(record)
    record_type = frame_type & 0xFFFF
    return aligned(length) == len(record) and record_type != _TERM_START and record_type != _PADDING


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

    def __init__(self) -> None:
        self.lose_admin = lose_admin_forwards()
        self.drop_command = command_forward_dropper()
        self.refuse_command = command_forward_dropper(FAULT_REFUSE_COMMAND_FORWARDS_ENV)

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
