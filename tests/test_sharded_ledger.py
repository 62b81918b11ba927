"""The sharded ledger's saga, sans-I/O: each shard a processor fed records, the bridges a queue
per ordered pair of shards (as `seqd bridge` keeps them: in order, possibly late, possibly
delivered twice). Money is conserved at every step and at quiescence; a late credit after a
refund is reversed on the target; a redelivery changes nothing."""

from __future__ import annotations

import collections
import random
from typing import Any

import msgspec
import pytest

from sequencer.apps.ledger import Balance, Deposit, OpenAccount, Transfer
from sequencer.apps.sharded_ledger import (
    SHARDED_LEDGER_SCHEMA,
    TRANSFER_TIMER_BASE,
    InitShard,
    SendTransfer,
    ShardedLedger,
    ShardRoute,
    ShardSummary,
    TransferCommitted,
    TransferPending,
    TransferRefunded,
    shard_of,
    stream_name,
)
from sequencer.egress import Event, Reply, ReplyStatus
from sequencer.processor import Processor
from tests.fixtures.feeder import Feeder, feed, session_id_of

SESSION = session_id_of(1, 1)
DEPOSIT = 1000


class Shards:
    """N shards and the bridges between them, stepped by hand."""

    def __init__(self, shard_count: int, accounts_per_shard: int = 3) -> None:
        self.shard_count = shard_count
        self.processors = [Processor(ShardedLedger) for _ in range(shard_count)]
        self.feeders = [Feeder(SHARDED_LEDGER_SCHEMA) for _ in range(shard_count)]
        self.request_ids = [0] * shard_count
        # (source, target) -> commands not yet delivered, in order; and all ever delivered.
        self.bridges: dict[tuple[int, int], collections.deque[tuple[int, Any]]] = {
            (i, j): collections.deque() for i in range(shard_count) for j in range(shard_count) if i != j
        }
        self.delivered: dict[tuple[int, int], list[tuple[int, Any]]] = collections.defaultdict(list)
        self.outcomes: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
        self.timers: dict[int, dict[int, int]] = collections.defaultdict(dict)
        self.acknowledged: set[tuple[int, int]] = set()
        for shard in range(shard_count):
            self.feed(shard, self.feeders[shard].open_session(SESSION, client_id=1))
            assert self.send(shard, InitShard(shard, shard_count))[0] == "ok"
        self.accounts: dict[int, list[str]] = collections.defaultdict(list)
        number = 0
        while min((len(self.accounts[s]) for s in range(shard_count)), default=0) < accounts_per_shard:
            name = f"acct{number}"
            number += 1
            shard = shard_of(name, shard_count)
            if len(self.accounts[shard]) < accounts_per_shard:
                self.accounts[shard].append(name)
                assert self.send(shard, OpenAccount(name))[0] == "ok"
                assert self.send(shard, Deposit(name, DEPOSIT))[0] == "ok"

    def feed(self, shard: int, record: bytes) -> list[Any]:
        outputs = feed(self.processors[shard], record)
        for output in outputs:
            if isinstance(output, Event):
                event = SHARDED_LEDGER_SCHEMA.decode_event(output.version, output.payload)
                if isinstance(event, TransferCommitted | TransferRefunded):
                    self.outcomes[(shard, event.transfer_id)].append(type(event).__name__)
                for target in range(self.shard_count):
                    if target == shard:
                        continue
                    command = ShardRoute(target).command_for(stream_name(shard, target), output.index, event)
                    if command is not None:
                        self.bridges[(shard, target)].append((output.index, command))
        self.processors[shard].app.invariants()
        return outputs

    def send(self, shard: int, command: Any) -> tuple[str, Any]:
        self.request_ids[shard] += 1
        outputs = self.feed(shard, self.feeders[shard].command(SESSION, self.request_ids[shard], command))
        (reply,) = [o for o in outputs if isinstance(o, Reply)]
        if reply.status != ReplyStatus.OK:
            return msgspec.msgpack.decode(reply.payload)["code"], None
        decoded = SHARDED_LEDGER_SCHEMA.decode_reply(reply.version, reply.payload)
        if isinstance(decoded, TransferPending):
            self.timers[shard][decoded.transfer_id] = decoded.deadline_ns
            self.acknowledged.add((shard, decoded.transfer_id))
        return "ok", decoded

    def deliver(self, source: int, target: int, again: bool = False) -> None:
        """The next command of a bridge (or, `again`, the last one delivered, a second time)."""
        if again:
            self.send(target, self.delivered[(source, target)][-1][1])
            return
        item = self.bridges[(source, target)].popleft()
        self.delivered[(source, target)].append(item)
        self.send(target, item[1])

    def fire_due_timers(self, shard: int) -> None:
        """The source's clock passes every deadline: its timers fire (if still scheduled)."""
        feeder = self.feeders[shard]
        for transfer_id, deadline_ns in sorted(self.timers[shard].items()):
            feeder.now = max(feeder.now, deadline_ns)
            self.feed(shard, feeder.timer_fired(TRANSFER_TIMER_BASE + transfer_id, deadline_ns))
        self.timers[shard].clear()

    def quiesce(self) -> None:
        while any(self.bridges.values()):
            for pair, queue in self.bridges.items():
                if queue:
                    self.deliver(*pair)

    def summaries(self) -> list[Any]:
        return [self.send(shard, ShardSummary())[1] for shard in range(self.shard_count)]

    def balance(self, account: str) -> int:
        code, reply = self.send(shard_of(account, self.shard_count), Balance(account))
        assert code == "ok", code
        return int(reply.balance)

    def check_conserved(self) -> None:
        summaries = self.summaries()
        deposited = sum(s.circulating for s in summaries)
        assert sum(s.customer_total for s in summaries) == deposited
        for a in summaries:
            for b in summaries:
                if a.shard != b.shard:
                    assert a.clearing.get(b.shard, 0) == -b.clearing.get(a.shard, 0), (a, b)
            assert a.holds_open == a.incoming_held == a.awaiting_answer == 0, a


