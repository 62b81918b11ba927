"""The nemesis (tests/nemesis/): a seeded fault schedule against a real cluster, judged by the
history checker (docs/cluster.md, "The nemesis").

CI runs two short seeds (SEEDS; each: three nodes, a recorded client on every node, a few faults, the
heal, the checker over every history and journal). More by flag: `SEQD_NEMESIS_SEEDS=N` runs N
seeds and `SEQD_NEMESIS_DURATION=S` gives each S seconds of faults; `python -m tests.nemesis`
runs any seed outside pytest. That the checker catches real bugs in such runs is shown by
`python -m tests.nemesis.planted` (benches/RESULTS.md, "Nemesis").
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from daemon.cluster_harness import Cluster
from daemon.fault_hooks import (
    FAULT_CLOCK_OFFSET_ENV,
    FAULT_FSYNC_DELAY_ENV,
    FAULT_SYNCED_INDEX_ENV,
    synced_index,
)
from daemon.harness import NodeError, NodeProcess
from daemon.incarnation import INCARNATION_NAME
from daemon.layout import INCARNATION_BITS, incarnation_id
from sequencer.apps.ledger import Deposit, Ledger, OpenAccount
from sequencer.client import Client
from sequencer.journal import read_records
from tests.nemesis.run import Nemesis, run_nemesis
from tests.nemesis.schedule import FAULT_KINDS, Fault, make_schedule

# CI runs seeds 1 and 2 (the issue: a few seeds in CI, more by a flag), 4 s of faults each: seed
# 1's one fault is a pause of node 1, seed 2's a proposal fault (a hook armed, the replicator
# killed for it to take effect, the heal's wait for it), each judged by the checker.
# `SEQD_NEMESIS_SEEDS=N` runs seeds 1..N.
SEEDS = range(1, int(os.environ.get("SEQD_NEMESIS_SEEDS", "2")) + 1)
DURATION_S = float(os.environ.get("SEQD_NEMESIS_DURATION", "4"))
HOUR_MS = 3_600_000
WAIT_S = 30.0  # a single node answers within a second; this bounds a hang

needs_cluster = pytest.mark.skipif(importlib.util.find_spec("daemon.roles.replicator") is None,
                                   reason="cluster mode is not built on this branch")  # fmt: skip


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    first = make_schedule(11, 60, 3)
    assert first == make_schedule(11, 60, 3)
    assert first != make_schedule(12, 60, 3)
    assert all(fault.start_s + fault.duration_s <= 60 for fault in first)
    assert [f.start_s for f in first] == sorted(f.start_s for f in first)  # one at a time


def test_schedules_draw_every_kind_and_wipe_only_when_asked() -> None:
    drawn = {fault.kind for seed in range(40) for fault in make_schedule(seed, 60, 5)}
    assert drawn == set(FAULT_KINDS) - {"wipe"}
    assert "wipe" in {fault.kind for seed in range(40) for fault in make_schedule(seed, 60, 5, wipe=True)}
    with pytest.raises(ValueError, match="choose among"):
        make_schedule(1, 10, 3, kinds=("meteor",))


def test_fault_hooks_slow_the_disk_jump_the_clock_back_and_note_the_synced_index(tmp_dir: Path, unique: str) -> None:
    """The hooks the nemesis drives, on one real node: a delayed fdatasync is logged as slow; a
    clock jumped an hour back (across a restart, so no timing is involved) never stamps the log
    below what it holds: every record after the jump carries the last timestamp before it, where
    a working clock would have moved on, and a start with no recorded start id takes the
    stepped-back clock's (the nemesis's restart_clock_back relies on it); the synced index is
    what the journal made durable."""
    hooks = {env: tmp_dir / env.lower() for env in (FAULT_FSYNC_DELAY_ENV, FAULT_CLOCK_OFFSET_ENV, FAULT_SYNCED_INDEX_ENV)}
    environment = {env: str(path) for env, path in hooks.items()}
    hooks[FAULT_FSYNC_DELAY_ENV].write_text("120")  # > the journaller's 50 ms "slow" threshold
    node = NodeProcess(tmp_dir, unique)
    try:
        node.start(environment=environment)
        with Client(node.socket_path, schema=Ledger.schema, timeout_s=WAIT_S) as client:
            client.call(OpenAccount("alice"))
            client.call(Deposit("alice", 1))
        node.stop()
        before = len(list(read_records(node.config.journal_dir)))
        hooks[FAULT_CLOCK_OFFSET_ENV].write_text(str(-HOUR_MS))
        # Without a recorded start id the start takes the clock's: the stepped-back one.
        (Path(node.config.node.data_dir) / INCARNATION_NAME).unlink()
        started_s = time.time()
        node.start(environment=environment)
        start_s = time.time() - started_s
        with Client(node.socket_path, schema=Ledger.schema, timeout_s=WAIT_S) as client:
            for _ in range(3):
                client.call(Deposit("alice", 1))
    finally:
        node.stop()
    assert "fdatasync took" in node.log_text()
    start_id = int((Path(node.config.node.data_dir) / INCARNATION_NAME).read_text().split()[0])
    after_clock_ms = (start_id - incarnation_id(started_s - HOUR_MS / 1000, 1)) % (1 << INCARNATION_BITS)
    assert after_clock_ms <= start_s * 1000 + 1, (start_id, after_clock_ms, start_s)
    records = list(read_records(node.config.journal_dir))
    timestamps = [record.timestamp_ns for record in records]
    assert len(timestamps) > before + 3, (len(timestamps), before)
    assert timestamps[before:] == [timestamps[before - 1]] * (len(timestamps) - before), timestamps
    assert synced_index(hooks[FAULT_SYNCED_INDEX_ENV]) == records[-1].index  # a clean stop syncs all


@needs_cluster
def test_a_fault_that_fails_halfway_leaves_no_hook_armed(tmp_dir: Path, unique: str) -> None:
    """restart_clock_back steps node 2's clock back, then kills it: node 2 is down, so the kill
    fails and the fault is skipped; its clock hook must not stay armed (every later start of
    node 2 in the run would take a clock an hour behind). A fault that applies keeps its hook
    until its heal, which disarms it. No node is started: the cluster's config and hooks only."""
    cluster = Cluster(tmp_dir, unique, size=3)
    try:
        nemesis = Nemesis(cluster, seed=1, log=lambda line: None)
        clock = nemesis.hooks[2][FAULT_CLOCK_OFFSET_ENV]
        with pytest.raises(NodeError, match="node 2 is not running"):
            nemesis.apply(Fault(1, 0.0, "restart_clock_back", 1.0, node=2, amount=HOUR_MS))
        assert not clock.exists(), clock.read_text()
        disk = nemesis.hooks[3][FAULT_FSYNC_DELAY_ENV]
        heal = nemesis.apply(Fault(2, 0.0, "slow_disk", 1.0, node=3, amount=200))
        assert disk.read_text() == "200"
        heal()
        assert not disk.exists()
    finally:
        cluster.close()


@needs_cluster
@pytest.mark.timeout(300 + 120 * len(SEEDS))
@pytest.mark.parametrize("seed", SEEDS)
def test_a_nemesis_seed_finds_no_violation(seed: int, tmp_dir: Path, unique: str) -> None:
    """Faults drawn from every kind but the wipe; after the heal the cluster is live (a leader
    agreed by all, every client progressing), every journal passes `seqd log check`, and the
    checker finds every acknowledged command once at its index with the replay's reply, equal
    journals, log time never going back and money conserved."""
    result = run_nemesis(seed, DURATION_S, 3, tmp_dir, prefix=unique)
    print(result.summary())
    assert result.ok, result.summary()
    assert sum(result.applied.values()) >= 1, result.summary()
    assert result.report is not None and result.report.operations["ok"] > 0
