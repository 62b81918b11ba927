"""The ledger with withdrawals paid out by an external payment service (docs/integration.md).

    app = "sequencer.apps.withdrawals:WithdrawalLedger"

Everything the ledger does, plus money leaving it through a payment service that only an
integration gateway talks to (`sequencer.apps.payout_gateway`). A withdrawal's life:

    Withdraw(account, amount, destination, timeout_ms)   at index k: the withdrawal's key is k
      -> the amount is held on the account; PayoutRequested(key=k, attempt=1) is published;
         timer k (its request timer) is armed for timeout_ms
    PayoutAnswer(k, "paid")                      -> settled: the held amount leaves the ledger
                                                    (back to the mint, the reverse of a Deposit)
    PayoutAnswer(k, "declined" | "cancelled")    -> refunded: the hold is released
    timer k fires, no answer yet:
      attempts < PAY_ATTEMPTS_MAX                -> retry: PayoutRequested(k, attempt + 1), re-arm
      otherwise                                  -> give up: PayoutCancelRequested(k), re-arm, and
                                                    again at every fire until an answer comes

The rule that keeps the books and the payment service in agreement: **the ledger never refunds
on a timeout**. A timeout only means that no answer came; the payment may still happen (a slow
call, a lost response). So giving up is itself a request to the service, "cancel k", which the
service answers with the key's final outcome: "cancelled" (it will never pay k; a later pay of k
is refused) or "paid" (it already had). Either answer settles the withdrawal exactly like a pay
answer. Until one comes the money stays held, never both refunded and paid.

Every answer is recognised by its key: the first one for a pending withdrawal decides; a later
one (the service answering twice, a gateway resending after a restart, a pay answer arriving
after the cancel's) is a `duplicate` when it agrees with the decision and an `anomaly` (published
as `PayoutAnomaly`, nothing moved) when it contradicts it, which only a service that broke its
contract can cause. All of it depends only on the log: the same answers and timer fires in the
same order give the same outcome on every replica and every replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from sequencer.apps.ledger import (
    LEDGER_SCHEMA,
    MINT,
    AccountState,
    Ledger,
    LedgerSnapshot,
    Reservation,
    Reserve,
    Reserved,
    _check_amount,
)
from sequencer.integration.keys import KEY_MAX, request_key_of_timer, request_timer_id
from sequencer.schema import Schema
from sequencer.state_machine import Context, Rejected, query

__all__ = [
    "PAY_ATTEMPTS_MAX",
    "WITHDRAWALS_SCHEMA",
    "PayoutAnomaly",
    "PayoutAnswer",
    "PayoutAnswerApplied",
    "PayoutCancelRequested",
    "PayoutRequested",
    "Withdraw",
    "WithdrawalAccepted",
    "WithdrawalLedger",
    "WithdrawalRefunded",
    "WithdrawalSettled",
]

# Pay requests per withdrawal before giving up and asking to cancel: the first call and two
# retries ride out a service restart or a lost response without holding money for long.
PAY_ATTEMPTS_MAX = 3
WITHDRAWAL_TIMEOUT_MS_MAX = 3600 * 1000  # an answer awaited longer than an hour is a mistake
DESTINATION_BYTES_MAX = 64  # an account number at the payment service, not a document
# Finished withdrawals remembered to recognise a late answer: at 100 withdrawals per second this
# is over 15 minutes of answers, far longer than a gateway takes to resend. An answer for a key
# forgotten since is refused as `unknown_withdrawal`, which changes nothing either.
FINISHED_KEPT_MAX = 100_000
PENDING_PAGE_MAX = 1000  # requests per `pending_payouts` answer: well inside a 1 MiB frame

Outcome = Literal["paid", "declined", "cancelled"]
PAYING = "paying"
CANCELLING = "cancelling"
SETTLED = "settled"  # a finished withdrawal's record: paid out
REFUNDED = "refunded"  # not paid, the hold released


# -- commands ---------------------------------------------------------------------------------


class Withdraw(msgspec.Struct, tag=True):
    account: str
    amount: int
    destination: str  # the payee at the payment service
    timeout_ms: int = 5000  # how long each request to the service waits for its answer


class PayoutAnswer(msgspec.Struct, tag=True):
    """The payment service's final answer for withdrawal `key`, submitted by the gateway."""

    key: int
    outcome: Outcome
    reference: str = ""  # the service's payout id, for the books


# -- replies ----------------------------------------------------------------------------------


class WithdrawalAccepted(msgspec.Struct, tag=True):
    key: int  # the withdrawal's id: the log index of the Withdraw command
    deadline_ns: int


class PayoutAnswerApplied(msgspec.Struct, tag=True):
    key: int
    effect: Literal["settled", "refunded", "duplicate", "anomaly"]


# -- events -----------------------------------------------------------------------------------


class PayoutRequested(msgspec.Struct, tag=True):
    """An integration request: pay `amount` to `destination`, idempotently by `key`."""

    key: int
    account: str
    amount: int
    destination: str
    attempt: int


class PayoutCancelRequested(msgspec.Struct, tag=True):
    """An integration request: make sure payout `key` never happens, or say that it did."""

    key: int
    attempt: int


