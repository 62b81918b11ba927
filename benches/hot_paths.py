"""The per-command hot paths of the sequencer and the blp, in one process, on real rings.

    python -m benches.hot_paths [--commands 100000] [--batch 35] [--json]
    python -m benches.hot_paths --only gateway_ingress --commands 200   # for callgrind, below

Each loop drives the real code a running node runs per command, without sockets, threads or
other processes, so its cost per command is measured apart from scheduling and the machine's
load:

- `gateway_ingress`: `batch` pipelined COMMAND frames in one read -> `Connection.receive_data` ->
  `Gateway.process` (parse, admit, claim, stamp) -> `RingWriter.publish`; the journaller's and
  the blp's readers release the records (as `poll_region` would).
- `gateway_egress`: the blp's outputs for those commands (a REPLY and an EVENT each) written with
  `try_write_frames`, then `RingReader.poll` -> `Gateway.route_egress` -> the session's bytes.
- `processor`: `Processor.apply_frame` of ledger transfers between 100 accounts, drained every
  16 records (the blp's `FRAMES_PER_POLL_MAX` until branch blpcycle made it 64; kept at 16 so the
  figures stay comparable).
- `replay`: `Processor.replay_run` of the same transfers as one run of whole records, the
  recovery's loop after `read_runs` (the record walk, then `apply_frame` per record).
- `blp_cycle`: the blp's whole duty cycle around the processor: the real `BlpAgent` driven by
  the real `AgentRunner` and `BlockingIdleStrategy` over a log ring that holds every transfer,
  its limit (the commit position) advanced `--limit-step` records at a time, as the journaller
  (one fdatasync: ~80 on one node) or the replicator (a Raft commit: ~47 in a cluster) moves
  it. Each step: cycles until one finds nothing, then the park (flag, fence, re-check, which
  finds the next step's limit already moved, so it never waits). `--follower`: the session is
  another node's, so no reply is written (a follower's blp). `--acked-lag N`: the client's ack
  runs N requests behind (a live client with N+1 in flight), so the blp holds ~N saved replies and
  drops the oldest with each command (the default 0 keeps one). Minus `processor` per command, this
  is the cycle's cost: poll, outputs to egress, counters, the park.
- `journaller_cycle`: the journaller's whole duty cycle: the real `JournallerAgent` (a real
  `Journal` in a temporary directory, fdatasync included) driven by the real `AgentRunner` and
  `BlockingIdleStrategy` over a log ring that holds every transfer, its published cursor moved
  `--limit-step` records at a time (one sequencer publish per fdatasync; the records are written
  in set-up, so the loop counts none of the writer's work). Each step: a cycle that appends and
  syncs, one that finds nothing, then the park (flag, fence, re-check, which finds the next
  step already published). `--follower` runs it in cluster mode (no commit counters, the
  replicator's doorbell rung after each fdatasync instead of the blp's). Per command this is
  the append (the records' check, the CRC, the write), the sync, the counters and the park; the
  fdatasync's own time is kernel time, which callgrind does not count.

Figures are thread CPU time per command (`time.thread_time`), median of `--runs`. On a shared
machine even CPU time moves by 10-20% with the load; instruction counts do not. Each measured
loop runs alone in a thread of its own (its set-up, the rings and the encoded records, in the
main thread), so callgrind can count the loop and nothing else (benches/RESULTS.md, issue 13):

    valgrind --tool=callgrind --toggle-collect=thread_run --callgrind-out-file=/dev/null \\
        python -m benches.hot_paths --only processor --commands 5000 --runs 1
    (the "Collected" total / 5000 is instructions per command; `thread_run` is CPython's
    thread entry point, so only the measured loop is counted)

`python -m benches.compiled` runs these loops on a mypyc-compiled copy of the tree beside the
pure one (docs/dependencies.md, "A compiled helper").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ipc
from benches.processor import SESSION_ID, Feeder, setup
from daemon.agent import AgentRunner
from daemon.layout import (
    COMMIT_INDEX,
    COMMIT_POSITION,
    COUNTER_NAMES,
    EGRESS_POLLABLE,
    EGRESS_READERS,
    LOG_READERS,
    PROPOSAL_READERS,
    ROLE_COUNTERS,
    CounterView,
    Role,
)
from daemon.roles.blp import BlpAgent
from daemon.roles.journaller import JournallerAgent
from ipc import ring_layout
from ipc.counters import Counters
from ipc.idle import BlockingIdleStrategy, IdleStrategy
from sequencer import egress
from sequencer.apps.ledger import LEDGER_SCHEMA, Transfer, TransferMade, Transferred
from sequencer.client.protocol import Connection, Hello, Side
from sequencer.gateway import Gateway, GatewayConfig, GatewaySession, SingleNodeStamping
from sequencer.journal import Journal
from sequencer.record import session_node_number

RING_CAPACITY_BYTES = 1 << 22  # a few thousand batches: the loops wrap it many times
ACCOUNTS = 100
DRAIN_EVERY_RECORDS = 16  # the blp drains its outputs once per poll of this many records
_Encoded = TypeVar("_Encoded")
LOOPS = ("gateway_ingress", "gateway_egress", "processor", "replay", "blp_cycle", "journaller_cycle")
LIMIT_STEP_RECORDS = 80  # records per fdatasync on one node under the closed loop (RESULTS.md)


class GatewayRig:
    """A gateway with one open session on real log and egress rings."""

    def __init__(self, batch: int) -> None:
        token = uuid.uuid4().hex[:8]
        self.log_ring = ipc.Ring.create(
            ipc.segment_name(token, "log"), RING_CAPACITY_BYTES, readers=LOG_READERS
        )
        self.egress_ring = ipc.Ring.create(ipc.segment_name(token, "egress"), RING_CAPACITY_BYTES,
                                           readers=EGRESS_READERS, pollable=EGRESS_POLLABLE)  # fmt: skip
        self.writer = self.log_ring.writer()
        self.log_readers = [self.log_ring.reader(name) for name in LOG_READERS]
        self.egress_writer = self.egress_ring.writer()
        self.egress_reader = self.egress_ring.reader(EGRESS_READERS[0])
        config = GatewayConfig(node_name="n1", node_number=1, incarnation=1, command_bytes_max=1 << 16,
                               command_version_max=LEDGER_SCHEMA.version, sessions_max=16)  # fmt: skip
        self.gateway: Gateway[GatewaySession] = Gateway(
            config, SingleNodeStamping(1, "n1"), self.writer.try_claim, lambda *_: None,
            last_index=0, last_timestamp_ns=0,
        )  # fmt: skip
        self.session = GatewaySession()
        client = Connection(Side.CLIENT)
        self.session.connection.receive_data(client.send(Hello(client_id=7)))
        self.gateway.process(self.session, 1)
        client.receive_data(bytes(self.session.out))
        self.session.out.clear()
        client.next_frames()
        self.writer.publish()
        self.now_ns = 1
        # The gateway does not deduplicate (the blp does), so one read can be sent again and again.
        _, command = LEDGER_SCHEMA.encode_command(Transfer("acct-1", "acct-2", 1))
        read = bytearray()
        for request_id in range(1, batch + 1):
            client.send_command_into(read, request_id, 0, LEDGER_SCHEMA.version, command)
        self.read = bytes(read)
        reply = LEDGER_SCHEMA.encode_reply(Transferred("acct-1", "acct-2", 1, 5))
        event = LEDGER_SCHEMA.encode_event(TransferMade("acct-1", "acct-2", 1))
        session_id = self.session.session_id
        self.outputs: list[tuple[int, bytes]] = []
        for request_id in range(1, batch + 1):
            index = 100 + request_id
            self.outputs.append((int(egress.EgressKind.REPLY),
                                 egress.REPLY_HEADER.pack(session_id, request_id, index, 0, 1) + reply))  # fmt: skip
            self.outputs.append(
                (int(egress.EgressKind.EVENT), egress.EVENT_HEADER.pack(index, 1) + event)
            )

    def ingress(self) -> None:
        self.session.connection.receive_data(self.read)
        self.now_ns += 1
        self.gateway.process(self.session, self.now_ns)
        self.writer.publish()
        for reader in self.log_readers:
            reader.poll_region(RING_CAPACITY_BYTES)
            reader.release()

    def egress(self) -> None:
        assert self.egress_writer.try_write_frames(self.outputs) == len(self.outputs)
        dirty: list[GatewaySession] = []
        self.gateway.route_egress(self.egress_reader.poll(len(self.outputs)), dirty)
        self.egress_reader.release()
        for session in dirty:
            bytes(session.out)
            session.out.clear()

    def close(self) -> None:
        for ring in (self.log_ring, self.egress_ring):
            ring.close()
            ring.unlink()


class BlpCycleRig:
    """A `BlpAgent` on real rings and counters whose log ring already holds `commands` transfers
    (after the accounts, applied in set-up), with the limit at the first record."""

    def __init__(self, commands: int, limit_step: int, follower: bool, acked_lag: int = 0) -> None:
        token = uuid.uuid4().hex[:8]
        self.counters = Counters.create(ipc.segment_name(token, "counters"), COUNTER_NAMES)
        record_bytes = 128  # a transfer's frame is ~100 bytes; every record stays in the ring
        capacity = 1 << max(20, (commands * record_bytes).bit_length())
        self.log_ring = ipc.Ring.create(
            ipc.segment_name(token, "log"), capacity, readers=LOG_READERS
        )
        self.egress_ring = ipc.Ring.create(ipc.segment_name(token, "egress"), capacity,
                                           readers=EGRESS_READERS, pollable=EGRESS_POLLABLE)  # fmt: skip
        processor, feeder = setup(ACCOUNTS, acked_lag)
        node_number = session_node_number(SESSION_ID)
        processor.emit_for(node_number + 1 if follower else node_number, cluster=follower)
        writer = self.log_ring.writer()
        self.limits: list[tuple[int, int]] = []  # (commit index, commit position) per step
        for n, (kind, view) in enumerate(_transfers(feeder.command, commands)):
            assert writer.try_write(view, kind)
            if n % limit_step == limit_step - 1 or n == commands - 1:
                self.limits.append((feeder.index, writer.published_position))
        self.limits.reverse()  # popped from the end
        self.commit_index = self.counters[COMMIT_INDEX.name]
        self.commit_position = self.counters[COMMIT_POSITION.name]
        self.commit_index.set(processor.applied_index)
        self.agent = BlpAgent(processor, self.log_ring, self.egress_ring, CounterView(self.counters, Role.BLP), snapshot_dir=Path("/nonexistent"),
                              snapshot_keep=1, delete_journal=False, clustered=False)  # fmt: skip
        role = ROLE_COUNTERS[Role.BLP]
        assert self.agent.doorbell is not None
        self.stop = self.counters[role.stop.name]
        self.runner = AgentRunner(self.agent, _StepIdle(self, BlockingIdleStrategy(self.agent.doorbell)),
                                  self.counters[role.heartbeat.name], self.stop, self.counters[role.state.name])  # fmt: skip

    def advance(self) -> None:
        """The limit's advancer (journaller or replicator): the next step committed, or stop."""
        if not self.limits:
            self.stop.set(1)
            return
        index, position = self.limits.pop()
        self.commit_index.set(index)  # before the position, as the journaller stores them
        self.commit_position.set(position)

    def close(self) -> None:
        for ring in (self.log_ring, self.egress_ring):
            ring.close()
            ring.unlink()
        self.counters.close()
        self.counters.unlink()


