"""The sequencer role: client sessions in, log records out; egress in, replies and events out.

Theory of operation
-------------------
One uvloop thread owns the Unix socket and every client session. It is the only writer of the
log ring. For each frame a client sends it claims ring space and stamps the record in place with
the next index, the term and a timestamp (the one place the clock is read; the stamp never goes
backwards). Claims are published once per event-loop pass (`_flush`), so everything that arrived
in one pass costs one cursor store: batching without waiting.

Backpressure: when the ring is full (the journaller or the blp is behind), the session whose frame
could not be claimed stops being read (`pause_reading`) and keeps the frame aside; a retry on the
next egress drain or timer tick claims it and resumes. Nothing is buffered without bound: the codec
holds at most one read plus one frame per session.

Egress: the blp writes replies, events and timer requests to the egress ring. A waker thread
parks on the egress doorbell (or backs off, per the idle strategy) and schedules `_drain_egress`
on the loop; replies go to the session with that id if it is still attached to this node, events
to every subscribed session. A session whose unsent output passes `client_write_buffer_bytes_max`
is a slow client: it gets an error frame and is disconnected, so it cannot stall anyone else.

A full disk: while the journaller reports `journal.disk_full` (DiskState SHORT or FULL), new
sessions and every new COMMAND get the retryable ERROR `disk_full` and their connection is closed,
so nothing more enters the log; sessions that only wait keep their replies and events, and the
node resumes by itself when the counter drops back. A refused client reconnects with backoff and
resends its unanswered requests; the dedup table applies each once.

Timers: TIMER_SCHEDULE outputs fill a heap keyed by deadline; when the clock passes a deadline the
sequencer sequences TIMER_FIRED(timer_id, deadline). The blp fires only if the timer is still
scheduled with that deadline, so a stale or duplicate fire is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import uvloop

from daemon.errorlog import DistinctErrorLog, exception_key
from daemon.exits import ExitCode, FatalError
from daemon.layout import (
    BLP_APPLIED_POSITION,
    COMMANDS_TOTAL,
    EGRESS_CONSUMED_POSITION,
    EGRESS_PUBLISHED_POSITION,
    ERRORS_DISK_FULL,
    ERRORS_PROTOCOL,
    ERRORS_SECURITY,
    ERRORS_SLOW_CLIENT,
    INCARNATION_BITS,
    JOURNAL_DISK_FULL,
    JOURNAL_FREE_BYTES,
    LOG_PUBLISHED_INDEX,
    LOG_PUBLISHED_POSITION,
    NODE_INCARNATION,
    RECOVERY_LAST_INDEX,
    RECOVERY_LAST_TERM,
    RECOVERY_LAST_TIMESTAMP_NS,
    SESSIONS_OPEN,
    SESSIONS_TOTAL,
    TIMERS_PENDING,
    DiskState,
    Role,
    RoleState,
    egress_name,
    log_name,
)
from daemon.roles.common import RoleContext, report_start_failure, start_role
from ipc.idle import idle_strategy
from ipc.ring import Ring
from sequencer import egress
from sequencer.client import protocol
from sequencer.processor import SAVED_REPLIES_MAX
from sequencer.record import (
    COMMAND_PREFIX,
    RECORD_TAIL,
    RecordType,
    encode_admin,
    encode_session_open,
    encode_timer_fired,
    frame_type,
)
from sequencer.state_machine import load_app

log = logging.getLogger("seqd.sequencer")

# Record tail after the 8-byte ring frame header: index, term, timestamp, session, request.
# A COMMAND record's tail plus the acked request id that prefixes its payload, packed in one call.
_COMMAND_TAIL = struct.Struct("<" + RECORD_TAIL.format.lstrip("<") + COMMAND_PREFIX.format.lstrip("<"))
assert _COMMAND_TAIL.size == RECORD_TAIL.size + COMMAND_PREFIX.size
COMMAND_FRAME_TYPE_CACHE_MAX = 64  # distinct command schema versions whose frame type we cache
HEARTBEAT_INTERVAL_S = 0.1
BLOCKED_RETRY_S = 0.001  # how soon a session blocked by a full ring retries its claim
DRAIN_TIMEOUT_S = 10.0  # SIGTERM: how long to wait for committed work to be replied
EGRESS_FRAMES_PER_DRAIN_MAX = 4096  # bound one drain so sessions' reads interleave with replies
SESSION_ID_COUNTER_BITS = 32
assert 8 + INCARNATION_BITS + SESSION_ID_COUNTER_BITS == 64  # node number | incarnation | counter
_EGRESS_REPLY = int(egress.EgressKind.REPLY)
_EGRESS_EVENT = int(egress.EgressKind.EVENT)
_EGRESS_TIMER_SCHEDULE = int(egress.EgressKind.TIMER_SCHEDULE)
_EGRESS_TIMER_CANCEL = int(egress.EgressKind.TIMER_CANCEL)
# What the codec raises when asked to frame onto a connection that failed or that we closed with
# a fatal ERROR: the session is going away, so its outputs are dropped, not errors.
_CONNECTION_GONE_CODES = frozenset({"connection_failed", "connection_closed"})
# The request window advertised in WELCOME and enforced at the gateway: a command's request_id
# may be at most acked_request_id + IN_FLIGHT_MAX. Every reply inside the window fits the blp's
# saved replies per client, so a resend after a reconnect always finds its original reply.
IN_FLIGHT_MAX = SAVED_REPLIES_MAX
assert IN_FLIGHT_MAX <= SAVED_REPLIES_MAX


class Session(asyncio.Protocol):
    """One client connection: a protocol codec plus the transport it writes to."""

    __slots__ = (
        "backlog",
        "client_id",
        "connection",
        "peer",
        "sequencer",
        "session_id",
        "subscribed",
        "transport",
    )

    def __init__(self, sequencer: Sequencer) -> None:
        self.sequencer = sequencer
        self.connection = protocol.Connection(protocol.Side.SERVER)
        self.transport: asyncio.Transport | None = None
        self.session_id = 0
        self.client_id = 0
        self.subscribed = False
        self.backlog: list[protocol.Frame] | None = None
        self.peer: tuple[int, int, int] = (0, 0, 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.sequencer.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.connection.receive_data(data)
        self.sequencer.on_data(self)

    def eof_received(self) -> bool:
        self.sequencer.on_eof(self)
        return True  # on_eof closes the transport itself, after any ERROR frame it owes

    def connection_lost(self, exc: Exception | None) -> None:
        self.sequencer.on_disconnect(self)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.sequencer.client_write_buffer_bytes_max:
            self.sequencer.slow_client(self)


class Sequencer:
    def __init__(self, context: RoleContext, loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.loop = loop
        config = context.config
        self.config = config
        counters = context.counters
        self.counters = counters
        self.log_ring = Ring.attach(log_name(config.node.name), epoch=context.epoch)
        self.egress_ring = Ring.attach(egress_name(config.node.name), epoch=context.epoch)
        self.writer = self.log_ring.writer()
        self.egress_reader = self.egress_ring.reader("sequencer")
        self.client_write_buffer_bytes_max = config.socket.client_write_buffer_bytes_max
        self.command_bytes_max = config.socket.command_bytes_max
        # The gateway checks a command's schema version (never its payload): a version newer than
        # the app's is refused here, because once in the log it would stop every replay.
        self.command_version_max = load_app(config.node.app).schema.version
        self.pending_closes: deque[int] = deque()  # SESSION_CLOSE records waiting for ring space
        # Positions and stamps continue from what recovery found in the journal.
        self.next_index = counters[RECOVERY_LAST_INDEX].get() + 1
        self.term = max(1, counters[RECOVERY_LAST_TERM].get())
        self.last_timestamp_ns = counters[RECOVERY_LAST_TIMESTAMP_NS].get()
        self.published_index = self.next_index - 1
        self.flush_scheduled = False
        self.sessions: dict[int, Session] = {}
        self.subscribers: list[Session] = []  # sessions that asked for events, in opening order
        self.blocked: deque[Session] = deque()
        self.blocked_retry: asyncio.TimerHandle | None = None
        self.timers: list[tuple[int, int]] = []  # heap of (deadline_ns, timer_id)
        self.timer_deadlines: dict[int, int] = {}  # timer_id -> current deadline
        self.timer_handle: asyncio.TimerHandle | None = None
        self.command_frame_types: dict[int, int] = {}
        self.session_counter = 0
        node_number = config.node.number
        incarnation = counters[NODE_INCARNATION].get()  # the supervisor's, within INCARNATION_BITS
        assert 0 <= incarnation < 1 << INCARNATION_BITS, incarnation
        self.session_id_base = (node_number << 56) | (incarnation << SESSION_ID_COUNTER_BITS)
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0
        self.snapshot_every_bytes = config.snapshot.every_bytes or (1 << 62)
        # 0 in the config means "only on request"; a bound no run reaches keeps the hot path to one compare.
        self.snapshot_every_records = config.snapshot.every_records or (1 << 62)
        self.accepting = True
        self.draining = False
        self.server: asyncio.AbstractServer | None = None
        self.published_position = counters[LOG_PUBLISHED_POSITION]
        self.published_index_counter = counters[LOG_PUBLISHED_INDEX]
        self.published_index_counter.set(self.published_index)  # the journal's last, until the first publish
        self.commands_total = counters[COMMANDS_TOTAL]
        self.sessions_open = counters[SESSIONS_OPEN]
        self.sessions_total = counters[SESSIONS_TOTAL]
        self.errors_protocol = counters[ERRORS_PROTOCOL]
        self.errors_total = context.errors
        self.egress_consumed = counters[EGRESS_CONSUMED_POSITION]
        self.disk_full = counters[JOURNAL_DISK_FULL]  # the journaller's DiskState
        # Client errors are counted every time and logged once per kind, with repeat counts, so
        # a misbehaving client cannot flood the log.
        self.errors = DistinctErrorLog(log, counter_add=self.errors_total.add)
        self.waker_stop = threading.Event()
        self.drained = threading.Event()
        self.drained.set()
        self.waker: threading.Thread | None = None

    # ---- log ring: stamping and publishing -------------------------------------------------

    def _stamp(self) -> int:
        now = time.time_ns()
        if now < self.last_timestamp_ns:
            now = self.last_timestamp_ns  # never backwards, whatever the wall clock does
        self.last_timestamp_ns = now
        return now

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.published_index != self.next_index - 1:
            self.writer.publish()
            self.published_index = self.next_index - 1
            self.published_index_counter.set(self.published_index)
            self.published_position.set(self.writer.published_position)
        # While clients keep the loop busy, serve egress from here too: the waker thread would
        # have to win the GIL from this thread first (up to sys.getswitchinterval()).
        if self.egress_reader.ready():
            self._drain_egress()

    def _claim_record(self, record_type: int, version: int, session_id: int, request_id: int, payload: bytes) -> bool:
        """Stamp and claim one record with an arbitrary payload. False when the ring is full."""
        view = self.writer.try_claim(RECORD_TAIL.size + len(payload), frame_type(record_type, version))
        if view is None:
            return False
        RECORD_TAIL.pack_into(view, 0, self.next_index, self.term, self._stamp(), session_id, request_id)
        view[RECORD_TAIL.size :] = payload
        self.next_index += 1
        self._schedule_flush()
        return True

    def _claim_command(self, session: Session, command: protocol.Command) -> bool:
        payload = command.payload
        kind = self.command_frame_types.get(command.version)
        if kind is None:
            kind = frame_type(RecordType.COMMAND, command.version)
            if len(self.command_frame_types) < COMMAND_FRAME_TYPE_CACHE_MAX:
                self.command_frame_types[command.version] = kind
        view = self.writer.try_claim(_COMMAND_TAIL.size + len(payload), kind)
        if view is None:
            return False
        # The pass read the clock once (`_process`); a record claimed since (SESSION_OPEN,
        # SNAPSHOT) may carry a later stamp, so take the newest: stamps never go backwards.
        _COMMAND_TAIL.pack_into(
            view, 0, self.next_index, self.term, self.last_timestamp_ns, session.session_id,
            command.request_id, command.acked_request_id,
        )
        view[_COMMAND_TAIL.size :] = payload
        self.next_index += 1
        self.records_since_snapshot += 1
        self.bytes_since_snapshot += len(payload)
        if self.records_since_snapshot >= self.snapshot_every_records or self.bytes_since_snapshot >= self.snapshot_every_bytes:
            self.request_snapshot()
        return True

    # ---- sessions --------------------------------------------------------------------------

    def on_connect(self, session: Session) -> None:
        transport = session.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        try:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            session.peer = struct.unpack("3i", credentials)
        except OSError:
            session.peer = (0, -1, -1)
        pid, uid, gid = session.peer
        socket_config = self.config.socket
        allowed = uid == os.getuid() or uid in socket_config.allowed_uids or gid in socket_config.allowed_gids
        if not allowed:
            self.counters[ERRORS_SECURITY].add(1)
            self.errors.record(
                "security.peer_not_allowed",
                f"refused a connection from pid {pid} uid {uid} gid {gid}: not in socket.allowed_uids/"
                "allowed_gids; add it to the config if it should be allowed",
                time.monotonic(),
            )
            self._fail(session, protocol.ErrorCode.PERMISSION_DENIED, f"uid {uid} gid {gid} is not allowed to use this socket")
            return
        if not self.accepting or len(self.sessions) >= socket_config.sessions_max:
            reason = "draining" if not self.accepting else f"sessions_max={socket_config.sessions_max} reached"
            self._fail(session, protocol.ErrorCode.UNAVAILABLE, f"the node is not accepting sessions ({reason}); retry later")

    def on_disconnect(self, session: Session) -> None:
        if session.session_id and self.sessions.pop(session.session_id, None) is session:
            self.sessions_open.set(len(self.sessions))
            if session.subscribed:
                self.subscribers.remove(session)
            if self.pending_closes or not self._claim_record(RecordType.SESSION_CLOSE, 1, session.session_id, 0, b""):
                # Ring full: the close waits (bounded by sessions_max) and is claimed in order
                # once there is room, so every replica forgets the session.
                self.pending_closes.append(session.session_id)
                self._schedule_retry()
        with contextlib.suppress(ValueError):
            self.blocked.remove(session)
        session.transport = None

    def _fail(self, session: Session, code: protocol.ErrorCode, message: str) -> None:
        transport = session.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(Exception):
            transport.write(session.connection.send(protocol.Error(code=code, message=message, fatal=True)))
        transport.close()

    def slow_client(self, session: Session) -> None:
        self.counters[ERRORS_SLOW_CLIENT].add(1)
        self.errors.record(
            "client.slow",
            f"session {session.session_id:x} (client {session.client_id}) is not reading its replies: "
            f"more than socket.client_write_buffer_bytes_max={self.client_write_buffer_bytes_max} bytes "
            "unsent; disconnected it (it may reconnect and resend)",
            time.monotonic(),
        )
        transport = session.transport
        if transport is not None:
            transport.abort()

    def _open_session(self, session: Session, hello: protocol.Hello) -> bool:
        session_id = self.session_id_base | (self.session_counter & 0xFFFF_FFFF)
        payload = encode_session_open(hello.client_id, self.config.node.name)
        if not self._claim_record(RecordType.SESSION_OPEN, 1, session_id, 0, payload):
            return False
        self.session_counter += 1
        session.session_id = session_id
        session.client_id = hello.client_id
        session.subscribed = hello.subscribe_events
        self.sessions[session_id] = session
        if session.subscribed:
            self.subscribers.append(session)
        self.sessions_open.set(len(self.sessions))
        self.sessions_total.add(1)
        welcome = protocol.Welcome(
            session_id=session_id,
            node=self.config.node.name,
            frame_bytes_max=protocol.FRAME_BYTES_MAX,
            # A single node sequences its own commands: it is the leader.
            leader=self.config.node.name,
            command_bytes_max=self.command_bytes_max,
            in_flight_max=IN_FLIGHT_MAX,
            saved_replies_max=SAVED_REPLIES_MAX,
        )
        session.write(session.connection.send(welcome))
        return True

    def on_data(self, session: Session) -> None:
        if session.backlog:
            return  # waiting for ring space; frames stay in the codec's bounded buffer
        self._process(session)

    def on_eof(self, session: Session) -> None:
        """The client shut its end. Frames it sent whole are processed as usual; a frame cut
        short gets ERROR `truncated_frame` (the socket may still be writable after a half-close)
        and is counted. Then the connection closes: `_process` closes it once the codec has
        seen the EOF, or after the backlog of a session waiting for ring space is claimed."""
        connection = session.connection
        if session.transport is None or session.transport.is_closing():
            return  # already refused or failed: nothing more to read or answer
        if connection.error is None and not connection.peer_closed:
            connection.receive_data(b"")
        if not session.backlog:
            self._process(session)

    def _process(self, session: Session) -> None:
        """Turn every complete frame of one session into records until it needs data or blocks."""
        connection = session.connection
        commands = 0
        claim_command = self._claim_command
        command_type = protocol.Command
        command_bytes_max = self.command_bytes_max
        command_version_max = self.command_version_max
        in_flight_max = IN_FLIGHT_MAX
        refusing = self.disk_full.get() != DiskState.ROOM
        self._stamp()  # one clock read for everything this session sent in this pass
        try:
            frames = session.backlog or connection.next_frames()
            session.backlog = None
            while frames:
                for position, frame in enumerate(frames):
                    if type(frame) is command_type:
                        # The codec refuses a COMMAND before HELLO, and a blocked HELLO stays
                        # ahead of the commands in the backlog.
                        assert session.session_id, "COMMAND before the session opened"
                        if refusing:
                            self._refuse_disk_full(session)
                            return
                        if (
                            len(frame.payload) > command_bytes_max
                            or not 1 <= frame.version <= command_version_max
                            or not 0 < frame.request_id <= frame.acked_request_id + in_flight_max
                        ):
                            self._refuse_command(session, frame)
                            continue
                        if not claim_command(session, frame):
                            self._block(session, frames[position:])
                            return
                        commands += 1
                    elif type(frame) is protocol.Hello:
                        assert not session.session_id, "the codec refuses a second HELLO"
                        if refusing:  # a SESSION_OPEN is a record too
                            self._refuse_disk_full(session)
                            return
                        if not self._open_session(session, frame):
                            self._block(session, frames[position:])
                            return
                    elif type(frame) is protocol.Ping:
                        session.write(connection.send(protocol.Pong(nonce=frame.nonce)))
                    elif type(frame) is protocol.Error:
                        self._client_error(session, frame)
                        if frame.fatal:
                            return  # the client hangs up; nothing after its fatal ERROR counts
                    else:
                        # The daemon sends no PING, so a PONG answers nothing: ignored, as the
                        # docs say. The codec lets a client send only these five kinds.
                        assert type(frame) is protocol.Pong, type(frame)
                frames = connection.next_frames()
            if connection.peer_closed and session.transport is not None:
                session.transport.close()
        except protocol.LocalProtocolError:
            raise  # the daemon misused its own codec: a bug, not the client's fault
        except protocol.ProtocolError as error:
            code = protocol.ErrorCode(error.code)  # every code the codec raises at a peer
            self.errors_protocol.add(1)
            self.errors.record(
                f"protocol.{code}",
                f"session {session.session_id:x}: protocol error {code}: {error.message}; sent an error frame and closed it",
                time.monotonic(),
            )
            self._fail(session, code, error.message)
        finally:
            if commands:
                self.commands_total.add(commands)
                self._schedule_flush()

    def _client_error(self, session: Session, error: protocol.Error) -> None:
        """A client says why it is unhappy: logged (once per code, with a count) and counted. A
        fatal one is followed by the client closing, so the daemon closes its end at once."""
        what = "closes the connection" if error.fatal else "carries on"
        self.errors.record(
            "client.error_frame",  # one key: the code is the client's, any string
            f"session {session.session_id:x} (client {session.client_id}) sent ERROR "
            f"{error.code!r}: {error.message[:200]!r}; it {what}",
            time.monotonic(),
        )
        if error.fatal and session.transport is not None:
            session.transport.close()

    def _refuse_command(self, session: Session, command: protocol.Command) -> None:
        """A command the gateway can tell is wrong without the log is refused here.

        It gets a REJECTED reply with index 0 (not a protocol error, which would make the client
        reconnect and resend it for ever); nothing enters the log, so replicas are unaffected.
        Each check depends on the command's bytes alone, so a resend of the same command gets
        the same answer (a resend carries an acked_request_id at least as high, so a command
        inside the window stays inside it). The checks run in the order documented in
        docs/client.md; the first that fails names the code.
        """
        code: protocol.RejectionCode
        if command.request_id == 0:
            code = protocol.RejectionCode.BAD_REQUEST_ID
            message = (
                "request_id 0 is not a request id (0 means none): number requests 1, 2, 3, ... "
                "per client id"
            )
        elif len(command.payload) > self.command_bytes_max:
            code = protocol.RejectionCode.COMMAND_TOO_LARGE
            message = (
                f"the command is {len(command.payload)} bytes; this node accepts at most "
                f"socket.command_bytes_max={self.command_bytes_max} (WELCOME's command_bytes_max): "
                "send smaller commands"
            )
        elif not 1 <= command.version <= self.command_version_max:
            code = protocol.RejectionCode.UNKNOWN_VERSION
            message = (
                f"the command has schema version {command.version}; this node's app speaks "
                f"1..{self.command_version_max}: versions start at 1, and a newer one needs the "
                "node upgraded first"
            )
        else:
            code = protocol.RejectionCode.WINDOW_EXCEEDED
            message = (
                f"request_id={command.request_id} > acked_request_id={command.acked_request_id} + "
                f"in_flight_max={IN_FLIGHT_MAX} (WELCOME's in_flight_max): the daemon could not "
                "keep its reply for a resend. Wait for replies (and acknowledge them) before "
                "sending more; this request was not applied"
            )
        self.errors.record(f"client.{code}", f"session {session.session_id:x}: {message}", time.monotonic())
        payload = protocol.encode_rejection(code, message)
        session.write(session.connection.send(
            protocol.Reply(command.request_id, 0, protocol.ReplyStatus.REJECTED, command.version, payload)
        ))

    def _refuse_disk_full(self, session: Session) -> None:
        """The journal's disk is short of space: refuse this connection's new work with the
        retryable `disk_full` ERROR and close it. Nothing of it entered the log; the client
        reconnects with backoff and resends."""
        self.counters[ERRORS_DISK_FULL].add(1)
        message = (
            f"the node's disk is full ({self.counters[JOURNAL_FREE_BYTES].get()} bytes free for "
            "the journal): it takes no new commands or sessions until space is freed. Retry "
            "later; acknowledged commands are safe, and unanswered ones are answered when resent"
        )
        self.errors.record("node.disk_full", f"session {session.session_id:x}: refused: {message}", time.monotonic())
        self._fail(session, protocol.ErrorCode.DISK_FULL, message)

    def _block(self, session: Session, frames: list[protocol.Frame]) -> None:
        session.backlog = frames
        if session.transport is not None:
            session.transport.pause_reading()
        self.blocked.append(session)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self.blocked_retry is None:
            self.blocked_retry = self.loop.call_later(BLOCKED_RETRY_S, self._retry_blocked)

    def _retry_blocked(self) -> None:
        self.blocked_retry = None
        self._flush()
        while self.pending_closes:
            if not self._claim_record(RecordType.SESSION_CLOSE, 1, self.pending_closes[0], 0, b""):
                self._schedule_retry()
                return
            self.pending_closes.popleft()
        while self.blocked:
            session = self.blocked[0]
            if session.transport is None:
                self.blocked.popleft()
                continue
            self._process(session)
            if session.backlog:
                # Still no room: _block appended it again at the back; keep the order fair.
                with contextlib.suppress(ValueError):
                    self.blocked.remove(session)
                self.blocked.appendleft(session)
                break
            self.blocked.popleft()
            if session.transport is not None and not session.transport.is_closing() and not self.draining:
                session.transport.resume_reading()
        if self.blocked:
            self._schedule_retry()

    # ---- snapshots and timers --------------------------------------------------------------

    def request_snapshot(self) -> None:
        """Sequence a SNAPSHOT record: every replica snapshots the same state at its index."""
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0
        if self._claim_record(RecordType.SNAPSHOT, 1, 0, 0, b""):
            log.info("snapshot requested at index %d", self.next_index - 1)
        else:
            log.warning("ring full: snapshot request deferred")
            self.loop.call_later(BLOCKED_RETRY_S, self.request_snapshot)

    def _arm_timers(self) -> None:
        if self.timer_handle is not None:
            self.timer_handle.cancel()
            self.timer_handle = None
        while self.timers and self.timer_deadlines.get(self.timers[0][1]) != self.timers[0][0]:
            heapq.heappop(self.timers)  # replaced or cancelled
        self.counters[TIMERS_PENDING].set(len(self.timer_deadlines))
        if self.timers:
            delay_s = max(0.0, (self.timers[0][0] - time.time_ns()) / 1e9)
            self.timer_handle = self.loop.call_later(delay_s, self._fire_timers)

    def _fire_timers(self) -> None:
        self.timer_handle = None
        now = time.time_ns()
        while self.timers and self.timers[0][0] <= now:
            deadline_ns, timer_id = self.timers[0]
            if self.timer_deadlines.get(timer_id) == deadline_ns:
                payload = encode_timer_fired(timer_id, deadline_ns)
                if not self._claim_record(RecordType.TIMER_FIRED, 1, 0, timer_id, payload):
                    self.timer_handle = self.loop.call_later(BLOCKED_RETRY_S, self._fire_timers)
                    return
                del self.timer_deadlines[timer_id]
            heapq.heappop(self.timers)
        self._arm_timers()

    # ---- egress ----------------------------------------------------------------------------

    def _drain_egress(self) -> None:
        """Send the egress ring's replies and events to their sessions; take its timer requests.

        Each output is handled on its own: one that cannot be framed or sent is counted and
        costs only itself, never the rest of the batch. That matters because the reader moves
        past the batch either way, and nothing reads an output twice: an exception escaping
        here would lose every reply, event and timer request of the batch, not delay them.
        """
        reader = self.egress_reader
        sessions = self.sessions
        reply_kind = _EGRESS_REPLY
        unpack_reply = egress.REPLY_HEADER.unpack_from
        reply_header_bytes = egress.REPLY_HEADER.size
        subscribers = self.subscribers
        pending: dict[Session, bytearray] = {}
        timers_changed = False
        frames = reader.poll(EGRESS_FRAMES_PER_DRAIN_MAX)
        while frames:
            for kind, view in frames:
                try:
                    if kind == reply_kind:
                        session_id, request_id, index, status, version = unpack_reply(view, 0)
                        session = sessions.get(session_id)
                        if session is not None:
                            out = pending.get(session)
                            if out is None:
                                out = pending[session] = bytearray()
                            try:
                                session.connection.send_reply_into(
                                    out, request_id, index, status, version, view[reply_header_bytes:]
                                )
                            except protocol.LocalProtocolError as error:
                                self._reply_not_framed(session, out, view, error)
                    elif kind == _EGRESS_EVENT:
                        if subscribers:  # nobody listens: not even decoded
                            self._send_event(pending, view)
                    elif kind == _EGRESS_TIMER_SCHEDULE:
                        timer = egress.decode(kind, view)
                        assert isinstance(timer, egress.TimerSchedule)
                        self.timer_deadlines[timer.timer_id] = timer.deadline_ns
                        heapq.heappush(self.timers, (timer.deadline_ns, timer.timer_id))
                        timers_changed = True
                    elif kind == _EGRESS_TIMER_CANCEL:
                        cancel = egress.decode(kind, view)
                        assert isinstance(cancel, egress.TimerCancel)
                        self.timer_deadlines.pop(cancel.timer_id, None)
                        timers_changed = True
                    else:
                        self._send_event_omitted(pending, view, kind)
                except Exception as error:  # one output's failure must not cost the batch
                    self._egress_output_failed(kind, error)
            reader.release()
            if len(frames) < EGRESS_FRAMES_PER_DRAIN_MAX:
                break
            frames = reader.poll(EGRESS_FRAMES_PER_DRAIN_MAX)
        for session, out in pending.items():
            try:
                session.write(bytes(out))
            except Exception as error:  # one session's failure must not cost the others
                self._egress_output_failed(_EGRESS_REPLY, error)
        self.egress_consumed.set(reader.position)
        if timers_changed:
            self._arm_timers()
        if (self.blocked or self.pending_closes) and self.blocked_retry is None:
            self._retry_blocked()

    def _reply_not_framed(
        self, session: Session, out: bytearray, view: memoryview, error: protocol.LocalProtocolError
    ) -> None:
        """A reply the session's codec refused: too large, or the connection is going away."""
        if error.code in _CONNECTION_GONE_CODES:
            # The connection failed or we sent it a fatal ERROR: it is closing, so the reply
            # would be dropped by `Session.write` too. The client reconnects and resends, and
            # gets the saved reply then.
            return
        if error.code != "frame_too_large":
            raise error
        # The blp replaces every reply too large to frame (sequencer.egress); this one was saved
        # by an older seqd (a snapshot or journal from before it did). The requester still gets
        # a clear error, the one the blp would have made.
        reply = egress.decode(_EGRESS_REPLY, view)
        assert isinstance(reply, egress.Reply)
        payload_bytes = len(reply.payload)
        self.errors.record(
            "egress.reply_too_large",
            f"the reply to request {reply.request_id} of session {session.session_id:x} (client "
            f"{session.client_id}) at index {reply.index} is {payload_bytes} bytes, over "
            f"REPLY_PAYLOAD_BYTES_MAX={egress.REPLY_PAYLOAD_BYTES_MAX}: sent it a REJECTED "
            f"{egress.REPLY_TOO_LARGE} instead. The reply was saved by an older seqd; nothing to do",
            time.monotonic(),
        )
        session.connection.send_reply_into(
            out, reply.request_id, reply.index, protocol.ReplyStatus.REJECTED, reply.version,
            egress.reply_too_large_payload(payload_bytes, applied=reply.status == protocol.ReplyStatus.OK),
        )

    def _send_event(self, pending: dict[Session, bytearray], view: memoryview) -> None:
        event = egress.decode(_EGRESS_EVENT, view)
        assert isinstance(event, egress.Event)
        for session in self.subscribers:
            out = pending.get(session)
            if out is None:
                out = pending[session] = bytearray()
            try:
                session.connection.send_event_into(out, event.index, event.version, event.payload)
            except protocol.LocalProtocolError as error:
                if error.code in _CONNECTION_GONE_CODES:
                    continue  # closing: events are not resent after a reconnect anyway
                # The blp replaces events too large to frame (EVENT_OMITTED); count one that
                # came through anyway and carry on with the other subscribers and outputs.
                self._egress_output_failed(_EGRESS_EVENT, error)

    def _send_event_omitted(self, pending: dict[Session, bytearray], view: memoryview, kind: int) -> None:
        """An event the blp left out (too large to frame): each subscriber gets a non-fatal
        ERROR in its place, so it learns at which index an event is missing."""
        omitted = egress.decode(kind, view)  # raises EgressError for an unknown kind
        assert isinstance(omitted, egress.EventOmitted), omitted
        self.errors.record(f"egress.{omitted.code}", f"an app bug: {omitted.message}", time.monotonic())
        notice = protocol.Error(code=omitted.code, message=omitted.message, fatal=False)
        for session in self.subscribers:
            out = pending.get(session)
            if out is None:
                out = pending[session] = bytearray()
            try:
                session.connection.send_into(out, notice)
            except protocol.LocalProtocolError as error:
                if error.code not in _CONNECTION_GONE_CODES:
                    self._egress_output_failed(kind, error)

    def _egress_output_failed(self, kind: int, error: Exception) -> None:
        """Count one output that could not be sent; it costs only itself."""
        key = f"egress.output_failed.{exception_key(error)}"
        message = (
            f"could not send an egress output of kind {kind} ({type(error).__name__}: {error}); "
            "skipped it alone, the rest of its batch was sent. This is a seqd bug: report it "
            "with this log"
        )
        if self.errors.observation(key) is None:
            message += "\n" + "".join(traceback.format_exception(error)).rstrip()
        self.errors.record(key, message, time.monotonic())

    def _on_egress_signal(self) -> None:
        try:
            self._drain_egress()
        finally:
            self.drained.set()

    def _waker(self) -> None:
        """Wait for egress on a thread (the loop cannot block) and hand it to the loop."""
        idle = idle_strategy(self.context.role_config.idle, self.egress_reader.doorbell)
        reader = self.egress_reader
        while not self.waker_stop.is_set():
            if reader.available() > 0:
                self.drained.clear()
                try:
                    self.loop.call_soon_threadsafe(self._on_egress_signal)
                except RuntimeError:
                    return  # loop closed
                self.drained.wait(1.0)
                idle.reset()
                continue
            idle.idle(0)

    # ---- life cycle ------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """Create the listening socket at socket.path (its directory 0750, the socket 0660).

        Raises:
            FatalError: the path is taken (not a socket, or served by another process) or the
                node may not create it; the message names the path and socket.path.
        """
        path = Path(self.config.socket.path)
        directory = path.parent
        try:
            if not directory.exists():
                directory.mkdir(mode=0o750, parents=True)
                os.chmod(directory, 0o750)
        except OSError as error:
            raise FatalError.from_os_error(error, f"create the socket directory {directory}", "socket.path") from error
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FatalError(
                    ExitCode.CANTCREAT, f"{path} exists and is not a socket: remove it or choose another socket.path"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                try:
                    path.unlink()  # a stale socket of a dead daemon
                except OSError as error:
                    raise FatalError.from_os_error(error, f"remove the stale socket {path}", "socket.path") from error
            else:
                raise FatalError(
                    ExitCode.CANTCREAT, f"another process is serving {path}: stop it or choose another socket.path"
                )
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o117)  # the socket file is born 0660: no window with wider access
        try:
            sock.bind(str(path))
            os.chmod(path, 0o660)
        except OSError as error:
            sock.close()
            raise FatalError.from_os_error(error, f"create the socket {path}", "socket.path") from error
        finally:
            os.umask(previous)
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def serve(self) -> None:
        context = self.context
        # Sessions of a previous incarnation of this node are closed by a record, so every replica
        # forgets them at the same index.
        while not self._claim_record(RecordType.ADMIN, 1, 0, 0, encode_admin("node_start", node=self.config.node.name, number=self.config.node.number)):
            await asyncio.sleep(BLOCKED_RETRY_S)
        self._flush()
        sock = self.bind()
        self.server = await self.loop.create_unix_server(lambda: Session(self), sock=sock)
        self.waker = threading.Thread(target=self._waker, name="egress-waker", daemon=True)
        self.waker.start()
        self.loop.add_signal_handler(signal.SIGUSR1, self.request_snapshot)
        context.set_state(RoleState.RUNNING)
        # The same number the supervisor logs: the last index in the log (this start's
        # node_start record); the first command gets the next one.
        log.info("serving %s from index %d", self.config.socket.path, self.next_index - 1)
        beats = 0
        while not context.stop_requested:
            beats += 1
            context.heartbeat.set(beats)
            self.errors.flush(time.monotonic())
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
        await self.drain()

    async def drain(self) -> None:
        """SIGTERM: stop accepting, finish what is committed and reply to it, then close."""
        self.accepting = False
        self.draining = True
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions.values()):
            if session.transport is not None:
                session.transport.pause_reading()
        self._flush()
        applied = self.counters[BLP_APPLIED_POSITION]
        egress_published = self.counters[EGRESS_PUBLISHED_POSITION]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            self._drain_egress()
            if applied.get() >= self.writer.published_position and self.egress_reader.position >= egress_published.get():
                break
            if self.disk_full.get() == DiskState.FULL:
                log.warning("draining on a full disk: records that did not fit were never acknowledged; clients resend them")
                break
            self.context.heartbeat.add(1)
            await asyncio.sleep(0.005)
        else:
            log.warning("drain timed out after %.0f s; unreplied commands will be resent by clients", DRAIN_TIMEOUT_S)
        for session in list(self.sessions.values()):
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0.05)  # let the transports flush what they hold
        Path(self.config.socket.path).unlink(missing_ok=True)
        self.waker_stop.set()
        self.drained.set()
        self.context.set_state(RoleState.DRAINED)
        log.info("drained at index %d", self.next_index - 1)


GIL_SWITCH_INTERVAL_S = 0.0005  # the waker thread gets the GIL within this, not CPython's 5 ms


def main() -> int:
    context = start_role(Role.SEQUENCER)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    uvloop.install()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with report_start_failure(context):
            sequencer = Sequencer(context, loop)
            try:
                loop.run_until_complete(sequencer.serve())
            finally:
                sequencer.waker_stop.set()
                if sequencer.waker is not None:
                    sequencer.waker.join(timeout=2.0)
                sequencer.log_ring.close()
                sequencer.egress_ring.close()
    finally:
        loop.close()
        context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
