"""The history checker: clients' histories and every node's journal in, violations out.

    report = check(histories, {"n1": read_journal(dir1), "n2": read_journal(dir2)})
    assert report.ok, report          # each violation names its kind, indexes and operations

Theory of operation. A journal is a list of whole records from index 1 (`read_journal`; a test
may edit a copy). Each node's journal is replayed through a fresh `Processor` that emits every
reply (node None), one record at a time, so the checker knows for each record the reply the
state machine gives, whether it was a fresh application (the reply carries the record's own
index) or the answer to a resend (the saved reply, with the original index), the rolling hash,
and the state hash at any index asked for. Sessions map to client ids through the SESSION_OPEN
records, so a COMMAND is identified by (client id, request id), the identity a history records.

The checks (docs/cluster.md, "Checking a cluster's history"):
    lost          an ok operation's index does not hold its command on a journal that reaches it
                  (or no journal reaches it)
    duplicated    one (client id, request id) freshly applied at two indexes
    divergent     two journals hold different records at one index
    real_time     A completed before B was invoked, but A's index is above B's
    reply         an ok operation's reply (status, payload) differs from the replay's
    state_hash    a node's snapshot state hash differs from the replay at that index, or two
                  nodes' rolling hashes differ at one index
    clock         a record's timestamp is below the one before it
    money         (ledger) the balances do not sum to zero, or the money in circulation is not
                  the sum of the deposits applied
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sequencer.apps.ledger import MINT, Deposit, Ledger
from sequencer.egress import REPLY_HEADER, EgressKind, ReplyStatus
from sequencer.journal import read_records
from sequencer.processor import Processor
from sequencer.record import (
    COMMAND_PREFIX,
    FRAME_HEADER_BYTES,
    RECORD_HEADER_BYTES,
    RecordHeader,
    RecordType,
    decode_header,
    decode_session_open,
)
from sequencer.snapshot import list_snapshots, read_snapshot
from sequencer.state_machine import StateMachine

from .recorder import Operation, read_history

__all__ = [
    "VIOLATION_KINDS",
    "Report",
    "Violation",
    "check",
    "check_files",
    "read_journal",
    "read_snapshot_hashes",
]

VIOLATION_KINDS = (
    "lost", "duplicated", "divergent", "real_time", "reply", "state_hash", "clock", "money",
)  # fmt: skip
_REPLY = int(EgressKind.REPLY)
_STATUS_NAMES = {int(ReplyStatus.OK): "ok", int(ReplyStatus.REJECTED): "rejected",
                 int(ReplyStatus.DUPLICATE): "duplicate"}  # fmt: skip


@dataclass
class Violation:
    kind: str  # one of VIOLATION_KINDS
    message: str  # what is wrong, with both sides
    operations: list[Operation] = field(default_factory=list)  # the history's operations involved
    indexes: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.kind}: {self.message}"]
        lines += [f"    {operation.describe()}" for operation in self.operations]
        return "\n".join(lines)


@dataclass
class Report:
    violations: list[Violation]
    operations: dict[str, int]  # outcome -> count
    records: dict[str, int]  # node -> last index of its journal

    @property
    def ok(self) -> bool:
        return not self.violations

    def of_kind(self, kind: str) -> list[Violation]:
        assert kind in VIOLATION_KINDS, kind
        return [violation for violation in self.violations if violation.kind == kind]

    def __str__(self) -> str:
        head = (
            f"{len(self.violations)} violations; operations {self.operations}; journals "
            f"(last index) {self.records}"
        )
        return "\n".join([head, *(str(violation) for violation in self.violations)])


# -- inputs -------------------------------------------------------------------------------------


def read_journal(journal_dir: Path | str) -> list[bytes]:
    """Every record of a journal, as whole record bytes (padding included), from index 1."""
    return [bytes(record.raw) for record in read_records(journal_dir)]


def read_snapshot_hashes(snapshot_dir: Path | str) -> dict[int, bytes]:
    """index -> state hash of each valid snapshot a node wrote (what its blp computed live)."""
    hashes = {}
    for info in list_snapshots(snapshot_dir):
        if info.valid:
            header, _body = read_snapshot(info.path)
            hashes[header.index] = header.state_hash
    return hashes


def check_files(
    history_paths: Iterable[Path | str],
    journal_dirs: Mapping[str, Path | str],
    snapshot_dirs: Mapping[str, Path | str] | None = None,
    app_class: type[StateMachine] = Ledger,
) -> Report:
    """`check` on files: JSON-lines histories, node name -> journal (and snapshot) directory."""
    operations = [operation for path in history_paths for operation in read_history(path)]
    journals = {node: read_journal(path) for node, path in journal_dirs.items()}
    hashes = {node: read_snapshot_hashes(path) for node, path in (snapshot_dirs or {}).items()}
    return check(operations, journals, hashes, app_class)


# -- replay ---------------------------------------------------------------------------------------


@dataclass
class _Applied:
    """What the replay of one journal found, by index (list position = index - 1)."""

    headers: list[RecordHeader]
    commands: list[tuple[int, int, bytes] | None]  # (client id, request id, command bytes)
    replies: dict[int, tuple[str, bytes]]  # index of a fresh application -> (status, payload)
    applied_at: dict[tuple[int, int], list[int]]  # (client id, request id) -> fresh indexes
    rolling_hashes: list[int]
    state_hashes: dict[int, bytes]  # at the indexes asked for
    processor: Processor[Any]


def _replay(
    app_class: type[StateMachine], records: Sequence[bytes], hash_at: set[int],
    after_command: Any = None,
) -> _Applied:  # fmt: skip
    processor: Processor[Any] = Processor(app_class, None)
    clients: dict[int, int] = {}  # session id -> client id
    applied = _Applied([], [], {}, {}, [], {}, processor)
    for position, raw in enumerate(records):
        header = decode_header(raw)
        if header.index != position + 1:
            raise ValueError(
                f"journal record {position} has index {header.index}, expected {position + 1}: "
                "a journal must be whole records from index 1 (read_journal)"
            )
        payload = raw[RECORD_HEADER_BYTES : header.length]
        command = None
        if header.type == RecordType.SESSION_OPEN:
            clients[header.session_id] = decode_session_open(payload).client_id
        elif header.type == RecordType.COMMAND:
            client_id = clients.get(header.session_id, 0)
            command = (client_id, header.request_id, payload[COMMAND_PREFIX.size :])
        applied.headers.append(header)
        applied.commands.append(command)
        processor.apply_frame(header.type | header.version << 16,
                              memoryview(raw)[FRAME_HEADER_BYTES : header.length])  # fmt: skip
        processor.snapshot_requested = False  # a replay writes no snapshots
        for kind, frame in processor.drain_outputs():
            if kind != _REPLY:
                continue
            _session, request_id, index, status, _version = REPLY_HEADER.unpack_from(frame, 0)
            if index == header.index and command is not None:  # fresh, not a resend's answer
                applied.replies[index] = (_STATUS_NAMES.get(status, str(status)),
                                          frame[REPLY_HEADER.size :])  # fmt: skip
                applied.applied_at.setdefault((command[0], request_id), []).append(index)
        applied.rolling_hashes.append(processor.rolling_hash)
        if header.index in hash_at:
            applied.state_hashes[header.index] = processor.state_hash()
        if after_command is not None and command is not None:
            after_command(processor, header.index)
    return applied


# -- the checks -------------------------------------------------------------------------------------


def check(
    operations: Iterable[Operation],
    journals: Mapping[str, Sequence[bytes]],
    snapshot_hashes: Mapping[str, Mapping[int, bytes]] | None = None,
    app_class: type[StateMachine] = Ledger,
) -> Report:
    """Checks the histories against every node's journal; see the module docstring.

    Args:
        operations: every client's operations (any order).
        journals: node name -> its journal's records from index 1 (`read_journal`).
        snapshot_hashes: node name -> index -> the state hash of a snapshot it wrote.
        app_class: the state machine the journals were written for.

    Raises:
        ValueError: no journal, or a journal that is not whole records from index 1.
    """
    if not journals:
        raise ValueError("no journals to check: pass at least one node's journal")
    operations = list(operations)
    snapshot_hashes = snapshot_hashes or {}
    replays = {
        node: _replay(app_class, records, set(snapshot_hashes.get(node, {})))
        for node, records in journals.items()
    }
    violations: list[Violation] = []
    by_identity = {(op.client_id, op.request_id): op for op in operations if op.request_id}
    by_index: dict[int, list[Operation]] = {}
    for op in operations:
        if op.outcome == "ok" and op.index is not None:
            by_index.setdefault(op.index, []).append(op)

    def involved(index: int, applied: _Applied) -> list[Operation]:
        command = applied.commands[index - 1] if index <= len(applied.commands) else None
        found = by_identity.get(command[:2]) if command is not None else None
        return [found] if found is not None else []

    longest = max(replays, key=lambda node: len(replays[node].headers))
    acknowledged = [op for op in operations if op.outcome == "ok"]
    for op in acknowledged:
        violations += _check_acknowledged(op, replays, longest)
    for node, applied in replays.items():
        for identity, indexes in applied.applied_at.items():
            if len(indexes) > 1:
                sent = by_identity.get(identity)
                violations.append(Violation(
                    "duplicated",
                    f"client {identity[0]} request {identity[1]} was applied at indexes "
                    f"{indexes} of {node}'s journal: a command must apply once",
                    [sent] if sent is not None else [], indexes, [node],
                ))  # fmt: skip
        violations += _check_clock(node, applied, involved)
        violations += _check_snapshots(node, applied, snapshot_hashes.get(node, {}))
        violations += _check_money(node, applied, journals[node], app_class, involved)
    violations += _check_divergence(journals, replays, involved)
    violations += _check_real_time(acknowledged)
    outcomes = {outcome: 0 for outcome in ("ok", "fail", "info")}
    for op in operations:
        outcomes[op.outcome] += 1
    return Report(violations, outcomes, {node: len(a.headers) for node, a in replays.items()})


def _check_acknowledged(op: Operation, replays: Mapping[str, _Applied], longest: str) -> list[Violation]:
    """An ok operation is at its index on every journal that reaches it, with the reply the
    client got; and the longest journal reaches it."""
    assert op.index is not None, op
    violations = []
    identity = (op.client_id, op.request_id)
    for node, applied in replays.items():
        if op.index > len(applied.headers):
            if node == longest:
                violations.append(Violation(
                    "lost",
                    f"acknowledged at index {op.index}, but the longest journal ({node}) ends at "
                    f"{len(applied.headers)}",
                    [op], [op.index], [node],
                ))  # fmt: skip
            continue
        command = applied.commands[op.index - 1]
        if command is None or command[:2] != identity or command[2].hex() != op.payload_hex:
            elsewhere = applied.applied_at.get(identity, [])
            violations.append(Violation(
                "lost",
                f"acknowledged at index {op.index}, but {node}'s record there is "
                f"{_describe_record(applied, op.index)}; this command is applied on {node} at "
                f"{elsewhere or 'no index'}",
                [op], [op.index, *elsewhere], [node],
            ))  # fmt: skip
            continue
        replayed = applied.replies.get(op.index)
        told = (op.reply_status, op.reply_hex)
        if replayed is None or (replayed[0], replayed[1].hex()) != told:
            shown = "no reply" if replayed is None else f"{replayed[0]} {replayed[1].hex()}"
            violations.append(Violation(
                "reply",
                f"the client was told {op.reply_status} {op.reply_hex} at index {op.index}; the "
                f"replay of {node}'s journal gives {shown}",
                [op], [op.index], [node],
            ))  # fmt: skip
    return violations


def _describe_record(applied: _Applied, index: int) -> str:
    header = applied.headers[index - 1]
    command = applied.commands[index - 1]
    name = RecordType(header.type).name if header.type in RecordType._value2member_map_ else header.type
    if command is None:
        return f"a {name} record"
    return f"client {command[0]} request {command[1]}'s command {command[2].hex()}"


def _check_divergence(
    journals: Mapping[str, Sequence[bytes]], replays: Mapping[str, _Applied], involved: Any
) -> list[Violation]:
    """Two journals must hold the same record at every index both have; the first difference
    between each pair is reported (everything after it follows from it)."""
    violations = []
    nodes = sorted(replays)
    for position, first in enumerate(nodes):
        for second in nodes[position + 1 :]:
            a, b = replays[first], replays[second]
            for offset in range(min(len(a.headers), len(b.headers))):
                if journals[first][offset] != journals[second][offset]:
                    index = offset + 1
                    violations.append(Violation(
                        "divergent",
                        f"index {index} holds {_describe_record(a, index)} "
                        f"(term {a.headers[offset].term}) on {first} but "
                        f"{_describe_record(b, index)} (term {b.headers[offset].term}) on {second}",
                        involved(index, a) + involved(index, b), [index], [first, second],
                    ))  # fmt: skip
                    break
                if a.rolling_hashes[offset] != b.rolling_hashes[offset]:
                    index = offset + 1
                    violations.append(Violation(
                        "state_hash",
                        f"the same records up to index {index} replay to rolling hashes "
                        f"{a.rolling_hashes[offset]:#x} ({first}) and "
                        f"{b.rolling_hashes[offset]:#x} ({second}): the replay is not deterministic",
                        involved(index, a), [index], [first, second],
                    ))  # fmt: skip
                    break
    return violations


def _check_real_time(acknowledged: list[Operation]) -> list[Violation]:
    """If A completed before B was invoked, A's index is below B's (linearizability of the log
    order). One sweep: operations by invoke time, with the highest index among those completed
    before each; a violation names B and the completed A with the highest index."""
    timed = [op for op in acknowledged if op.complete_ns is not None and op.index is not None]
    by_completion = sorted(timed, key=lambda op: op.complete_ns or 0)
    highest: Operation | None = None
    completed = 0
    violations = []
    for later in sorted(timed, key=lambda op: op.invoke_ns):
        while completed < len(by_completion) and (by_completion[completed].complete_ns or 0) < later.invoke_ns:
            candidate = by_completion[completed]
            if highest is None or (candidate.index or 0) > (highest.index or 0):
                highest = candidate
            completed += 1
        if highest is not None and (highest.index or 0) >= (later.index or 0) and highest is not later:
            if (highest.client_id, highest.request_id) == (later.client_id, later.request_id):
                continue  # one request recorded twice (a resend's answer): same index, no order
            violations.append(Violation(
                "real_time",
                f"the first completed (at {highest.complete_ns} ns) before the second was invoked "
                f"(at {later.invoke_ns} ns), yet its index {highest.index} is not below "
                f"{later.index}",
                [highest, later], [highest.index or 0, later.index or 0],
            ))  # fmt: skip
    return violations


def _check_clock(node: str, applied: _Applied, involved: Any) -> list[Violation]:
    """Log time never goes backwards (a leader's clock may; its timestamps must not)."""
    violations = []
    for before, after in zip(applied.headers, applied.headers[1:], strict=False):
        if after.timestamp_ns < before.timestamp_ns:
            violations.append(Violation(
                "clock",
                f"index {after.index} on {node} is stamped {after.timestamp_ns} ns, below index "
                f"{before.index}'s {before.timestamp_ns} ns",
                involved(after.index, applied), [before.index, after.index], [node],
            ))  # fmt: skip
    return violations


def _check_snapshots(node: str, applied: _Applied, hashes: Mapping[int, bytes]) -> list[Violation]:
    violations = []
    for index, snapshot_hash in sorted(hashes.items()):
        replayed = applied.state_hashes.get(index)
        if replayed is None:
            violations.append(Violation(
                "state_hash",
                f"{node} has a snapshot at index {index} but its journal ends at "
                f"{len(applied.headers)}", [], [index], [node],
            ))  # fmt: skip
        elif replayed != snapshot_hash:
            violations.append(Violation(
                "state_hash",
                f"{node}'s snapshot at index {index} has state hash {snapshot_hash.hex()}; the "
                f"replay of its journal gives {replayed.hex()} there",
                [], [index], [node],
            ))  # fmt: skip
    return violations


def _check_money(
    node: str, applied: _Applied, records: Sequence[bytes], app_class: type[StateMachine],
    involved: Any,
) -> list[Violation]:  # fmt: skip
    """Ledger only: the balances sum to zero (every movement has two sides) and the money in
    circulation (-mint) is the sum of the deposits applied. When either fails, a second replay
    finds the first command after which it fails and names it."""
    app = applied.processor.app
    if not isinstance(app, Ledger):
        return []
    deposited = _deposited(applied)
    total = sum(account.balance for account in app.accounts.values())
    circulating = -app.accounts[MINT].balance
    if total == 0 and circulating == deposited:
        return []
    first: list[int] = []

    def conserved(processor: Processor[Any], index: int) -> None:
        ledger = processor.app
        if first or sum(account.balance for account in ledger.accounts.values()) == 0:
            return
        first.append(index)

    _replay(app_class, records, set(), conserved)
    at = first[0] if first else len(records)
    return [Violation(
        "money",
        f"on {node} the balances sum to {total} (must be 0) and {circulating} is in circulation "
        f"against {deposited} deposited; the sum first breaks at index {at}",
        involved(at, applied), [at], [node],
    )]  # fmt: skip


def _deposited(applied: _Applied) -> int:
    """The amounts of the Deposit commands the replay applied with an ok reply."""
    schema = Ledger.schema
    total = 0
    for index, (status, _payload) in applied.replies.items():
        command = applied.commands[index - 1]
        header = applied.headers[index - 1]
        if status != "ok" or command is None:
            continue
        decoded = schema.decode_command(header.version, bytes(command[2]), index)
        if isinstance(decoded, Deposit):
            total += decoded.amount
    return total


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sequencer.history.checker --history H... --journal NODE=DIR...`: prints the report
    (JSON with --json); exit status 1 when there is a violation."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", action="append", default=[], help="a JSON-lines history")
    parser.add_argument("--journal", action="append", default=[], help="NODE=JOURNAL_DIR")
    parser.add_argument("--snapshots", action="append", default=[], help="NODE=SNAPSHOT_DIR")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    def pairs(values: list[str]) -> dict[str, str]:
        for value in values:
            if "=" not in value:
                parser.error(f"{value!r} is not NODE=DIR")
        return dict(value.split("=", 1) for value in values)

    report = check_files(args.history, pairs(args.journal), pairs(args.snapshots))
    if args.json:
        print(json.dumps({"violations": [{"kind": v.kind, "message": v.message,
                                          "indexes": v.indexes, "nodes": v.nodes,
                                          "operations": [op.describe() for op in v.operations]}
                                         for v in report.violations],
                          "operations": report.operations, "records": report.records}))  # fmt: skip
    else:
        print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
