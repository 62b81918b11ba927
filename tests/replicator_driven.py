"""A `Replicator` (daemon/roles/replicator.py) driven in this process: its real Raft core, log and
proposal rings and counters, a journal directory, and a transport that only notes what it is
handed. The test is every other process: the supervisor (the segments), the journaller (its
durable index, its ring reads), the blp (its ring reads), a query replica (a read round), the
sequencer (proposals), and the peers (messages stepped through `_on_messages`, answers read from
`transport.sent`). Nothing runs on its own: the event loop never runs, and a tick's pass is
`tick()` (`Replicator._process(tick=True)`, what `_tick` calls), a scheduled pass `run_scheduled()`
(its `TickTimer` is never started: no pass takes a tick of its own; test_replicator_tick_timer.py
runs one on a simulated loop).

Cheap (no process, no socket): the level at which the replicator's own choices (which tick
makes a pass, when the commit-notice timer is armed) are shown, where a cluster of real nodes
would show them only through timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.cluster_harness import write_secret
from daemon.config import ClusterConfig, Config, MemberConfig, NodeConfig
from daemon.counter_view import CounterView, create_counters
from daemon.layout import (
    JOURNAL_DURABLE_INDEX,
    LOG_READERS,
    PROPOSAL_POLLABLE,
    PROPOSAL_READERS,
    RAFT_ROLE,
    READ_ROUND_COUNTERS,
    Role,
)
from daemon.node_roles import log_name, proposal_name
from daemon.roles.common import RoleContext
from daemon.roles.replicator import Replicator
from ipc.counters import Counter, Counters
from ipc.ring import Ring
from ipc.ring_reader import RingReader
from sequencer.raft.config import NO_NODE
from sequencer.raft.messages import AppendEntries, Message
from sequencer.raft.peer_protocol import ForwardedRecord
from sequencer.raft.raft_role import FOLLOWER, RaftRole
from sequencer.raft.transport_config import TransportCounters
from sequencer.record import RecordType, encode_record

__all__ = ["CLUSTER_ID", "DrivenReplicator", "NotingTransport", "command", "driven_replicator"]

CLUSTER_ID = 7
FORWARD_STREAM = 1  # the one forward stream toward any peer (a connection that never breaks)


def command(request_id: int, payload_bytes: int = 16) -> bytes:
    """A whole client record, as a sequencer proposes it and a leader replicates it."""
    return encode_record(RecordType.COMMAND, 1, 0, 0, 500, 99, request_id, b"x" * payload_bytes)


class NotingTransport:
    """`PeerTransport` as the replicator uses it, connected to every peer, sending nothing:
    `sent` the messages handed to it, `forwarded` the records forwarded to a leader."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.forwarded: list[bytes] = []
        self.forwarded_to: list[int] = []  # each forwarded record's target
        self.counters = TransportCounters()

    def send(self, messages: Sequence[Message]) -> None:
        self.sent.extend(messages)

    def forward(self, target: int, records: Sequence[ForwardedRecord], stream: int) -> None:
        assert stream == FORWARD_STREAM, stream
        self.forwarded.extend(forwarded.record for forwarded in records)
        self.forwarded_to.extend(target for _ in records)

    def forward_stream(self, target: int) -> int:
        return FORWARD_STREAM

    def forward_writable(self, target: int) -> bool:
        return True

    def drop_forwards(self, target: int, count: int) -> None:
        raise AssertionError("no forward is dropped here")

    def close_forwards_from(self, peer_ids: object, reason: str | None = None) -> None:
        pass

    def take(self, kind: type[Message]) -> list[Message]:
        """The messages of `kind` sent since the last take (the others stay)."""
        taken = [message for message in self.sent if type(message) is kind]
        self.sent = [message for message in self.sent if type(message) is not kind]
        return taken