class WithdrawalSettled(msgspec.Struct, tag=True):
    key: int
    account: str
    amount: int
    reference: str


class WithdrawalRefunded(msgspec.Struct, tag=True):
    key: int
    account: str
    amount: int
    outcome: str  # the service's answer: "declined" or "cancelled"


class PayoutAnomaly(msgspec.Struct, tag=True):
    """An answer that contradicts the withdrawal's recorded end: the service broke its contract
    (paid after confirming a cancel, or the reverse). Nothing moved; a person must look."""

    key: int
    recorded: str  # "settled" or "refunded"
    answered: str


# -- state ------------------------------------------------------------------------------------


class Withdrawal(msgspec.Struct, array_like=True, gc=False):
    account: str
    amount: int
    destination: str
    timeout_ms: int
    phase: str  # PAYING or CANCELLING
    attempt: int  # requests published so far in this phase
    deadline_ns: int  # of the current request


class WithdrawalSnapshot(msgspec.Struct, array_like=True):
    accounts: dict[str, AccountState]
    reservations: dict[int, Reservation]
    withdrawals: dict[int, Withdrawal]
    finished: dict[int, str]  # key -> SETTLED or REFUNDED, oldest first
    anomalies: int


WITHDRAWALS_SCHEMA = Schema(
    name="ledger-withdrawals",
    version=1,
    commands=(*LEDGER_SCHEMA.commands, Withdraw, PayoutAnswer),
    replies=(*LEDGER_SCHEMA.replies, WithdrawalAccepted, PayoutAnswerApplied),
    events=(*LEDGER_SCHEMA.events, PayoutRequested, PayoutCancelRequested, WithdrawalSettled,
            WithdrawalRefunded, PayoutAnomaly),
    snapshot_type=WithdrawalSnapshot,
)  # fmt: skip


