"""The business-logic processor's core: records in, state and outputs out (sans-I/O).

Theory of operation. The blp role reads committed records from the log ring and hands each to
`apply_frame(frame_type, view)`; this module decodes it, keeps the bookkeeping the daemon owes
every app (sessions, the per-client dedup table, timers), calls the app, and queues the outputs
(replies, events, timer requests) that the role drains to the egress ring. It touches no clock,
socket or file: time enters as the records' timestamps, so a replay of the same records in
another process computes the same state and the same outputs, bit for bit.

Exactly-once (`sequencer.dedup`, `ClientTable`). Per client id the last applied request id and
the unacknowledged replies are kept; a resend gets the saved reply (or DUPLICATE once it was
acknowledged and pruned) and is never applied twice. The table is part of the state. A COMMAND
is checked against it inline here (the hot path); sessions and client expiry are the table's.

Replicas. Every node applies every record and computes every output, but emits replies only to
sessions attached to itself: those whose id carries its node number (`emit_for`; without it,
those opened under its name `node`). Events and timer requests go out on every node, events only
while `emit_events` (the blp clears it while no session on its node subscribes). The rolling
hash covers every output before that routing: it changes what a node emits, never the hash.

Duplicates (cluster mode). A record may reach the log twice (a follower resends what it
forwarded when the leader changes); every type is idempotent, so the second copy changes nothing
(`sequencer.dedup`, "Every record is idempotent"). Second copies are counted in
`duplicate_records`; a COMMAND's is answered with its saved reply, like any resend. What a
SESSION_OPEN and a node_start do is the log's active session rules version's (an ADMIN
rules_version record switches it at one index on every replica: sequencer/rules_versions.py).

Timers (`sequencer.timers`, `PendingTimers`). `ctx.schedule` records (timer_id -> deadline_ns)
in the state and emits TIMER_SCHEDULE; the sequencer keeps the wall-clock schedule and sequences TIMER_FIRED(timer_id, deadline_ns) when
it passes. The fire runs `on_timer` only if that timer is still scheduled with exactly that
deadline, so a fire that raced a cancel or a reschedule is ignored the same way on every replica.
After recovery `pending_timers()` re-emits every pending timer; one whose deadline passed while
the node was down fires once, as soon as the sequencer sees it.

Snapshots. A SNAPSHOT record sets `snapshot_requested`; the role must fork the snapshot writer
(`snapshot_file_contents` runs in the child) before the next `apply_frame`, then clear the flag:
the state at the fork is the state at the SNAPSHOT record's index on every replica. The body's
layout, encoding and restore checks are `sequencer.processor_state`'s.

Outputs too large to frame. A reply or event payload a client frame cannot carry is replaced
here, where every replica decides the same from protocol constants (see `sequencer.egress`): a
reply by a REJECTED `reply_too_large` (saved in the dedup table like any reply, so a resend gets
it too; the command's effects stay applied), an event by an EVENT_OMITTED marker.

Migrated requests. A copy-and-transform of the journal can turn one client request into zero or
several COMMAND_PART records, applied as that one request: `sequencer.command_parts`.

Failure. `Rejected` from the app is a reply. Any other exception is a bug in the app: it
propagates and crashes the blp; the supervisor restarts from snapshot + journal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import crc32c

from sequencer.app_versions import AppVersions
from sequencer.client.protocol import encode_rejection
from sequencer.command_parts import PartVerdict, command_part_verdict
from sequencer.dedup import (
    CLIENT_EXPIRY_NS_DEFAULT,
    SAVED_REPLIES_MAX,
    ClientTable,
    SessionEntry,
)
from sequencer.determinism import guard, rolling_hash_update, state_hash
from sequencer.egress import (
    EVENT_HEADER,
    EVENT_PAYLOAD_BYTES_MAX,
    REPLY_HEADER,
    REPLY_PAYLOAD_BYTES_MAX,
    EgressKind,
    ReplyStatus,
    encode_event_omitted,
    reply_too_large_payload,
    undecodable_payload,
)
from sequencer.processor_state import (
    PROCESSOR_STATE_VERSION,
    ClientState,
    ProcessorError,
    ProcessorState,
    SavedReply,
    SessionState,
    decode_state,
    encode_state,
    restore_table,
)
from sequencer.record import (
    ADMIN_NODE_START,
    ADMIN_RAISE_VERSION,
    ADMIN_RULES_VERSION,
    COMMAND_HEAD,
    COMMAND_PREFIX,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    RECORD_TAIL,
    RecordType,
    decode_admin,
    decode_session_open,
    iter_records,
    walk_records,
)
from sequencer.rules_versions import RULES_VERSION, RulesVersions
from sequencer.snapshot_format import SnapshotHeader
from sequencer.state_machine import Context, Rejected, StateMachine
from sequencer.timers import TIMER_FIRED_PAYLOAD, PendingTimers, encode_timer_cancel

__all__ = [
    "CLIENT_EXPIRY_NS_DEFAULT",
    "PROCESSOR_STATE_VERSION",
    "SAVED_REPLIES_MAX",
    "ClientState",
    "Processor",
    "ProcessorError",
    "ProcessorState",
    "SavedReply",
    "SessionState",
]

_COMMAND: Final = int(RecordType.COMMAND)
_SESSION_OPEN: Final = int(RecordType.SESSION_OPEN)
_SESSION_CLOSE: Final = int(RecordType.SESSION_CLOSE)
_TIMER_FIRED: Final = int(RecordType.TIMER_FIRED)
_SNAPSHOT: Final = int(RecordType.SNAPSHOT)
_TERM_START: Final = int(RecordType.TERM_START)
_ADMIN: Final = int(RecordType.ADMIN)
_COMMAND_PART: Final = int(RecordType.COMMAND_PART)
_OK: Final = int(ReplyStatus.OK)
_REJECTED: Final = int(ReplyStatus.REJECTED)
_DUPLICATE: Final = int(ReplyStatus.DUPLICATE)
_REPLY: Final = int(EgressKind.REPLY)
_EVENT: Final = int(EgressKind.EVENT)
_TIMER_SCHEDULE: Final = int(EgressKind.TIMER_SCHEDULE)
_TIMER_CANCEL: Final = int(EgressKind.TIMER_CANCEL)
_EVENT_OMITTED: Final = int(EgressKind.EVENT_OMITTED)
_PAYLOAD_OFFSET: Final = RECORD_TAIL.size  # payload offset in a view that starts after the frame header
_COMMAND_OFFSET: Final = _PAYLOAD_OFFSET + COMMAND_PREFIX.size
_unpack_tail: Final = RECORD_TAIL.unpack_from
_unpack_prefix: Final = COMMAND_PREFIX.unpack_from
_unpack_head: Final = COMMAND_HEAD.unpack_from
_pack_reply: Final = REPLY_HEADER.pack
_pack_event: Final = EVENT_HEADER.pack
# The rolling hash: determinism.rolling_hash_update, bound here to spare a call per output.
_crc32c: Final = crc32c.crc32c
assert rolling_hash_update(1, b"x") == _crc32c(b"x", 1)
# CRC-32C continues over concatenated bytes: folding a + b in one call is folding a, then b. A
# record's events and timer requests are folded with its reply in one call (`_unhashed`): a call
# costs ~700 instructions, ~470 of them parsing its arguments, against ~150 for the join. (A
# rejected command's app emitted nothing: `_rejection`.)
assert _crc32c(b"y", _crc32c(b"x", 1)) == _crc32c(b"xy", 1)
# Past this, a record's outputs not yet hashed are folded in at once (`_fold_unhashed`).
UNHASHED_BYTES_MAX: Final = 16 << 10


App = TypeVar("App", bound=StateMachine)
_Result = TypeVar("_Result")


class Processor(Generic[App]):
    """Applies records to one app instance; see the module docstring.

    Args:
        app_class: the StateMachine subclass (with its `schema`).
        node: this node's name; replies are emitted only for sessions opened on it. None emits
            every reply (single node, tests, replays).
        debug: run every call into the app under `determinism.guard()` (clock and random
            sources raise). Slower; for development and `seqd verify`.
        app: an existing app instance (restore); default `app_class()`.
        rules_version: the newest session rules this code applies (sequencer/rules_versions.py;
            a test stands in for an older build with a lower one).

    Invariants (between calls):
        applied_index is the index of the last applied record (0 before the first);
        every timer in the table is pending: scheduled and neither fired nor cancelled.
    """

    # Slots keep every attribute load of the hot path a specialised one however many attributes
    # there are: a plain instance past 30 attributes loses CPython's shared-key dict, and with it
    # ~3% of a transfer (benches/processor.py, measured when the 31st was added).
    __slots__ = (
        "_app_apply", "_app_on_session_close", "_app_on_session_open", "_app_on_timer", "_context", "_copy_commands",
        "_decode_command", "_decode_current_command", "_encode", "_encode_event", "_encode_reply", "_event_types", "_handlers",
        "_output_version",
        "_outputs", "_sessions", "_table", "_timers", "_unhashed", "_version", "app", "app_class", "applied_index", "applied_term",
        "command_parts_skipped", "commands_without_session", "debug", "duplicate_records", "emit_events",
        "events_too_large", "last_timestamp_ns", "node", "replies_too_large", "rolling_hash", "schema",
        "snapshot_requested", "stale_timer_fires", "timer_fired_notices", "unknown_admin_ops",
    )  # fmt: skip

    def __init__(
        self,
        app_class: type[App],
        node: str | None = None,
        *,
        debug: bool = False,
        app: App | None = None,
        client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
        rules_version: int = RULES_VERSION,
    ) -> None:
        self.app_class = app_class
        self.schema = app_class.schema
        self.app: App = app if app is not None else app_class()
        self.node = node
        self.debug = debug
        self.applied_index = 0
        self.applied_term = 0
        self.last_timestamp_ns = 0
        self.rolling_hash = 0
        # The outputs of the app (events, timer requests) for the record being applied, not yet
        # folded into `rolling_hash`: their frames in order, joined. Empty between records:
        # apply_frame folds it, with the reply if there is one, before it returns.
        self._unhashed = b""
        self.snapshot_requested = False
        # Records that were ignored by design; counted so an operator can see them.
        self.commands_without_session = 0
        self.stale_timer_fires = 0
        self.unknown_admin_ops = 0
        self.command_parts_skipped = 0  # parts of a migrated request after a rejected part
        self.duplicate_records = 0  # second copies of a SESSION_OPEN or node_start: no-ops
        # Cluster mode (`emit_for`): a TIMER_CANCEL on egress for each timer fired, so the
        # sequencer of every node, not only the one that sequenced the fire, drops it.
        self.timer_fired_notices = False
        self.emit_events = True  # False: events are hashed, not output (the blp: no subscriber)
        # Outputs too large for a client frame, replaced (see sequencer.egress).
        self.replies_too_large = 0
        self.events_too_large = 0
        # Every replica and every replay must use the same expiry: it decides what is deduplicated.
        self._table = ClientTable(node, client_expiry_ns, rules_version)
        self._sessions = self._table.sessions  # the hot path's; the table never rebinds it
        self._timers = PendingTimers()
        self._outputs: list[tuple[int, bytes]] = []
        self._context = Context(self)
        # The app's entry points, each under determinism.guard() in debug mode: the one debug
        # switch, decided here once, so the hot path pays nothing for it.
        self._app_apply = self._app_entry(self.app.apply)
        self._app_on_timer = self._app_entry(self.app.on_timer)
        self._app_on_session_open = self._app_entry(self.app.on_session_open)
        self._app_on_session_close = self._app_entry(self.app.on_session_close)
        # The app's handler called directly, not through `apply` (in debug mode: under the guard).
        self._handlers = None if debug else app_class.direct_handlers()
        self._decode_command = self.schema.decode_command
        self._encode_event = self.schema.encode_event
        self._version = self.schema.version
        self._output_version = self._context.app_version = self._version  # the active one: app_versions
        # The hot path calls msgspec directly: a call through the schema's method is a Python
        # frame per command, reply and event (benches/RESULTS.md, issue 13).
        codec = self.schema.hot_codec()
        self._decode_current_command = codec.decode_command
        self._encode_reply = self._encode = codec.encode
        self._event_types = codec.event_types
        self._copy_commands = codec.command_borrows_input  # else decoded from the ring itself

    def _app_entry(self, method: Callable[..., _Result]) -> Callable[..., _Result]:
        """The app's `method` as the processor calls it: under `determinism.guard()` in debug
        mode (clock and random sources raise), as it is otherwise."""
        if not self.debug:
            return method

        def guarded(*args: Any) -> _Result:
            with guard():
                return method(*args)

        return guarded

    # -- records in -------------------------------------------------------------------------

    def apply_frame(self, frame_type: int, view: Any, start: int = 0, end: int | None = None) -> None:
        """Applies one record: `view[start:end]`, the record after its 8-byte ring frame header.

        `frame_type` is record type | version << 16. Records must come gapless, in index order.
        A COMMAND is the hot path: what every command does is inline here, what only some do
        (a resend, bytes that do not decode, a rejection, a reply too large) is a call away. A
        call with seven arguments costs a measurable share of the ~3 us a transfer takes
        (benches/processor.py), so the common path makes none of its own.
        """
        assert not self.snapshot_requested, "fork the snapshot writer before the next record"
        record_type = frame_type & 0xFFFF
        if record_type == _COMMAND:  # the tail and the command's prefix in one unpack
            index, term, timestamp_ns, session_id, request_id, acked_request_id = _unpack_head(view, start)
        else:
            index, term, timestamp_ns, session_id, request_id = _unpack_tail(view, start)
        assert index == self.applied_index + 1, (index, self.applied_index)
        # The context of every call into the app for this record: its session and client are
        # set by the caller (`_context_for`).
        context = self._context
        context.index = self.applied_index = index
        context.term = self.applied_term = term
        context.now = self.last_timestamp_ns = timestamp_ns
        if record_type != _COMMAND:
            if record_type != _COMMAND_PART:
                self._apply_other(record_type, view[start:end], session_id)
                if self._unhashed:  # the outputs of on_timer, on_session_open or on_session_close
                    self.rolling_hash = _crc32c(self._unhashed, self.rolling_hash)
                    self._unhashed = b""
                return
            acked_request_id = self._start_command_part(view[start:end], session_id, request_id)
            if acked_request_id < 0:
                return
            # Else the part is applied below, as a command of its request.

        session = self._sessions.get(session_id)
        if session is None:
            # Its session was closed (its node restarted) after the command was sequenced. We
            # cannot know the client, so we cannot dedup: drop it; the client resends it on its
            # new session, and the dedup table makes that safe.
            self.commands_without_session += 1
            return
        client = session.client
        replies = client.replies
        if acked_request_id > client.acked_request_id:
            client.acked_request_id = acked_request_id
            while replies:  # forget the replies the client has received
                oldest = next(iter(replies))
                if oldest > acked_request_id:
                    break
                del replies[oldest]
        if request_id <= client.last_request_id:
            self._answer_resend(session, session_id, request_id, index)
            return

        command_version = frame_type >> 16
        try:
            # The view is shared memory that the ring reuses: a msgspec.Raw or memoryview field
            # of a command must not point into it, so such a schema decodes from a copy.
            data = view[start + _COMMAND_OFFSET : end]
            if command_version == self._version:
                command = self._decode_current_command(bytes(data) if self._copy_commands else data)
            else:
                command = self._decode_command(command_version, bytes(data), index)  # upcast/refuse
        except Exception as error:
            status = _REJECTED
            payload = self._undecodable(error, command_version, index)
        else:
            context.session = session_id  # `_context_for`, inlined
            context.client_id = session.client_id
            try:
                handlers = self._handlers  # the app's own table (StateMachine.command_handlers)
                if handlers is None:
                    reply = self._app_apply(context, command)
                else:
                    reply = handlers[type(command)](self.app, context, command)
                status = _OK
                payload = self._encode_reply(reply)
            except Rejected as rejected:
                status = _REJECTED
                payload = self._rejection(rejected, index)
        if len(payload) > REPLY_PAYLOAD_BYTES_MAX:
            payload = self._reply_too_large(status, payload)
            status = _REJECTED
        client.last_request_id = request_id
        version = self._output_version
        replies[request_id] = (index, status, version, payload)
        if len(replies) > SAVED_REPLIES_MAX:
            del replies[next(iter(replies))]
        frame = _pack_reply(session_id, request_id, index, status, version) + payload
        if self._unhashed:  # the command's events and timer requests, then its reply: one call
            self.rolling_hash = _crc32c(self._unhashed + frame, self.rolling_hash)
            self._unhashed = b""
        else:
            self.rolling_hash = _crc32c(frame, self.rolling_hash)
        if session.local:
            self._outputs.append((_REPLY, frame))

    def _answer_resend(
        self, session: SessionEntry, session_id: int, request_id: int, index: int
    ) -> None:
        """A command whose request id was applied before: the saved reply again (its original
        index and status), or DUPLICATE once the client acknowledged it and it was forgotten.
        Never applied twice."""
        saved = session.client.replies.get(request_id)
        if saved is None:
            saved = (index, _DUPLICATE, self._output_version, b"")
        frame = _pack_reply(session_id, request_id, *saved[:3]) + saved[3]
        self.rolling_hash = _crc32c(frame, self.rolling_hash)
        if session.local:
            self._outputs.append((_REPLY, frame))

    def _start_command_part(self, view: Any, session_id: int, request_id: int) -> int:
        """The acked request id of a COMMAND_PART whose command is to be applied by the COMMAND
        path, which then records the request id and saves the reply (`sequencer.command_parts`);
        -1 for one that is not."""
        session = self._sessions.get(session_id)
        if session is None:
            return 0  # the COMMAND path counts it as a command without a session
        verdict = command_part_verdict(session.client, request_id, len(view) > _COMMAND_OFFSET)
        if verdict is PartVerdict.SKIPPED:
            self.command_parts_skipped += 1
        return _unpack_prefix(view, _PAYLOAD_OFFSET)[0] if verdict is PartVerdict.APPLY else -1

    def _undecodable(self, error: Exception, command_version: int, index: int) -> bytes:
        """The rejection for command bytes this app cannot decode or upcast (its payload:
        `egress.undecodable_payload`).

        Raises:
            the error itself when the command is of a newer version than the app: a newer app
            wrote this log, and this code must not replay it (VersionError).
        """
        if command_version > self._version:
            raise error
        return undecodable_payload(index, command_version, self.schema.name, self._version, error)

    def _rejection(self, rejected: Rejected, index: int) -> bytes:
        """The reply payload of a `Rejected`; the app must not have emitted anything first (an
        event too where events are not emitted: every output is in `_unhashed`, so every replica
        decides the same)."""
        if self._unhashed:
            raise AssertionError(
                f"{self.app_class.__name__}.apply raised Rejected({rejected.code!r}) after "
                "emitting outputs (ctx.publish/schedule/cancel) for the record at index "
                f"{index}: validate the whole command before mutating anything"
            ) from rejected
        return encode_rejection(rejected.code, rejected.message)

    def _reply_too_large(self, status: int, payload: bytes) -> bytes:
        """No client frame can carry `payload`. Replaced here, where every replica decides the
        same, and saved as the reply: a resend gets this answer too (status REJECTED)."""
        self.replies_too_large += 1
        return reply_too_large_payload(len(payload), applied=status == _OK)

    def _apply_other(self, record_type: int, view: Any, session_id: int) -> None:
        if record_type == _TIMER_FIRED:
            self._apply_timer_fired(view)
        elif record_type == _SESSION_OPEN:
            opened = decode_session_open(view[_PAYLOAD_OFFSET:])
            self._open_session(session_id, opened.client_id, opened.node)
        elif record_type == _SESSION_CLOSE:
            self._close_session(session_id)
        elif record_type == _SNAPSHOT:
            self.snapshot_requested = True
        elif record_type == _ADMIN:
            self._apply_admin(view)
        elif record_type == _TERM_START:
            pass
        else:
            raise AssertionError(
                f"record type {record_type} at index {self.applied_index} is not applicable"
            )

    def apply_records(self, buffer: Any) -> int:
        """Replays a run of whole records (journal bytes, a fixture file); returns how many
        were applied.

        Records at or below `applied_index` (already in the restored snapshot) are skipped.
        SNAPSHOT requests are cleared: a replay writes no snapshots.
        """
        count = 0
        view = memoryview(buffer)
        for header, _payload, offset in iter_records(view):
            if header.index <= self.applied_index:
                continue
            frame_type = header.type | header.version << 16
            self.apply_frame(frame_type, view[offset + FRAME_HEADER_BYTES : offset + header.length])
            self.snapshot_requested = False
            count += 1
        return count

    def replay_run(self, run: Any, after_each: Callable[[Processor[App]], object] | None = None,
                   on_snapshot: Callable[[Processor[App]], object] | None = None) -> int:  # fmt: skip
        """Applies a run of whole records (`journal.read_runs`), discarding outputs; returns how
        many. The recovery fast path: one header word per record, no per-record objects.
        `after_each(self)` is called after each record (`seqd verify` records the rolling hash);
        `on_snapshot(self)` right after a SNAPSHOT record, before the next one (the snapshotter
        writes the state of that index; a replay without it writes no snapshots)."""
        apply = self.apply_frame
        count = 0
        for (length, frame_type), start, _after in walk_records(run, FRAME_HEADER):
            apply(frame_type, run, start + FRAME_HEADER_BYTES, start + length)
            if self.snapshot_requested:
                self.snapshot_requested = False
                if on_snapshot is not None:
                    on_snapshot(self)
            if after_each is not None:
                after_each(self)
            count += 1
        self._outputs.clear()
        return count

    def _context_for(self, session_id: int, client_id: int) -> Context:
        """The context for a call into the app on behalf of `session_id` (0: none) during the
        record being applied (apply_frame set its index, term and time)."""
        context = self._context
        context.session = session_id
        context.client_id = client_id
        return context

    def _apply_timer_fired(self, view: Any) -> None:
        timer_id, deadline_ns = TIMER_FIRED_PAYLOAD.unpack_from(view, _PAYLOAD_OFFSET)
        if not self._timers.fire(timer_id, deadline_ns):
            # Cancelled, rescheduled, or already fired (a re-armed timer fired twice, or a
            # second copy of the record in a cluster).
            self.stale_timer_fires += 1
            return
        if self.timer_fired_notices:
            # Before on_timer, whose reschedule of the same id must come after it. Not in the
            # rolling hash: like a re-arm, it is this node's plumbing, not an output of the log.
            self._outputs.append((_TIMER_CANCEL, encode_timer_cancel(timer_id)))
        self._app_on_timer(self._context_for(0, 0), timer_id)

    def _open_session(self, session_id: int, client_id: int, node: str) -> None:
        if not self._table.open(session_id, client_id, node, self.last_timestamp_ns):
            self.duplicate_records += 1  # a second copy: the session is open, its app told
            return
        self._app_on_session_open(self._context_for(session_id, client_id))

    def _close_session(self, session_id: int) -> None:
        session = self._table.close(session_id, self.last_timestamp_ns)
        if session is not None:
            self._app_on_session_close(self._context_for(session_id, session.client_id))

    def _apply_admin(self, view: Any) -> None:
        admin = decode_admin(view[_PAYLOAD_OFFSET:])
        try:
            self._apply_admin_op(admin)
        finally:  # also when a raise stops this node: the version it reached is the state's
            self._output_version = self._context.app_version = self._table.versions.output_version(self._version)

    def _apply_admin_op(self, admin: dict[str, Any]) -> None:
        op = admin["op"]
        if op == ADMIN_NODE_START:
            self._table.versions.node_started(admin.get("number"), admin.get("app_version"), admin.get("members"))
        elif op == ADMIN_RAISE_VERSION:
            self._table.versions.raise_to(admin["version"], admin["members"], self._version, self.applied_index)
        elif op != ADMIN_RULES_VERSION:
            # A newer daemon's operation: ignoring it is the same decision on every replica.
            self.unknown_admin_ops += 1
        # What it does to the sessions, under the active session rules (a migration follows the same).
        closing = self._table.admin_record(admin, self.applied_index)
        if closing is None:
            self.duplicate_records += 1  # a second copy of this incarnation's start
            return
        for session_id in closing:
            self._close_session(session_id)

    # -- the app's outputs (called through Context) --------------------------------------------

    def _schedule(self, timer_id: int, deadline_ns: int) -> None:
        self._emit(_TIMER_SCHEDULE, self._timers.schedule(timer_id, deadline_ns))

    def _cancel(self, timer_id: int) -> None:
        cancel = self._timers.cancel(timer_id)
        if cancel is not None:
            self._emit(_TIMER_CANCEL, cancel)

    def _publish(self, event: Any) -> None:
        if type(event) in self._event_types:
            payload = self._encode(event)
        else:
            payload = self._encode_event(event)  # raises the TypeError that names the schema
        if len(payload) > EVENT_PAYLOAD_BYTES_MAX:
            # No client frame can carry it: subscribers are told it was left out, in its place.
            kind, frame = _EVENT_OMITTED, encode_event_omitted(self.applied_index, self._output_version, len(payload))
            self.events_too_large += 1
        else:
            kind, frame = _EVENT, _pack_event(self.applied_index, self._output_version) + payload
        self._unhashed += frame  # hashed whether emitted or not, with what follows (`_unhashed`)
        if len(self._unhashed) > UNHASHED_BYTES_MAX:
            self._fold_unhashed()
        if self.emit_events:
            self._outputs.append((kind, frame))

    def _emit(self, kind: int, frame: bytes) -> None:
        self._unhashed += frame  # folded with the record's other outputs (`_unhashed`)
        if len(self._unhashed) > UNHASHED_BYTES_MAX:
            self._fold_unhashed()
        self._outputs.append((kind, frame))

    def _fold_unhashed(self) -> None:
        """Folds all but the last byte of a record's outputs into the hash now: joined to the end,
        a record with many outputs copied them quadratically (10,000 events: 2.5 s, not 6 ms).
        The same hash (CRC-32C continues over concatenated bytes); the byte kept tells
        `_rejection` that the app emitted something."""
        unhashed = self._unhashed
        with memoryview(unhashed) as view:
            self.rolling_hash = _crc32c(view[:-1], self.rolling_hash)
        self._unhashed = unhashed[-1:]

    # -- outputs out ------------------------------------------------------------------------

    def emit_for(self, node_number: int, *, cluster: bool) -> None:
        """Emit replies only for sessions whose id carries `node_number` (the blp's node), and
        in a cluster a TIMER_CANCEL for each timer fired (`timer_fired_notices`). Changes what
        this processor emits, never its state or its rolling hash."""
        self._table.emit_for(node_number)
        self.timer_fired_notices = cluster

    def drain_outputs(self) -> list[tuple[int, bytes]]:
        """The outputs since the last drain, in order: (EgressKind, frame payload bytes)."""
        outputs = self._outputs
        self._outputs = []
        return outputs

    def pending_timers(self) -> list[tuple[int, bytes]]:
        """TIMER_SCHEDULE outputs for every pending timer, to re-arm them after recovery.

        Not folded into the rolling hash: a re-arm is a property of a restart, not of the log.
        """
        return [(_TIMER_SCHEDULE, schedule) for schedule in self._timers.rearm()]

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_bytes(self) -> bytes:
        """The compact snapshot body: app state, sessions, dedup table, timers, position."""
        return encode_state(
            app_name=self.schema.name,
            app_version=self._version,
            applied_index=self.applied_index,
            applied_term=self.applied_term,
            last_timestamp_ns=self.last_timestamp_ns,
            rolling_hash=self.rolling_hash,
            table=self._table,
            timers=self._timers.items(),
            app_snapshot=self.schema.encode_snapshot(self.app.snapshot()),
        )

    def state_hash(self) -> bytes:
        """BLAKE2b-128 of `snapshot_bytes()`: equal states have equal hashes."""
        return state_hash(self.snapshot_bytes())

    def snapshot_file_contents(self) -> tuple[SnapshotHeader, bytes]:
        """(header, body) for `snapshot.write_snapshot`; call it in the forked child."""
        body = self.snapshot_bytes()
        header = SnapshotHeader(
            app_name=self.schema.name,
            app_version=self._version,
            index=self.applied_index,
            term=self.applied_term,
            timestamp_ns=self.last_timestamp_ns,
            state_hash=state_hash(body),
        )
        return header, body

    @classmethod
    def restore(
        cls,
        app_class: type[App],
        body: bytes,
        node: str | None = None,
        *,
        debug: bool = False,
        client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
        rules_version: int = RULES_VERSION,
    ) -> Processor[App]:
        """Rebuilds a processor from a snapshot body, upcasting an older app state.

        Raises:
            ProcessorError: the body belongs to another app or a newer processor layout.
            schema.VersionError: the app state was written by a newer version of the app, or
                under session rules this code does not know (RulesVersionError).
        """
        state = decode_state(body, app_class)
        app_snapshot = app_class.schema.decode_snapshot(
            state.app_version, state.app, state.applied_index
        )
        app = app_class.restore(app_snapshot)
        processor = cls(app_class, node, debug=debug, app=app, client_expiry_ns=client_expiry_ns,
                        rules_version=rules_version)  # fmt: skip
        processor.applied_index = state.applied_index
        processor.applied_term = state.applied_term
        processor.last_timestamp_ns = state.last_timestamp_ns
        processor.rolling_hash = state.rolling_hash
        restore_table(processor._table, state)
        processor._output_version = processor._context.app_version = processor._table.versions.output_version(
            processor._version)
        processor._timers = PendingTimers(state.timers)
        return processor

    # -- inspection (tests, tools) ------------------------------------------------------------

    @property
    def app_versions(self) -> AppVersions:
        """The active app version and each node's report (sequencer/app_versions.py)."""
        return self._table.versions

    @property
    def rules_versions(self) -> RulesVersions:
        """The active session rules version and each node's report (sequencer/rules_versions.py)."""
        return self._table.rules

    @property
    def client_expiry_ns(self) -> int:
        """How long a client id without a session is remembered (log time)."""
        return self._table.expiry_ns

    @property
    def clients_expired(self) -> int:
        """Client ids forgotten after `client_expiry_ns` without a session, so far."""
        return self._table.expired

    def session_ids(self) -> list[int]:
        return list(self._sessions)

    def timers(self) -> dict[int, int]:
        return self._timers.as_dict()

    def saved_reply_ids(self, client_id: int) -> list[int]:
        client = self._table.clients.get(client_id)
        return [] if client is None else list(client.replies)
