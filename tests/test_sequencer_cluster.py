"""The sequencer role in cluster mode, a real process over real shared memory and a real socket.

The test plays the supervisor and the replicator: it creates the counters, the proposal ring
(`proposal_name(node)`, which the supervisor creates in cluster mode) and the egress ring, writes
the replicator's `raft.role` and `raft.leader`, and reads the proposal ring as the replicator
does. It also plays the blp on egress (a TIMER_SCHEDULE). No log ring exists: in cluster mode
the sequencer never touches it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import (
    ClusterConfig,
    Config,
    MemberConfig,
    NodeConfig,
    SnapshotConfig,
    SocketConfig,
)
from daemon.exits import FATAL_FD_ENV
from daemon.layout import (
    BLP_APPLIED_INDEX,
    EGRESS_POLLABLE,
    EGRESS_READERS,
    NODE_INCARNATION,
    PROPOSAL_READERS,
    RAFT_LEADER,
    RAFT_ROLE,
    ROLE_COUNTERS,
    TIMERS_PENDING,
    Role,
    RoleState,
    create_counters,
    egress_name,
    log_name,
    proposal_name,
)
from daemon.roles.common import EPOCH_ENV, SUPERVISOR_PID_ENV
from ipc.ring import Ring
from ipc.segment import SegmentError
from sequencer.egress import EgressKind
from sequencer.raft import RaftRole
from sequencer.record import RecordType, decode_admin, iter_records
from sequencer.timers import decode_timer_fired, encode_timer_schedule
from tests.raw_wire import Raw, app, command

WAIT_S = 20.0  # generous: a loaded 2-core machine starts a Python process slowly
RING_BYTES = 1 << 20
EGRESS_BYTES = 2 << 20
INCARNATION = 0x00ABCD
SEQUENCER = ROLE_COUNTERS[Role.SEQUENCER]


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")


class ClusterSequencer:
    """One sequencer role in cluster mode, with the segments its supervisor would create."""

    def __init__(self, directory: Path, node: str) -> None:
        self.node = node
        self.socket_path = str(directory / "seqd.sock")
        members = [
            MemberConfig(id=1, peer_address="127.0.0.1:7101", name=node),
            MemberConfig(id=2, peer_address="127.0.0.1:7102", name="east"),
            MemberConfig(id=3, peer_address="127.0.0.1:7103"),
        ]
        self.config = Config(
            node=NodeConfig(name=node, number=1, data_dir=str(directory / "data")),
            socket=SocketConfig(path=self.socket_path),
            cluster=ClusterConfig(members=members, secret_file=str(directory / "secret")),
            snapshot=SnapshotConfig(every_records=100),
        )
        self.epoch = secrets.randbits(63)
        self.counters = create_counters(node, epoch=self.epoch)
        self.counters[NODE_INCARNATION.name].set(INCARNATION)
        self.proposals = Ring.create(proposal_name(node), RING_BYTES, readers=PROPOSAL_READERS, epoch=self.epoch)
        self.egress = Ring.create(egress_name(node), EGRESS_BYTES, readers=EGRESS_READERS, epoch=self.epoch,
                                  pollable=EGRESS_POLLABLE)
        self.reader = self.proposals.reader(Role.REPLICATOR)
        self.records: list[tuple[Any, bytes]] = []
        self.process: subprocess.Popen[bytes] | None = None

    def standing(self, role: RaftRole, leader: int) -> None:
        self.counters[RAFT_ROLE.name].set(int(role))
        self.counters[RAFT_LEADER.name].set(leader)

    def start(self) -> None:
        environment = dict(os.environ)
        environment["SEQD_CONFIG_JSON"] = self.config.to_json().decode()
        environment[SUPERVISOR_PID_ENV] = str(os.getpid())
        environment[EPOCH_ENV] = str(self.epoch)
        environment.pop(FATAL_FD_ENV, None)
        self.process = subprocess.Popen([sys.executable, "-m", "daemon.roles.sequencer"], env=environment)
        wait_for(lambda: self.counters[SEQUENCER.state.name].get() == RoleState.RUNNING, "the sequencer to run")

    def take(self) -> list[tuple[Any, bytes]]:
        """Read what the sequencer proposed since the last call (as the replicator would)."""
        while True:
            got = self.reader.read()
            if got is None:
                return self.records
            frame_type, payload = got
            # The ring hands the record after its 8-byte frame header: rebuild the whole record.
            record = (len(payload) + 8).to_bytes(4, "little") + frame_type.to_bytes(4, "little") + payload
            for header, body, _offset in iter_records(record.ljust(-(-len(record) // 8) * 8, b"\0")):
                self.records.append((header, bytes(body)))

    def of_type(self, record_type: RecordType) -> list[tuple[Any, bytes]]:
        return [(h, b) for h, b in self.take() if h.type == record_type]

    def stop(self) -> None:
        if self.process is not None:
            self.counters[SEQUENCER.stop.name].set(1)
            while self.process.poll() is None:
                self.take()  # the drain waits until the replicator took every proposal
                try:
                    self.process.wait(timeout=0.01)
                except subprocess.TimeoutExpired:
                    continue
            assert self.process.returncode == 0, self.process.returncode
            self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=WAIT_S)
        for ring in (self.proposals, self.egress):
            ring.close()
            ring.unlink()
        self.counters.close()
        self.counters.unlink()


@pytest.fixture
def sequencer(tmp_dir: Path, unique: str) -> Iterator[ClusterSequencer]:
    node = ClusterSequencer(tmp_dir, unique)
    try:
        yield node
    finally:
        node.close()


def test_a_cluster_sequencer_proposes_unstamped_records_and_fires_timers_only_while_leading(
    sequencer: ClusterSequencer,
) -> None:
    sequencer.standing(RaftRole.FOLLOWER, 2)
    sequencer.start()
    with pytest.raises(SegmentError):  # the sequencer created no log ring, nor needs one
        Ring.attach(log_name(sequencer.node))

    # node_start first, naming this incarnation, unstamped.
    (start_header, start_payload), *_ = wait_for(sequencer.take, "the node_start proposal")
    assert start_header.type == RecordType.ADMIN
    assert decode_admin(start_payload)["incarnation"] == INCARNATION

    with Raw(sequencer.socket_path) as client:
        welcome = client.open(client_id=41)
        assert welcome["leader"] == "east"  # raft.leader = 2, named by the membership
        client.send(command(1, app("open_account", name="alice")))
        (opened,) = wait_for(lambda: sequencer.of_type(RecordType.SESSION_OPEN), "the SESSION_OPEN")
        (proposed,) = wait_for(lambda: sequencer.of_type(RecordType.COMMAND), "the COMMAND")
    assert proposed[0].session_id == opened[0].session_id == welcome["session_id"]
    assert {(header.index, header.term) for header, _ in sequencer.take()} == {(0, 0)}

    # The blp applies a lot of log (other nodes' commands): a follower requests no snapshot.
    sequencer.counters[BLP_APPLIED_INDEX.name].set(500)
    # A timer the blp scheduled is due at once, but a follower does not fire it either.
    deadline_ns = time.time_ns() - 1_000_000_000
    assert sequencer.egress.writer().try_write(encode_timer_schedule(5, deadline_ns), int(EgressKind.TIMER_SCHEDULE))
    wait_for(lambda: sequencer.counters[TIMERS_PENDING.name].get() == 1, "the sequencer to take the timer")
    # Three heartbeats (HEARTBEAT_INTERVAL_S apart) are dozens of leadership polls.
    beats = sequencer.counters[SEQUENCER.heartbeat.name].get()
    wait_for(lambda: sequencer.counters[SEQUENCER.heartbeat.name].get() >= beats + 3, "three heartbeats")
    assert sequencer.of_type(RecordType.TIMER_FIRED) == []
    assert sequencer.of_type(RecordType.SNAPSHOT) == []
    assert sequencer.counters[TIMERS_PENDING.name].get() == 1

    sequencer.standing(RaftRole.LEADER, 1)  # this node is elected: it fires what is due
    ((fired, payload),) = wait_for(lambda: sequencer.of_type(RecordType.TIMER_FIRED), "the TIMER_FIRED")
    assert decode_timer_fired(payload) == (5, deadline_ns)
    assert (fired.index, fired.term) == (0, 0)
    # The leader counts from its election: 100 more records applied, one snapshot request.
    sequencer.counters[BLP_APPLIED_INDEX.name].set(600)
    ((requested, _),) = wait_for(lambda: sequencer.of_type(RecordType.SNAPSHOT), "the SNAPSHOT request")
    assert (requested.index, requested.term) == (0, 0)
    with Raw(sequencer.socket_path) as client:
        assert client.open(client_id=42)["leader"] == sequencer.node
    sequencer.stop()