def test_cross_shard_transfer_moves_the_money_in_four_commands_and_releases_every_hold() -> None:
    shards = Shards(2)
    source, target = shards.accounts[0][0], shards.accounts[1][0]
    code, pending = shards.send(0, SendTransfer(source, target, 300))
    assert code == "ok" and pending.target_shard == 1
    shards.deliver(0, 1)  # Credit: the target is credited, held
    code, held = shards.send(1, Balance(target))
    assert (held.balance, held.held) == (DEPOSIT + 300, 300)
    shards.deliver(1, 0)  # CreditAnswer: the source commits
    shards.deliver(0, 1)  # Settle: the target's hold released
    assert shards.balance(source) == DEPOSIT - 300 and shards.balance(target) == DEPOSIT + 300
    assert shards.outcomes[(0, pending.transfer_id)] == ["TransferCommitted"]
    shards.fire_due_timers(0)  # cancelled: nothing happens
    shards.check_conserved()


def test_late_credit_after_the_refund_is_reversed_on_the_target() -> None:
    shards = Shards(2)
    source, target = shards.accounts[0][0], shards.accounts[1][0]
    _, pending = shards.send(0, SendTransfer(source, target, 300, timeout_ms=5))
    shards.fire_due_timers(0)  # the bridge was down: the source refunds
    assert shards.outcomes[(0, pending.transfer_id)] == ["TransferRefunded"]
    assert shards.send(0, Balance(source))[1].held == 0
    shards.deliver(0, 1)  # the late Credit: credited, held
    shards.deliver(1, 0)  # its answer changes nothing on the source
    shards.deliver(0, 1)  # the refund's Settle reverses the held credit
    assert shards.balance(source) == DEPOSIT and shards.balance(target) == DEPOSIT
    assert shards.outcomes[(0, pending.transfer_id)] == ["TransferRefunded"]
    shards.check_conserved()


def test_an_answer_at_or_past_the_deadline_refunds_even_before_the_timer_fires() -> None:
    shards = Shards(2)
    source, target = shards.accounts[0][0], shards.accounts[1][0]
    _, pending = shards.send(0, SendTransfer(source, target, 300, timeout_ms=5))
    shards.deliver(0, 1)
    shards.feeders[0].advance(10_000_000)  # the answer is stamped past the deadline
    shards.deliver(1, 0)
    shards.fire_due_timers(0)  # cancelled by the refund: no second outcome
    shards.quiesce()
    assert shards.outcomes[(0, pending.transfer_id)] == ["TransferRefunded"]
    assert shards.balance(target) == DEPOSIT
    shards.check_conserved()


