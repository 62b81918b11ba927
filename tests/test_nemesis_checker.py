"""The history checker: a real node's history under kill -9 passes it, and each planted violation
(a crafted history and journal) is reported with the operations involved."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from daemon.harness import NodeProcess
from sequencer.apps.ledger import AccountState, Deposit, Ledger, OpenAccount, Transfer
from sequencer.client import Client
from sequencer.egress import REPLY_HEADER, EgressKind
from sequencer.history.checker import Report, check, check_files
from sequencer.history.recorder import HistoryWriter, Operation, RecordingClient, read_history
from sequencer.processor import Processor
from sequencer.record import (
    RECORD_HEADER,
    RecordType,
    decode_header,
    encode_command,
    encode_record,
    encode_session_open,
)
from sequencer.state_machine import Context
from tests.node_fixtures import node_factory  # noqa: F401 (fixture)

ACCOUNTS = ["alice", "bob", "carol"]
CLIENTS = 3
ACKS_BEFORE_KILL = 40  # per client: enough that the kill lands mid-stream
ACKS_AFTER_RESTART = 40


def _client_loop(socket_path: str, name: str, sink: HistoryWriter, stop: threading.Event,
                 acknowledged: list[int], errors: list[BaseException]) -> None:  # fmt: skip
    import random

    rng = random.Random(name)
    try:
        with RecordingClient(
            Client(socket_path, schema=Ledger.schema, timeout_s=60, reconnect_timeout_s=60, in_flight_max=8),
            name,
            sink,
        ) as client:
            window = []
            while not stop.is_set():
                if rng.random() < 0.2:
                    command: object = Deposit(rng.choice(ACCOUNTS), rng.randrange(1, 50))
                else:
                    source, target = rng.sample(ACCOUNTS, 2)
                    command = Transfer(source, target, rng.randrange(1, 80))
                window.append(client.submit(command))
                if len(window) >= 8:
                    _take(window.pop(0))
                    acknowledged.append(1)
            for request in window:
                _take(request)
    except BaseException as error:
        errors.append(error)


def _take(request: object) -> None:
    from sequencer.client import CommandRejected

    try:
        request.result()  # type: ignore[attr-defined]
    except CommandRejected:
        pass  # insufficient funds: an answer, recorded ok/rejected


def _wait(condition: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_real_node_under_kill_9_and_restart_passes_the_checker(node_factory, tmp_path: Path) -> None:  # noqa: F811
    node: NodeProcess = node_factory()
    history = tmp_path / "history.jsonl"
    with HistoryWriter(history) as sink:
        with RecordingClient(Client(node.socket_path, schema=Ledger.schema, timeout_s=30), "setup",
                             sink) as setup:  # fmt: skip
            for account in ACCOUNTS:
                setup.call(OpenAccount(account))
                setup.call(Deposit(account, 1000))
        stop = threading.Event()
        counts: list[list[int]] = [[] for _ in range(CLIENTS)]
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_client_loop, args=(node.socket_path, f"c{number}", sink, stop,
                                                        counts[number], errors), daemon=True)
            for number in range(CLIENTS)
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        _wait(lambda: all(len(count) >= ACKS_BEFORE_KILL for count in counts) or errors, "acks")
        node.kill()  # kill -9 of the whole daemon, supervisor and roles
        node.start()
        target = [len(count) + ACKS_AFTER_RESTART for count in counts]
        _wait(lambda: all(len(c) >= t for c, t in zip(counts, target, strict=True)) or errors,
              "acks after the restart")  # fmt: skip
        stop.set()
        for thread in threads:
            thread.join(90)
            assert not thread.is_alive(), "a client did not finish"
        assert not errors, errors
    assert node.stop() == 0
    operations = read_history(history)
    assert sum(op.outcome == "ok" for op in operations) >= CLIENTS * (ACKS_BEFORE_KILL + ACKS_AFTER_RESTART)
    report = check_files([history], {node.node: node.config.journal_dir},
                         {node.node: node.config.snapshot_dir})  # fmt: skip
    assert report.ok, str(report)
    assert report.operations["ok"] == len(operations)


# -- planted violations on a crafted history and journal ---------------------------------------

CLIENT_IDS = (101, 202)
SESSION_IDS = (1, 2)
COMMANDS: list[tuple[int, object]] = [  # (which client, command)
    (0, OpenAccount("alice")),
    (1, OpenAccount("bob")),
    (0, Deposit("alice", 500)),
    (1, Deposit("bob", 300)),
    (0, Transfer("alice", "bob", 70)),
    (1, Transfer("bob", "alice", 20)),
    (0, Transfer("alice", "bob", 5)),
]
STEP_NS = 1_000_000  # each operation is invoked and completes before the next is invoked


def _crafted() -> tuple[list[Operation], list[bytes]]:
    """A journal (sessions, then the commands, one request at a time) and the history of the
    clients that sent them, the replies taken from a replay: a history the checker passes."""
    records = [
        encode_record(RecordType.SESSION_OPEN, 1, index, 1, index * STEP_NS, session_id, 0,
                      encode_session_open(client_id, "n1"))
        for index, (session_id, client_id) in enumerate(zip(SESSION_IDS, CLIENT_IDS, strict=True), 1)
    ]  # fmt: skip
    operations = []
    next_request = [1, 1]
    for which, command in COMMANDS:
        index = len(records) + 1
        version, payload = Ledger.schema.encode_command(command)
        request_id = next_request[which]
        next_request[which] += 1
        records.append(encode_record(RecordType.COMMAND, version, index, 1, index * STEP_NS,
                                     SESSION_IDS[which], request_id,
                                     encode_command(request_id - 1, payload)))  # fmt: skip
        operations.append(Operation(
            client=f"c{which}", client_id=CLIENT_IDS[which], request_id=request_id,
            op=type(command).__name__, command=str(command), payload_hex=payload.hex(),
            version=version, invoke_ns=index * STEP_NS, complete_ns=index * STEP_NS + STEP_NS // 2,
            outcome="ok", index=index,
        ))  # fmt: skip
    processor: Processor[Ledger] = Processor(Ledger, None)
    processor.apply_records(b"".join(records))
    replies = {}
    for kind, frame in processor.drain_outputs():
        if kind == EgressKind.REPLY:
            _session, _request, index, _status, _version = REPLY_HEADER.unpack_from(frame, 0)
            replies[index] = frame[REPLY_HEADER.size :].hex()
    for op in operations:
        op.reply_status, op.reply_hex = "ok", replies[op.index or 0]
    return operations, records


def _renumbered(records: list[bytes]) -> list[bytes]:
    """The records with indexes 1, 2, ... in list order (after one was dropped or moved)."""
    result = []
    for index, raw in enumerate(records, 1):
        fields = list(decode_header(raw))
        fields[3] = index
        result.append(RECORD_HEADER.pack(*fields) + raw[RECORD_HEADER.size :])
    return result


def _only(report: Report, kind: str) -> list[Operation]:
    found = report.of_kind(kind)
    assert found, f"no {kind} violation in:\n{report}"
    return [op for violation in found for op in violation.operations]


def _names(operations: list[Operation]) -> set[tuple[int, int]]:
    return {(op.client_id, op.request_id) for op in operations}


def test_the_crafted_history_passes() -> None:
    operations, records = _crafted()
    report = check(operations, {"n1": records, "n2": list(records)})
    assert report.ok, str(report)


def test_an_acknowledged_command_dropped_from_the_journal_is_reported_lost() -> None:
    operations, records = _crafted()
    dropped = operations[4]  # alice -> bob 70, at index 7
    planted = _renumbered([raw for raw in records if decode_header(raw).index != dropped.index])
    report = check(operations, {"n1": planted})
    assert (dropped.client_id, dropped.request_id) in _names(_only(report, "lost"))


def test_a_command_applied_twice_is_reported_duplicated() -> None:
    # The client's session closes and, a day and more later (past the client expiry, so the
    # dedup table forgot it), it comes back and its request is sequenced again: applied twice.
    operations, records = _crafted()
    twice = operations[6]
    original = records[(twice.index or 0) - 1]
    last = len(records)
    later_ns = (last + 1) * STEP_NS + 2 * 24 * 3600 * 10**9
    header = decode_header(original)
    planted = [
        *records,
        encode_record(RecordType.SESSION_CLOSE, 1, last + 1, 1, (last + 1) * STEP_NS,
                      header.session_id, 0),
        # Another client's session opens: the log time passes the expiry, the table forgets.
        encode_record(RecordType.SESSION_OPEN, 1, last + 2, 1, later_ns, 8,
                      0, encode_session_open(999, "n1")),
        encode_record(RecordType.SESSION_OPEN, 1, last + 3, 1, later_ns, 9,
                      0, encode_session_open(twice.client_id, "n1")),
        RECORD_HEADER.pack(header.length, header.type, header.version, last + 4, 1, later_ns, 9,
                           header.request_id) + original[RECORD_HEADER.size :],
    ]  # fmt: skip
    report = check(operations, {"n1": planted})
    assert _names(_only(report, "duplicated")) == {(twice.client_id, twice.request_id)}
    assert report.of_kind("duplicated")[0].indexes == [twice.index, last + 4]


def test_an_order_against_real_time_is_reported_naming_both_operations() -> None:
    # Swap two records: the journal and the replies are consistent (the history is rebuilt from
    # the swapped log's indexes), but the later-invoked operation now has the lower index.
    operations, records = _crafted()
    first, second = operations[2], operations[3]  # two deposits, independent of each other
    first.index, second.index = second.index, first.index
    a, b = (first.index or 0) - 1, (second.index or 0) - 1
    records[a], records[b] = records[b], records[a]
    planted = _renumbered(records)
    first.reply_hex, second.reply_hex = second.reply_hex, first.reply_hex
    # The replies of deposits carry the mint's balance: take them from the swapped replay.
    report = check(operations, {"n1": planted})
    assert _names(_only(report, "real_time")) == {(first.client_id, first.request_id),
                                                  (second.client_id, second.request_id)}


def test_a_reply_that_differs_from_the_replay_is_reported() -> None:
    operations, records = _crafted()
    corrupted = operations[5]
    corrupted.reply_hex = (corrupted.reply_hex or "") + "00"
    report = check(operations, {"n1": records})
    assert _names(_only(report, "reply")) == {(corrupted.client_id, corrupted.request_id)}
    assert [violation.kind for violation in report.violations] == ["reply"]


def test_two_journals_that_differ_at_one_index_are_reported_divergent() -> None:
    operations, records = _crafted()
    other = list(records)
    index = operations[6].index or 0
    version, payload = Ledger.schema.encode_command(Transfer("alice", "bob", 6))
    header = decode_header(records[index - 1])
    other[index - 1] = encode_record(RecordType.COMMAND, version, index, 2, header.timestamp_ns,
                                     header.session_id, header.request_id,
                                     encode_command(header.request_id - 1, payload))  # fmt: skip
    report = check(operations, {"n1": records, "n2": other})
    divergent = report.of_kind("divergent")
    assert len(divergent) == 1 and divergent[0].indexes == [index], str(report)
    assert divergent[0].nodes == ["n1", "n2"]
    assert (operations[6].client_id, operations[6].request_id) in _names(divergent[0].operations)


class _LeakyLedger(Ledger):
    """A planted bug: a transfer of exactly 5 credits the target 6 (money from nowhere)."""

    def apply(self, ctx: Context, command: object) -> object:
        reply = super().apply(ctx, command)
        if isinstance(command, Transfer) and command.amount == 5:
            account: AccountState = self.accounts[command.target]
            account.balance += 1
        return reply


def test_money_that_is_not_conserved_is_reported_at_the_operation_that_broke_it() -> None:
    operations, records = _crafted()
    report = check(operations, {"n1": records}, app_class=_LeakyLedger)
    leaked = operations[6]
    assert _names(_only(report, "money")) == {(leaked.client_id, leaked.request_id)}
    assert report.of_kind("money")[0].indexes == [leaked.index]


def test_a_snapshot_whose_state_hash_differs_from_the_replay_is_reported() -> None:
    operations, records = _crafted()
    report = check(operations, {"n1": records}, {"n1": {5: bytes(16)}})
    assert report.of_kind("state_hash")[0].indexes == [5], str(report)


@pytest.mark.parametrize("outcome", ["ok", "fail", "info"])
def test_history_lines_round_trip(tmp_path: Path, outcome: str) -> None:
    operations, _records = _crafted()
    operations[0].outcome = outcome
    with HistoryWriter(tmp_path / "h.jsonl") as sink:
        sink.write(operations[0])
    assert read_history(tmp_path / "h.jsonl") == [operations[0]]
