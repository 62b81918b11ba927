"""The withdrawals app's reactions to integration answers and timers (docs/integration.md): the
state machine half of a gateway, in-process. Retries keep the idempotency key, a timeout never
refunds by itself, late and repeated answers are recognised, and all of it is a function of the
log (replayed, it gives the same state)."""

from __future__ import annotations

from typing import Any

import msgspec

from sequencer.apps.ledger import Deposit, OpenAccount, Reserve
from sequencer.apps.withdrawals import (
    PAY_ATTEMPTS_MAX,
    WITHDRAWALS_SCHEMA,
    PayoutAnomaly,
    PayoutAnswer,
    PayoutCancelRequested,
    PayoutRequested,
    Withdraw,
    WithdrawalLedger,
    WithdrawalRefunded,
    WithdrawalSettled,
)
from sequencer.egress import Event, Reply, ReplyStatus
from sequencer.integration import request_timer_id
from sequencer.processor import Processor
from tests.fixtures.feeder import Feeder, feed, session_id_of

SESSION = session_id_of(1, 1)
TIMEOUT_MS = 100


class Run:
    def __init__(self) -> None:
        self.processor = Processor(WithdrawalLedger)
        self.feeder = Feeder(WITHDRAWALS_SCHEMA)
        self.request_id = 0
        feed(self.processor, self.feeder.open_session(SESSION, client_id=1))
        self.send(OpenAccount("alice"))
        self.send(Deposit("alice", 1000))

    @property
    def ledger(self) -> WithdrawalLedger:
        return self.processor.app  # type: ignore[return-value]

    def send(self, command: Any) -> tuple[Any, list[Any]]:
        """(the reply's decoded payload or its rejection code, the events published)."""
        self.request_id += 1
        outputs = feed(self.processor, self.feeder.command(SESSION, self.request_id, command))
        (reply,) = [o for o in outputs if isinstance(o, Reply)]
        if reply.status == ReplyStatus.OK:
            value = WITHDRAWALS_SCHEMA.decode_reply(reply.version, reply.payload)
        else:
            value = msgspec.msgpack.decode(reply.payload)["code"]
        return value, self._events(outputs)

    def fire(self, key: int) -> list[Any]:
        """The withdrawal's request timer fires at its deadline; returns the events."""
        deadline_ns = self.processor.timers()[request_timer_id(key)]
        self.feeder.now = max(self.feeder.now, deadline_ns)
        return self._events(feed(self.processor, self.feeder.timer_fired(request_timer_id(key), deadline_ns)))

    def _events(self, outputs: list[Any]) -> list[Any]:
        return [WITHDRAWALS_SCHEMA.decode_event(o.version, o.payload) for o in outputs if isinstance(o, Event)]

    def withdraw(self, amount: int = 100) -> int:
        accepted, events = self.send(Withdraw("alice", amount, "acct-1", TIMEOUT_MS))
        assert events == [PayoutRequested(accepted.key, "alice", amount, "acct-1", 1)]
        return int(accepted.key)

    def alice(self) -> tuple[int, int]:
        account = self.ledger.accounts["alice"]
        return account.balance, account.held


def test_a_withdrawal_holds_the_amount_and_its_key_is_its_log_index() -> None:
    run = Run()
    key = run.withdraw(100)
    assert key == run.feeder.index
    assert run.alice() == (1000, 100)
    assert request_timer_id(key) in run.processor.timers()
    assert run.send(Withdraw("alice", 901, "acct-1", TIMEOUT_MS))[0] == "insufficient_funds"
    assert run.send(Withdraw("alice", 0, "acct-1", TIMEOUT_MS))[0] == "bad_amount"
    assert run.send(Withdraw("alice", 1, "", TIMEOUT_MS))[0] == "bad_destination"
    assert run.send(Withdraw("@mint", 1, "acct-1", TIMEOUT_MS))[0] == "system_account"
    assert run.alice() == (1000, 100)  # a refused withdrawal holds nothing
    run.ledger.invariants()


