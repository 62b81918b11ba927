"""Bridges and the sharded ledger with real processes: shard nodes (`seqd run`), bridges
(`seqd bridge run`), kill -9 of each of them while transfers are in flight. At quiescence money
is conserved across the shards, no hold is open (nor past its deadline), and every acknowledged
transfer completed or was refunded exactly once: the balances are exactly what the outcomes
recorded in the shards' logs say, each outcome once.

CI runs one seed of each; SEQD_SHARDS_LONG=1 runs more seeds and more rounds.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.shard_harness import BridgeProcess, ShardSystem
from sequencer.apps.ledger import Balance, Deposit, OpenAccount, Transfer, Transferred
from sequencer.apps.sharded_ledger import (
    SendTransfer,
    ShardedLedger,
    TransferCommitted,
    TransferPending,
    TransferRefunded,
)
from sequencer.projection import JournalSource

LONG = os.environ.get("SEQD_SHARDS_LONG") == "1"
DEPOSIT = 1_000_000
ACCOUNTS = [f"acct{number}" for number in range(12)]
# Short deadlines refund the transfers a kill holds up (the late-credit path); long ones commit.
TIMEOUTS_MS = (400, 60_000)


class Workload:
    """A driver's record of what the shards acknowledged."""

    def __init__(self, client: Any, seed: int) -> None:
        self.client = client
        self.rng = random.Random(seed)
        self.intra: list[tuple[str, str, int]] = []
        self.cross: dict[tuple[int, int], tuple[str, str, int]] = {}  # (shard, transfer id)

    def open_accounts(self) -> None:
        pending = [self.client.submit(OpenAccount(name)) for name in ACCOUNTS]
        pending += [self.client.submit(Deposit(name, DEPOSIT)) for name in ACCOUNTS]
        for request in pending:
            request.result()

    def submit(self, count: int) -> list[tuple[tuple[str, str, int], Any]]:
        submitted = []
        for _ in range(count):
            source, target = self.rng.sample(ACCOUNTS, 2)
            transfer = (source, target, self.rng.randrange(1, 100))
            if self.client.shard_of(source) == self.client.shard_of(target):
                command: Any = Transfer(*transfer)
            else:
                command = SendTransfer(*transfer, timeout_ms=self.rng.choice(TIMEOUTS_MS))
            submitted.append((transfer, self.client.submit(command)))
        return submitted

    def collect(self, submitted: list[tuple[tuple[str, str, int], Any]]) -> None:
        for transfer, request in submitted:
            reply = request.result(120)
            if isinstance(reply, Transferred):
                self.intra.append(transfer)
            else:
                assert isinstance(reply, TransferPending), reply
                self.cross[(self.client.shard_of(transfer[0]), reply.transfer_id)] = transfer


def outcomes(system: ShardSystem) -> collections.Counter[tuple[int, int, str]]:
    """Every saga outcome each shard's log holds: (shard, transfer id, kind), counted."""
    found: collections.Counter[tuple[int, int, str]] = collections.Counter()
    for shard, node in enumerate(system.nodes):
        source = JournalSource(ShardedLedger, node.config.journal_dir, node.config.snapshot_dir)
        for item in source.read(1):
            if item is not None and isinstance(item.event, TransferCommitted | TransferRefunded):
                assert item.event.source_shard == shard
                found[(shard, item.event.transfer_id, type(item.event).__name__)] += 1
    return found


def check_settled(system: ShardSystem, workload: Workload) -> collections.Counter[str]:
    summaries = system.wait_settled()
    for summary in summaries:
        assert summary.holds_past_deadline == 0, summary
        for other in summaries:
            if other.shard != summary.shard:  # the clearing positions match pairwise
                assert summary.clearing.get(other.shard, 0) == -other.clearing.get(summary.shard, 0)
    assert sum(s.customer_total for s in summaries) == DEPOSIT * len(ACCOUNTS)
    found = outcomes(system)
    assert all(count == 1 for count in found.values()), [k for k, n in found.items() if n > 1]
    decided = {(shard, transfer_id): kind for shard, transfer_id, kind in found}
    assert decided.keys() == workload.cross.keys(), "an acknowledged transfer has no outcome"
    expected = dict.fromkeys(ACCOUNTS, DEPOSIT)
    moved = list(workload.intra) + [
        transfer for key, transfer in workload.cross.items() if decided[key] == "TransferCommitted"
    ]
    for source, target, amount in moved:
        expected[source] -= amount
        expected[target] += amount
    with system.client(timeout_s=60) as client:
        actual = {name: client.call(Balance(name)) for name in ACCOUNTS}
    assert {name: b.balance for name, b in actual.items()} == expected
    assert all(b.held == 0 for b in actual.values())
    return collections.Counter(decided.values())


