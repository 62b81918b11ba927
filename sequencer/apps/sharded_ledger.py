"""The ledger split across N shards, with cross-shard transfers as a saga through the logs.

    app = "sequencer.apps.sharded_ledger:ShardedLedger"      # on every shard's node

Each shard is a separate node running this app; `InitShard(shard, shard_count)` (the first
command, sent by `ShardedClient.init_shards`) tells it which one it is. An account lives on the
shard `shard_of(account, shard_count)` (a stable hash), and only there. A transfer between two
accounts of one shard is one `Transfer` command, as in the ledger. A transfer across shards is a
saga, each step one command on one shard, the steps carried between shards by bridges
(`seqd bridge`, route `ShardRoute`), in order per pair of shards:

    source shard i                                 target shard j
    SendTransfer: hold the amount on the source,
      arm a timer, publish CreditRequested   ---->  Credit: credit the target, *held*
                                                      (in its balance, not yet spendable),
                                             <----    publish CreditAnswered(credited)
    CreditAnswer before the deadline: move the
      hold out (commit), publish TransferCommitted -> Settle: release the target's hold
    ... or the timer fired first, or the credit
      was refused: release the hold (refund),
      publish TransferRefunded              ---->  Settle: reverse the held credit, if any

The rule for a late credit. The source's timer is final: a hold never outlives its deadline
(in the source's log time). A credit the target applied in the meantime is still held there,
so when the refund reaches it (after the credit, since a bridge keeps its stream's order) the
target reverses it, which always succeeds: the money never left the target account's held
part. The other rules offered fail on conservation: a target that credits spendable money may
have spent it when the refund arrives, and a source that treats the late credit as a new
payment may no longer have the funds. The price is that incoming cross-shard money becomes
spendable one bridge hop later (at Settle), and a cross-shard transfer is four commands.

Money is conserved on every shard at every index: the sum of its accounts' balances (the mint's
included) plus its clearing positions is 0 (`invariants`). `clearing[k]` is the money this shard
has sent to shard k (committed) minus what it has received from k (credited, not reversed); at
quiescence `clearing[k]` on shard i equals `-clearing[i]` on shard k, and the customers'
balances over all shards sum to the deposits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgspec

from sequencer.apps.ledger import (
    BALANCE_MAX,
    LEDGER_SCHEMA,
    MINT,
    RESERVATION_TIMEOUT_MS_MAX,
    AccountOpened,
    AccountState,
    Ledger,
    OpenAccount,
    Reservation,
    Reserve,
    Reserved,
    _check_amount,
)
from sequencer.bridge.inbox import BridgePosition, BridgePositionReply, Inbox
from sequencer.schema import Schema
from sequencer.state_machine import Context, Rejected, query

__all__ = [
    "SHARDED_LEDGER_SCHEMA",
    "SHARDS_MAX",
    "TRANSFER_TIMER_BASE",
    "Credit",
    "CreditAnswer",
    "CreditAnswered",
    "CreditRequested",
    "InitShard",
    "SendTransfer",
    "Settle",
    "ShardInitialised",
    "ShardRoute",
    "ShardSummary",
    "ShardSummaryReply",
    "ShardedLedger",
    "TransferCommitted",
    "TransferPending",
    "TransferRefunded",
    "shard_of",
    "stream_name",
]

SHARDS_MAX = 256  # a shard is a node (four processes): a few hundred is far past one site
# Timer ids of cross-shard holds: TRANSFER_TIMER_BASE + transfer id (the SendTransfer's log
# index). Reservation ids, the ledger's timer ids, stay below it, so the two never collide.
TRANSFER_TIMER_BASE = 1 << 63
TRANSFER_TIMEOUT_MS_DEFAULT = 10_000  # a bridge down for longer than this refunds the transfer


def shard_of(account: str, shard_count: int) -> int:
    """The shard of `account`: jump consistent hash (Lamping and Veach, 2014) of a blake2b key.

    Stable across processes and machines (not Python's salted `hash`); growing from N to N+1
    shards would move only 1/(N+1) of the accounts (re-sharding itself is not built).
    """
    assert 1 <= shard_count <= SHARDS_MAX, shard_count
    key = int.from_bytes(hashlib.blake2b(account.encode(), digest_size=8).digest(), "little")
    bucket, jump = -1, 0
    while jump < shard_count:
        bucket = jump
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        jump = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def stream_name(source_shard: int, target_shard: int) -> str:
    """The bridge stream from one shard to another (its client id is a hash of this)."""
    return f"shard{source_shard}>shard{target_shard}"


# -- commands ---------------------------------------------------------------------------------


class InitShard(msgspec.Struct, tag=True):
    shard: int
    shard_count: int


class SendTransfer(msgspec.Struct, tag=True):
    """A transfer to an account of another shard (the saga's first step, on the source's)."""

    source: str
    target: str
    amount: int
    timeout_ms: int = TRANSFER_TIMEOUT_MS_DEFAULT


class Credit(msgspec.Struct, tag=True):
    """Bridged to the target shard: credit `target`, held until Settle."""

    stream: str
    source_index: int
    transfer_id: int
    source_shard: int
    target: str
    amount: int


class CreditAnswer(msgspec.Struct, tag=True):
    """Bridged back to the source shard: whether the target credited."""

    stream: str
    source_index: int
    transfer_id: int
    credited: bool


class Settle(msgspec.Struct, tag=True):
    """Bridged to the target shard: the source's decision (committed, or refunded)."""

    stream: str
    source_index: int
    transfer_id: int
    source_shard: int
    committed: bool


class ShardSummary(msgspec.Struct, tag=True):
    pass


# -- replies ----------------------------------------------------------------------------------


class ShardInitialised(msgspec.Struct, tag=True):
    shard: int
    shard_count: int


class TransferPending(msgspec.Struct, tag=True):
    transfer_id: int  # the SendTransfer's log index on the source shard
    target_shard: int
    deadline_ns: int


class ShardSummaryReply(msgspec.Struct, tag=True):
    shard: int
    customer_total: int  # the accounts' balances, the mint left out
    circulating: int  # minus the mint's balance: deposited on this shard
    clearing: dict[int, int]
    holds_open: int  # cross-shard transfers whose source hold is not released
    holds_past_deadline: int  # of those, whose deadline has passed (a timer not yet fired)
    awaiting_answer: int  # refunded by the timer, the target's answer not yet in
    incoming_held: int  # credits held here until their source's decision
    inbox: dict[str, int]


# -- events -----------------------------------------------------------------------------------


class CreditRequested(msgspec.Struct, tag=True):
    transfer_id: int
    source_shard: int
    target_shard: int
    source: str
    target: str
    amount: int


class CreditAnswered(msgspec.Struct, tag=True):
    transfer_id: int
    source_shard: int
    target_shard: int
    credited: bool
    reason: str = ""


class TransferCommitted(msgspec.Struct, tag=True):
    transfer_id: int
    source_shard: int
    target_shard: int
    source: str
    target: str
    amount: int


class TransferRefunded(msgspec.Struct, tag=True):
    transfer_id: int
    source_shard: int
    target_shard: int
    source: str
    target: str
    amount: int


# -- state ------------------------------------------------------------------------------------

_PENDING = 0  # the hold is on, the answer not in
_REFUNDED = 1  # the timer refunded it; the answer, still to come, changes nothing here


class Outgoing(msgspec.Struct, array_like=True, gc=False):
    source: str
    target: str
    target_shard: int
    amount: int
    deadline_ns: int
    state: int = _PENDING


class Incoming(msgspec.Struct, array_like=True, gc=False):
    target: str
    amount: int


class ShardedLedgerSnapshot(msgspec.Struct, array_like=True):
    accounts: dict[str, AccountState]
    reservations: dict[int, Reservation]
    shard: int
    shard_count: int
    clearing: dict[int, int]
    outgoing: dict[int, Outgoing]
    incoming: dict[str, Incoming]  # "<source shard>/<transfer id>"
    inbox: dict[str, int]


SHARDED_LEDGER_SCHEMA = Schema(
    name="sharded_ledger",
    version=1,
    commands=(*LEDGER_SCHEMA.commands, InitShard, SendTransfer, Credit, CreditAnswer, Settle,
              BridgePosition, ShardSummary),
    replies=(*LEDGER_SCHEMA.replies, ShardInitialised, TransferPending, BridgePositionReply,
             ShardSummaryReply),
    events=(*LEDGER_SCHEMA.events, CreditRequested, CreditAnswered, TransferCommitted,
            TransferRefunded),
    snapshot_type=ShardedLedgerSnapshot,
)  # fmt: skip


class ShardedLedger(Ledger):
    """One shard of the ledger (see the module docstring)."""

    schema = SHARDED_LEDGER_SCHEMA

    def __init__(
        self,
        accounts: dict[str, AccountState] | None = None,
        reservations: dict[int, Reservation] | None = None,
        shard: int = -1,
        shard_count: int = 0,
        clearing: dict[int, int] | None = None,
        outgoing: dict[int, Outgoing] | None = None,
        incoming: dict[str, Incoming] | None = None,
        inbox: dict[str, int] | None = None,
    ) -> None:
        super().__init__(accounts, reservations)
        self.shard = shard  # -1 until InitShard
        self.shard_count = shard_count
        self.clearing = clearing if clearing is not None else {}
        # Invariants: an account's held == its reservations + its PENDING outgoing transfers +
        # its incoming credits; sum(balances) + sum(clearing) == 0.
        self.outgoing = outgoing if outgoing is not None else {}
        self.incoming = incoming if incoming is not None else {}
        self.inbox = Inbox(inbox)

    def apply(self, ctx: Context, command: Any) -> Any:
        handler = _SHARD_HANDLERS.get(type(command))
        if handler is not None:
            return handler(self, ctx, command)
        if self.shard < 0:
            raise Rejected("shard_not_initialised", "send InitShard(shard, shard_count) first")
        handler = _INITIALISED_HANDLERS.get(type(command))
        if handler is not None:
            return handler(self, ctx, command)
        return super().apply(ctx, command)  # the ledger's own (their accounts: `_account`)

    # -- set-up and the ledger's commands, shard-aware --------------------------------------

    def init_shard(self, ctx: Context, command: InitShard) -> ShardInitialised:
        if not 1 <= command.shard_count <= SHARDS_MAX or not 0 <= command.shard < command.shard_count:
            raise Rejected("bad_shard", f"shard {command.shard} of {command.shard_count}: "
                           f"need 0 <= shard < shard_count <= {SHARDS_MAX}")  # fmt: skip
        if self.shard >= 0 and (self.shard, self.shard_count) != (command.shard, command.shard_count):
            raise Rejected(
                "shard_mismatch",
                f"this node is shard {self.shard} of {self.shard_count}, not {command.shard} of "
                f"{command.shard_count}: check which socket belongs to which shard",
            )
        self.shard, self.shard_count = command.shard, command.shard_count
        return ShardInitialised(self.shard, self.shard_count)

    def open_account(self, ctx: Context, command: OpenAccount) -> AccountOpened:
        self._check_here(command.account)
        return super().open_account(ctx, command)

    def reserve(self, ctx: Context, command: Reserve) -> Reserved:
        if command.reservation_id >= TRANSFER_TIMER_BASE:
            raise Rejected("bad_reservation_id",
                           f"on a shard, reservation ids are below {TRANSFER_TIMER_BASE}")  # fmt: skip
        return super().reserve(ctx, command)

    def _account(self, name: str) -> AccountState:
        account = self.accounts.get(name)
        if account is None:
            self._check_here(name)
            raise Rejected("unknown_account", f"no account {name!r}")
        return account

    def _check_here(self, account: str) -> None:
        home = shard_of(account, self.shard_count)
        if home != self.shard:
            raise Rejected(
                "wrong_shard",
                f"account {account!r} lives on shard {home}, not on this shard {self.shard}: "
                "send through ShardedClient, which routes each command to its shard",
            )

    # -- the saga ----------------------------------------------------------------------------

    def send_transfer(self, ctx: Context, command: SendTransfer) -> TransferPending:
        target_shard = shard_of(command.target, self.shard_count)
        if target_shard == self.shard:
            raise Rejected("same_shard", f"{command.target!r} is on this shard: send a Transfer")
        if not 1 <= command.timeout_ms <= RESERVATION_TIMEOUT_MS_MAX:
            raise Rejected("bad_timeout", f"timeout_ms={command.timeout_ms} is not 1 to "
                           f"{RESERVATION_TIMEOUT_MS_MAX}")  # fmt: skip
        _check_amount(command.amount)
        if command.source.startswith("@") or command.target.startswith("@"):
            raise Rejected("system_account", "money enters through Deposit only")
        source = self._account(command.source)
        if not source.allow_negative and source.balance - source.held < command.amount:
            raise Rejected("insufficient_funds", f"account {command.source!r} has "
                           f"{source.balance - source.held} available, needs {command.amount}")  # fmt: skip
        transfer_id = ctx.index
        deadline_ns = ctx.now + command.timeout_ms * 1_000_000
        source.held += command.amount
        self.outgoing[transfer_id] = Outgoing(command.source, command.target, target_shard,
                                              command.amount, deadline_ns)  # fmt: skip
        ctx.schedule(TRANSFER_TIMER_BASE + transfer_id, deadline_ns)
        ctx.publish(CreditRequested(transfer_id, self.shard, target_shard, command.source,
                                    command.target, command.amount))  # fmt: skip
        return TransferPending(transfer_id, target_shard, deadline_ns)

    def _check_stream(self, stream: str, source_shard: int) -> None:
        """One stream per ordered pair of shards: a bridge configured with another name would
        deliver the pair's commands a second time under a position of its own."""
        expected = stream_name(source_shard, self.shard)
        if stream != expected:
            raise Rejected("wrong_stream", f"commands from shard {source_shard} come on stream "
                           f"{expected!r}, not {stream!r}: fix the bridge's `stream`")  # fmt: skip

    def credit(self, ctx: Context, command: Credit) -> None:
        self._check_stream(command.stream, command.source_shard)
        if not self.inbox.fresh(command.stream, command.source_index):
            return None  # a redelivery: applied before
        answer = CreditAnswered(command.transfer_id, command.source_shard, self.shard, True)
        account = self.accounts.get(command.target)
        if account is None or shard_of(command.target, self.shard_count) != self.shard:
            answer.credited, answer.reason = False, f"no account {command.target!r} on shard {self.shard}"
        elif account.balance + command.amount > BALANCE_MAX:
            answer.credited, answer.reason = False, f"account {command.target!r} would overflow"
        else:
            account.balance += command.amount
            account.held += command.amount
            self.clearing[command.source_shard] = (
                self.clearing.get(command.source_shard, 0) - command.amount
            )
            key = f"{command.source_shard}/{command.transfer_id}"
            self.incoming[key] = Incoming(command.target, command.amount)
        ctx.publish(answer)
        return None

    def credit_answer(self, ctx: Context, command: CreditAnswer) -> None:
        transfer = self.outgoing.get(command.transfer_id)
        if transfer is not None:
            self._check_stream(command.stream, transfer.target_shard)
        if not self.inbox.fresh(command.stream, command.source_index):
            return None
        transfer = self.outgoing.pop(command.transfer_id, None)
        if transfer is None or transfer.state == _REFUNDED:
            # Refunded by the timer already; its TransferRefunded, bridged after the Credit,
            # makes the target reverse what it credited.
            return None
        source = self.accounts[transfer.source]
        source.held -= transfer.amount
        ctx.cancel(TRANSFER_TIMER_BASE + command.transfer_id)
        if command.credited and ctx.now < transfer.deadline_ns:
            source.balance -= transfer.amount
            self.clearing[transfer.target_shard] = (
                self.clearing.get(transfer.target_shard, 0) + transfer.amount
            )
            ctx.publish(TransferCommitted(command.transfer_id, self.shard, transfer.target_shard,
                                          transfer.source, transfer.target, transfer.amount))  # fmt: skip
        else:
            # Refused, or credited at or past the deadline: the outcome follows the log's time,
            # as if the timer had fired first.
            ctx.publish(TransferRefunded(command.transfer_id, self.shard, transfer.target_shard,
                                         transfer.source, transfer.target, transfer.amount))  # fmt: skip
        return None

    def settle(self, ctx: Context, command: Settle) -> None:
        self._check_stream(command.stream, command.source_shard)
        if not self.inbox.fresh(command.stream, command.source_index):
            return None
        held = self.incoming.pop(f"{command.source_shard}/{command.transfer_id}", None)
        if held is None:
            return None  # the credit was refused: nothing to release or reverse
        account = self.accounts[held.target]
        account.held -= held.amount
        if not command.committed:
            account.balance -= held.amount
            self.clearing[command.source_shard] += held.amount
        return None

    def on_timer(self, ctx: Context, timer_id: int) -> None:
        if timer_id < TRANSFER_TIMER_BASE:
            super().on_timer(ctx, timer_id)
            return
        transfer_id = timer_id - TRANSFER_TIMER_BASE
        transfer = self.outgoing[transfer_id]  # every path that ends a hold cancels its timer
        assert transfer.state == _PENDING, transfer_id
        transfer.state = _REFUNDED  # kept until the answer comes, so it changes nothing then
        self.accounts[transfer.source].held -= transfer.amount
        ctx.publish(TransferRefunded(transfer_id, self.shard, transfer.target_shard,
                                     transfer.source, transfer.target, transfer.amount))  # fmt: skip

    def bridge_position(self, ctx: Context, command: BridgePosition) -> BridgePositionReply:
        return self.inbox.position_reply(command)

    def summary(self, ctx: Context, command: ShardSummary) -> ShardSummaryReply:
        return self.summary_at(ctx.now)

    def summary_at(self, now_ns: int) -> ShardSummaryReply:
        open_holds = [t for t in self.outgoing.values() if t.state == _PENDING]
        return ShardSummaryReply(
            shard=self.shard,
            customer_total=sum(a.balance for name, a in self.accounts.items() if name != MINT),
            circulating=self.circulating(),
            clearing=dict(self.clearing),
            holds_open=len(open_holds),
            holds_past_deadline=sum(1 for t in open_holds if t.deadline_ns <= now_ns),
            awaiting_answer=len(self.outgoing) - len(open_holds),
            incoming_held=len(self.incoming),
            inbox=dict(self.inbox.positions),
        )

    @query("summary")
    def query_summary(self) -> ShardSummaryReply:
        """The shard's totals as of the replica's index (past-deadline holds are not counted:
        a replica has no clock)."""
        return self.summary_at(0)

    # -- snapshots and checks ------------------------------------------------------------------

    def snapshot(self) -> ShardedLedgerSnapshot:  # type: ignore[override]
        return ShardedLedgerSnapshot(
            self.accounts, self.reservations, self.shard, self.shard_count, self.clearing,
            self.outgoing, self.incoming, self.inbox.positions,
        )  # fmt: skip

    @classmethod
    def restore(cls, snapshot: ShardedLedgerSnapshot) -> ShardedLedger:  # type: ignore[override]
        return cls(snapshot.accounts, snapshot.reservations, snapshot.shard,
                   snapshot.shard_count, snapshot.clearing, snapshot.outgoing, snapshot.incoming,
                   snapshot.inbox)  # fmt: skip

    def invariants(self) -> int:
        """The shard's invariants (module docstring); returns the sum of the balances and the
        clearing positions (always 0).

        Raises:
            AssertionError: naming the account or the sum that is wrong.
        """
        held: dict[str, int] = {}
        for reservation in self.reservations.values():
            held[reservation.source] = held.get(reservation.source, 0) + reservation.amount
        for transfer in self.outgoing.values():
            if transfer.state == _PENDING:
                held[transfer.source] = held.get(transfer.source, 0) + transfer.amount
        for credit in self.incoming.values():
            held[credit.target] = held.get(credit.target, 0) + credit.amount
        total = sum(self.clearing.values())
        for name, account in self.accounts.items():
            total += account.balance
            assert account.held == held.get(name, 0), (name, account.held, held.get(name, 0))
            if not account.allow_negative:
                assert account.balance - account.held >= 0, (name, account.balance, account.held)
        assert total == 0, f"balances and clearing sum to {total}, not 0 on shard {self.shard}"
        return total


_SHARD_HANDLERS: dict[type, Callable[[ShardedLedger, Context, Any], Any]] = {
    InitShard: ShardedLedger.init_shard,
    BridgePosition: ShardedLedger.bridge_position,
}
_INITIALISED_HANDLERS: dict[type, Callable[[ShardedLedger, Context, Any], Any]] = {
    SendTransfer: ShardedLedger.send_transfer,
    Credit: ShardedLedger.credit,
    CreditAnswer: ShardedLedger.credit_answer,
    Settle: ShardedLedger.settle,
    ShardSummary: ShardedLedger.summary,
    OpenAccount: ShardedLedger.open_account,
    Reserve: ShardedLedger.reserve,
}


class ShardRoute:
    """The bridge route from one shard to `target_shard` (`seqd bridge`, docs/integration.md):
    the saga's events of the source shard that concern the target, as the target's commands."""

    def __init__(self, target_shard: int) -> None:
        self.target_shard = target_shard

    def command_for(self, stream: str, source_index: int, event: Any) -> Any | None:
        target = self.target_shard
        if type(event) is CreditRequested and event.target_shard == target:
            return Credit(stream, source_index, event.transfer_id, event.source_shard,
                          event.target, event.amount)  # fmt: skip
        if type(event) is CreditAnswered and event.source_shard == target:
            return CreditAnswer(stream, source_index, event.transfer_id, event.credited)
        if type(event) in (TransferCommitted, TransferRefunded) and event.target_shard == target:
            return Settle(stream, source_index, event.transfer_id, event.source_shard,
                          type(event) is TransferCommitted)  # fmt: skip
        return None