class JournallerCycleRig:
    """A `JournallerAgent` on a real log ring, counters and journal whose ring holds `commands`
    transfers (indexes from 1), written in set-up and published `limit_step` records at a time."""

    def __init__(self, commands: int, limit_step: int, follower: bool) -> None:
        token = uuid.uuid4().hex[:8]
        self.directory = Path(tempfile.mkdtemp(prefix="seqd-hot-journal-"))
        self.counters = Counters.create(ipc.segment_name(token, "counters"), COUNTER_NAMES)
        record_bytes = 128  # a transfer's frame is ~100 bytes; every record stays in the ring
        capacity = 1 << max(20, (commands * record_bytes).bit_length())
        self.log_ring = ipc.Ring.create(ipc.segment_name(token, "log"), capacity, readers=LOG_READERS)
        # Cluster mode: the replicator's doorbell (never parked here, so never posted).
        self.proposal_ring = ipc.Ring.create(ipc.segment_name(token, "proposal"), 1 << 16,
                                             readers=PROPOSAL_READERS) if follower else None  # fmt: skip
        writer = self.log_ring.writer()
        feeder = Feeder()
        self.steps: list[int] = []  # published position per step
        for n, (kind, view) in enumerate(_transfers(feeder.command, commands)):
            assert writer.try_write(view, kind)
            if n % limit_step == limit_step - 1 or n == commands - 1:
                self.steps.append(writer.published_position)
        self.steps.reverse()  # popped from the end
        self.control = self.log_ring._control
        self.control[ring_layout.PUBLISHED] = 0  # nothing published yet; `advance` publishes
        self.journal = Journal.open(self.directory / "journal")
        self.agent = JournallerAgent(
            self.log_ring, self.journal, CounterView(self.counters, Role.JOURNALLER, clustered=follower),
            batch_bytes_max=1 << 20, delete_journal=False,
            replicator_doorbell=None if self.proposal_ring is None else self.proposal_ring.doorbell(Role.REPLICATOR),
        )  # fmt: skip
        role = ROLE_COUNTERS[Role.JOURNALLER]
        assert self.agent.doorbell is not None
        self.stop = self.counters[role.stop.name]
        self.runner = AgentRunner(self.agent, _StepIdle(self, BlockingIdleStrategy(self.agent.doorbell)),
                                  self.counters[role.heartbeat.name], self.stop, self.counters[role.state.name])  # fmt: skip

    def advance(self) -> None:
        """The sequencer's publish of the next step (the records are in the ring), or stop."""
        if not self.steps:
            self.stop.set(1)
            return
        self.control[ring_layout.PUBLISHED] = self.steps.pop()

    def close(self) -> None:
        self.journal.close()
        rings = [self.log_ring] if self.proposal_ring is None else [self.log_ring, self.proposal_ring]
        for ring in rings:
            ring.close()
            ring.unlink()
        self.counters.close()
        self.counters.unlink()
        shutil.rmtree(self.directory, ignore_errors=True)


