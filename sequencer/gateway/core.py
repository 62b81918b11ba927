"""The gateway core: sessions, admission, stamping, snapshot policy, timers and egress fan-out.

See the package docstring (`sequencer.gateway`) for the theory of operation.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from sequencer import egress
from sequencer.client import protocol
from sequencer.gateway.sessions import (
    CLIENT_MESSAGE_LOGGED_CHARS_MAX,
    IN_FLIGHT_MAX,
    GatewaySession,
    admission_refusal,
    next_session_id,
    session_id_base,
    session_incarnation,
)
from sequencer.gateway.stamping import Stamp, StampingPolicy
from sequencer.processor import SAVED_REPLIES_MAX
from sequencer.record import (
    ADMIN_NODE_START,
    ADMIN_RAISE_VERSION,
    ADMIN_RULES_VERSION,
    COMMAND_HEAD,
    DAEMON_RECORD_VERSION,
    RECORD_TAIL,
    VERSION_MAX,
    RecordType,
    encode_admin,
    encode_session_open,
)
from sequencer.rules_versions import RULES_VERSION
from sequencer.timers import TimerCancel, TimerQueue, TimerSchedule, encode_timer_fired

__all__ = [
    "SNAPSHOT_EVERY_NEVER",
    "Claim",
    "Gateway",
    "GatewayConfig",
    "Report",
    "Reporter",
]

# `snapshot.every_records = 0` (or every_bytes) means "only on request". A bound no run reaches
# keeps the per-command check to one compare: 2^62 commands at a million a second is 146,000 years.
SNAPSHOT_EVERY_NEVER: Final = 1 << 62

# A COMMAND record after the ring frame header: the record tail (index, term, timestamp, session,
# request) and the acked request id that prefixes its payload, packed in one call (the blp reads
# them with one unpack of the same struct).
_COMMAND_TAIL: Final = COMMAND_HEAD
_COMMAND: Final = int(RecordType.COMMAND)  # the ring frame type is record type | version << 16
_DAEMON_VERSION_BITS: Final = DAEMON_RECORD_VERSION << 16
_BLOCKED: Final = -1  # `_begin`: no term, the batch waits (a TERM_START found no ring space)
_EGRESS_REPLY: Final = int(egress.EgressKind.REPLY)
_EGRESS_EVENT: Final = int(egress.EgressKind.EVENT)
_EGRESS_TIMER_SCHEDULE: Final = int(egress.EgressKind.TIMER_SCHEDULE)
_EGRESS_TIMER_CANCEL: Final = int(egress.EgressKind.TIMER_CANCEL)
_SESSION_ID: Final = struct.Struct("<Q")  # the first field of egress.REPLY_HEADER
assert egress.REPLY_HEADER.format.startswith(_SESSION_ID.format), egress.REPLY_HEADER.format

Claim = Callable[[int, int], "memoryview | None"]


class Report(enum.Enum):
    """What the gateway tells its owner, who logs it (once per key, with repeat counts) and counts it."""

    CLIENT_ERROR = "client_error"  # a client's mistake: a refused command, its ERROR frame
    PROTOCOL_ERROR = "protocol_error"  # a client broke the protocol: ERROR sent, connection closed
    DISK_FULL = "disk_full"  # new work refused while the journal's disk is short of space
    OUTPUT_ERROR = "output_error"  # an egress output not sent as the blp wrote it
    SNAPSHOT_REQUESTED = "snapshot_requested"  # not an error: a SNAPSHOT record was sequenced
    SNAPSHOT_DEFERRED = "snapshot_deferred"  # a SNAPSHOT record waits for ring space


# report(kind, key, message, error): `error`, when given, is the exception behind an
# OUTPUT_ERROR (a seqd bug); the owner keys it by where it was raised and logs its traceback.
Reporter = Callable[[Report, str, str, "BaseException | None"], None]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    node_name: str
    node_number: int  # 1..NODE_NUMBER_MAX, the top bits of every session id
    incarnation: int  # this start of the node; its low 24 bits go into session ids
    command_bytes_max: int  # larger command payloads are REJECTED `command_too_large`
    command_version_max: int  # the app's schema version: newer commands are `unknown_version`
    sessions_max: int
    snapshot_every_records: int = 0  # 0: only on request
    snapshot_every_bytes: int = 0  # command payload bytes between snapshots; 0: only on request
    # The node's query replica sockets, told to every client in WELCOME (docs/query-side.md).
    replicas: tuple[str, ...] = ()
    # The node numbers of the cluster, reported in node_start (empty: this node alone).
    members: tuple[int, ...] = ()
    # The start of the node before this one (its incarnation id), named in node_start so that
    # start's late records change nothing (sequencer/dedup.py); None: not known.
    previous_incarnation: int | None = None


# -- the gateway -------------------------------------------------------------------------------


S = TypeVar("S", bound=GatewaySession)


class Gateway(Generic[S]):
    """The sequencer's decisions; see the package docstring. `S` is the shell's session type.

    Args:
        config: limits and identity (`GatewayConfig`).
        stamping: where the term comes from (`SingleNodeStamping` on a single node).
        claim: ring space: `claim(length, frame_type)` -> a writable view of `length` bytes (the
            record after its 8-byte frame header), or None when the ring is full.
        report: the error log and counters.
        last_index, last_timestamp_ns: the last record in the log (what recovery found): stamps
            continue from there.

    Invariants (between calls):
        next_index is one more than the index of the last record claimed;
        last_timestamp_ns is the largest timestamp stamped (or recovered), never decreasing;
        every session in `sessions` has its session id, and `subscribers` lists those of them
        that subscribed, in opening order.
    """

    def __init__(
        self,
        config: GatewayConfig,
        stamping: StampingPolicy,
        claim: Claim,
        report: Reporter,
        *,
        last_index: int,
        last_timestamp_ns: int,
    ) -> None:
        assert 1 <= config.command_version_max <= VERSION_MAX, config.command_version_max
        # Newer commands are refused: the app's version, or in a cluster the log's active one
        # while it is lower (`limit_command_version`, sequencer/app_versions.py).
        self.command_version_max = config.command_version_max
        assert 0 <= config.command_bytes_max <= protocol.COMMAND_BYTES_MAX, config.command_bytes_max
        self.config = config
        self.stamping = stamping
        self._claim = claim
        self._report = report
        # 1: records carry the indexes counted here; 0 (cluster mode): index 0 on every record,
        # for the leader's replicator to stamp, and `next_index` stays 0.
        self._index_step = 1 if stamping.stamps_indexes else 0
        self.next_index = last_index + 1 if stamping.stamps_indexes else 0
        self.last_timestamp_ns = last_timestamp_ns
        self.sessions: dict[int, S] = {}
        self.subscribers: list[S] = []
        self._session_id_base = session_id_base(config.node_number, config.incarnation)
        self._session_counter = 0
        self.accepting = True  # False once draining: new connections are refused
        self.timers = TimerQueue()
        # Records that found the ring full and wait for `retry`, in the order they were due.
        self.pending_closes: deque[int] = deque()  # session ids
        self.snapshot_pending = False
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0
        # The snapshot policy. A single node counts the commands it sequences (`process`, inline).
        # In a cluster no node sees every command it would count, so the leader counts the log
        # as its blp applies it (`log_applied`), and the per-command check never fires.
        every_records = config.snapshot_every_records or SNAPSHOT_EVERY_NEVER
        every_bytes = config.snapshot_every_bytes or SNAPSHOT_EVERY_NEVER
        self._log_every_records = every_records
        self._log_every_bytes = every_bytes
        self._log_mark = (0, 0)  # (applied index, position) at the last request or in office since
        if not stamping.stamps_indexes:
            every_records = every_bytes = SNAPSHOT_EVERY_NEVER
        self._snapshot_every_records = every_records
        self._snapshot_every_bytes = every_bytes

    # -- stamping ---------------------------------------------------------------------------

    def _begin(self, now_ns: int) -> int:
        """Once per batch: the stamp clock moves to `now_ns` unless that would go backwards, and
        the policy names the term. Returns the term, or _BLOCKED when a term's TERM_START record
        found the ring full (the batch waits)."""
        if now_ns > self.last_timestamp_ns:
            self.last_timestamp_ns = now_ns
        stamp = self.stamping.begin(self.next_index)
        if stamp.term_start_index and not self._start_term(stamp):
            return _BLOCKED
        return stamp.term

    def _start_term(self, stamp: Stamp) -> bool:
        assert stamp.term_start_index >= 1, stamp
        assert self._index_step, "a policy that does not stamp indexes starts no term"
        view = self._claim(RECORD_TAIL.size, int(RecordType.TERM_START) | _DAEMON_VERSION_BITS)
        if view is None:
            return False
        self.next_index = stamp.term_start_index  # Raft decides where a term starts
        RECORD_TAIL.pack_into(view, 0, self.next_index, stamp.term, self.last_timestamp_ns, 0, 0)
        self.next_index += 1
        self.stamping.term_started(stamp)
        return True

    def _sequence(self, record_type: int, session_id: int, request_id: int, payload: bytes, term: int) -> bool:
        """Claim and stamp one record the daemon defines. False when the ring is full."""
        view = self._claim(RECORD_TAIL.size + len(payload), record_type | _DAEMON_VERSION_BITS)
        if view is None:
            return False
        RECORD_TAIL.pack_into(view, 0, self.next_index, term, self.last_timestamp_ns, session_id, request_id)
        view[RECORD_TAIL.size :] = payload
        self.next_index += self._index_step
        return True

    def sequence_node_start(self, now_ns: int) -> bool:
        """Sequence the ADMIN `node_start` record that closes this node's sessions of its previous
        incarnations, at one index on every replica. False when the ring is full (try again).

        It names this incarnation (the bits of it every session id of this start carries), so a
        copy of it that reaches the log twice (a follower resends what it forwarded when the
        leader changes) closes nothing the second time (`sequencer.dedup`, "node_start"). It
        reports the app's schema version and the session rules this code applies, which the log
        makes active once every member reports them (sequencer/app_versions.py, rules_versions.py)."""
        term = self._begin(now_ns)
        config = self.config
        payload = encode_admin(
            ADMIN_NODE_START, node=config.node_name, number=config.node_number,
            incarnation=session_incarnation(self._session_id_base),
            app_version=config.command_version_max, members=list(config.members or (config.node_number,)),
            rules_version=RULES_VERSION,
            **({} if config.previous_incarnation is None else {"previous": config.previous_incarnation}),
        )  # fmt: skip
        return term != _BLOCKED and self._sequence(RecordType.ADMIN, 0, 0, payload, term)

    def sequence_raise_version(self, now_ns: int, version: int) -> bool:
        """Sequence an ADMIN `raise_version` to `version` naming this cluster's members (the
        processor accepts it only if each reported code that knows it). False: the ring is full."""
        term = self._begin(now_ns)
        config = self.config
        payload = encode_admin(ADMIN_RAISE_VERSION, version=version,
                               members=list(config.members or (config.node_number,)))  # fmt: skip
        return term != _BLOCKED and self._sequence(RecordType.ADMIN, 0, 0, payload, term)

    def sequence_rules_version(self, now_ns: int, version: int) -> bool:
        """Sequence an ADMIN `rules_version` making seqd's session rules `version` active (the blp
        reported that every member's code applies it: sequencer/rules_versions.py). False: the
        ring is full."""
        term = self._begin(now_ns)
        payload = encode_admin(ADMIN_RULES_VERSION, version=version)
        return term != _BLOCKED and self._sequence(RecordType.ADMIN, 0, 0, payload, term)

    def limit_command_version(self, active: int) -> None:
        """In a cluster: admit commands only up to the log's active app version (0: none known
        yet, so only version 1, which every build of the app reads) and the app's own."""
        self.command_version_max = min(self.config.command_version_max, max(active, 1))

    # -- sessions -----------------------------------------------------------------------------

    def connection_refusal(self) -> str | None:
        """Why a new connection is refused before its HELLO (ERROR `unavailable`), or None."""
        if not self.accepting:
            return "the node is not accepting sessions (draining); retry later"
        if len(self.sessions) >= self.config.sessions_max:
            return (
                f"the node is not accepting sessions (sessions_max={self.config.sessions_max} "
                "reached); retry later"
            )
        return None

    def fail(self, session: S, code: protocol.ErrorCode, message: str) -> None:
        """Send a fatal ERROR and have the shell close the connection. A session already closing
        gets nothing more: it had its fatal ERROR, or its client hung up."""
        if session.closing:
            return
        session.connection.send_into(session.out, protocol.Error(code=code, message=message, fatal=True))
        session.closing = True

    def _open_session(self, session: S, hello: protocol.Hello, term: int) -> bool:
        session_id, counter = next_session_id(self._session_id_base, self._session_counter, self.sessions)
        payload = encode_session_open(hello.client_id, self.config.node_name)
        if not self._sequence(RecordType.SESSION_OPEN, session_id, 0, payload, term):
            return False
        self._session_counter = counter + 1
        session.session_id = session_id
        session.client_id = hello.client_id
        session.subscribed = hello.subscribe_events
        self.sessions[session_id] = session
        if session.subscribed:
            self.subscribers.append(session)
        config = self.config
        welcome = protocol.Welcome(
            session_id=session_id,
            node=config.node_name,
            frame_bytes_max=protocol.FRAME_BYTES_MAX,
            leader=self.stamping.leader,
            command_bytes_max=config.command_bytes_max,
            in_flight_max=IN_FLIGHT_MAX,
            saved_replies_max=SAVED_REPLIES_MAX,
            replicas=list(config.replicas),
        )
        session.connection.send_into(session.out, welcome)
        return True

    def close_session(self, session: S, now_ns: int) -> None:
        """The connection is gone: sequence SESSION_CLOSE so every replica forgets the session.
        A close that finds the ring full waits, in order, for `retry` (at most sessions_max)."""
        session_id = session.session_id
        session.backlog = None
        if not session_id or self.sessions.get(session_id) is not session:
            return  # never opened (no HELLO sequenced), or already closed
        del self.sessions[session_id]
        if session.subscribed:
            self.subscribers.remove(session)
        self.pending_closes.append(session_id)
        self._sequence_closes(now_ns)

    def _sequence_closes(self, now_ns: int) -> bool:
        pending = self.pending_closes
        term = self._begin(now_ns)
        if term == _BLOCKED:
            return False
        while pending:
            if not self._sequence(RecordType.SESSION_CLOSE, pending[0], 0, b"", term):
                return False
            pending.popleft()
        return True

    @property
    def waiting(self) -> bool:
        """Records wait for ring space (closes, a snapshot): call `retry` soon."""
        return bool(self.pending_closes) or self.snapshot_pending

    def retry(self, now_ns: int) -> bool:
        """Claim the records that waited for ring space, in order. True when none waits."""
        if self.pending_closes and not self._sequence_closes(now_ns):
            return False
        if self.snapshot_pending:
            return self.request_snapshot(now_ns)
        return True

    # -- client frames in, records out ----------------------------------------------------------

    def process(self, session: S, now_ns: int, disk_free_bytes: int | None = None) -> int:
        """Turn every complete frame of one session into records, until it needs data or blocks.

        Frames come from `session.backlog` (a batch that waited for ring space) or the codec.
        When the ring fills, the rest of the batch is left in `session.backlog`: the shell pauses
        the session's reads and calls again once there is room.

        Args:
            now_ns: the clock, read once by the caller for the whole batch.
            disk_free_bytes: None while the journal has room; while it is short of space, the
                bytes free, named in the `disk_full` refusal of new sessions and commands.

        Returns:
            The number of COMMAND records sequenced.

        Raises:
            protocol.LocalProtocolError: the gateway misused its own codec (a bug, never the
                client's fault).
        """
        if session.closing:
            return 0  # it was sent a fatal ERROR or hung up: nothing more it sends counts
        if now_ns > self.last_timestamp_ns:  # `_begin`, inlined: this runs once per read
            self.last_timestamp_ns = now_ns
        timestamp_ns = self.last_timestamp_ns
        stamping = self.stamping
        connection = session.connection
        claim = self._claim
        pack_command = _COMMAND_TAIL.pack_into
        command_tail_bytes = _COMMAND_TAIL.size
        command_type = protocol.Command
        config = self.config
        command_bytes_max = config.command_bytes_max
        command_version_max = self.command_version_max
        in_flight_max = IN_FLIGHT_MAX
        every_records = self._snapshot_every_records
        every_bytes = self._snapshot_every_bytes
        index_step = self._index_step
        commands = 0
        try:
            frames = session.backlog or connection.next_frames()
            session.backlog = None
            while frames:
                stamp = stamping.begin(self.next_index)
                if stamp.term_start_index and not self._start_term(stamp):
                    session.backlog = frames  # the term's TERM_START first: the batch waits
                    return commands
                term = stamp.term
                session_id = session.session_id
                for position, frame in enumerate(frames):
                    if type(frame) is command_type:
                        # The codec refuses a COMMAND before HELLO, and a HELLO that waited for
                        # ring space stays ahead of the commands in the backlog.
                        assert session_id, "COMMAND before the session opened"
                        if disk_free_bytes is not None:
                            self._refuse_disk_full(session, disk_free_bytes)
                            return commands
                        payload = frame.payload
                        payload_bytes = len(payload)
                        version = frame.version
                        request_id = frame.request_id
                        acked_request_id = frame.acked_request_id
                        if (
                            payload_bytes > command_bytes_max
                            or not 1 <= version <= command_version_max
                            or not 0 < request_id <= acked_request_id + in_flight_max
                        ):
                            self._refuse_command(session, frame)
                            continue
                        # The ring frame type, inline: version is 1..VERSION_MAX (checked above).
                        view = claim(command_tail_bytes + payload_bytes, _COMMAND | version << 16)
                        if view is None:
                            session.backlog = frames[position:]
                            return commands
                        index = self.next_index
                        pack_command(view, 0, index, term, timestamp_ns, session_id, request_id, acked_request_id)
                        view[command_tail_bytes:] = payload
                        self.next_index = index + index_step
                        commands += 1
                        self.records_since_snapshot += 1
                        self.bytes_since_snapshot += payload_bytes
                        if self.records_since_snapshot >= every_records or self.bytes_since_snapshot >= every_bytes:
                            self._sequence_snapshot(term)
                    elif type(frame) is protocol.Hello:
                        assert not session_id, "the codec refuses a second HELLO"
                        if disk_free_bytes is not None:  # a SESSION_OPEN is a record too
                            self._refuse_disk_full(session, disk_free_bytes)
                            return commands
                        if not self._open_session(session, frame, term):
                            session.backlog = frames[position:]
                            return commands
                        session_id = session.session_id
                    elif type(frame) is protocol.Ping:
                        connection.send_into(session.out, protocol.Pong(nonce=frame.nonce))
                    elif type(frame) is protocol.Error:
                        self._client_error(session, frame)
                        if frame.fatal:
                            return commands  # the client hangs up; nothing after its ERROR counts
                    else:
                        # The daemon sends no PING, so a PONG answers nothing: ignored, as the
                        # docs say. The codec lets a client send only these five kinds.
                        assert type(frame) is protocol.Pong, type(frame)
                frames = connection.next_frames()
            if connection.peer_closed:
                session.closing = True  # every whole frame it sent is handled: close our end
        except protocol.LocalProtocolError:
            raise  # the gateway misused its own codec: a bug, not the client's fault
        except protocol.ProtocolError as error:
            code = protocol.ErrorCode(error.code)  # every code the codec raises at a peer
            self._report(
                Report.PROTOCOL_ERROR,
                f"protocol.{code}",
                f"session {session.session_id:x}: protocol error {code}: {error.message}; sent an "
                "error frame and closed it",
                None,
            )
            self.fail(session, code, error.message)
        return commands

    def _client_error(self, session: S, error: protocol.Error) -> None:
        """A client says why it is unhappy: logged (once per code, with a count) and counted. A
        fatal one is followed by the client closing, so the connection is closed at once."""
        what = "closes the connection" if error.fatal else "carries on"
        self._report(
            Report.CLIENT_ERROR,
            "client.error_frame",  # one key: the code is the client's, any string
            f"session {session.session_id:x} (client {session.client_id}) sent ERROR "
            f"{error.code!r}: {error.message[:CLIENT_MESSAGE_LOGGED_CHARS_MAX]!r}; it {what}",
            None,
        )
        if error.fatal:
            session.closing = True

    def _refuse_command(self, session: S, command: protocol.Command) -> None:
        """A command the gateway can tell is wrong without the log gets a REJECTED reply with
        index 0 (not a protocol error, which would make the client reconnect and resend it for
        ever); nothing enters the log, so replicas are unaffected."""
        config = self.config
        refusal = admission_refusal(command, config.command_bytes_max, self.command_version_max,
                                    config.command_version_max)  # fmt: skip
        assert refusal is not None, command  # the inline check and admission_refusal agree
        code, message = refusal
        self._report(Report.CLIENT_ERROR, f"client.{code}", f"session {session.session_id:x}: {message}", None)
        reply = protocol.Reply(
            command.request_id, 0, protocol.ReplyStatus.REJECTED, command.version,
            protocol.encode_rejection(code, message),
        )  # fmt: skip
        session.connection.send_into(session.out, reply)

    def _refuse_disk_full(self, session: S, disk_free_bytes: int) -> None:
        """The journal's disk is short of space: refuse this connection's new work with the
        retryable `disk_full` ERROR and close it. Nothing of it entered the log; the client
        reconnects with backoff and resends."""
        message = (
            f"the node's disk is full ({disk_free_bytes} bytes free for the journal): it takes no "
            "new commands or sessions until space is freed. Retry later; acknowledged commands "
            "are safe, and unanswered ones are answered when resent"
        )
        self._report(Report.DISK_FULL, "node.disk_full", f"session {session.session_id:x}: refused: {message}", None)
        self.fail(session, protocol.ErrorCode.DISK_FULL, message)

    # -- snapshots and timers -------------------------------------------------------------------

    def request_snapshot(self, now_ns: int) -> bool:
        """Sequence a SNAPSHOT record (SIGUSR1, `seqd snapshot`): every replica snapshots the
        same state at its index. False when the ring is full: it waits for `retry`."""
        term = self._begin(now_ns)
        if term == _BLOCKED:
            self.snapshot_pending = True
            return False
        return self._sequence_snapshot(term)

    def log_applied(self, now_ns: int, applied_index: int, applied_position: int, snapshot_index: int) -> bool:
        """Cluster mode's automatic snapshot policy: the leader requests a SNAPSHOT after every
        `snapshot_every_records` records or `snapshot_every_bytes` bytes of log its blp applied
        (ring bytes: records with their headers) since the last snapshot, its own last request or
        its taking office, whichever is latest. A follower requests none; it only keeps the mark
        moving, so a new leader counts from its election, not from records the old leader covered.

        Args:
            applied_index, applied_position: this node's blp's progress (`blp.applied.*`).
            snapshot_index: the index of the newest snapshot this node wrote (`snapshot.last.index`,
                or `snapshotter.snapshot.index` with `snapshot.writer = "replica"`).

        Returns:
            Whether a SNAPSHOT record was requested (it may wait for ring space: `retry`).
        """
        mark_index, mark_position = self._log_mark
        if not self.stamping.sequences_timers:
            self._log_mark = (applied_index, applied_position)
            return False
        since_records = applied_index - max(mark_index, snapshot_index)
        if since_records < self._log_every_records and applied_position - mark_position < self._log_every_bytes:
            return False
        self._log_mark = (applied_index, applied_position)
        self.request_snapshot(now_ns)
        return True

    def _sequence_snapshot(self, term: int) -> bool:
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0
        if self._sequence(RecordType.SNAPSHOT, 0, 0, b"", term):
            self.snapshot_pending = False
            where = f"at index {self.next_index - 1}" if self._index_step else "(the leader stamps its index)"
            self._report(Report.SNAPSHOT_REQUESTED, "snapshot.requested", f"snapshot requested {where}", None)
            return True
        if not self.snapshot_pending:
            self.snapshot_pending = True
            self._report(Report.SNAPSHOT_DEFERRED, "snapshot.deferred", "ring full: snapshot request deferred", None)
        return False

    def fire_due_timers(self, now_ns: int) -> bool:
        """Sequence TIMER_FIRED for every timer due at `now_ns`, in deadline order. Nothing while
        this gateway does not sequence timers (a cluster's follower): they stay due, for the
        moment it leads (`StampingPolicy.sequences_timers`).

        Returns:
            False when the ring filled first: the timers not fired stay due; call again soon.
        """
        timers = self.timers
        due = timers.next_due(now_ns)
        if due is None or not self.stamping.sequences_timers:
            return True
        term = self._begin(now_ns)  # the stamp is now_ns or later: never before the deadline
        if term == _BLOCKED:
            return False
        while due is not None:
            timer_id = due.timer_id
            payload = encode_timer_fired(timer_id, due.deadline_ns)
            if not self._sequence(RecordType.TIMER_FIRED, 0, timer_id, payload, term):
                return False
            timers.fired(due)
            due = timers.next_due(now_ns)
        return True

    # -- egress in, client frames out -------------------------------------------------------------

    def route_egress(self, frames: list[tuple[int, memoryview]], dirty: list[S]) -> bool:
        """Frame the blp's outputs for their sessions; take its timer requests.

        Replies go to the session with that id if it is attached to this node, events to every
        subscribed session; the bytes are appended to each session's `out`, and a session whose
        `out` was empty is appended to `dirty` for the shell to write. Each output is handled on
        its own: one that cannot be framed is reported and costs only itself.

        Returns:
            Whether the timer schedule changed (the shell re-arms its timer).
        """
        sessions = self.sessions
        subscribers = self.subscribers
        unpack_session_id = _SESSION_ID.unpack_from
        timers_changed = False
        for kind, view in frames:
            try:
                if kind == _EGRESS_REPLY:
                    (session_id,) = unpack_session_id(view, 0)
                    session = sessions.get(session_id)
                    if session is not None:
                        out = session.out
                        if not out:
                            dirty.append(session)
                        try:
                            # After its session id a reply is the client frame's body as is.
                            session.connection.send_reply_body_into(out, view[8:])
                        except protocol.LocalProtocolError as error:
                            self._reply_not_framed(session, view, error)
                elif kind == _EGRESS_EVENT:
                    if subscribers:  # nobody listens: not even decoded
                        self._send_event(view, dirty)
                elif kind == _EGRESS_TIMER_SCHEDULE:
                    schedule = egress.decode(kind, view)
                    assert isinstance(schedule, TimerSchedule)
                    self.timers.schedule(schedule.timer_id, schedule.deadline_ns)
                    timers_changed = True
                elif kind == _EGRESS_TIMER_CANCEL:
                    cancel = egress.decode(kind, view)
                    assert isinstance(cancel, TimerCancel)
                    self.timers.cancel(cancel.timer_id)
                    timers_changed = True
                else:
                    self._send_event_omitted(view, kind, dirty)
            except Exception as error:  # one output's failure must not cost the batch
                self.output_failed(kind, error)
        return timers_changed

    def _reply_not_framed(self, session: S, view: memoryview, error: protocol.LocalProtocolError) -> None:
        """A reply the session's codec refused: the connection is going away, or it is too large."""
        if session.closing or session.connection.error is not None:
            # We sent it a fatal ERROR or its connection failed: it is closing, so the reply
            # would be dropped anyway. The client reconnects, resends, and gets the saved reply.
            return
        if error.code != "frame_too_large":
            raise error
        # The blp replaces every reply too large to frame (sequencer.egress); this one was saved
        # by an older seqd (a snapshot or journal from before it did). The requester still gets
        # a clear error, the one the blp would have made.
        reply = egress.decode(_EGRESS_REPLY, view)
        assert isinstance(reply, egress.Reply)
        payload_bytes = len(reply.payload)
        self._report(
            Report.OUTPUT_ERROR,
            "egress.reply_too_large",
            f"the reply to request {reply.request_id} of session {session.session_id:x} (client "
            f"{session.client_id}) at index {reply.index} is {payload_bytes} bytes, over "
            f"REPLY_PAYLOAD_BYTES_MAX={egress.REPLY_PAYLOAD_BYTES_MAX}: sent it a REJECTED "
            f"{egress.REPLY_TOO_LARGE} instead. The reply was saved by an older seqd; nothing to do",
            None,
        )
        session.connection.send_reply_into(
            session.out, reply.request_id, reply.index, protocol.ReplyStatus.REJECTED, reply.version,
            egress.reply_too_large_payload(payload_bytes, applied=reply.status == protocol.ReplyStatus.OK),
        )  # fmt: skip

    def _send_event(self, view: memoryview, dirty: list[S]) -> None:
        event = egress.decode(_EGRESS_EVENT, view)
        assert isinstance(event, egress.Event)
        for session in self.subscribers:
            out = session.out
            if not out:
                dirty.append(session)
            try:
                session.connection.send_event_into(out, event.index, event.version, event.payload)
            except protocol.LocalProtocolError as error:
                if session.closing or session.connection.error is not None:
                    continue  # closing: events are not resent after a reconnect anyway
                # The blp replaces events too large to frame (EVENT_OMITTED); count one that
                # came through anyway and carry on with the other subscribers and outputs.
                self.output_failed(_EGRESS_EVENT, error)

    def _send_event_omitted(self, view: memoryview, kind: int, dirty: list[S]) -> None:
        """An event the blp left out (too large to frame): each subscriber gets a non-fatal
        ERROR in its place, so it learns at which index an event is missing."""
        omitted = egress.decode(kind, view)  # raises EgressError for an unknown kind
        assert isinstance(omitted, egress.EventOmitted), omitted
        self._report(Report.OUTPUT_ERROR, f"egress.{omitted.code}", f"an app bug: {omitted.message}", None)
        notice = protocol.Error(code=omitted.code, message=omitted.message, fatal=False)
        for session in self.subscribers:
            out = session.out
            if not out:
                dirty.append(session)
            try:
                session.connection.send_into(out, notice)
            except protocol.LocalProtocolError as error:
                if not (session.closing or session.connection.error is not None):
                    self.output_failed(kind, error)

    def output_failed(self, kind: int, error: Exception) -> None:
        """Report one output that could not be sent; it costs only itself."""
        self._report(
            Report.OUTPUT_ERROR,
            "egress.output_failed",
            f"could not send an egress output of kind {kind} ({type(error).__name__}: {error}); "
            "skipped it alone, the rest of its batch was sent. This is a seqd bug: report it "
            "with this log",
            error,
        )
