"""The replicator's per-entry paths, in one process: what each cut of the replicators is judged by.

    python -m benches.replicator_paths [--records 64000] [--batch 64] [--json]
    valgrind --tool=callgrind --toggle-collect=thread_run --callgrind-out-file=/dev/null \\
        python -m benches.replicator_paths --only positions --records 6400 --runs 1
    (the "Collected" total / records is instructions per entry, as in benches/hot_paths.py)

Each loop drives the real code a running replicator runs for every entry, in batches of `batch`
(a leader's proposal batch, a follower's AppendEntries: ~40-110 entries under the closed loop of
`benches.cluster_cpu`), without sockets or other processes:

- `positions` (every node): the ends of a run of entries written to the log ring recorded
  (`RingPositions.wrote_run`), then the commit moved past them (`RingPositions.commit`): the blp's
  limit, once per pass.
- `leader_pass` (the leader, per batch): what the leader's pass does around a batch of `batch`
  stamped records besides the stamp and the pending set (`leader_records`): the Raft core's
  `propose_batch`, `ready` (`Leader.flush_appends`) and `advance`, the AppendEntries to two
  followers framed and MAC'd (`PeerConnection.send_messages`), the journaller's fdatasync
  reported (`durable`), both followers' answers read (`receive_data`, `next_event`) and stepped,
  and the commit's ready. Run it at `--batch 16` and `--batch 64` to split it into per batch and
  per entry; libcrypto's share (software SHA-256 under valgrind) is to be subtracted as for
  `frames`.
- `frames` (both ends of a link): an AppendEntries of `batch` entries framed and MAC'd by the
  leader's codec (`PeerConnection.send_messages`), checked and decoded by the follower's
  (`receive_data`, `next_event`), and its AppendEntriesResponse the other way.
- `leader_records` (the leader): a batch of ledger commands taken from a real proposal ring as one
  region (`poll_region`) and stamped in one walk that
  also checks each frame (`RecordStamper.stamp_region`), proposed and held pending by index
  (`PendingForwards.proposed`), then seen in the log (`logged_all`) and committed
  (`committed_all`), as `daemon/roles/replicator.py` does; each batch is written into the ring
  first (the sequencer's one joined copy and publish, counted too).
- `follower` (a follower's receive path, one AppendEntries of `batch` records at a time): the
  leader's frame checked and decoded (`receive_data`, `next_event`), stepped into a follower's
  `RaftCore`, its entries queued and written into a real log ring (`RingFeed`, `RingPositions`),
  reported durable (the journaller's fdatasync) and the answer framed; the commit the next
  AppendEntries carries moves the ring's commit. Run it at `--batch 1` and at the batch of the
  cluster (~40) to split a follower's cost into per message and per record: what the role adds
  beyond this (its pass, the loop's wake-ups, the ticks) is per message, not per record. Its core
  keeps `--log-entries` applied entries in memory, as the role's does: that memory's size shows
  in the time per record (cache misses), not in instruction counts.

Figures are thread CPU time per entry (`time.thread_time`), median of `--runs`; under callgrind,
instructions per entry (exact under any load). Not for `frames`: about half its time is the
HMAC-SHA256 of each frame, which OpenSSL runs with the CPU's SHA instructions natively and in
software under valgrind (whose CPU has none), so its instruction count overstates the MAC (and
`follower`'s per record: subtract libcrypto's share, `callgrind_annotate`).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
import uuid
from typing import Any

import ipc
from benches.hot_paths import _in_thread
from daemon.roles.replicator_ring import RingFeed
from daemon.roles.replicator_setup import PROPOSAL_BYTES_PER_PASS_MAX
from ipc.counters import Counter
from sequencer.cluster import PendingForwards, RecordStamper, RingPositions, record_from_frame
from sequencer.raft.config import RaftConfig
from sequencer.raft.core import RaftCore
from sequencer.raft.messages import AppendEntries, AppendEntriesResponse, Message
from sequencer.raft.peer_protocol import (
    NEED_DATA,
    Authenticated,
    ClusterIdentity,
    MessageBatch,
    PeerConnection,
    Side,
)
from sequencer.raft.raft_role import RaftRole
from sequencer.record import FRAME_HEADER, RecordType, encode_record

LOOPS = ("positions", "leader_records", "leader_pass", "frames", "follower")
PAYLOAD_BYTES = 96  # a ledger transfer's payload is of this order
FOLLOWER_RING_BYTES = 1 << 22  # a log ring of the cluster benchmark's order (it wraps in the loop)
# Applied entries the loop's core keeps in memory, as a follower's role does (a storage's tail,
# `RaftConfig.follower_log_retention_entries`; `--log-entries 65536` is what one held before).
FOLLOWER_LOG_ENTRIES = RaftConfig(node_id=2, voters=(1, 2, 3)).follower_log_retention_entries


def _frames(records: int) -> list[tuple[int, memoryview]]:
    """Ring frames (type, view after the frame header) of `records` distinct unstamped commands."""
    frames = []
    for n in range(records):
        record = encode_record(RecordType.COMMAND, 1, 0, 0, 1_000 + n, 1 + n % 4, n, bytes(PAYLOAD_BYTES))
        length, frame_type = FRAME_HEADER.unpack_from(record)
        frames.append((frame_type, memoryview(record)[FRAME_HEADER.size : length]))
    return frames


def positions_loop(records: int, batch: int) -> float:
    run = [bytes(PAYLOAD_BYTES + 48)] * batch
    run_bytes = sum(map(len, run))

    def loop() -> float:
        positions = RingPositions(0, 0)
        started = time.thread_time()
        for first in range(1, records + 1, batch):
            start = (first - 1) // batch * run_bytes
            positions.wrote_run(first, start, start + run_bytes, run)
            positions.commit(first + batch - 1)
        return time.thread_time() - started

    return _in_thread(loop)


def leader_records_loop(records: int, batch: int) -> float:
    frames = _frames(records)
    runs = [b"".join(record_from_frame(*frame) for frame in frames[start : start + batch])
            for start in range(0, records, batch)]  # fmt: skip
    capacity = 1 << max(16, (sum(map(len, runs)) - 1).bit_length())  # no wrap: one copy a batch
    ring = ipc.Ring.create(ipc.segment_name(uuid.uuid4().hex[:8], "proposal"), capacity, readers=("replicator",))
    try:
        writer = ring.writer()
        proposals = ring.reader("replicator")

        def loop() -> float:
            pending = PendingForwards()
            stamper = RecordStamper(0)
            started = time.thread_time()
            for start, run in zip(range(0, records, batch), runs, strict=True):
                assert writer.try_write_joined(run)  # the sequencer's batch (one copy, one publish)
                region = proposals.poll_region(PROPOSAL_BYTES_PER_PASS_MAX)[1]  # _take_proposals
                copies = stamper.stamp_region(region, 1 + start, 1)  # _propose
                proposals.release()
                pending.proposed(1 + start, copies, 1.0, len(region))
                pending.logged_all(copies, 1 + start)  # _queue_entries
                pending.committed_all(copies, 1 + start)  # _handle_ready
            assert not len(pending), len(pending)
            return time.thread_time() - started

        return _in_thread(loop)
    finally:
        ring.close()
        ring.unlink()


def _link(dialler_id: int, acceptor_id: int) -> tuple[PeerConnection, PeerConnection]:
    """Two ends of an authenticated peer connection, in memory (the codec is sans-I/O)."""
    members = frozenset({1, 2, 3})
    secret = bytes(range(32))
    dialling = PeerConnection(ClusterIdentity(7, dialler_id, members, secret), Side.DIALLER, bytes(32), acceptor_id)
    accepting = PeerConnection(ClusterIdentity(7, acceptor_id, members, secret), Side.ACCEPTOR, bytes(range(1, 33)))
    accepting.receive_data(dialling.data_to_send())
    assert accepting.next_event() is NEED_DATA
    dialling.receive_data(accepting.data_to_send())
    assert isinstance(dialling.next_event(), Authenticated)
    accepting.receive_data(dialling.data_to_send())
    assert isinstance(accepting.next_event(), Authenticated)
    return dialling, accepting


def frames_loop(records: int, batch: int) -> float:
    payloads = [bytes(PAYLOAD_BYTES + 48)] * batch
    leader_out, follower_in = _link(1, 2)
    follower_out, leader_in = _link(2, 1)

    def loop() -> float:
        started = time.thread_time()
        for first in range(1, records + 1, batch):
            append = AppendEntries(7, 1, 2, 3, first - 1, 3, first - 1, [3] * batch, payloads)
            follower_in.receive_data(leader_out.send_messages([append]))
            assert type(follower_in.next_event()) is MessageBatch
            answer = AppendEntriesResponse(7, 2, 1, 3, True, first + batch - 1, 0, 0, first + batch - 1, 1)
            leader_in.receive_data(follower_out.send_messages([answer]))
            assert type(leader_in.next_event()) is MessageBatch
        return time.thread_time() - started

    return _in_thread(loop)


def _elected_leader() -> tuple[RaftCore, dict[int, int]]:
    """Node 1's core, leader of term >= 1 with nodes 2 and 3 as the daemon configures them (commit
    notices deferred), the followers' replies applied; and each follower's incarnation."""
    cores = {node: RaftCore(RaftConfig(node_id=node, voters=(1, 2, 3), cluster_id=7, defer_commit_notices=True,
                                       incarnation=node), random.Random(node))
             for node in (1, 2, 3)}  # fmt: skip
    leader = cores[1]
    for _ in range(1000):
        if leader.raft_role is RaftRole.LEADER and not leader.has_ready():
            break
        leader.tick()
        for core in cores.values():
            while core.has_ready():
                ready = core.ready()
                core.advance(ready)
                for message in ready.messages:
                    cores[message.target].step(message)
    assert leader.raft_role is RaftRole.LEADER, leader.raft_role
    return leader, {node: cores[node].config.incarnation for node in (2, 3)}


def leader_pass_loop(records: int, batch: int) -> float:
    """`leader_pass` (module docstring): the leader's Raft core and peer codec per batch."""
    core, incarnations = _elected_leader()
    term = core.term
    first = core.log.last_index + 1
    entries = [encode_record(RecordType.COMMAND, 1, first + n, term, 1_000 + n, 1 + n % 4, n, bytes(PAYLOAD_BYTES))
               for n in range(records)]  # fmt: skip
    outs, ins, answers = {}, {}, {}
    for peer in (2, 3):
        outs[peer], _follower_in = _link(1, peer)  # what the followers read is not the leader's cost
        follower_out, ins[peer] = _link(peer, 1)
        answers[peer] = [follower_out.send_messages([AppendEntriesResponse(
            7, peer, 1, term, True, first + start + batch - 1, 0, 0, first + start + batch - 1, incarnations[peer])])
            for start in range(0, records, batch)]  # fmt: skip
    log: list[bytes] = []
    sent = [0]

    def handle_readies() -> None:  # Replicator._handle_ready, the transport's flush
        while core.has_ready():
            ready = core.ready()
            if ready.entries is not None:
                log.extend(ready.entries.payloads)
            by_peer: dict[int, list[Message]] = {}
            for message in ready.messages:
                by_peer.setdefault(message.target, []).append(message)
            for peer, messages in by_peer.items():
                sent[0] += len(outs[peer].send_messages(messages))
            core.advance(ready, entries_durable=False)

    def loop() -> float:
        started = time.thread_time()
        for number, start in enumerate(range(0, records, batch)):
            run = entries[start : start + batch]
            core.propose_batch(run, first_index=first + start, term=term)  # Replicator._propose
            handle_readies()
            core.durable(first + start + len(run) - 1, term)  # the journaller's fdatasync
            for peer in (2, 3):  # the followers' answers, read and stepped
                ins[peer].receive_data(answers[peer][number])
                event = ins[peer].next_event()
                assert type(event) is MessageBatch, event
                for message in event.messages:
                    core.step(message)
            handle_readies()
        return time.thread_time() - started

    elapsed = _in_thread(loop)
    assert len(log) == records and core.commit_index == first + records - 1, (len(log), core.commit_index)
    return elapsed


