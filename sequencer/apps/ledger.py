"""The embedded default app: a double-entry ledger with two-phase transfers.

    app = "sequencer.apps.ledger:Ledger"

Money is an integer number of minor units (cents): floats do not add up exactly, and a replay
must compute the same balances bit for bit. Every movement is a transfer between two accounts,
so the sum of all balances never changes. Money enters through the system account `@mint`, which
exists from the start, may go negative, and is the source of every `Deposit`: the sum of all
balances, the mint's included, is always zero, and `-mint.balance` is the money in circulation.

Two-phase transfers: `Reserve` holds an amount on the source (it is no longer available to
spend, but still in the balance), `CommitReservation` moves it, `VoidReservation` releases it,
and a timer voids it when `timeout_ms` passes first (`ReservationExpired` is published).

Every command is validated completely before anything changes (there is no rollback), so a
rejected command leaves the ledger exactly as it was.
"""

from __future__ import annotations

from types import MappingProxyType

import msgspec

from sequencer.schema import Schema
from sequencer.state_machine import Context, Rejected, StateMachine, query

__all__ = [
    "AMOUNT_MAX",
    "BALANCE_MAX",
    "LEDGER_SCHEMA",
    "MINT",
    "AccountBalance",
    "AccountOpened",
    "AccountState",
    "Balance",
    "CommitReservation",
    "Deposit",
    "Ledger",
    "LedgerSnapshot",
    "OpenAccount",
    "Reservation",
    "ReservationCommitted",
    "ReservationExpired",
    "ReservationVoided",
    "Reserve",
    "Reserved",
    "Transfer",
    "TransferMade",
    "Transferred",
    "VoidReservation",
]

MINT = "@mint"  # the system account money enters from; names starting with "@" are reserved
ACCOUNT_NAME_BYTES_MAX = 64  # an account name is an identifier, not a document
# One transfer moves at most 10^15 minor units (10 trillion in cents): larger is a typo.
AMOUNT_MAX = 10**15
# Balances stay within +-2^62 so they always fit the msgpack int64 of a snapshot, with room.
BALANCE_MAX = 1 << 62
RESERVATION_TIMEOUT_MS_MAX = 7 * 24 * 3600 * 1000  # a hold longer than a week is a mistake
RESERVATION_ID_MAX = (1 << 64) - 1  # reservation ids are the timer ids, u64 on egress


# -- commands (schema version 1) ----------------------------------------------------------------


class OpenAccount(msgspec.Struct, tag=True):
    account: str
    allow_negative: bool = False


class Deposit(msgspec.Struct, tag=True):
    """Moves `amount` from the mint into `account`: how money enters the ledger."""

    account: str
    amount: int


class Transfer(msgspec.Struct, tag=True):
    source: str
    target: str
    amount: int


class Balance(msgspec.Struct, tag=True):
    account: str


class Reserve(msgspec.Struct, tag=True):
    reservation_id: int
    source: str
    target: str
    amount: int
    timeout_ms: int


class CommitReservation(msgspec.Struct, tag=True):
    reservation_id: int


class VoidReservation(msgspec.Struct, tag=True):
    reservation_id: int


# -- replies ----------------------------------------------------------------------------------


class AccountOpened(msgspec.Struct, tag=True):
    account: str


class Transferred(msgspec.Struct, tag=True):
    source: str
    target: str
    amount: int
    source_balance: int


class AccountBalance(msgspec.Struct, tag=True):
    account: str
    balance: int
    held: int  # reserved by pending two-phase transfers; available = balance - held


class Reserved(msgspec.Struct, tag=True):
    reservation_id: int
    deadline_ns: int


class ReservationCommitted(msgspec.Struct, tag=True):
    reservation_id: int


class ReservationVoided(msgspec.Struct, tag=True):
    reservation_id: int


# -- events -----------------------------------------------------------------------------------


class TransferMade(msgspec.Struct, tag=True):
    source: str
    target: str
    amount: int


class ReservationExpired(msgspec.Struct, tag=True):
    reservation_id: int
    source: str
    amount: int


# -- state ------------------------------------------------------------------------------------
# The live state is made of these structs, so snapshot() returns them without copying.
# gc=False: they hold only ints, strings and bools (no cycles), and untracked objects keep the
# garbage collector, and the copy-on-write faults it causes after a fork, off a million accounts.


class AccountState(msgspec.Struct, array_like=True, gc=False):
    balance: int = 0
    held: int = 0
    allow_negative: bool = False


class Reservation(msgspec.Struct, array_like=True, gc=False):
    source: str
    target: str
    amount: int
    deadline_ns: int


class LedgerSnapshot(msgspec.Struct, array_like=True):
    accounts: dict[str, AccountState]
    reservations: dict[int, Reservation]


LEDGER_SCHEMA = Schema(
    name="ledger",
    version=1,
    commands=(OpenAccount, Deposit, Transfer, Balance, Reserve, CommitReservation,
              VoidReservation),
    replies=(AccountOpened, Transferred, AccountBalance, Reserved, ReservationCommitted,
             ReservationVoided),
    events=(TransferMade, ReservationExpired),
    snapshot_type=LedgerSnapshot,
)  # fmt: skip


