"""Following the committed log from the journal: the core of query replicas and subscriptions.

A `LogFollower` is a `Processor` fed from the journal instead of the log ring: `follow(to_index)`
applies the next committed records (never past `to_index`, the commit index the caller read)
and returns each with the events its application published (`FollowedRecord`). Events are
outputs of the state machine, not records, so the only way to know the events of index i is to
apply the log up to i from a state at or before it: `start_follower(..., index)` restores the
newest valid snapshot at or before `index - 1` (or starts from an empty state when the journal
still holds record 1), replays silently up to `index - 1` (the recovery fast path), and returns
a follower whose next record is `index`. `oldest_servable_index` says how far back that can go
once retention has deleted the first segments.

A follower reads only files (the journal's segments, which a reader may follow while they are
written: only complete, CRC-valid batches are returned) and never the shared memory of the
pipeline, so it can never hold the sequencer or the blp back, whatever it does with its time.

Queries (`run_query`) call an app's `@query` handler on a follower's state between two records.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec

from sequencer import snapshot as snapshots
from sequencer.egress import EVENT_HEADER, EgressKind
from sequencer.journal import JournalReader, list_segments
from sequencer.processor import CLIENT_EXPIRY_NS_DEFAULT, Processor
from sequencer.record import FRAME_HEADER_BYTES, RECORD_HEADER, walk_records
from sequencer.recovery import replay, restore
from sequencer.snapshot import LoadedSnapshot
from sequencer.state_machine import Rejected, StateMachine

__all__ = [
    "FOLLOW_RECORDS_MAX",
    "BelowRetention",
    "FollowedRecord",
    "LogFollower",
    "QueryFailure",
    "oldest_servable_index",
    "run_query",
    "start_follower",
]

# Records one `follow` call applies: about 10 ms of a transfer-heavy ledger at ~3 us a record, so
# a caller that serves sockets between calls stays responsive while it catches up.
FOLLOW_RECORDS_MAX: Final = 4096
# The node name a follower's processor is given: no session is opened on it, so it builds no
# reply frames for anyone (a replica answers queries, never commands).
_NO_NODE: Final = "\0follower"
_EVENT: Final = int(EgressKind.EVENT)
_EVENT_OMITTED: Final = int(EgressKind.EVENT_OMITTED)
_unpack_header = RECORD_HEADER.unpack_from
_EVENT_PREFIX_BYTES: Final = EVENT_HEADER.size  # the egress EVENT header: index, version
_unpack_event = EVENT_HEADER.unpack_from


class FollowedRecord(NamedTuple):
    """One committed record as a follower applied it."""

    index: int  # type: ignore[assignment]  # shadows tuple.index: the log word wins
    timestamp_ns: int
    record_type: int
    version: int
    record: bytes  # the whole record, header included (its `length` bytes, no padding)
    # (EgressKind.EVENT or EVENT_OMITTED, version, payload) per event, in publication order
    events: list[tuple[int, int, bytes]]


class BelowRetention(Exception):
    """The log from the asked index can no longer be rebuilt: the journal's first segments went
    with retention and no snapshot kept is old enough."""

    def __init__(self, index: int, oldest: int) -> None:
        super().__init__(
            f"index {index} is below what retention kept: the oldest index that can be served is "
            f"{oldest} (the oldest snapshot kept, plus one). Start again from a snapshot: rebuild "
            f"what you derive from the log from a state at or after index {oldest - 1} (or keep "
            "more snapshots and journal: snapshot.keep, snapshot.delete_journal)"
        )
        self.index = index
        self.oldest = oldest


class QueryFailure(Exception):
    """A query could not be answered: `code` (unknown_query, bad_query_args, query_failed, or the
    app's Rejected code) and a message saying what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LogFollower:
    """A processor fed from the journal (see the module docstring).

    Invariant: `processor.applied_index` is the last record applied, and the reader's next
    record is the one after it.
    """

    def __init__(self, processor: Processor[Any], journal_dir: Path | str) -> None:
        self.processor = processor
        self.journal_dir = Path(journal_dir)
        self.reader = JournalReader(journal_dir, processor.applied_index + 1)

    @property
    def applied_index(self) -> int:
        return self.processor.applied_index

    def close(self) -> None:
        self.reader.close()

    def follow(self, to_index: int, records_max: int = FOLLOW_RECORDS_MAX) -> list[FollowedRecord]:
        """Apply the records after `applied_index` up to `to_index` (at most `records_max`, and
        only those the journal holds complete now); each with the events it published.

        Raises:
            JournalError: the records went with retention (or their segment was deleted while
                being read); JournalCorruptError for damage in the middle of the log.
        """
        processor = self.processor
        last = min(to_index, processor.applied_index + records_max)
        followed: list[FollowedRecord] = []
        if last <= processor.applied_index:
            return followed
        apply = processor.apply_frame
        append = followed.append
        for run in self._runs(last):
            first = len(followed)
            for (length, record_type, version, index, _term, timestamp_ns, _session, _request), start, _end in walk_records(run, RECORD_HEADER):
                apply(record_type | version << 16, run, start + FRAME_HEADER_BYTES, start + length)
                processor.snapshot_requested = False  # a follower writes no snapshots
                append(FollowedRecord(index, timestamp_ns, record_type, version,
                                      bytes(run[start : start + length]), []))  # fmt: skip
            # One drain per batch: an event frame starts with its record's index, and the
            # indexes of a batch are consecutive, so each event finds its record by arithmetic.
            base = followed[first].index - first if first < len(followed) else 0
            for kind, frame in processor.drain_outputs():
                if kind == _EVENT or kind == _EVENT_OMITTED:
                    event_index, event_version = _unpack_event(frame)
                    followed[event_index - base].events.append(
                        (kind, event_version, frame[_EVENT_PREFIX_BYTES:])
                    )
        assert processor.applied_index <= to_index, (processor.applied_index, to_index)
        return followed

    def advance(
        self,
        to_index: int,
        records_max: int = FOLLOW_RECORDS_MAX,
        on_snapshot: Callable[[Processor[Any]], object] | None = None,
    ) -> int:
        """`follow` without keeping anything: apply the next committed records up to `to_index`
        (at most `records_max`) on the recovery fast path, outputs discarded; returns how many.
        `on_snapshot(processor)` is called right after each SNAPSHOT record, with the state of
        that record's index (the snapshotter, daemon/roles/snapshotter.py, writes it).

        Raises:
            As `follow`.
        """
        processor = self.processor
        last = min(to_index, processor.applied_index + records_max)
        applied = 0
        for run in self._runs(last):
            applied += processor.replay_run(run, None, on_snapshot)
        assert processor.applied_index <= to_index, (processor.applied_index, to_index)
        return applied

    def _runs(self, last: int) -> Iterator[memoryview]:
        """The journal's runs of complete records after `applied_index` up to `last`."""
        processor = self.processor
        if last <= processor.applied_index:
            return iter(())
        reader = self.reader
        if reader.next_index != processor.applied_index + 1 or reader.on_deleted_segment():
            reader.seek(processor.applied_index + 1)
        return reader.read_runs(last)


def oldest_servable_index(journal_dir: Path | str, snapshot_dir: Path | str) -> int:
    """The lowest index a follower can start at: 1 while the journal holds record 1, else the
    oldest valid snapshot whose next record the journal holds, plus one (0: none can)."""
    segments = list_segments(journal_dir)
    first_index = segments[0][0] if segments else 1
    if first_index <= 1:
        return 1
    usable = [
        info.index for info in snapshots.list_snapshots(snapshot_dir)
        if info.valid and info.index >= first_index - 1
    ]  # fmt: skip
    return min(usable) + 1 if usable else 0


def start_follower(
    app_class: type[StateMachine],
    journal_dir: Path | str,
    snapshot_dir: Path | str,
    index: int,
    *,
    client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
    yield_every: Callable[[], object] | None = None,
) -> LogFollower:
    """A follower whose next record is `index` (>= 1): the newest valid snapshot at or before
    `index - 1` that the journal continues, or an empty state, then a silent replay to
    `index - 1` (the caller must know that `index - 1` is committed).

    Args:
        yield_every: called after each journal batch of the silent replay (a caller serving
            sockets in the same thread; unused by a synchronous caller).

    Raises:
        BelowRetention: no starting point at or before `index - 1` is left.
        JournalError, ProcessorError, VersionError: as `recovery.recover`.
    """
    assert index >= 1, index
    segments = list_segments(journal_dir)
    first_index = segments[0][0] if segments else 1
    found: LoadedSnapshot | None = None
    if first_index > 1 or index > 1:
        for info in snapshots.list_snapshots(snapshot_dir):  # newest first
            if info.valid and first_index - 1 <= info.index <= index - 1:
                header, body = snapshots.read_snapshot(info.path)
                found = LoadedSnapshot(info.path, header, body, [])
                break
    if found is None and first_index > 1:
        raise BelowRetention(index, oldest_servable_index(journal_dir, snapshot_dir))
    processor = restore(app_class, found, node=_NO_NODE, client_expiry_ns=client_expiry_ns)
    replay(processor, journal_dir, index - 1,
           progress=None if yield_every is None else (lambda _count: yield_every()))  # fmt: skip
    processor.drain_outputs()
    return LogFollower(processor, journal_dir)


# Each handler's signature (self included), computed once: inspect.signature costs ~20 us, more
# than many queries. Bounded by the query handlers of the apps loaded (one, in a replica).
_SIGNATURES: dict[tuple[type, str], inspect.Signature] = {}


def _signature(app_class: type, method_name: str) -> inspect.Signature:
    key = (app_class, method_name)
    signature = _SIGNATURES.get(key)
    if signature is None:
        signature = _SIGNATURES[key] = inspect.signature(getattr(app_class, method_name))
    return signature


_ENCODER: Final = msgspec.msgpack.Encoder()


def run_query(app: StateMachine, handlers: dict[str, str], name: str, args: dict[str, Any]) -> bytes:
    """The msgpack of `app`'s query `name` called with `args`.

    Raises:
        QueryFailure: no such query, arguments it does not take, the app's `Rejected`, or an
            exception in the handler (a bug in the app: the message names it).
    """
    method_name = handlers.get(name)
    if method_name is None:
        raise QueryFailure(
            "unknown_query",
            f"{type(app).__name__} has no query {name!r}; its queries are {sorted(handlers)} "
            "(declared with @query, docs/state-machine.md)",
        )
    method = getattr(app, method_name)
    signature = _signature(type(app), method_name)
    try:
        signature.bind(None, **args)
    except TypeError as error:
        raise QueryFailure(
            "bad_query_args",
            f"query {name!r} does not take the arguments {sorted(args)}: {error}; its signature "
            f"is {method_name}{inspect.signature(method)}",
        ) from None
    try:
        result = method(**args)
    except Rejected as rejected:
        raise QueryFailure(rejected.code, rejected.message) from None
    except Exception as error:
        raise QueryFailure(
            "query_failed",
            f"query {name!r} raised {type(error).__name__}: {error} (a bug in "
            f"{type(app).__name__}.{method_name}; the state is unchanged)",
        ) from None
    try:
        return _ENCODER.encode(result)
    except (TypeError, msgspec.EncodeError) as error:
        raise QueryFailure(
            "query_failed",
            f"query {name!r} returned a {type(result).__name__} that msgpack cannot carry: {error}",
        ) from None
