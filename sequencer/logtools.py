"""The logic behind `seqd log dump`, `seqd log tail -f` and `seqd log check`.

The CLI only parses arguments and prints; everything else is here. All three only read: they
take no lock, so they work on the journal of a running node (they see complete, CRC-valid
batches only) as well as on a stopped one.

Records come out as plain dicts (JSON-ready): the header fields, the type by name, and the
payload decoded. The payloads the daemon defines (session open, timer fired, admin) are always
decoded; an app's command bytes go through the `decode` callable when one is given (built from
the app's msgspec schema) and are shown as hex otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from sequencer.journal import (
    SEGMENT_HEADER_BYTES,
    JournalCorruptError,
    JournalError,
    JournalReader,
    Record,
    SegmentScan,
    list_segments,
    scan_segment,
)
from sequencer.journal.scan import corrupt_before_a_valid_batch, segments_join
from sequencer.journal.truncate import INTENT_NAME, decode_intent
from sequencer.record import (
    RecordType,
    decode_admin,
    decode_command,
    decode_session_open,
)
from sequencer.timers import decode_timer_fired

__all__ = [
    "TAIL_POLL_INTERVAL_S_MAX",
    "TAIL_POLL_INTERVAL_S_MIN",
    "CheckReport",
    "CommandDecoder",
    "check",
    "dump",
    "last_index",
    "record_to_dict",
    "tail",
]

# `decode(version, command_bytes)` -> the app's command (a msgspec Struct or anything msgspec
# can turn into builtins). For an app schema: `lambda v, b: schema.decode_command(v, b, 0)`.
CommandDecoder = Callable[[int, memoryview], Any]

# `tail -f` polls: from MIN while records flow, doubling to at most MAX while idle. MAX bounds the
# delay before a new record shows (a person watching); MIN keeps an idle tail from costing more
# than a few wake-ups a second.
TAIL_POLL_INTERVAL_S_MIN = 0.01
TAIL_POLL_INTERVAL_S_MAX = 0.25
assert TAIL_POLL_INTERVAL_S_MIN <= TAIL_POLL_INTERVAL_S_MAX

_TYPE_NAMES = {int(t): t.name for t in RecordType}


def _type_number(value: int | str) -> int:
    if isinstance(value, str):
        try:
            return int(RecordType[value.upper()])
        except KeyError:
            raise ValueError(
                f"unknown record type {value!r}; one of {', '.join(t.name for t in RecordType)} "
                "or a number"
            ) from None
    return int(value)


def _payload(record: Record, decode: CommandDecoder | None) -> Any:
    payload = record.payload
    record_type = record.type
    try:
        if record_type == RecordType.COMMAND or record_type == RecordType.COMMAND_PART:
            acked_request_id, command = decode_command(payload)
            body: Any = (
                None  # a COMMAND_PART without a command: a request that became none
                if not len(command)
                else command.hex()
                if decode is None
                else msgspec.to_builtins(decode(record.version, command))
            )
            return {"acked_request_id": acked_request_id, "command": body}
        if record_type == RecordType.SESSION_OPEN:
            opened = decode_session_open(payload)
            return {"client_id": opened.client_id, "node": opened.node}
        if record_type == RecordType.TIMER_FIRED:
            timer_id, deadline_ns = decode_timer_fired(payload)
            return {"timer_id": timer_id, "deadline_ns": deadline_ns}
        if record_type == RecordType.ADMIN:
            return msgspec.to_builtins(decode_admin(payload))
    except Exception as error:  # a dump shows a bad payload; it does not stop on one
        return {"hex": payload.hex(), "error": f"{type(error).__name__}: {error}"}
    return payload.hex() if len(payload) else None


def record_to_dict(record: Record, decode: CommandDecoder | None = None) -> dict[str, Any]:
    """Header fields, the type by name (or number when unknown), and the decoded payload."""
    return {
        "index": record.index,
        "term": record.term,
        "timestamp_ns": record.timestamp_ns,
        "type": _TYPE_NAMES.get(record.type, record.type),
        "version": record.version,
        "session_id": record.session_id,
        "request_id": record.request_id,
        "length": record.length,
        "payload": _payload(record, decode),
    }


def _selected(
    records: Iterable[Record], types: frozenset[int] | None, session_id: int | None
) -> Iterator[Record]:
    for record in records:
        if types is not None and record.type not in types:
            continue
        if session_id is not None and record.session_id != session_id:
            continue
        yield record


def dump(
    directory: Path | str,
    from_index: int = 1,
    to_index: int | None = None,
    types: Iterable[int | str] | None = None,
    session_id: int | None = None,
    decode: CommandDecoder | None = None,
    note: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records `from_index`..`to_index` (or to the end) that match `types` (names or numbers) and
    `session_id`, as dicts.

    The end is the last complete, CRC-valid batch. Bad bytes after it at the end of the last
    segment are a write in progress on a running node (its journaller appends while this reads;
    the batch it is writing fails its CRC until the write lands), or on a stopped one a torn tail
    that the node's next start cuts: records that were never durable, hence never acknowledged.
    Either way the records stop there without an error (a dump of a running node under load hit
    the first case and failed); `note`, if given, is told the bad bytes' place. Bad bytes with a
    valid batch after them are neither: they are corruption, and raise.

    Raises:
        JournalCorruptError: damage in the middle of the log (after the records before it), in
            the last segment too when a valid batch follows the bad bytes.
        JournalError: `from_index` went with retention, or a segment was deleted while reading.
        ValueError: an unknown type name.
    """
    wanted = None if types is None else frozenset(_type_number(t) for t in types)
    directory = Path(directory)
    segments = list_segments(directory)
    if segments:
        from_index = max(from_index, segments[0][0])
    with JournalReader(directory, from_index) as reader:
        for record in _selected(reader.read(to_index), wanted, session_id):
            yield record_to_dict(record, decode)
        stopped_at = reader.stopped_at
        if stopped_at is not None:
            # A batch still being written has nothing valid after it (the journaller appends in
            # order); bad bytes with a valid batch after them are damage in the middle of the log,
            # which the node refuses to start with: an error, not a short dump (a script's export
            # would end early with no error). If the batch landed meanwhile it is not damage.
            if (error := corrupt_before_a_valid_batch(scan_segment(stopped_at.path).damage)) is not None:
                raise error
        if stopped_at is not None and note is not None:
            note(
                f"journal {directory} ends in bad bytes at {stopped_at.describe()}: a "
                "write in progress, or a torn tail that the next start of the node cuts (keeping "
                "a copy); the records above end before them. `seqd log check` tells which."
            )


