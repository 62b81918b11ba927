"""The blp core's bytes pinned: a fixed log of ledger records gives a fixed rolling hash after
every record, fixed output frames and a fixed state hash.

Every replica, every replay and every older journal depends on these values (the rolling hash is
compared across nodes and stored in snapshots), so a change to the hot path that moves one byte of
an output, or what is hashed, or in what order, must fail here. The log walks every output path of
a COMMAND and the other records the blp applies: replies OK and REJECTED (the app's refusal and
undecodable bytes), a resend answered with its saved reply and one with DUPLICATE, acknowledgements
that prune, events, timers scheduled, cancelled, fired and fired stale, a command without a session,
a session closed, a snapshot and a term start. It is applied as a single node emits (every reply and
event) and as a cluster follower does (no reply of another node's session, no events, a notice per
timer fired), which must hash the same.

The pinned values are those of 82d0083 (before branch blpfast's cuts). If a change is meant to
move them, it changes what every replica computes: it needs a new record or rules version, not
new constants here.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict

from sequencer.apps.ledger import (
    LEDGER_SCHEMA,
    Balance,
    CommitReservation,
    Deposit,
    Ledger,
    OpenAccount,
    Reserve,
    Transfer,
    VoidReservation,
)
from sequencer.egress import ReplyStatus, decode
from sequencer.processor import Processor
from tests.fixtures.feeder import Feeder, frame_of, session_id_of

LOCAL = session_id_of(1, 1)  # a session on node 1
REMOTE = session_id_of(2, 1)  # a session on node 2
GONE = session_id_of(1, 9)  # never opened

# What 82d0083's processor computes for `golden_log()`.
GOLDEN_ROLLING_HASH = 3593540980
GOLDEN_ROLLING_HASHES_DIGEST = "8139ce224295470f307c53d8ffac4d53"  # of the hash after each record
GOLDEN_STATE_HASH = "445f75f6ffd09055969f64c9f975d7e6"
GOLDEN_OUTPUTS_SINGLE = "a5d0510fd2c6520456f3b5443e6c4f3d"  # 77 replies, 58 events, 5 timer requests
GOLDEN_OUTPUTS_FOLLOWER = "701f37935c2c5dcf205c6bbb678ec314"


def golden_log() -> list[bytes]:
    feeder = Feeder(LEDGER_SCHEMA)
    records = [feeder.open_session(LOCAL, client_id=7), feeder.open_session(REMOTE, client_id=8, node="n2")]
    request = {LOCAL: 0, REMOTE: 0}

    def command(session: int, value: object, acked: int = 0) -> bytes:
        request[session] += 1
        return feeder.command(session, request[session], value, acked=acked)

    accounts = [f"acct-{n}" for n in range(8)]
    records += [command(LOCAL, OpenAccount(name)) for name in accounts]
    records.append(command(LOCAL, OpenAccount(accounts[0])))  # rejected: account_exists
    records.append(command(REMOTE, OpenAccount("overdraft", allow_negative=True)))
    records += [command(LOCAL, Deposit(name, 1_000 + n)) for n, name in enumerate(accounts)]
    for n in range(40):  # the hot path, on both sessions, with acknowledgements that prune
        session = LOCAL if n % 3 else REMOTE
        source, target = accounts[n % 8], accounts[(n * 5 + 3) % 8]
        if source == target:
            target = "overdraft"
        records.append(command(session, Transfer(source, target, 1 + n % 17), acked=max(0, request[session] - 4)))
    records.append(command(LOCAL, Transfer(accounts[1], accounts[2], 10**9)))  # insufficient_funds
    records.append(command(LOCAL, Transfer(accounts[1], "nobody", 1)))  # unknown_account
    records.append(command(REMOTE, Transfer("overdraft", accounts[3], 5_000)))  # may go negative
    records.append(command(LOCAL, Balance(accounts[3])))
    # Resends: the last request (its saved reply) and an acknowledged one (DUPLICATE).
    records.append(feeder.command(LOCAL, request[LOCAL], Balance(accounts[3])))
    records.append(feeder.command(LOCAL, 1, OpenAccount(accounts[0])))
    records.append(feeder.raw_command(LOCAL, request[LOCAL] + 1, 1, b"\xc1 not msgpack"))  # undecodable
    request[LOCAL] += 1
    records.append(feeder.command(GONE, 1, Balance(accounts[0])))  # no session: dropped
    # Timers: reserve, commit (cancel), void (cancel), expire (fire), and a stale fire.
    records.append(command(LOCAL, Reserve(1, accounts[4], accounts[5], 7, 10)))
    records.append(command(LOCAL, CommitReservation(1)))
    records.append(command(REMOTE, Reserve(2, accounts[5], accounts[6], 3, 10)))
    records.append(command(REMOTE, VoidReservation(2)))
    records.append(command(LOCAL, Reserve(3, accounts[6], accounts[7], 11, 1)))
    deadline_ns = feeder.now + 1_000_000  # the reserve's timestamp plus its 1 ms
    feeder.advance(2_000_000)
    records.append(feeder.timer_fired(3, deadline_ns))
    records.append(feeder.timer_fired(3, 1))  # stale: not pending
    records.append(feeder.timer_fired(1, 1))  # stale: committed, its timer cancelled
    records += [feeder.snapshot(), feeder.term_start()]
    records.append(feeder.close_session(REMOTE))
    records.append(feeder.command(REMOTE, request[REMOTE] + 1, Balance(accounts[0])))  # closed: dropped
    records += [command(LOCAL, Transfer(accounts[n], accounts[n + 1], 2)) for n in range(7)]
    return records


def run(records: list[bytes], *, follower: bool) -> tuple[Processor[Ledger], list[int], bytes]:
    """Applies `records` one by one as the blp does; returns the processor, the rolling hash
    after each record and a digest of every output (kind, frame) in order."""
    processor = Processor(Ledger)
    if follower:
        processor.emit_for(2, cluster=True)  # node 2's blp: LOCAL's replies are node 1's
        processor.emit_events = False
    hashes = []
    outputs = hashlib.blake2b(digest_size=16)
    for record in records:
        processor.apply_frame(*frame_of(record))
        processor.snapshot_requested = False
        hashes.append(processor.rolling_hash)
        for kind, frame in processor.drain_outputs():
            outputs.update(kind.to_bytes(2, "little") + len(frame).to_bytes(4, "little") + frame)
    return processor, hashes, outputs.digest()


def hashes_digest(hashes: list[int]) -> str:
    return hashlib.blake2b(b"".join(h.to_bytes(8, "little") for h in hashes), digest_size=16).hexdigest()


def test_the_log_walks_every_output_path() -> None:
    """The log is what the docstring says, so the pins below cover those paths."""
    processor = Processor(Ledger)
    kinds: Counter[tuple[str, int]] = Counter()
    for record in golden_log():
        processor.apply_frame(*frame_of(record))
        processor.snapshot_requested = False
        for kind, frame in processor.drain_outputs():
            output = decode(kind, frame)
            kinds[type(output).__name__, getattr(output, "status", -1)] += 1
    assert kinds == {
        ("Reply", ReplyStatus.OK): 72, ("Reply", ReplyStatus.REJECTED): 4, ("Reply", ReplyStatus.DUPLICATE): 1,
        ("Event", -1): 58, ("TimerSchedule", -1): 3, ("TimerCancel", -1): 2,
    }  # fmt: skip
    assert processor.commands_without_session == 2
    assert processor.stale_timer_fires == 2
    assert processor.timers() == {}
    assert processor.session_ids() == [LOCAL]
    assert processor.app.reservations == {}
    assert processor.app.accounts["overdraft"].balance < 0
    processor.app.invariants()


def test_a_fixed_log_gives_the_pinned_rolling_hash_outputs_and_state() -> None:
    records = golden_log()
    single, single_hashes, single_outputs = run(records, follower=False)
    follower, follower_hashes, follower_outputs = run(records, follower=True)
    assert follower_hashes == single_hashes  # routing changes what is emitted, never the hash
    assert single.rolling_hash == GOLDEN_ROLLING_HASH
    assert hashes_digest(single_hashes) == GOLDEN_ROLLING_HASHES_DIGEST
    assert single.state_hash().hex() == follower.state_hash().hex() == GOLDEN_STATE_HASH
    assert single_outputs.hex() == GOLDEN_OUTPUTS_SINGLE
    assert follower_outputs.hex() == GOLDEN_OUTPUTS_FOLLOWER


def test_a_replay_of_the_fixed_log_gives_the_pinned_hashes() -> None:
    """The recovery's path (`replay_run`) and `apply_records` compute the same."""
    run_bytes = b"".join(golden_log())
    replayed = Processor(Ledger)
    replayed.replay_run(memoryview(run_bytes))
    applied = Processor(Ledger)
    applied.apply_records(run_bytes)
    for processor in (replayed, applied):
        assert processor.rolling_hash == GOLDEN_ROLLING_HASH
        assert processor.state_hash().hex() == GOLDEN_STATE_HASH


def test_saved_replies_stay_an_ordered_dict_through_a_snapshot_restore() -> None:
    """The hot path drops a client's oldest saved reply with each ack: in a plain dict finding it
    scans the entries deleted since the last resize (~0.6 us a command at 512 in flight), so a
    restored processor must hold them as the live one does (`ClientEntry.replies`)."""
    processor, _, _ = run(golden_log(), follower=False)
    restored = Processor.restore(Ledger, processor.snapshot_bytes())
    for table in (processor._table, restored._table):
        assert {type(client.replies) for client in table.clients.values()} == {OrderedDict}
    assert restored.saved_reply_ids(7) == processor.saved_reply_ids(7) != []
