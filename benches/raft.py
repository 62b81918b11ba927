"""Committed entries per second of the Raft core alone: no network, no disk, no faults.

    python -m benches.raft [--quick] [--json] [--batch 100]

Napkin math: the daemon's target is ~500k records/s per node. A batch of 100 proposals costs the
leader one AppendEntries per follower, one response each and three ready/advance cycles, about
20 Python-level calls of ~1 us: ~30 us per 100 entries, ~3M entries/s if nothing else dominates.
The core must stay well clear of the daemon's other costs (journal, rings), so the target is
>= 1M entries/s committed for 3 nodes with batches of 100.

What it runs: every node's core in one process, messages handed from `ready().messages` straight
to the target's `step()`, persistence reduced to appending to in-memory lists (what the caller
must at least do), and committed entries counted on every node. Each round the leader proposes one
batch, then every node processes one ready and the messages are delivered: a pipeline one network
hop deep, as with a steady stream of client batches. The figure is the leader's commit index
divided by the wall time, after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time

from benches._measure import MEASURE_S_MIN, repeat_for, timed
from sequencer.raft import Message, RaftConfig, RaftCore, RaftRole

WARMUP_ROUNDS = 200
PAYLOAD = b"x" * 64  # a small command record; the core never looks inside


class DirectCluster:
    def __init__(self, node_count: int) -> None:
        ids = tuple(range(1, node_count + 1))
        self.cores = [RaftCore(RaftConfig(i, ids), random.Random(i)) for i in ids]
        self.by_id = {core.id: core for core in self.cores}
        self.durable: dict[int, list[bytes]] = {core.id: [] for core in self.cores}
        self.applied = dict.fromkeys(ids, 0)
        self.inbox: list[Message] = []
        while not any(core.raft_role == RaftRole.LEADER for core in self.cores):
            self.cores[0].tick()
            self.process()
            self.deliver()
        self.leader = next(core for core in self.cores if core.raft_role == RaftRole.LEADER)

    def process(self) -> None:
        inbox = self.inbox
        for core in self.cores:
            if not core.has_ready():
                continue
            ready = core.ready()
            if ready.entries is not None:
                self.durable[core.id].extend(ready.entries.payloads)
            inbox.extend(ready.messages)
            if ready.committed is not None:
                self.applied[core.id] += len(ready.committed.terms)
            core.advance(ready)

    def deliver(self) -> None:
        inbox, self.inbox = self.inbox, []
        by_id = self.by_id
        for message in inbox:
            by_id[message.target].step(message)

    def settle(self) -> None:
        for _ in range(20):
            self.process()
            self.deliver()


def measure(node_count: int, batch: int, rounds: int) -> float:
    cluster = DirectCluster(node_count)
    payloads = [PAYLOAD] * batch
    leader = cluster.leader
    for _ in range(WARMUP_ROUNDS):
        leader.propose_batch(payloads)
        cluster.process()
        cluster.deliver()
    cluster.settle()
    start_commit = leader.commit_index
    gc.collect()
    started = time.perf_counter()
    for _ in range(rounds):
        leader.propose_batch(payloads)
        cluster.process()
        cluster.deliver()
    cluster.settle()
    elapsed = time.perf_counter() - started
    committed = leader.commit_index - start_commit
    assert committed == rounds * batch, (committed, rounds * batch)
    assert all(count == leader.commit_index for count in cluster.applied.values())
    return committed / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.raft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs (each figure still measured >= 2 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch", type=int, default=100, help="proposals per batch")
    args = parser.parse_args(argv)
    rounds, runs = (2_000, 3) if args.quick else (10_000, 5)
    results: dict[str, object] = {
        "batch": args.batch,
        "rounds": rounds,
        "runs": runs,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for node_count in (3, 5):
        figures, measured_s = repeat_for(timed(lambda count=node_count: measure(count, args.batch, rounds)), runs, MEASURE_S_MIN)
        results[f"raft{node_count}_entries_per_s"] = round(statistics.median(figures))
        results[f"raft{node_count}_measured_s"] = round(measured_s, 3)
        results[f"raft{node_count}_entries_per_s_runs"] = [round(f) for f in figures]
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