def last_index(directory: Path | str) -> int:
    """The last index in the journal (0 when empty), found by reading its last segment."""
    segments = list_segments(directory)
    if not segments:
        return 0
    with JournalReader(directory, segments[-1][0]) as reader:
        for _ in reader.read():
            pass
        return reader.next_index - 1


def tail(
    directory: Path | str,
    follow: bool = True,
    last: int = 10,
    from_index: int | None = None,
    types: Iterable[int | str] | None = None,
    session_id: int | None = None,
    decode: CommandDecoder | None = None,
    stop: threading.Event | None = None,
    poll_interval_s_max: float = TAIL_POLL_INTERVAL_S_MAX,
) -> Iterator[dict[str, Any]]:
    """The last `last` records (or from `from_index`), then, with `follow`, each new record as it
    becomes readable, until `stop` is set (or the consumer closes the generator).

    Waits by polling (the journal has no doorbell for outside readers): from
    TAIL_POLL_INTERVAL_S_MIN while records flow, doubling up to `poll_interval_s_max` while idle.
    """
    assert TAIL_POLL_INTERVAL_S_MIN <= poll_interval_s_max <= TAIL_POLL_INTERVAL_S_MAX, (
        poll_interval_s_max
    )
    wanted = None if types is None else frozenset(_type_number(t) for t in types)
    directory = Path(directory)
    while True:  # the journal may not exist yet: wait for its first segment
        segments = list_segments(directory) if directory.is_dir() else []
        if segments:
            break
        if not follow or _wait(stop, poll_interval_s_max):
            return
    if from_index is None:
        from_index = max(segments[0][0], last_index(directory) - last + 1, 1)
    interval_s = TAIL_POLL_INTERVAL_S_MIN
    with JournalReader(directory, from_index) as reader:
        while True:
            before = reader.next_index
            for record in _selected(reader.read(), wanted, session_id):
                yield record_to_dict(record, decode)
            if not follow:
                return
            interval_s = (
                TAIL_POLL_INTERVAL_S_MIN
                if reader.next_index != before
                else min(interval_s * 2, poll_interval_s_max)
            )
            if _wait(stop, interval_s):
                return