class DrivenReplicator:
    def __init__(self, replicator: Replicator, loop: asyncio.AbstractEventLoop, counters_segment: Counters,
                 log_ring: Ring, proposal_ring: Ring) -> None:  # fmt: skip
        self.replicator = replicator
        self.loop = loop  # run only by a test that waits for a timer
        self.transport = NotingTransport()
        replicator.transport = self.transport  # type: ignore[assignment]
        self.log_ring = log_ring
        self.proposal_ring = proposal_ring
        # Other processes' counters, written through the segment (a `CounterView` is one owner's).
        self.durable_index: Counter = counters_segment[JOURNAL_DURABLE_INDEX.name]  # the journaller's
        self.read_asked: Counter = counters_segment[READ_ROUND_COUNTERS[0].asked.name]  # query replica 1's
        self.role_counter: Counter = counters_segment[RAFT_ROLE.name]
        # The log ring's readers (the journaller's, the blp's): `free_ring` reads what is written.
        self.log_readers: list[RingReader] = [log_ring.reader(name) for name in LOG_READERS]
        self.proposal_writer = proposal_ring.writer()

    @property
    def passes(self) -> int:
        return self.replicator.passes

    def raft_role(self) -> RaftRole:
        """The Raft standing the replicator last published (`raft.role`), as the sequencer, `seqd
        status` and the operator's tools read it."""
        return RaftRole(self.role_counter.get())

    def tick(self) -> None:
        """One tick of the replicator (its `_tick` less the timer and the snapshot sender), after
        checking `QuietTicks.quiet`'s proof that a follower's outbox is no reason for a pass: one
        that knows a leader holds records there only if its standing changed since its last pass."""
        replicator = self.replicator
        core = replicator.core
        if replicator.outbox and core.raft_role is FOLLOWER and core.leader_id != NO_NODE:
            assert replicator.standing != (core.term, core.leader_id), (len(replicator.outbox), replicator.standing)
        replicator._process(tick=True)
        self.raise_failure()

    def raise_failure(self) -> None:
        """A pass that raised (an assertion: a broken invariant) stops the role (`_process` sets
        `finished`): raise it here, in the test."""
        finished = self.replicator.finished
        if finished.done() and (error := finished.exception()) is not None:
            raise error

    def quiet_ticks_left(self) -> int:
        """Ticks a follower with nothing due makes no pass before its `QUIET_PASS_S` pass."""
        ticks = self.replicator.quiet_ticks
        return ticks.quiet_ticks_max - 1 - ticks.quiet_ticks

    def run_scheduled(self) -> None:
        """The pass `_schedule` asked for, if any (the loop's turn)."""
        if self.replicator.process_scheduled is not None:
            self.replicator._process()
            self.raise_failure()

    def step(self, peer: int, *messages: Message) -> None:
        """Peer messages as the transport hands them over."""
        self.replicator._on_messages(peer, list(messages))

    def written_index(self) -> int:
        return self.replicator.positions.written_index

    def free_ring(self) -> int:
        """The journaller and the blp read everything written: the ring has room again. Returns
        the records read (by each)."""
        counts = set()
        for reader in self.log_readers:
            count = 0
            while reader.read() is not None:
                count += 1
            counts.add(count)
        assert len(counts) == 1, counts
        return counts.pop()

    def propose(self, *records: bytes) -> None:
        """The sequencer puts records in the proposal ring (frames: the record's own header)."""
        written = self.proposal_writer.try_write_joined(b"".join(records))
        assert written, "the proposal ring is full: the test proposes more than it holds"


def _config(directory: Path, name: str, number: int, cluster_settings: dict[str, Any]) -> Config:
    secret = write_secret(directory / "cluster.secret")
    members = [MemberConfig(id=k, peer_address=f"127.0.0.1:{7300 + k}") for k in (1, 2, 3)]
    cluster = ClusterConfig(members=members, cluster_id=CLUSTER_ID, secret_file=str(secret), **cluster_settings)
    return Config(node=NodeConfig(name=name, number=number, data_dir=str(directory / "data")), cluster=cluster)


@contextmanager
def driven_replicator(directory: Path, name: str, number: int, *, log_ring_bytes: int = 1 << 20,
                      cluster: dict[str, Any] | None = None,
                      recovered: Callable[[Config, Counters], None] | None = None) -> Iterator[DrivenReplicator]:  # fmt: skip
    """Node `number` of a three-node cluster (`[cluster]` settings: `cluster`), fresh unless
    `recovered` plays the supervisor and the blp before the start (a journal written, the
    recovery counters set): its segments (named after `name`, a test's unique token), its data
    directory in `directory`, its replicator built as `main` builds it."""
    config = _config(directory, name, number, cluster or {})
    Path(config.node.data_dir).mkdir()
    config.journal_dir.mkdir()
    config.snapshot_dir.mkdir()
    raw = create_counters(name, epoch=1)
    log_ring = Ring.create(log_name(name), log_ring_bytes, readers=LOG_READERS, epoch=1)
    proposal_ring = Ring.create(proposal_name(name), 1 << 20, readers=PROPOSAL_READERS, epoch=1,
                                pollable=PROPOSAL_POLLABLE)  # fmt: skip
    loop = asyncio.new_event_loop()
    replicator: Replicator | None = None
    try:
        if recovered is not None:
            recovered(config, raw)
        context = RoleContext(role=Role.REPLICATOR, config=config,
                              counters=CounterView(raw, Role.REPLICATOR, clustered=True), epoch=1)  # fmt: skip
        replicator = Replicator(context, loop)
        yield DrivenReplicator(replicator, loop, raw, log_ring, proposal_ring)
    finally:
        if replicator is not None:
            if replicator.hard_state_saver.failure is None:  # a failure was the test's (raised)
                replicator.hard_state_saver.stop()  # `serve`'s end: the worker thread ends
            replicator.close()
        loop.close()
        for ring in (log_ring, proposal_ring):
            ring.close()
            ring.unlink()
        raw.close()
        raw.unlink()


def append(term: int, previous_index: int, previous_term: int, commit_index: int,
           payloads: Sequence[bytes], target: int = 2, leader: int = 1) -> AppendEntries:  # fmt: skip
    """An AppendEntries of `leader` to `target`, all its entries of `term`."""
    return AppendEntries(CLUSTER_ID, leader, target, term, previous_index, previous_term, commit_index,
                         [term] * len(payloads), list(payloads))  # fmt: skip