def bridge_status_text(system: ShardSystem, pair: tuple[int, int]) -> tuple[int, str]:
    from daemon.cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main(["bridge", "status", "--config", str(system.bridges[pair].config_path)])
    return code, output.getvalue()


def wait_delivering(bridge: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = bridge.status()
        if status["running"] and status.get("delivered", 0) > 0:
            return
        assert time.monotonic() < deadline, (status, bridge.log_text()[-2000:])
        time.sleep(0.02)


def test_bridge_delivers_exactly_once_across_kill_9_of_source_target_and_bridge(tmp_dir: Path, unique: str) -> None:
    with ShardSystem(tmp_dir, unique, shard_count=2) as system, contextlib.ExitStack() as stack:
        second = BridgeProcess(tmp_dir / "second", system.nodes[0], system.nodes[1], 0, 1)
        stack.callback(second.stop)
        with system.client(timeout_s=120, reconnect_timeout_s=120) as client:
            workload = Workload(client, seed=1)
            workload.open_accounts()
            for victim in ("bridge", "target", "source"):  # bridge 0>1: source shard 0, target 1
                submitted = workload.submit(60)
                client.client(0).flush()
                client.client(1).flush()
                if victim == "bridge":
                    wait_delivering(system.bridges[(0, 1)])  # killed mid-stream, not at start-up
                    system.bridges[(0, 1)].kill()
                    code, text = bridge_status_text(system, (0, 1))
                    assert code == 3 and "shard0>shard1: dead" in text, text
                    system.bridges[(0, 1)].start()
                    # And a second bridge for the same stream from now on (an operator's mistake,
                    # or the old session of a killed bridge): every command is delivered twice.
                    second.start()
                else:
                    node = system.nodes[1 if victim == "target" else 0]
                    node.kill()
                    node.start()
                workload.collect(submitted)
            kinds = check_settled(system, workload)
        code, text = bridge_status_text(system, (0, 1))
        assert code == 0 and "bridge shard0>shard1: running" in text, text
        assert system.bridges[(0, 1)].status()["delivered_index"] > 0
        assert system.bridges[(0, 1)].stop() == 0  # SIGTERM: a clean stop
        code, text = bridge_status_text(system, (0, 1))
        assert code == 3 and "shard0>shard1: stopped" in text, text
    assert kinds["TransferCommitted"] > 0, kinds


@pytest.mark.parametrize("seed", range(4) if LONG else [7])
def test_random_cross_shard_transfers_under_kill_9_conserve_money(tmp_dir: Path, unique: str, seed: int) -> None:
    rng = random.Random(seed)
    with ShardSystem(tmp_dir, unique, shard_count=3) as system:
        with system.client(timeout_s=120, reconnect_timeout_s=120) as client:
            workload = Workload(client, seed)
            workload.open_accounts()
            for _round in range(12 if LONG else 3):
                submitted = workload.submit(rng.randrange(20, 80))
                for shard in range(3):
                    client.client(shard).flush()
                victim = rng.choice(["bridge", "bridge", "shard"])
                if victim == "bridge":
                    bridge = system.bridges[rng.choice(sorted(system.bridges))]
                    bridge.kill()
                    bridge.start()
                else:
                    node = system.nodes[rng.randrange(3)]
                    node.kill()
                    node.start()
                workload.collect(submitted)
            kinds = check_settled(system, workload)
    assert sum(kinds.values()) == len(workload.cross), (seed, kinds)