class Ledger(StateMachine):
    schema = LEDGER_SCHEMA

    def __init__(
        self,
        accounts: dict[str, AccountState] | None = None,
        reservations: dict[int, Reservation] | None = None,
    ) -> None:
        # Invariants: sum(balance) == 0 over all accounts; for each account, held == the sum of
        # its pending reservations' amounts; balance - held >= 0 unless allow_negative.
        self.accounts = accounts if accounts is not None else {MINT: AccountState(0, 0, True)}
        self.reservations = reservations if reservations is not None else {}

    # -- commands (dispatched by `command_handlers`, at the end of the module) -----------------

    def open_account(self, ctx: Context, command: OpenAccount) -> AccountOpened:
        account = command.account
        _check_name(account)
        if account in self.accounts:
            raise Rejected("account_exists", f"account {account!r} is already open")
        self.accounts[account] = AccountState(0, 0, command.allow_negative)
        return AccountOpened(account)

    def deposit(self, ctx: Context, command: Deposit) -> Transferred:
        _check_amount(command.amount)
        target = self._account(command.account)
        if command.account == MINT:
            raise Rejected("system_account", "cannot deposit into the mint")
        mint = self.accounts[MINT]
        if mint.balance - command.amount < -BALANCE_MAX:
            raise Rejected("balance_overflow", "the mint has issued the most money it may")
        if target.balance + command.amount > BALANCE_MAX:
            raise Rejected("balance_overflow", f"account {command.account!r} would overflow")
        mint.balance -= command.amount
        target.balance += command.amount
        ctx.publish(TransferMade(MINT, command.account, command.amount))
        return Transferred(MINT, command.account, command.amount, mint.balance)

    def transfer(self, ctx: Context, command: Transfer) -> Transferred:
        amount = command.amount
        source_name = command.source
        target_name = command.target
        accounts = self.accounts
        source = accounts.get(source_name)
        target = accounts.get(target_name)
        # The common case in one test (the hot path); anything unusual takes the full
        # validation, which names the reason.
        if (
            source is None
            or target is None
            or not 0 < amount <= AMOUNT_MAX
            or source_name == target_name
            or source.allow_negative
            or source.balance - source.held < amount
            or source_name == MINT
            or target_name == MINT
        ):
            source, target = self._pair(source_name, target_name, amount)
        if target.balance + amount > BALANCE_MAX:
            raise Rejected("balance_overflow", f"account {command.target!r} would overflow")
        source.balance -= amount
        target.balance += amount
        ctx.publish(TransferMade(source_name, target_name, amount))
        return Transferred(source_name, target_name, amount, source.balance)

    def balance(self, ctx: Context, command: Balance) -> AccountBalance:
        account = self._account(command.account)
        return AccountBalance(command.account, account.balance, account.held)

    def reserve(self, ctx: Context, command: Reserve) -> Reserved:
        reservation_id = command.reservation_id
        if not 1 <= reservation_id <= RESERVATION_ID_MAX:
            raise Rejected("bad_reservation_id", f"reservation ids are 1 to {RESERVATION_ID_MAX}")
        if reservation_id in self.reservations:
            raise Rejected("reservation_exists", f"reservation {reservation_id} is pending")
        if not 1 <= command.timeout_ms <= RESERVATION_TIMEOUT_MS_MAX:
            raise Rejected(
                "bad_timeout",
                f"timeout_ms={command.timeout_ms} is not 1 to {RESERVATION_TIMEOUT_MS_MAX}",
            )
        source, _target = self._pair(command.source, command.target, command.amount)
        deadline_ns = ctx.now + command.timeout_ms * 1_000_000
        source.held += command.amount
        self.reservations[reservation_id] = Reservation(
            command.source, command.target, command.amount, deadline_ns
        )
        ctx.schedule(reservation_id, deadline_ns)
        return Reserved(reservation_id, deadline_ns)

    def commit_reservation(self, ctx: Context, command: CommitReservation) -> ReservationCommitted:
        reservation = self._reservation(command.reservation_id)
        if ctx.now >= reservation.deadline_ns:
            # Past its deadline the hold is void even if the TIMER_FIRED record has not come yet:
            # the outcome follows the log's time, not which record the sequencer's clock let in
            # first.
            raise Rejected(
                "reservation_expired",
                f"reservation {command.reservation_id} expired at {reservation.deadline_ns} ns "
                f"(this command is stamped {ctx.now} ns); nothing was moved",
            )
        source = self.accounts[reservation.source]
        target = self.accounts[reservation.target]
        if target.balance + reservation.amount > BALANCE_MAX:
            raise Rejected("balance_overflow", f"account {reservation.target!r} would overflow")
        del self.reservations[command.reservation_id]
        source.held -= reservation.amount
        source.balance -= reservation.amount
        target.balance += reservation.amount
        ctx.cancel(command.reservation_id)
        ctx.publish(TransferMade(reservation.source, reservation.target, reservation.amount))
        return ReservationCommitted(command.reservation_id)

    def void_reservation(self, ctx: Context, command: VoidReservation) -> ReservationVoided:
        reservation = self._reservation(command.reservation_id)
        del self.reservations[command.reservation_id]
        self.accounts[reservation.source].held -= reservation.amount
        ctx.cancel(command.reservation_id)
        return ReservationVoided(command.reservation_id)

    def on_timer(self, ctx: Context, timer_id: int) -> None:
        # The processor fires only timers still scheduled, and every path that ends a
        # reservation cancels its timer: a fire always finds its reservation.
        reservation = self.reservations.pop(timer_id)
        self.accounts[reservation.source].held -= reservation.amount
        ctx.publish(ReservationExpired(timer_id, reservation.source, reservation.amount))

    # -- validation (raises Rejected, mutates nothing) --------------------------------------

    def _account(self, name: str) -> AccountState:
        account = self.accounts.get(name)
        if account is None:
            raise Rejected("unknown_account", f"no account {name!r}")
        return account

    def _pair(self, source_name: str, target_name: str, amount: int) -> tuple[AccountState,
                                                                              AccountState]:
        _check_amount(amount)
        if source_name == target_name:
            raise Rejected("same_account", f"source and target are both {source_name!r}")
        if source_name == MINT or target_name == MINT:
            raise Rejected("system_account", "money enters through Deposit only")
        source = self._account(source_name)
        target = self._account(target_name)
        if not source.allow_negative and source.balance - source.held < amount:
            raise Rejected(
                "insufficient_funds",
                f"account {source_name!r} has {source.balance - source.held} available, "
                f"needs {amount}",
            )
        if source.balance - source.held - amount < -BALANCE_MAX:
            raise Rejected("balance_overflow", f"account {source_name!r} would overflow")
        return source, target

    def _reservation(self, reservation_id: int) -> Reservation:
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise Rejected(
                "unknown_reservation",
                f"reservation {reservation_id} is not pending (never made, committed, voided "
                "or expired)",
            )
        return reservation

    # -- queries (answered by query replicas, never by the blp) ------------------------------

    @query("balance")
    def query_balance(self, account: str) -> AccountBalance:
        """An account's balance and held amount, read from a replica."""
        state = self.accounts.get(account)
        if state is None:
            raise Rejected("unknown_account", f"account {account!r} is not open")
        return AccountBalance(account, state.balance, state.held)

    @query("accounts")
    def query_accounts(self) -> list[str]:
        """The open accounts' names, in the order they were opened (the mint left out)."""
        return [name for name in self.accounts if name != MINT]

    # -- snapshots --------------------------------------------------------------------------

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(self.accounts, self.reservations)

    @classmethod
    def restore(cls, snapshot: LedgerSnapshot) -> Ledger:
        return cls(snapshot.accounts, snapshot.reservations)

    # -- checks for tests and tools ---------------------------------------------------------

    def invariants(self) -> int:
        """Checks the ledger's invariants; returns the sum of all balances (always 0).

        Raises:
            AssertionError: naming the account or the sum that is wrong.
        """
        total = 0
        held_by_account = self.holds()
        for name, account in self.accounts.items():
            total += account.balance
            assert account.held == held_by_account.get(name, 0), (name, account.held)
            assert account.held >= 0, (name, account.held)
            if not account.allow_negative:
                assert account.balance - account.held >= 0, (name, account.balance, account.held)
        assert total == 0, f"the balances sum to {total}, not 0: money was created or destroyed"
        return total

    def holds(self) -> dict[str, int]:
        """The amount each account should have held: the sum of its pending holds (an app built
        on the ledger that holds money for other reasons adds its own)."""
        held_by_account: dict[str, int] = {}
        for reservation in self.reservations.values():
            held_by_account[reservation.source] = (
                held_by_account.get(reservation.source, 0) + reservation.amount
            )
        return held_by_account

    def circulating(self) -> int:
        """The money deposited so far (it never leaves): minus the mint's balance."""
        return -self.accounts[MINT].balance


def _check_name(account: str) -> None:
    if not account or len(account.encode()) > ACCOUNT_NAME_BYTES_MAX:
        raise Rejected("bad_account_name", f"account names are 1 to {ACCOUNT_NAME_BYTES_MAX} bytes")
    if account.startswith("@"):
        raise Rejected("bad_account_name", "names starting with '@' are reserved for the system")


def _check_amount(amount: int) -> None:
    if not 0 < amount <= AMOUNT_MAX:
        raise Rejected("bad_amount", f"amount {amount} is not 1 to {AMOUNT_MAX}")


# The processor calls these itself (StateMachine, `command_handlers`): no `apply` frame a command.
# Read-only: a subclass that overrides a handler declares its own table from this one.
Ledger.command_handlers = MappingProxyType({
    OpenAccount: Ledger.open_account,
    Deposit: Ledger.deposit,
    Transfer: Ledger.transfer,
    Balance: Ledger.balance,
    Reserve: Ledger.reserve,
    CommitReservation: Ledger.commit_reservation,
    VoidReservation: Ledger.void_reservation,
})
