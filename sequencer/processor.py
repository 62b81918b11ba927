"""The business-logic processor's core: records in, state and outputs out (sans-I/O).

Theory of operation. The blp role reads committed records from the log ring and hands each to
`apply_frame(frame_type, view)`; this module decodes it, keeps the bookkeeping the daemon owes
every app (sessions, the per-client dedup table, timers), calls the app, and queues the outputs
(replies, events, timer requests) that the role drains to the egress ring. It touches no clock,
socket or file: time enters as the records' timestamps, so a replay of the same records in
another process computes the same state and the same outputs, bit for bit.

Exactly-once. Each client numbers its requests. Per client id (stable across reconnects and
failovers) we keep the last applied request id and the replies not yet acknowledged; a command
whose request id is not above the last applied is a resend: it gets the saved reply (status and
payload of the original, the original index) or, once the client has acknowledged that reply
(`acked_request_id` in the COMMAND payload prefix) and it was pruned, status DUPLICATE. It is
never applied twice. The table is part of the state, so it survives snapshots and failover.

Replicas. Every node applies every record and computes every output, but emits replies only to
sessions attached to itself (`node`). The rolling hash covers every output before that routing,
so all replicas have the same hash at the same index.

Timers. `ctx.schedule` records (timer_id -> deadline_ns) in the state and emits TIMER_SCHEDULE;
the sequencer keeps the wall-clock schedule and sequences TIMER_FIRED(timer_id, deadline_ns) when
it passes. The fire runs `on_timer` only if that timer is still scheduled with exactly that
deadline, so a fire that raced a cancel or a reschedule is ignored the same way on every replica.
After recovery `pending_timers()` re-emits every pending timer; one whose deadline passed while
the node was down fires once, as soon as the sequencer sees it.

Snapshots. A SNAPSHOT record sets `snapshot_requested`; the role must fork the snapshot writer
(`snapshot_file_contents` runs in the child) before the next `apply_frame`, then clear the flag:
the state at the fork is the state at the SNAPSHOT record's index on every replica.

Outputs too large to frame. A reply or event payload a client frame cannot carry is replaced
here, where every replica decides the same from protocol constants (see `sequencer.egress`): a
reply by a REJECTED `reply_too_large` (saved in the dedup table like any reply, so a resend gets
it too; the command's effects stay applied), an event by an EVENT_OMITTED marker.

Migrated requests. A copy-and-transform of the journal (`sequencer.migrate`) can turn one client
request into zero or several commands. They are written back to back as COMMAND_PART records,
all with the request's session and request id. The first (request id above the client's last)
starts the request like a COMMAND; each later one (request id equal to the client's last) is
applied too and its reply replaces the saved one, unless a part before it was rejected: then it
is skipped (counted in `command_parts_skipped`), so a request stops at its first rejection, as
the original command was refused whole. A part without command bytes applies nothing; as the
first part it records the request id as applied with no saved reply, so a resend of a request
that became no command gets DUPLICATE. No live node sequences this type.

Failure. `Rejected` from the app is a reply. Any other exception is a bug in the app: it
propagates and crashes the blp; the supervisor restarts from snapshot + journal.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import crc32c
import msgspec

from sequencer.determinism import guard, rolling_hash_update, state_hash
from sequencer.egress import (
    BAD_COMMAND,
    EVENT_HEADER,
    EVENT_PAYLOAD_BYTES_MAX,
    REPLY_HEADER,
    REPLY_PAYLOAD_BYTES_MAX,
    TIMER_CANCEL,
    TIMER_SCHEDULE,
    EgressKind,
    ReplyStatus,
    encode_event_omitted,
    reply_too_large_payload,
)
from sequencer.record import (
    ADMIN_NODE_START,
    COMMAND_PREFIX,
    FRAME_HEADER_BYTES,
    RECORD_TAIL,
    TIMER_FIRED_PAYLOAD,
    RecordType,
    decode_admin,
    decode_session_open,
    iter_records,
)
from sequencer.snapshot import SnapshotHeader
from sequencer.state_machine import Context, Rejected, StateMachine

__all__ = [
    "PROCESSOR_STATE_VERSION",
    "SAVED_REPLIES_MAX",
    "Processor",
    "ProcessorError",
    "ProcessorState",
    "replay",
]

# A client may pipeline requests; the replies it has not acknowledged are kept so a resend after a
# reconnect gets the original reply. A well-behaved client acks as replies arrive, so it holds a
# handful; the bound stops a client that never acks from growing the state without limit. Beyond
# it the oldest saved reply is dropped, and a resend of that request gets DUPLICATE (it was
# applied; its reply is gone). 1024 covers the client library's in-flight window with room.
CLIENT_EXPIRY_NS_DEFAULT = 24 * 3600 * 1_000_000_000  # a day without a session: forget the client
SAVED_REPLIES_MAX = 1024  # per client; the client library caps its window at this (IN_FLIGHT_LIMIT_MAX)

# The layout of the processor's part of the snapshot body (ProcessorState); the app's part is
# versioned by the app's schema version.
PROCESSOR_STATE_VERSION = 1

_COMMAND = int(RecordType.COMMAND)
_SESSION_OPEN = int(RecordType.SESSION_OPEN)
_SESSION_CLOSE = int(RecordType.SESSION_CLOSE)
_TIMER_FIRED = int(RecordType.TIMER_FIRED)
_SNAPSHOT = int(RecordType.SNAPSHOT)
_TERM_START = int(RecordType.TERM_START)
_ADMIN = int(RecordType.ADMIN)
_COMMAND_PART = int(RecordType.COMMAND_PART)
_OK = int(ReplyStatus.OK)
_REJECTED = int(ReplyStatus.REJECTED)
_DUPLICATE = int(ReplyStatus.DUPLICATE)
_REPLY = int(EgressKind.REPLY)
_EVENT = int(EgressKind.EVENT)
_TIMER_SCHEDULE = int(EgressKind.TIMER_SCHEDULE)
_TIMER_CANCEL = int(EgressKind.TIMER_CANCEL)
_EVENT_OMITTED = int(EgressKind.EVENT_OMITTED)
_PAYLOAD_OFFSET = RECORD_TAIL.size  # payload offset in a view that starts after the frame header
_COMMAND_OFFSET = _PAYLOAD_OFFSET + COMMAND_PREFIX.size
_REJECTED_ENCODER = msgspec.msgpack.Encoder()
_FRAME_WORD = struct.Struct("<II")  # a record's first 8 bytes: length, type | version << 16
_unpack_tail = RECORD_TAIL.unpack_from
_unpack_prefix = COMMAND_PREFIX.unpack_from
_pack_reply = REPLY_HEADER.pack
_pack_event = EVENT_HEADER.pack
# The rolling hash: determinism.rolling_hash_update, bound here to spare a call per output.
_crc32c = crc32c.crc32c
assert rolling_hash_update(1, b"x") == _crc32c(b"x", 1)


class _Client:
    """The dedup entry of one client id."""

    __slots__ = ("acked_request_id", "idle_since_ns", "last_request_id", "replies", "sessions")

    def __init__(self) -> None:
        self.last_request_id = 0
        self.acked_request_id = 0
        self.sessions = 0  # open sessions of this client id (a reconnect race can make two)
        self.idle_since_ns = 0  # log time its last session closed; meaningful when sessions == 0
        # request_id -> (index, status, version, payload), ascending request_id (insertion order).
        # Invariant: every key is > acked_request_id and <= last_request_id.
        self.replies: dict[int, tuple[int, int, int, bytes]] = {}


class _Session:
    __slots__ = ("client", "client_id", "local", "node")

    def __init__(self, client_id: int, node: str, client: _Client, local: bool) -> None:
        self.client_id = client_id
        self.node = node
        self.client = client
        self.local = local  # replies to it are emitted by this node


# -- the snapshot body ----------------------------------------------------------------------


class SessionState(msgspec.Struct, array_like=True, gc=False):
    session_id: int
    client_id: int
    node: str


class SavedReply(msgspec.Struct, array_like=True, gc=False):
    request_id: int
    index: int
    status: int
    version: int
    payload: bytes


class ClientState(msgspec.Struct, array_like=True, gc=False):
    client_id: int
    last_request_id: int
    acked_request_id: int
    replies: list[SavedReply]
    idle_since_ns: int = 0  # added later: older snapshots decode with 0 (idle since the snapshot)


class ProcessorState(msgspec.Struct, array_like=True):
    """The snapshot body: the processor's bookkeeping and the app's encoded state."""

    state_version: int
    app_name: str
    app_version: int
    applied_index: int
    applied_term: int
    last_timestamp_ns: int
    rolling_hash: int
    sessions: list[SessionState]
    clients: list[ClientState]
    timers: list[tuple[int, int]]  # (timer_id, deadline_ns) in scheduling order
    app: msgspec.Raw  # the app's snapshot, encoded at app_version


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(ProcessorState)


App = TypeVar("App", bound=StateMachine)


class ProcessorError(Exception):
    """A snapshot body cannot be restored by this processor."""


class Processor(Generic[App]):
    """Applies records to one app instance; see the module docstring.

    Args:
        app_class: the StateMachine subclass (with its `schema`).
        node: this node's name; replies are emitted only for sessions opened on it. None emits
            every reply (single node, tests, replays).
        debug: run every call into the app under `determinism.guard()` (clock and random
            sources raise). Slower; for development and `seqd verify`.
        app: an existing app instance (restore); default `app_class()`.

    Invariants (between calls):
        applied_index is the index of the last applied record (0 before the first);
        every timer in the table is pending: scheduled and neither fired nor cancelled.
    """

    def __init__(
        self,
        app_class: type[App],
        node: str | None = None,
        *,
        debug: bool = False,
        app: App | None = None,
        client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
    ) -> None:
        assert client_expiry_ns > 0, client_expiry_ns
        self.app_class = app_class
        # Every replica and every replay must use the same expiry: it decides what is deduplicated.
        self.client_expiry_ns = client_expiry_ns
        self.clients_expired = 0
        self.schema = app_class.schema
        self.app: App = app if app is not None else app_class()
        self.node = node
        self.debug = debug
        self.applied_index = 0
        self.applied_term = 0
        self.last_timestamp_ns = 0
        self.rolling_hash = 0
        self.snapshot_requested = False
        # Records that were ignored by design; counted so an operator can see them.
        self.commands_without_session = 0
        self.stale_timer_fires = 0
        self.unknown_admin_ops = 0
        self.command_parts_skipped = 0  # parts of a migrated request after a rejected part
        # Outputs too large for a client frame, replaced (see sequencer.egress).
        self.replies_too_large = 0
        self.events_too_large = 0
        self._sessions: dict[int, _Session] = {}
        self._clients: dict[int, _Client] = {}
        # Clients with no open session, oldest idle first: client_id -> idle since (log time).
        self._idle_clients: dict[int, int] = {}
        self._timers: dict[int, int] = {}  # timer_id -> deadline_ns
        self._outputs: list[tuple[int, bytes]] = []
        self._context = Context(self)
        self._guard: Any = guard if debug else contextlib.nullcontext
        self._app_apply = self.app.apply
        self._decode_command = self.schema.decode_command
        self._encode_reply = self.schema.encode_reply
        self._encode_event = self.schema.encode_event
        self._version = self.schema.version

    # -- records in -------------------------------------------------------------------------

    def apply_frame(self, frame_type: int, view: Any) -> None:
        """Applies one record; `view` is the record after the 8-byte ring frame header.

        `frame_type` is record type | version << 16. Records must come gapless, in index order.
        A COMMAND is the hot path and is handled inline here (a call with seven arguments costs
        a measurable share of the ~3 us a transfer takes; see benches/processor.py).
        """
        assert not self.snapshot_requested, "fork the snapshot writer before the next record"
        index, term, timestamp_ns, session_id, request_id = _unpack_tail(view, 0)
        assert index == self.applied_index + 1, (index, self.applied_index)
        self.applied_index = index
        self.applied_term = term
        self.last_timestamp_ns = timestamp_ns
        record_type = frame_type & 0xFFFF
        if record_type != _COMMAND:
            if record_type != _COMMAND_PART:
                self._apply_other(record_type, view, index, term, timestamp_ns, session_id)
                return
            if not self._start_command_part(view, session_id, request_id):
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
        (acked_request_id,) = _unpack_prefix(view, _PAYLOAD_OFFSET)
        replies = client.replies
        if acked_request_id > client.acked_request_id:
            client.acked_request_id = acked_request_id
            while replies:
                oldest = next(iter(replies))
                if oldest > acked_request_id:
                    break
                del replies[oldest]
        version = self._version
        if request_id <= client.last_request_id:
            saved = replies.get(request_id)
            if saved is None:
                saved = (index, _DUPLICATE, version, b"")
            frame = _pack_reply(session_id, request_id, *saved[:3]) + saved[3]
            self.rolling_hash = _crc32c(frame, self.rolling_hash)
            if session.local:
                self._outputs.append((_REPLY, frame))
            return

        command_version = frame_type >> 16
        try:
            # bytes(): the view is shared memory that the ring reuses; a msgspec.Raw or
            # memoryview field of the command must not point into it.
            command = self._decode_command(command_version, bytes(view[_COMMAND_OFFSET:]), index)
        except Exception as error:
            if command_version > self._version:
                raise  # a newer app wrote this log: this code must not replay it (VersionError)
            # Bytes this app cannot decode (or upcast): refused the same way on every replica
            # and every replay; the record is in the log for good, so it must never crash the
            # blp. The message names the exception type only, not its text, which may differ
            # between library versions on different replicas.
            status = _REJECTED
            payload = _REJECTED_ENCODER.encode({
                "code": BAD_COMMAND,
                "message": f"the command at index {index} (schema version {command_version}) could "
                f"not be decoded by {self.schema.name} v{self._version} "
                f"({type(error).__name__}); nothing was applied",
            })
        else:
            context = self._context
            context.now = timestamp_ns
            context.index = index
            context.term = term
            context.session = session_id
            context.client_id = session.client_id
            outputs = self._outputs
            outputs_before = len(outputs)
            try:
                if self.debug:
                    with guard():
                        reply = self._app_apply(context, command)
                else:
                    reply = self._app_apply(context, command)
                status = _OK
                payload = self._encode_reply(reply)
            except Rejected as rejected:
                if len(self._outputs) != outputs_before:
                    raise AssertionError(
                        f"{self.app_class.__name__}.apply raised Rejected({rejected.code!r}) after "
                        "emitting outputs (ctx.publish/schedule/cancel) for the record at index "
                        f"{index}: validate the whole command before mutating anything"
                    ) from rejected
                status = _REJECTED
                payload = _REJECTED_ENCODER.encode(
                    {"code": rejected.code, "message": rejected.message}
                )
        if len(payload) > REPLY_PAYLOAD_BYTES_MAX:
            # No client frame can carry it. Replaced here, where every replica decides the same,
            # and saved as the reply: a resend gets this answer too.
            payload = reply_too_large_payload(len(payload), applied=status == _OK)
            status = _REJECTED
            self.replies_too_large += 1
        client.last_request_id = request_id
        replies[request_id] = (index, status, version, payload)
        if len(replies) > SAVED_REPLIES_MAX:
            del replies[next(iter(replies))]
        frame = _pack_reply(session_id, request_id, index, status, version) + payload
        self.rolling_hash = _crc32c(frame, self.rolling_hash)
        if session.local:
            self._outputs.append((_REPLY, frame))

    def _start_command_part(self, view: Any, session_id: int, request_id: int) -> bool:
        """The rules of a COMMAND_PART record (module docstring, "Migrated requests"); True when
        its command is to be applied by the COMMAND path, which then records the request id and
        saves the reply."""
        session = self._sessions.get(session_id)
        if session is None:
            return True  # the COMMAND path counts it as a command without a session
        client = session.client
        last_request_id = client.last_request_id
        if request_id > last_request_id:  # the request's first part
            if len(view) > _COMMAND_OFFSET:
                return True
            client.last_request_id = request_id  # no command: only the request id is recorded
            return False
        saved = client.replies.get(request_id)
        if request_id < last_request_id or (saved is not None and saved[1] != _OK):
            self.command_parts_skipped += 1  # after a rejected part of its request
            return False
        if len(view) <= _COMMAND_OFFSET:
            return False
        # A later part: let the COMMAND path's dedup test pass for this one record.
        client.last_request_id = request_id - 1
        return True

    def _apply_other(
        self, record_type: int, view: Any, index: int, term: int, timestamp_ns: int,
        session_id: int,
    ) -> None:  # fmt: skip
        if record_type == _TIMER_FIRED:
            self._apply_timer_fired(view, index, term, timestamp_ns)
        elif record_type == _SESSION_OPEN:
            opened = decode_session_open(view[_PAYLOAD_OFFSET:])
            self._open_session(session_id, opened.client_id, opened.node, index, term,
                               timestamp_ns)  # fmt: skip
        elif record_type == _SESSION_CLOSE:
            self._close_session(session_id, index, term, timestamp_ns)
        elif record_type == _SNAPSHOT:
            self.snapshot_requested = True
        elif record_type == _ADMIN:
            self._apply_admin(view, index, term, timestamp_ns)
        elif record_type == _TERM_START:
            pass
        else:
            raise AssertionError(f"record type {record_type} at index {index} is not applicable")

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

    def replay_run(self, run: Any) -> int:
        """Applies a run of whole records (`journal.read_runs`), discarding outputs; returns how
        many. The recovery fast path: one header word per record, no per-record objects."""
        unpack = _FRAME_WORD.unpack_from
        apply = self.apply_frame
        position = 0
        end = len(run)
        count = 0
        while position < end:
            length, frame_type = unpack(run, position)
            apply(frame_type, run[position + FRAME_HEADER_BYTES : position + length])
            self.snapshot_requested = False  # a replay writes no snapshots
            position += (length + 7) & -8
            count += 1
        self._outputs.clear()
        return count

    def _set_context(self, index: int, term: int, timestamp_ns: int, session_id: int,
                     client_id: int) -> Context:  # fmt: skip
        context = self._context
        context.now = timestamp_ns
        context.index = index
        context.term = term
        context.session = session_id
        context.client_id = client_id
        return context

    def _apply_timer_fired(self, view: Any, index: int, term: int, timestamp_ns: int) -> None:
        timer_id, deadline_ns = TIMER_FIRED_PAYLOAD.unpack_from(view, _PAYLOAD_OFFSET)
        if self._timers.get(timer_id) != deadline_ns:
            # Cancelled, rescheduled, or already fired (a re-armed timer fired twice).
            self.stale_timer_fires += 1
            return
        del self._timers[timer_id]
        context = self._set_context(index, term, timestamp_ns, 0, 0)
        with self._guard():
            self.app.on_timer(context, timer_id)

    def _open_session(self, session_id: int, client_id: int, node: str, index: int, term: int,
                      timestamp_ns: int) -> None:  # fmt: skip
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client()
        client.sessions += 1
        self._idle_clients.pop(client_id, None)
        self._expire_clients(timestamp_ns)
        local = self.node is None or node == self.node
        self._sessions[session_id] = _Session(client_id, node, client, local)
        context = self._set_context(index, term, timestamp_ns, session_id, client_id)
        with self._guard():
            self.app.on_session_open(context)

    def _close_session(self, session_id: int, index: int, term: int, timestamp_ns: int) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return  # already closed (e.g. by a node_start); closing twice is a no-op
        client = session.client
        client.sessions -= 1
        assert client.sessions >= 0, (session.client_id, client.sessions)
        if client.sessions == 0:
            client.idle_since_ns = timestamp_ns
            self._idle_clients[session.client_id] = timestamp_ns
        self._expire_clients(timestamp_ns)
        context = self._set_context(index, term, timestamp_ns, session_id, session.client_id)
        with self._guard():
            self.app.on_session_close(context)

    def _expire_clients(self, now_ns: int) -> None:
        """Forget the dedup state of clients without a session for `client_expiry_ns`.

        Without this the table grows with every client id ever seen (a client that takes a
        random id per process makes one per run). The queue is in idle-time order (log time is
        non-decreasing), so each check looks at its head only. A client that comes back after
        expiry with requests it never saw answered could have them applied twice: the expiry
        (a day by default) must be far longer than any client's reconnect timeout. Kafka's
        idempotent producer makes the same trade (`producer.id.expiration.ms`).
        """
        idle = self._idle_clients
        deadline = now_ns - self.client_expiry_ns
        while idle:
            client_id = next(iter(idle))
            if idle[client_id] > deadline:
                break
            del idle[client_id]
            del self._clients[client_id]
            self.clients_expired += 1

    def _apply_admin(self, view: Any, index: int, term: int, timestamp_ns: int) -> None:
        admin = decode_admin(view[_PAYLOAD_OFFSET:])
        if admin["op"] == ADMIN_NODE_START:
            node = admin["node"]
            lost = [sid for sid, session in self._sessions.items() if session.node == node]
            for session_id in lost:
                self._close_session(session_id, index, term, timestamp_ns)
        else:
            # A newer daemon's operation: ignoring it is the same decision on every replica.
            self.unknown_admin_ops += 1

    # -- the app's outputs (called through Context) --------------------------------------------

    def _schedule(self, timer_id: int, deadline_ns: int) -> None:
        # Rescheduling replaces: the old deadline's fire will not match and is ignored.
        self._timers.pop(timer_id, None)
        self._timers[timer_id] = deadline_ns
        self._emit(_TIMER_SCHEDULE, TIMER_SCHEDULE.pack(timer_id, deadline_ns))

    def _cancel(self, timer_id: int) -> None:
        if self._timers.pop(timer_id, None) is not None:
            self._emit(_TIMER_CANCEL, TIMER_CANCEL.pack(timer_id))

    def _publish(self, event: Any) -> None:
        payload = self._encode_event(event)
        if len(payload) > EVENT_PAYLOAD_BYTES_MAX:
            # No client frame can carry it: subscribers are told it was left out, in its place.
            frame = encode_event_omitted(self.applied_index, self._version, len(payload))
            self.events_too_large += 1
            self.rolling_hash = _crc32c(frame, self.rolling_hash)
            self._outputs.append((_EVENT_OMITTED, frame))
            return
        frame = _pack_event(self.applied_index, self._version) + payload
        self.rolling_hash = _crc32c(frame, self.rolling_hash)
        self._outputs.append((_EVENT, frame))

    def _emit(self, kind: int, frame: bytes) -> None:
        self.rolling_hash = _crc32c(frame, self.rolling_hash)
        self._outputs.append((kind, frame))

    # -- outputs out ------------------------------------------------------------------------

    def drain_outputs(self) -> list[tuple[int, bytes]]:
        """The outputs since the last drain, in order: (EgressKind, frame payload bytes)."""
        outputs = self._outputs
        self._outputs = []
        return outputs

    def pending_timers(self) -> list[tuple[int, bytes]]:
        """TIMER_SCHEDULE outputs for every pending timer, to re-arm them after recovery.

        Not folded into the rolling hash: a re-arm is a property of a restart, not of the log.
        """
        return [
            (_TIMER_SCHEDULE, TIMER_SCHEDULE.pack(timer_id, deadline_ns))
            for timer_id, deadline_ns in self._timers.items()
        ]

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_bytes(self) -> bytes:
        """The compact snapshot body: app state, sessions, dedup table, timers, position."""
        app_snapshot = self.schema.encode_snapshot(self.app.snapshot())
        state = ProcessorState(
            state_version=PROCESSOR_STATE_VERSION,
            app_name=self.schema.name,
            app_version=self._version,
            applied_index=self.applied_index,
            applied_term=self.applied_term,
            last_timestamp_ns=self.last_timestamp_ns,
            rolling_hash=self.rolling_hash,
            sessions=[
                SessionState(session_id, session.client_id, session.node)
                for session_id, session in self._sessions.items()
            ],
            clients=[
                ClientState(
                    client_id,
                    client.last_request_id,
                    client.acked_request_id,
                    [SavedReply(rid, *saved) for rid, saved in client.replies.items()],
                    client.idle_since_ns,
                )
                for client_id, client in self._clients.items()
            ],
            timers=list(self._timers.items()),
            app=msgspec.Raw(app_snapshot),
        )
        return _state_encoder.encode(state)

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
    ) -> Processor[App]:
        """Rebuilds a processor from a snapshot body, upcasting an older app state.

        Raises:
            ProcessorError: the body belongs to another app or a newer processor layout.
            schema.VersionError: the app state was written by a newer version of the app.
        """
        state = _state_decoder.decode(body)
        schema = app_class.schema
        if state.state_version > PROCESSOR_STATE_VERSION:
            raise ProcessorError(
                f"snapshot at index {state.applied_index} has processor state version "
                f"{state.state_version} but this seqd reads up to {PROCESSOR_STATE_VERSION}: "
                "upgrade seqd"
            )
        if state.app_name != schema.name:
            raise ProcessorError(
                f"snapshot at index {state.applied_index} holds the state of app "
                f"{state.app_name!r}, but the configured app is {schema.name!r} "
                f"({app_class.__module__}:{app_class.__qualname__})"
            )
        app_snapshot = schema.decode_snapshot(state.app_version, state.app, state.applied_index)
        app = app_class.restore(app_snapshot)
        processor = cls(app_class, node, debug=debug, app=app, client_expiry_ns=client_expiry_ns)
        processor.applied_index = state.applied_index
        processor.applied_term = state.applied_term
        processor.last_timestamp_ns = state.last_timestamp_ns
        processor.rolling_hash = state.rolling_hash
        for saved_client in state.clients:
            client = _Client()
            client.last_request_id = saved_client.last_request_id
            client.acked_request_id = saved_client.acked_request_id
            client.replies = {
                r.request_id: (r.index, r.status, r.version, r.payload)
                for r in saved_client.replies
            }
            client.idle_since_ns = saved_client.idle_since_ns
            processor._clients[saved_client.client_id] = client
        for saved_session in state.sessions:
            session_client = processor._clients.get(saved_session.client_id)
            if session_client is None:
                session_client = processor._clients[saved_session.client_id] = _Client()
            session_client.sessions += 1
            local = node is None or saved_session.node == node
            processor._sessions[saved_session.session_id] = _Session(
                saved_session.client_id, saved_session.node, session_client, local
            )
        # The idle queue in the order the live processor built it: by idle time, ties in the
        # clients' order (the order of eviction among ties does not change what is evicted).
        for client in processor._clients.values():
            if client.sessions == 0 and client.idle_since_ns == 0:
                client.idle_since_ns = state.last_timestamp_ns  # a snapshot from before expiry
        idle = sorted(
            (client.idle_since_ns, position, client_id)
            for position, (client_id, client) in enumerate(processor._clients.items())
            if client.sessions == 0
        )
        processor._idle_clients = {client_id: since for since, _, client_id in idle}
        processor._timers = dict(state.timers)
        return processor

    # -- inspection (tests, tools) ------------------------------------------------------------

    def session_ids(self) -> list[int]:
        return list(self._sessions)

    def timers(self) -> dict[int, int]:
        return dict(self._timers)

    def saved_reply_ids(self, client_id: int) -> list[int]:
        client = self._clients.get(client_id)
        return [] if client is None else list(client.replies)


def replay(
    app_class: type[App], buffers: Iterable[Any], body: bytes | None = None
) -> Processor[App]:
    """A processor restored from `body` (or empty) after applying every record in `buffers`;
    outputs are discarded. For tools and tests."""
    processor = Processor.restore(app_class, body) if body is not None else Processor(app_class)
    for buffer in buffers:
        processor.apply_records(buffer)
        processor.drain_outputs()
    return processor
