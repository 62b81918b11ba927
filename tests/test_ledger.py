"""The ledger app: validation before mutation, two-phase transfers, and its invariants under
random command sequences (hypothesis): money conserved, no overdraft unless allowed, a rejected
command changes nothing, an accepted transfer moves exactly its amount."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sequencer.apps.ledger import (
    AMOUNT_MAX,
    LEDGER_SCHEMA,
    MINT,
    Balance,
    CommitReservation,
    Deposit,
    Ledger,
    OpenAccount,
    Reserve,
    Transfer,
    VoidReservation,
)
from sequencer.egress import Reply, ReplyStatus
from sequencer.processor import Processor
from tests.fixtures.feeder import Feeder, feed, session_id_of

SESSION = session_id_of(1, 1)
# Mostly accounts the run opens first, sometimes an unknown, a system or an invalid name.
NAMES = [*(["alice", "bob", "carol"] * 4), "dave", "@mint", ""]


class Run:
    def __init__(self) -> None:
        self.processor = Processor(Ledger)
        self.feeder = Feeder(LEDGER_SCHEMA)
        self.request_id = 0
        feed(self.processor, self.feeder.open_session(SESSION, client_id=1))

    @property
    def ledger(self) -> Ledger:
        return self.processor.app  # type: ignore[return-value]

    def send(self, command) -> Reply:
        self.request_id += 1
        outputs = feed(self.processor, self.feeder.command(SESSION, self.request_id, command))
        (reply,) = [o for o in outputs if isinstance(o, Reply)]
        return reply

    def code(self, command) -> str:
        reply = self.send(command)
        if reply.status == ReplyStatus.OK:
            return "ok"
        return msgspec.msgpack.decode(reply.payload)["code"]


@pytest.fixture
def run() -> Run:
    run = Run()
    for command in (OpenAccount("alice"), OpenAccount("bob"), OpenAccount("debtor", True),
                    Deposit("alice", 100)):  # fmt: skip
        assert run.code(command) == "ok"
    return run


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (Transfer("nobody", "bob", 1), "unknown_account"),
        (Transfer("alice", "nobody", 1), "unknown_account"),
        (Transfer("alice", "bob", 0), "bad_amount"),
        (Transfer("alice", "bob", -5), "bad_amount"),
        (Transfer("alice", "bob", AMOUNT_MAX + 1), "bad_amount"),
        (Transfer("alice", "alice", 1), "same_account"),
        (Transfer("alice", "bob", 101), "insufficient_funds"),
        (Transfer(MINT, "bob", 1), "system_account"),
        (Deposit(MINT, 1), "system_account"),
        (OpenAccount("alice"), "account_exists"),
        (OpenAccount("@bank"), "bad_account_name"),
        (OpenAccount(""), "bad_account_name"),
        (OpenAccount("x" * 65), "bad_account_name"),
        (Balance("nobody"), "unknown_account"),
        (Reserve(1, "alice", "bob", 101, 1000), "insufficient_funds"),
        (Reserve(1, "alice", "bob", 1, 0), "bad_timeout"),
        (Reserve(0, "alice", "bob", 1, 1000), "bad_reservation_id"),
        (CommitReservation(9), "unknown_reservation"),
        (VoidReservation(9), "unknown_reservation"),
    ],
)
def test_invalid_command_is_rejected_with_its_reason_and_changes_nothing(run, command, code):
    before = LEDGER_SCHEMA.encode_snapshot(run.ledger.snapshot())
    assert run.code(command) == code
    assert LEDGER_SCHEMA.encode_snapshot(run.ledger.snapshot()) == before


def test_deposit_comes_from_the_mint_so_the_total_stays_zero(run):
    assert run.ledger.accounts[MINT].balance == -100
    assert run.ledger.circulating() == 100
    assert run.ledger.invariants() == 0


def test_an_account_that_allows_negative_may_overdraw(run):
    assert run.code(Transfer("debtor", "bob", 50)) == "ok"
    assert run.ledger.accounts["debtor"].balance == -50
    run.ledger.invariants()


def test_a_reservation_holds_funds_until_commit_moves_them(run):
    assert run.code(Reserve(1, "alice", "bob", 80, 1000)) == "ok"
    assert run.code(Transfer("alice", "bob", 30)) == "insufficient_funds"  # 20 available
    reply = run.send(Balance("alice"))
    assert LEDGER_SCHEMA.decode_reply(1, reply.payload).held == 80
    assert run.code(CommitReservation(1)) == "ok"
    assert (run.ledger.accounts["alice"].balance, run.ledger.accounts["bob"].balance) == (20, 80)
    assert run.code(CommitReservation(1)) == "unknown_reservation"
    assert run.processor.timers() == {}
    run.ledger.invariants()


def test_a_reservation_expires_by_timer_and_releases_its_hold(run):
    assert run.code(Reserve(1, "alice", "bob", 80, 5)) == "ok"
    (deadline_ns,) = run.processor.timers().values()
    assert deadline_ns == run.feeder.now + 5_000_000
    run.feeder.advance(10_000_000)
    feed(run.processor, run.feeder.timer_fired(1, deadline_ns))
    assert run.ledger.reservations == {}
    assert run.ledger.accounts["alice"].held == 0
    assert run.code(CommitReservation(1)) == "unknown_reservation"
    assert run.code(Transfer("alice", "bob", 100)) == "ok"
    run.ledger.invariants()


# -- random sequences against a model --------------------------------------------------------

names = st.sampled_from(NAMES)
amounts = st.integers(1, 90)
bad_amounts = st.sampled_from([0, -1, 150, AMOUNT_MAX + 1])
reservation_ids = st.integers(1, 4)
transfers = st.builds(Transfer, names, names, amounts)
reserves = st.builds(Reserve, reservation_ids, names, names, amounts, st.sampled_from([1, 2, 1000]))
commands = st.one_of(
    transfers, transfers, transfers, reserves, reserves,
    st.builds(Transfer, names, names, bad_amounts),
    st.builds(OpenAccount, names, st.booleans()),
    st.builds(Deposit, names, amounts),
    st.builds(Balance, names),
    st.builds(CommitReservation, reservation_ids),
    st.builds(VoidReservation, reservation_ids),
    st.builds(lambda n: ("fire", n), reservation_ids),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(commands, min_size=1, max_size=60))
def test_random_commands_conserve_money_and_rejections_change_nothing(sequence):
    run = Run()
    for command in (OpenAccount("alice"), OpenAccount("bob"), OpenAccount("carol", True),
                    Deposit("alice", 100), Deposit("bob", 100)):  # fmt: skip
        assert run.code(command) == "ok"
    for command in sequence:
        if isinstance(command, tuple):  # let a reservation's timer fire, if it is pending
            deadline_ns = run.processor.timers().get(command[1])
            if deadline_ns is not None:
                run.feeder.advance(max(0, deadline_ns - run.feeder.now))
                feed(run.processor, run.feeder.timer_fired(command[1], deadline_ns))
            run.ledger.invariants()
            continue
        before = LEDGER_SCHEMA.encode_snapshot(run.ledger.snapshot())
        timers_before = run.processor.timers()
        reply = run.send(command)
        if reply.status == ReplyStatus.REJECTED:
            assert LEDGER_SCHEMA.encode_snapshot(run.ledger.snapshot()) == before
            assert run.processor.timers() == timers_before
        elif isinstance(command, Transfer | Deposit):
            old = msgspec.msgpack.decode(before, type=type(run.ledger.snapshot())).accounts
            source = MINT if isinstance(command, Deposit) else command.source
            target = command.account if isinstance(command, Deposit) else command.target
            accounts = run.ledger.accounts
            assert accounts[source].balance == old[source].balance - command.amount
            assert accounts[target].balance == old[target].balance + command.amount
        assert run.ledger.invariants() == 0
        # Every pending reservation has exactly its timer pending, and nothing else is.
        assert set(run.processor.timers()) == set(run.ledger.reservations)
    # A replay of the same records builds the same state (the snapshot round trip included).
    replayed = Processor.restore(Ledger, run.processor.snapshot_bytes())
    assert replayed.state_hash() == run.processor.state_hash()


def test_commit_stamped_after_the_deadline_is_rejected_before_the_timer_record_arrives() -> None:
    from sequencer.apps.ledger import CommitReservation, Deposit, Ledger, OpenAccount, Reserve
    from sequencer.processor import Processor
    from sequencer.record import RecordType, encode_command, encode_record, encode_session_open

    processor = Processor(Ledger)
    records = [encode_record(RecordType.SESSION_OPEN, 1, 1, 1, 1, 5, 0, encode_session_open(9, "n1"))]
    commands = [(OpenAccount("a"), 2), (OpenAccount("b"), 3), (Deposit("a", 100), 4),
                (Reserve(1, "a", "b", 40, timeout_ms=1), 5),
                (CommitReservation(1), 5 + 2_000_000)]  # stamped 2 ms later: past the deadline
    for number, (command, stamp) in enumerate(commands, start=2):
        version, payload = Ledger.schema.encode_command(command)
        records.append(encode_record(RecordType.COMMAND, version, number, 1, stamp, 5, number, encode_command(0, payload)))
    processor.apply_records(b"".join(records))
    ledger = processor.app
    assert ledger.accounts["b"].balance == 0
    assert ledger.accounts["a"].held == 40  # still held until the timer voids it