class _StepIdle(IdleStrategy):
    """The blocking strategy, with the limit moved after each empty cycle (before the park's
    re-check, which then finds work and returns without waiting)."""

    def __init__(self, rig: BlpCycleRig | JournallerCycleRig, idle: BlockingIdleStrategy) -> None:
        self.rig = rig
        self.inner = idle.idle

    def idle(self, work_count: int) -> None:
        if work_count <= 0:
            self.rig.advance()
        self.inner(work_count)


def _in_thread(loop: Callable[[], float]) -> float:
    """`loop()` run in a thread of its own: what callgrind's `--toggle-collect=thread_run` counts."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(loop()), name="measured-loop")
    thread.start()
    thread.join()
    assert result, "the measured loop raised (its traceback is above)"
    return result[0]


def _timed(step: Callable[[], None], steps: int) -> float:
    def loop() -> float:
        started = time.thread_time()
        for _ in range(steps):
            step()
        return time.thread_time() - started

    return _in_thread(loop)


def _transfers(encode: Callable[[Transfer], _Encoded], commands: int) -> list[_Encoded]:
    """`commands` ledger transfers between ACCOUNTS accounts, each encoded by `encode`."""
    return [encode(Transfer(f"acct-{n % ACCOUNTS}", f"acct-{(n * 7 + 1) % ACCOUNTS}", 1))
            for n in range(commands)]  # fmt: skip


def measure(loop: str, commands: int, batch: int, limit_step: int = LIMIT_STEP_RECORDS,
            follower: bool = False, acked_lag: int = 0) -> float:  # fmt: skip
    """Thread CPU microseconds of `loop` per command, over about `commands` commands."""
    if loop == "replay":
        processor, feeder = setup(ACCOUNTS)
        run = memoryview(b"".join(_transfers(feeder.command_record, commands)))

        def replay() -> float:
            started = time.thread_time()
            assert processor.replay_run(run) == commands
            return time.thread_time() - started

        return 1e6 * _in_thread(replay) / commands
    if loop == "blp_cycle":
        cycle_rig = BlpCycleRig(commands, limit_step, follower, acked_lag)
        try:

            def cycle() -> float:
                started = time.thread_time()
                cycle_rig.runner.run()
                return time.thread_time() - started

            spent = _in_thread(cycle)
            assert cycle_rig.agent.processor.applied_index == cycle_rig.commit_index.get(), (
                "the loop stopped early"
            )
            return 1e6 * spent / commands
        finally:
            cycle_rig.close()
    if loop == "journaller_cycle":
        journal_rig = JournallerCycleRig(commands, limit_step, follower)
        try:

            def journal_cycle() -> float:
                started = time.thread_time()
                journal_rig.runner.run()
                return time.thread_time() - started

            spent = _in_thread(journal_cycle)
            assert journal_rig.journal.durable_index == commands, (
                "the loop stopped early", journal_rig.journal.durable_index, commands)
            return 1e6 * spent / commands
        finally:
            journal_rig.close()
    if loop == "processor":
        processor, feeder = setup(ACCOUNTS)
        frames = _transfers(feeder.command, commands)
        apply_frame = processor.apply_frame
        drain = processor.drain_outputs

        def loop() -> float:
            started = time.thread_time()
            for n, (kind, view) in enumerate(frames):
                apply_frame(kind, view)
                if n % DRAIN_EVERY_RECORDS == DRAIN_EVERY_RECORDS - 1:
                    drain()
            return time.thread_time() - started

        return 1e6 * _in_thread(loop) / commands
    rig = GatewayRig(batch)
    try:
        steps = max(1, commands // batch)
        return (
            1e6
            * _timed(rig.ingress if loop == "gateway_ingress" else rig.egress, steps)
            / (steps * batch)
        )
    finally:
        rig.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.hot_paths")
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=35, help="commands per read (the node's ~35)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--limit-step",
        type=int,
        default=LIMIT_STEP_RECORDS,
        help="blp_cycle: records per move of the limit (a cluster's commit: ~47); "
        "journaller_cycle: records per publish",
    )
    parser.add_argument(
        "--follower", action="store_true",
        help="blp_cycle: write no replies (a follower's blp); journaller_cycle: cluster mode",
    )
    parser.add_argument(
        "--acked-lag", type=int, default=0,
        help="blp_cycle: how far the client's ack runs behind its requests (0: acks each reply "
        "before the next request; benches.cluster_cpu's --in-flight 512 client: ~511)",
    )  # fmt: skip
    parser.add_argument("--only", choices=LOOPS, action="append", help="run these loops only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"commands": args.commands, "batch": args.batch}
    for loop in args.only or LOOPS:
        runs = [
            measure(loop, args.commands, args.batch, args.limit_step, args.follower, args.acked_lag)
            for _ in range(args.runs)
        ]
        results[f"{loop}_cpu_us_per_cmd"] = round(statistics.median(runs), 3)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        for key, value in results.items():
            print(f"{key:34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