class WithdrawalLedger(Ledger):
    schema = WITHDRAWALS_SCHEMA

    def __init__(
        self,
        accounts: dict[str, AccountState] | None = None,
        reservations: dict[int, Reservation] | None = None,
        withdrawals: dict[int, Withdrawal] | None = None,
        finished: dict[int, str] | None = None,
        anomalies: int = 0,
    ) -> None:
        super().__init__(accounts, reservations)
        # Invariant: each pending withdrawal's amount is part of its account's `held`, and its
        # request timer is armed; a key is in `withdrawals` or `finished`, never both.
        self.withdrawals = withdrawals if withdrawals is not None else {}
        self.finished = finished if finished is not None else {}
        self.anomalies = anomalies

    def apply(self, ctx: Context, command: Any) -> Any:
        handler = _HANDLERS.get(type(command))
        if handler is None:
            return super().apply(ctx, command)
        return handler(self, ctx, command)

    def reserve(self, ctx: Context, command: Reserve) -> Reserved:
        if command.reservation_id > KEY_MAX:
            raise Rejected(
                "bad_reservation_id",
                f"reservation ids are 1 to {KEY_MAX} here: the ids above are the payout timers",
            )
        return super().reserve(ctx, command)

    def withdraw(self, ctx: Context, command: Withdraw) -> WithdrawalAccepted:
        if command.account == MINT:
            raise Rejected("system_account", "cannot withdraw from the mint")
        account = self._account(command.account)
        _check_amount(command.amount)
        if command.amount > account.balance - account.held:
            raise Rejected(
                "insufficient_funds",
                f"account {command.account!r} has {account.balance - account.held} available; "
                f"cannot withdraw {command.amount}",
            )
        if not command.destination or len(command.destination.encode()) > DESTINATION_BYTES_MAX:
            raise Rejected("bad_destination", f"destination must be 1 to {DESTINATION_BYTES_MAX} bytes")
        if not 1 <= command.timeout_ms <= WITHDRAWAL_TIMEOUT_MS_MAX:
            raise Rejected(
                "bad_timeout",
                f"timeout_ms={command.timeout_ms} is not 1 to {WITHDRAWAL_TIMEOUT_MS_MAX}",
            )
        key = ctx.index
        deadline_ns = ctx.now + command.timeout_ms * 1_000_000
        account.held += command.amount
        self.withdrawals[key] = Withdrawal(command.account, command.amount, command.destination,
                                           command.timeout_ms, PAYING, 1, deadline_ns)  # fmt: skip
        ctx.publish(PayoutRequested(key, command.account, command.amount, command.destination, 1))
        ctx.schedule(request_timer_id(key), deadline_ns)
        return WithdrawalAccepted(key, deadline_ns)

    def payout_answer(self, ctx: Context, command: PayoutAnswer) -> PayoutAnswerApplied:
        key = command.key
        withdrawal = self.withdrawals.pop(key, None)
        if withdrawal is None:
            return self._late_answer(ctx, command)
        account = self.accounts[withdrawal.account]
        account.held -= withdrawal.amount
        ctx.cancel(request_timer_id(key))
        if command.outcome == "paid":
            account.balance -= withdrawal.amount
            self.accounts[MINT].balance += withdrawal.amount  # the money left the ledger
            self._finish(key, SETTLED)
            ctx.publish(WithdrawalSettled(key, withdrawal.account, withdrawal.amount,
                                          command.reference))  # fmt: skip
            return PayoutAnswerApplied(key, "settled")
        self._finish(key, REFUNDED)
        ctx.publish(WithdrawalRefunded(key, withdrawal.account, withdrawal.amount, command.outcome))
        return PayoutAnswerApplied(key, "refunded")

    def _late_answer(self, ctx: Context, command: PayoutAnswer) -> PayoutAnswerApplied:
        recorded = self.finished.get(command.key)
        if recorded is None:
            raise Rejected(
                "unknown_withdrawal",
                f"no withdrawal {command.key} is pending or recently finished; nothing changed",
            )
        if (recorded == SETTLED) == (command.outcome == "paid"):
            return PayoutAnswerApplied(command.key, "duplicate")
        self.anomalies += 1
        ctx.publish(PayoutAnomaly(command.key, recorded, command.outcome))
        return PayoutAnswerApplied(command.key, "anomaly")

    def _finish(self, key: int, end: str) -> None:
        finished = self.finished
        finished[key] = end
        if len(finished) > FINISHED_KEPT_MAX:
            del finished[next(iter(finished))]  # the oldest: dicts keep insertion order

    def on_timer(self, ctx: Context, timer_id: int) -> None:
        key = request_key_of_timer(timer_id)
        if key is None:
            super().on_timer(ctx, timer_id)
            return
        # Every answer cancels the timer, so a fire finds its withdrawal still pending.
        withdrawal = self.withdrawals[key]
        if withdrawal.phase == PAYING and withdrawal.attempt < PAY_ATTEMPTS_MAX:
            withdrawal.attempt += 1
            ctx.publish(PayoutRequested(key, withdrawal.account, withdrawal.amount,
                                        withdrawal.destination, withdrawal.attempt))  # fmt: skip
        else:
            withdrawal.attempt = withdrawal.attempt + 1 if withdrawal.phase == CANCELLING else 1
            withdrawal.phase = CANCELLING
            ctx.publish(PayoutCancelRequested(key, withdrawal.attempt))
        withdrawal.deadline_ns = ctx.now + withdrawal.timeout_ms * 1_000_000
        ctx.schedule(timer_id, withdrawal.deadline_ns)

    def holds(self) -> dict[str, int]:
        held = super().holds()
        for withdrawal in self.withdrawals.values():
            held[withdrawal.account] = held.get(withdrawal.account, 0) + withdrawal.amount
        return held

    # -- queries -----------------------------------------------------------------------------

    @query("pending_payouts")
    def query_pending_payouts(self, after_key: int = 0, limit: int = PENDING_PAGE_MAX) -> list[Any]:
        """The current request of each pending withdrawal with a key above `after_key`, in key
        order, at most `limit`: what an integration gateway must still get answered."""
        limit = max(1, min(limit, PENDING_PAGE_MAX))
        page: list[Any] = []
        for key in sorted(key for key in self.withdrawals if key > after_key)[:limit]:
            withdrawal = self.withdrawals[key]
            if withdrawal.phase == PAYING:
                page.append(PayoutRequested(key, withdrawal.account, withdrawal.amount,
                                            withdrawal.destination, withdrawal.attempt))  # fmt: skip
            else:
                page.append(PayoutCancelRequested(key, withdrawal.attempt))
        return page

    @query("finished_withdrawals")
    def query_finished_withdrawals(self, after_key: int = 0, limit: int = PENDING_PAGE_MAX) -> dict[int, str]:
        """Finished withdrawals with a key above `after_key` ("settled" or "refunded")."""
        limit = max(1, min(limit, PENDING_PAGE_MAX))
        keys = sorted(key for key in self.finished if key > after_key)[:limit]
        return {key: self.finished[key] for key in keys}

    @query("withdrawals_summary")
    def query_withdrawals_summary(self) -> dict[str, int]:
        ends = list(self.finished.values())
        return {"pending": len(self.withdrawals), "settled": ends.count(SETTLED),
                "refunded": ends.count(REFUNDED), "anomalies": self.anomalies}  # fmt: skip

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> WithdrawalSnapshot:  # type: ignore[override]
        return WithdrawalSnapshot(self.accounts, self.reservations, self.withdrawals,
                                  self.finished, self.anomalies)  # fmt: skip

    @classmethod
    def restore(cls, snapshot: LedgerSnapshot | WithdrawalSnapshot) -> WithdrawalLedger:
        assert isinstance(snapshot, WithdrawalSnapshot), type(snapshot)
        return cls(snapshot.accounts, snapshot.reservations, snapshot.withdrawals,
                   snapshot.finished, snapshot.anomalies)  # fmt: skip


_HANDLERS: dict[type, Callable[[WithdrawalLedger, Context, Any], Any]] = {
    Withdraw: WithdrawalLedger.withdraw,
    PayoutAnswer: WithdrawalLedger.payout_answer,
    Reserve: WithdrawalLedger.reserve,
}