def _word() -> Counter:
    """A counter of this process's own memory (the loop's `log.published.*`)."""
    return Counter("bench", memoryview(bytearray(8)).cast("q"), 0)


def follower_loop(records: int, batch: int, log_entries: int = FOLLOWER_LOG_ENTRIES) -> float:
    term = 3
    total = 2 * records  # the first half warms the ring's pages and the allocator, untimed
    entries = [encode_record(RecordType.COMMAND, 1, 1 + n, term, 1_000 + n, 1 + n % 4, n, bytes(PAYLOAD_BYTES))
               for n in range(total)]  # fmt: skip
    leader_out, follower_in = _link(1, 2)
    follower_out, _leader_in = _link(2, 1)
    frames = []
    for first in range(0, total, batch):
        run = entries[first : first + batch]
        commit = max(0, first - batch)  # the run before the last is committed
        append = AppendEntries(7, 1, 2, term, first, term if first else 0, commit, [term] * len(run), run)
        frames.append(leader_out.send_messages([append]))
    ring = ipc.Ring.create(ipc.segment_name(uuid.uuid4().hex[:8], "log"), FOLLOWER_RING_BYTES, readers=("journaller", "blp"))
    try:
        readers = [ring.reader(name) for name in ("journaller", "blp")]
        positions = RingPositions(0, 0)
        feed = RingFeed(ring.writer(), positions, _word(), _word())
        core = RaftCore(RaftConfig(node_id=2, voters=(1, 2, 3), cluster_id=7), random.Random(1))
        answers: list[bytes] = []

        def handle_readies() -> None:
            while core.has_ready():
                ready = core.ready()
                if ready.entries is not None:
                    feed.extend(ready.entries.payloads)
                if ready.messages:
                    answers.append(follower_out.send_messages(ready.messages))
                core.advance(ready, entries_durable=False)

        def receive(frame: bytes) -> None:
            follower_in.receive_data(frame)
            event = follower_in.next_event()
            assert type(event) is MessageBatch, event
            for message in event.messages:
                core.step(message)
            handle_readies()
            feed.write()
            positions.commit(core.commit_index)
            for reader in readers:  # the journaller and the blp keep up (other processes)
                reader.poll_region(FOLLOWER_RING_BYTES)
                reader.release()
            core.durable(core.log.last_index, term)  # the journaller's fdatasync
            handle_readies()
            if core.applied_index - core.log.snapshot_index >= log_entries:
                core.compact(core.applied_index, b"")  # the role's core keeps a bounded tail too

        warm = len(frames) // 2
        for frame in frames[:warm]:
            receive(frame)

        def loop() -> float:
            started = time.thread_time()
            for frame in frames[warm:]:
                receive(frame)
            return time.thread_time() - started

        elapsed = _in_thread(loop)
        assert len(answers) == len(frames), (len(answers), len(frames))  # one answer each
        return elapsed
    finally:
        ring.close()
        ring.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.replicator_paths")
    parser.add_argument("--records", type=int, default=64_000)
    parser.add_argument("--batch", type=int, default=64, help="entries per pass")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=LOOPS, action="append", help="run these loops only")
    parser.add_argument("--log-entries", type=int, default=FOLLOWER_LOG_ENTRIES,
                        help="applied entries the follower loop's core keeps in memory")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"records": args.records, "batch": args.batch}
    loops = {"positions": positions_loop, "leader_records": leader_records_loop, "leader_pass": leader_pass_loop,
             "frames": frames_loop,
             "follower": functools.partial(follower_loop, log_entries=args.log_entries)}
    for name in args.only or LOOPS:
        runs = [loops[name](args.records, args.batch) for _ in range(args.runs)]
        results[f"{name}_cpu_us_per_entry"] = round(1e6 * statistics.median(runs) / args.records, 3)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        for key, value in results.items():
            print(f"{key:34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
