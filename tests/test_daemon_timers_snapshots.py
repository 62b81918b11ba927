"""Timers and snapshots on a real node: fired through the log, re-armed and restored after crashes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sequencer import snapshot as snapshots
from sequencer.apps.ledger import (
    Balance,
    CommitReservation,
    Ledger,
    ReservationExpired,
    Reserve,
)
from sequencer.client import Client, CommandRejected
from sequencer.journal import read_records
from sequencer.record import RecordType
from tests.node_fixtures import DEPOSIT, balances, node_factory, open_accounts  # noqa: F401


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def timer_fired_records(journal_dir: Path) -> list[int]:
    return [record.request_id for record in read_records(journal_dir) if record.type == RecordType.TIMER_FIRED]


def test_reservation_expires_by_a_sequenced_timer_and_subscribers_see_the_event(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    with Client(node.socket_path, schema=Ledger.schema, subscribe_events=True, timeout_s=10) as client:
        client.call(Reserve(reservation_id=1, source="a", target="b", amount=500, timeout_ms=200))
        assert client.call(Balance("a")).held == 500
        event = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            candidate = client.next_event(timeout_s=1)
            if isinstance(candidate, ReservationExpired):
                event = candidate
                break
        assert event == ReservationExpired(reservation_id=1, source="a", amount=500)
        assert client.call(Balance("a")) .held == 0
        # Committing after expiry is refused: the timer already voided it.
        try:
            client.call(CommitReservation(1))
        except CommandRejected as rejected:
            assert rejected.code
        else:
            raise AssertionError("commit after expiry was accepted")
    assert balances(node.socket_path, ["a", "b"]) == {"a": DEPOSIT, "b": DEPOSIT}
    assert node.stop() == 0
    assert timer_fired_records(node.config.journal_dir) == [1]


def test_timer_whose_deadline_passed_while_the_node_was_down_fires_once_on_recovery(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=10) as client:
        client.call(Reserve(reservation_id=7, source="a", target="b", amount=300, timeout_ms=1500))
    node.kill()
    time.sleep(2.0)  # the deadline passes while nothing runs
    node.start()
    wait_for(lambda: balances(node.socket_path, ["a"])["a"] == DEPOSIT, what="the reservation to expire")
    assert node.stop() == 0
    assert timer_fired_records(node.config.journal_dir) == [7]
    # And a later restart does not fire it again.
    node.start()
    assert node.stop() == 0
    assert timer_fired_records(node.config.journal_dir) == [7]


def test_snapshot_command_writes_a_snapshot_that_recovery_uses(node_factory) -> None:  # noqa: F811
    node = node_factory()
    names = [f"s{number}" for number in range(20)]
    open_accounts(node.socket_path, names)
    os.kill(node.role_pid("sequencer"), signal.SIGUSR1)  # what `seqd snapshot` does
    wait_for(lambda: node.read_counters()["snapshot.last.index"] > 0, what="a snapshot")
    index = node.read_counters()["snapshot.last.index"]
    infos = snapshots.list_snapshots(node.config.snapshot_dir)
    assert [info.index for info in infos] == [index]
    assert infos[0].valid
    open_accounts(node.socket_path, ["after"])
    node.kill()
    node.start()
    assert "restored snapshot at index" in node.log_text()
    assert balances(node.socket_path, [*names, "after"]) == dict.fromkeys([*names, "after"], DEPOSIT)


def test_corrupt_newest_snapshot_is_reported_and_the_previous_one_used(node_factory) -> None:  # noqa: F811
    node = node_factory({"snapshot": {"keep": 5}})
    open_accounts(node.socket_path, ["a"])
    for expected in (1, 2):
        os.kill(node.role_pid("sequencer"), signal.SIGUSR1)
        wait_for(lambda e=expected: node.read_counters()["snapshot.writes"] >= e, what=f"snapshot {expected}")  # type: ignore[misc]
        open_accounts(node.socket_path, [f"b{expected}"])
    assert node.stop() == 0
    newest = snapshots.list_snapshots(node.config.snapshot_dir)[0]
    data = bytearray(newest.path.read_bytes())
    data[len(data) // 2] ^= 0x40
    newest.path.write_bytes(bytes(data))
    node.start()
    assert "is invalid, using an older one" in node.log_text()
    assert node.read_counters()["errors.snapshot"] >= 1
    assert balances(node.socket_path, ["a", "b1", "b2"]) == dict.fromkeys(["a", "b1", "b2"], DEPOSIT)


def test_automatic_snapshots_every_n_records_and_retention(node_factory) -> None:  # noqa: F811
    every = 50
    node = node_factory({"snapshot": {"every_records": every, "keep": 2}})
    open_accounts(node.socket_path, [f"x{number}" for number in range(100)])  # 200 commands
    assert node.stop() == 0  # the blp waits for its snapshot writers before it exits
    # The k-th SNAPSHOT record comes right after the (k * every)-th command, before the next one.
    commands = 0
    snapshot_indexes = []
    for record in read_records(node.config.journal_dir):
        if record.type == RecordType.COMMAND:
            commands += 1
        elif record.type == RecordType.SNAPSHOT:
            snapshot_indexes.append(record.index)
            assert commands == every * len(snapshot_indexes), (record.index, commands, snapshot_indexes)
    assert commands == 200
    assert len(snapshot_indexes) == 200 // every
    # Written at those indexes, and only the newest `keep` retained.
    infos = snapshots.list_snapshots(node.config.snapshot_dir)
    assert sorted(info.index for info in infos) == snapshot_indexes[-2:]
    assert all(info.valid for info in infos)


def test_log_timestamps_never_go_backwards_with_snapshots_and_sessions_in_the_same_pass(node_factory) -> None:  # noqa: F811
    node = node_factory({"snapshot": {"every_records": 3, "keep": 2}})
    open_accounts(node.socket_path, [f"t{number}" for number in range(150)])
    open_accounts(node.socket_path, [f"u{number}" for number in range(150)])
    assert node.stop() == 0
    stamps = [record.timestamp_ns for record in read_records(node.config.journal_dir)]
    assert len(stamps) > 600
    backwards = [index for index in range(1, len(stamps)) if stamps[index] < stamps[index - 1]]
    assert not backwards, f"timestamps go backwards at {len(backwards)} records, first at index {backwards[0] + 1}"


def test_more_pending_timers_than_the_egress_ring_holds_do_not_block_a_restart(node_factory) -> None:  # noqa: F811
    from tests.fixtures.bulky import ScheduleMany, Timers

    # 2 MiB of egress (the least allowed: one reply of the largest frame) holds 87,381 timer
    # requests of 24 bytes; 90,000 must still come back. One command schedules 10,000.
    timers_max = 90_000
    node = node_factory({
        "node": {"app": "tests.fixtures.bulky:Timers"},
        "ring": {"egress_capacity_bytes": 2 << 20},
    })
    assert (2 << 20) // 24 < timers_max
    with Client(node.socket_path, schema=Timers.schema, timeout_s=60) as client:
        pending = [
            client.submit(ScheduleMany(first_id=first_id, count=10_000, timeout_ms=3_600_000))
            for first_id in range(1, timers_max, 10_000)
        ]
        for request in pending:
            request.result()
    wait_for(lambda: node.read_counters()["timers.pending"] == timers_max, what="90000 timers armed")
    node.kill()
    node.start()
    wait_for(lambda: node.read_counters()["timers.pending"] == timers_max, timeout_s=60, what="90000 timers re-armed")