def test_a_paid_answer_settles_once_and_a_repeat_is_a_duplicate() -> None:
    run = Run()
    key = run.withdraw(100)
    applied, events = run.send(PayoutAnswer(key, "paid", "po-1"))
    assert applied.effect == "settled"
    assert events == [WithdrawalSettled(key, "alice", 100, "po-1")]
    assert run.alice() == (900, 0)
    assert request_timer_id(key) not in run.processor.timers()
    applied, events = run.send(PayoutAnswer(key, "paid", "po-1"))
    assert (applied.effect, events, run.alice()) == ("duplicate", [], (900, 0))
    assert run.ledger.circulating() == 900  # the paid money left the ledger
    run.ledger.invariants()


def test_a_timeout_retries_with_the_same_key_then_asks_to_cancel_and_never_refunds_by_itself() -> None:
    run = Run()
    key = run.withdraw(100)
    for attempt in range(2, PAY_ATTEMPTS_MAX + 1):
        assert run.fire(key) == [PayoutRequested(key, "alice", 100, "acct-1", attempt)]
    for attempt in range(1, 4):
        assert run.fire(key) == [PayoutCancelRequested(key, attempt)]
        assert run.alice() == (1000, 100)  # still held: the payment may yet have happened
    applied, events = run.send(PayoutAnswer(key, "cancelled"))
    assert applied.effect == "refunded"
    assert events == [WithdrawalRefunded(key, "alice", 100, "cancelled")]
    assert run.alice() == (1000, 0)
    run.ledger.invariants()


def test_a_pay_answer_that_arrives_after_the_cancel_request_settles_and_the_cancel_answer_agrees() -> None:
    run = Run()
    key = run.withdraw(100)
    for _ in range(PAY_ATTEMPTS_MAX):
        run.fire(key)
    assert run.ledger.withdrawals[key].phase == "cancelling"
    assert run.send(PayoutAnswer(key, "paid", "po-1"))[0].effect == "settled"  # the slow first call
    assert run.send(PayoutAnswer(key, "paid", "po-1"))[0].effect == "duplicate"  # the cancel's answer
    assert run.alice() == (900, 0)


def test_an_answer_that_contradicts_the_recorded_end_is_an_anomaly_and_moves_nothing() -> None:
    run = Run()
    key = run.withdraw(100)
    run.send(PayoutAnswer(key, "declined"))
    assert run.alice() == (1000, 0)
    applied, events = run.send(PayoutAnswer(key, "paid", "po-1"))
    assert applied.effect == "anomaly"
    assert events == [PayoutAnomaly(key, "refunded", "paid")]
    assert run.alice() == (1000, 0)
    assert run.send(PayoutAnswer(key + 100, "paid"))[0] == "unknown_withdrawal"


def test_reservation_ids_stay_clear_of_the_payout_timers() -> None:
    run = Run()
    run.send(OpenAccount("bob"))
    assert run.send(Reserve(request_timer_id(5), "alice", "bob", 1, 1000))[0] == "bad_reservation_id"
    assert run.send(Reserve(5, "alice", "bob", 1, 1000))[0].reservation_id == 5


def test_the_reaction_to_timers_and_answers_is_a_function_of_the_log() -> None:
    run = Run()
    keys = [run.withdraw(10) for _ in range(4)]
    run.fire(keys[0])
    run.send(PayoutAnswer(keys[1], "paid", "po"))
    for _ in range(PAY_ATTEMPTS_MAX):
        run.fire(keys[2])
    run.send(PayoutAnswer(keys[2], "cancelled"))
    run.send(PayoutAnswer(keys[2], "paid"))  # an anomaly, recorded
    replayed = Processor(WithdrawalLedger)
    for record in run.feeder.records:
        feed(replayed, record)
    assert replayed.state_hash() == run.processor.state_hash()
    restored = Processor.restore(WithdrawalLedger, run.processor.snapshot_bytes())
    assert restored.state_hash() == run.processor.state_hash()
    assert restored.app.query_withdrawals_summary() == {  # type: ignore[attr-defined]
        "pending": 2, "settled": 1, "refunded": 1, "anomalies": 1}
    pending = restored.app.query_pending_payouts()  # type: ignore[attr-defined]
    assert [request.key for request in pending] == [keys[0], keys[3]]
    assert pending[0].attempt == 2