def _wait(stop: threading.Event | None, seconds: float) -> bool:
    """Sleep up to `seconds`; True when told to stop."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


@dataclass
class CheckReport:
    """What `check` found. `ok`: every segment header and batch CRC verified, indexes gapless."""

    directory: Path
    ok: bool = True
    segments: int = 0
    batches: int = 0
    records: int = 0
    data_bytes: int = 0  # batch headers and records, excluding segment headers and zero tails
    first_index: int = 0
    last_index: int = 0
    problem: str | None = None
    damaged_path: Path | None = None
    damaged_offset: int | None = None
    # The damage is a torn tail (end of the last segment, nothing valid after it): the node's next
    # start cuts it, keeping a copy. Otherwise it refuses to start.
    torn_tail: bool = False
    broken_copies: list[Path] = field(default_factory=list)  # `.broken-*` kept by earlier repairs
    # Empty `.broken-*` files: no evidence of anything (an older seqd left them when the disk had
    # no room for the copy); safe to delete.
    empty_leftovers: list[Path] = field(default_factory=list)
    # A truncation interrupted after its commit point (journal/truncate.py): the index it keeps
    # up to. The node's next start finishes it before it reads a segment.
    truncation_pending: int | None = None

    def __str__(self) -> str:
        counts = (
            f"{self.segments} segment(s), {self.batches} batch(es), {self.records} record(s) "
            f"{self.first_index}..{self.last_index}, {self.data_bytes} bytes"
        )
        copies = (
            f"; {len(self.broken_copies)} .broken copy(ies) kept from earlier repairs"
            if self.broken_copies
            else ""
        )
        if self.empty_leftovers:
            copies += (
                f"; {len(self.empty_leftovers)} empty .broken file(s), not evidence of anything "
                "(left when the disk had no room for a copy): delete them"
            )
        if self.truncation_pending is not None:
            copies += (
                f"; an interrupted truncation after index {self.truncation_pending} is pending: "
                "the next start finishes it (and rewrites the bytes after the cut)"
            )
        if self.ok:
            return f"journal {self.directory}: ok, {counts}{copies}"
        verdict = (
            "torn tail: the next start cuts it and keeps a copy"
            if self.torn_tail
            else "corrupt: the node will refuse to start; restore the journal from a replica or a backup"
        )
        return (
            f"journal {self.directory}: DAMAGED at {self.damaged_path} byte offset {self.damaged_offset} "
            f"({verdict}): {self.problem}. Verified before it: {counts}{copies}"
        )


def check(directory: Path | str) -> CheckReport:
    """Verify every segment header, batch CRC and record of the journal; report the first damage.

    Read-only: repairs nothing (a node's start repairs a torn tail).
    """
    directory = Path(directory)
    report = CheckReport(directory)
    for path in sorted(directory.glob("*.broken-*")):
        empty = path.stat().st_size == 0
        (report.empty_leftovers if empty else report.broken_copies).append(path)
    intent_path = directory / INTENT_NAME
    if intent_path.exists():
        try:
            report.truncation_pending = decode_intent(intent_path.read_bytes(), str(intent_path)).index
        except JournalError as error:
            _damaged(report, intent_path, 0, str(error), torn=False)
            return report
    segments = list_segments(directory)
    report.segments = len(segments)
    previous: SegmentScan | None = None
    journal_id = b""
    for position, (_first, path) in enumerate(segments):
        is_last = position == len(segments) - 1
        try:
            scan = scan_segment(path, walk_records=True)
        except (JournalCorruptError, JournalError) as error:
            _damaged(report, path, 0, str(error), torn=False)
            return report
        if position == 0:
            report.first_index = scan.first_index
            journal_id = scan.journal_id
        elif scan.journal_id != journal_id:
            _damaged(
                report,
                path,
                0,
                f"segment belongs to another journal (id {scan.journal_id.hex()})",
                torn=False,
            )
            return report
        if previous is not None and not segments_join(previous, scan):
            _damaged(
                report, path, 0,
                f"starts at index {scan.first_index} (term before {scan.prev_term}) but "
                f"{previous.path.name} ends at index {previous.last_index} (term "
                f"{previous.last_term}): records are missing",
                torn=False,
            )  # fmt: skip
            return report
        report.batches += scan.batches
        report.records += scan.records
        report.data_bytes += scan.end_offset - SEGMENT_HEADER_BYTES
        report.last_index = scan.last_index
        if scan.damage is not None:
            torn = is_last and scan.damage.valid_batch_offset is None
            problem = scan.damage.reason
            if scan.damage.claimed_indexes:
                first, last = scan.damage.claimed_indexes
                problem += f" (the batch header claims records {first}..{last})"
            if scan.damage.valid_batch_offset is not None:
                problem += (
                    f"; a valid batch follows at byte offset {scan.damage.valid_batch_offset}"
                )
            _damaged(report, path, scan.damage.offset, problem, torn=torn)
            return report
        previous = scan
    return report


def _damaged(report: CheckReport, path: Path, offset: int, problem: str, torn: bool) -> None:
    report.ok = False
    report.damaged_path = path
    report.damaged_offset = offset
    report.problem = problem
    report.torn_tail = torn
