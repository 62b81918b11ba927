"""The ledger, version 2: the worked example of docs/evolution.md.

    app = "sequencer.apps.ledger_v2:LedgerV2"
    seqd log migrate --from OLD --to NEW --transform sequencer.apps.ledger_v2:FromLedgerV1

What changed from version 1 (`sequencer.apps.ledger`), and why it needs a copy-and-transform of
the journal rather than an upcaster:

- `Transfer` is gone. Money moves in two postings, each touching one account: `Debit` takes it
  from the source into the system account `@transit`, `Credit` gives it from `@transit` to the
  target (the step before the accounts can live in different services). One v1 command becomes
  two v2 commands: a split, which upcasting (one message in, one out) cannot do.
- `Balance` is obsolete: a read in the log costs a record and a replay step, and changes nothing.
  v2 reads with `Account`; the migration drops the old `Balance` records (their clients' request
  ids are still recorded, so a resend is answered DUPLICATE and not applied).
- Every other command (accounts, deposits, two-phase reservations with their timers) is the same
  type as in v1, so it is copied as it is.

A `Debit` validates exactly what a v1 `Transfer` did (both accounts, funds, overflow on either
side), so a migrated transfer is refused by its `Debit` exactly when v1 refused the `Transfer`,
and the processor then skips its `Credit`: the balances after the migration are v1's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from sequencer.apps.ledger import (
    BALANCE_MAX,
    AccountBalance,
    AccountOpened,
    AccountState,
    Balance,
    CommitReservation,
    Deposit,
    Ledger,
    LedgerSnapshot,
    OpenAccount,
    Reservation,
    ReservationCommitted,
    ReservationExpired,
    ReservationVoided,
    Reserve,
    Reserved,
    Transfer,
    TransferMade,
    Transferred,
    VoidReservation,
    _check_amount,
)
from sequencer.migrate import Origin, Transform
from sequencer.schema import Schema
from sequencer.state_machine import Context, Rejected

__all__ = [
    "LEDGER_V2_SCHEMA",
    "TRANSIT",
    "Account",
    "Credit",
    "Credited",
    "Debit",
    "Debited",
    "FromLedgerV1",
    "LedgerV2",
]

TRANSIT = "@transit"  # money debited and not yet credited; 0 between a transfer's two postings


# -- commands new in version 2 ------------------------------------------------------------------


class Debit(msgspec.Struct, tag=True):
    """Takes `amount` from `account` into `@transit`, for a `Credit` to `counterparty`."""

    account: str
    amount: int
    counterparty: str


class Credit(msgspec.Struct, tag=True):
    """Gives `amount` from `@transit` to `account`, debited from `counterparty`."""

    account: str
    amount: int
    counterparty: str


class Account(msgspec.Struct, tag=True):
    """Reads an account (v1's `Balance`)."""

    account: str


class Debited(msgspec.Struct, tag=True):
    account: str
    amount: int
    balance: int


class Credited(msgspec.Struct, tag=True):
    account: str
    amount: int
    balance: int


LEDGER_V2_SCHEMA = Schema(
    name="ledger",
    version=2,
    commands=(OpenAccount, Deposit, Debit, Credit, Account, Reserve, CommitReservation,
              VoidReservation),
    replies=(AccountOpened, Transferred, AccountBalance, Reserved, ReservationCommitted,
             ReservationVoided, Debited, Credited),
    events=(TransferMade, ReservationExpired),
    snapshot_type=LedgerSnapshot,
)  # fmt: skip


class LedgerV2(Ledger):
    """The v1 ledger with transfers as two postings; the invariants are v1's (the balances,
    `@transit` included, sum to zero)."""

    schema = LEDGER_V2_SCHEMA

    def __init__(
        self,
        accounts: dict[str, AccountState] | None = None,
        reservations: dict[int, Reservation] | None = None,
    ) -> None:
        super().__init__(accounts, reservations)
        self.accounts.setdefault(TRANSIT, AccountState(0, 0, False))

    def apply(self, ctx: Context, command: Any) -> Any:
        return _HANDLERS_V2[type(command)](self, ctx, command)

    def debit(self, ctx: Context, command: Debit) -> Debited:
        _check_not_system(command.account, command.counterparty)
        # The same checks, in the same order, as a v1 Transfer from account to counterparty.
        source, target = self._pair(command.account, command.counterparty, command.amount)
        if target.balance + command.amount > BALANCE_MAX:
            raise Rejected("balance_overflow", f"account {command.counterparty!r} would overflow")
        transit = self.accounts[TRANSIT]
        if transit.balance + command.amount > BALANCE_MAX:
            raise Rejected("balance_overflow", f"{TRANSIT} would overflow")
        source.balance -= command.amount
        transit.balance += command.amount
        return Debited(command.account, command.amount, source.balance)

    def credit(self, ctx: Context, command: Credit) -> Credited:
        _check_not_system(command.account, command.counterparty)
        _check_amount(command.amount)
        target = self._account(command.account)
        transit = self.accounts[TRANSIT]
        if transit.balance < command.amount:
            raise Rejected(
                "not_debited",
                f"credit of {command.amount} to {command.account!r}: only {transit.balance} was "
                "debited and not credited yet; send the Debit first",
            )
        if target.balance + command.amount > BALANCE_MAX:
            raise Rejected("balance_overflow", f"account {command.account!r} would overflow")
        transit.balance -= command.amount
        target.balance += command.amount
        ctx.publish(TransferMade(command.counterparty, command.account, command.amount))
        return Credited(command.account, command.amount, target.balance)

    def account(self, ctx: Context, command: Account) -> AccountBalance:
        state = self._account(command.account)
        return AccountBalance(command.account, state.balance, state.held)


def _check_not_system(*names: str) -> None:
    for name in names:
        if name.startswith("@"):
            raise Rejected("system_account", f"{name!r} is a system account: postings use client accounts")


_HANDLERS_V2: dict[type, Callable[[LedgerV2, Context, Any], Any]] = {
    OpenAccount: LedgerV2.open_account,
    Deposit: LedgerV2.deposit,
    Debit: LedgerV2.debit,
    Credit: LedgerV2.credit,
    Account: LedgerV2.account,
    Reserve: LedgerV2.reserve,
    CommitReservation: LedgerV2.commit_reservation,
    VoidReservation: LedgerV2.void_reservation,
}


class FromLedgerV1(Transform):
    """The copy-and-transform from v1: a `Transfer` becomes a `Debit` and a `Credit`, a
    `Balance` is dropped, everything else is copied (docs/evolution.md runs the same class)."""

    source = Ledger
    target = LedgerV2

    def command(self, command: Any, origin: Origin) -> Iterable[Any]:
        kind = type(command)
        if kind is Transfer:
            return (
                Debit(command.source, command.amount, command.target),
                Credit(command.target, command.amount, command.source),
            )
        if kind is Balance:
            return ()  # a read: it changed nothing
        return (command,)  # the types v2 shares with v1