def test_credit_to_an_account_not_open_is_refused_and_refunded() -> None:
    shards = Shards(2)
    missing = next(f"ghost{n}" for n in range(100) if shard_of(f"ghost{n}", 2) == 1)
    _, pending = shards.send(0, SendTransfer(shards.accounts[0][0], missing, 7))
    shards.quiesce()
    assert shards.outcomes[(0, pending.transfer_id)] == ["TransferRefunded"]
    assert shards.balance(shards.accounts[0][0]) == DEPOSIT
    shards.check_conserved()


def test_a_redelivered_bridged_command_changes_nothing() -> None:
    shards = Shards(2)
    source, target = shards.accounts[0][0], shards.accounts[1][0]
    shards.send(0, SendTransfer(source, target, 300))
    shards.deliver(0, 1)
    shards.deliver(0, 1, again=True)  # a new client id's resend: the inbox refuses it
    shards.deliver(1, 0)
    shards.deliver(1, 0, again=True)
    shards.quiesce()
    shards.deliver(0, 1, again=True)
    assert shards.balance(target) == DEPOSIT + 300
    shards.check_conserved()


def test_accounts_and_transfers_stay_on_their_shard() -> None:
    shards = Shards(2)
    elsewhere = next(f"x{n}" for n in range(100) if shard_of(f"x{n}", 2) == 1)
    assert shards.send(0, OpenAccount(elsewhere))[0] == "wrong_shard"
    assert shards.send(0, Transfer(shards.accounts[0][0], shards.accounts[1][0], 1))[0] == "wrong_shard"
    assert shards.send(0, SendTransfer(shards.accounts[0][0], shards.accounts[0][1], 1))[0] == "same_shard"
    assert shards.send(0, InitShard(1, 2))[0] == "shard_mismatch"
    assert shards.send(0, SendTransfer("@mint", shards.accounts[1][0], 1))[0] == "system_account"


@pytest.mark.parametrize("seed", range(20))
def test_random_transfers_deliveries_and_timeouts_conserve_money(seed: int) -> None:
    rng = random.Random(seed)
    shards = Shards(3)
    names = [name for shard in range(3) for name in shards.accounts[shard]]
    for _ in range(150):
        action = rng.random()
        if action < 0.4:
            source, target = rng.sample(names, 2)
            home = shard_of(source, 3)
            if home == shard_of(target, 3):
                shards.send(home, Transfer(source, target, rng.randrange(1, 200)))
            else:
                shards.send(home, SendTransfer(source, target, rng.randrange(1, 200), timeout_ms=rng.choice([5, 10_000])))
        elif action < 0.9:
            pairs = [pair for pair, queue in shards.bridges.items() if queue]
            if pairs:
                shards.deliver(*rng.choice(pairs))
        elif action < 0.95:
            shards.fire_due_timers(rng.randrange(3))
        else:
            pairs = [pair for pair in shards.delivered if shards.delivered[pair]]
            if pairs:
                shards.deliver(*rng.choice(pairs), again=True)
    for shard in range(3):
        shards.fire_due_timers(shard)
    shards.quiesce()
    shards.check_conserved()
    assert set(shards.outcomes) == shards.acknowledged, seed
    for outcome in shards.outcomes.values():
        assert len(outcome) == 1, (seed, outcome)


def test_a_shard_mid_saga_survives_a_snapshot_round_trip() -> None:
    from sequencer.apps.sharded_ledger import ShardedLedgerSnapshot

    shards = Shards(2)
    shards.send(0, SendTransfer(shards.accounts[0][0], shards.accounts[1][0], 300, timeout_ms=5))
    shards.send(0, SendTransfer(shards.accounts[0][1], shards.accounts[1][1], 200))
    shards.fire_due_timers(0)  # both refunded by their timers, their answers not yet in
    shards.deliver(0, 1)  # a held credit on shard 1
    for processor in shards.processors:
        data = msgspec.msgpack.encode(processor.app.snapshot())
        restored = ShardedLedger.restore(msgspec.msgpack.decode(data, type=ShardedLedgerSnapshot))
        assert msgspec.msgpack.encode(restored.snapshot()) == data
        restored.invariants()


def test_a_bridge_on_a_stream_of_another_name_is_refused() -> None:
    shards = Shards(2)
    shards.send(0, SendTransfer(shards.accounts[0][0], shards.accounts[1][0], 300))
    _, credit = shards.bridges[(0, 1)][0]
    assert shards.send(1, msgspec.structs.replace(credit, stream="shard0-to-shard1"))[0] == "wrong_stream"
    shards.quiesce()
    assert shards.balance(shards.accounts[1][0]) == DEPOSIT + 300
    shards.check_conserved()
