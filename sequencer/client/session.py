"""The client session as a sans-I/O core: what `Client` and `AsyncClient` share, with no I/O.

Theory of operation
-------------------

A client has a stable `client_id` and numbers its requests 1, 2, 3, ... (or from
`first_request_id` when a restarted process resumes an old id). Every request stays *in flight*
until its reply arrives, whatever happens to the connection in between: timeouts and lost
connections do not forget it. `acked_request_id`, sent with every command, is the highest request
id such that every reply up to it has arrived; the daemon keeps each client's replies above it,
so a resent request gets its saved reply instead of being applied again.

When the connection drops (EOF, ECONNRESET, the socket file gone while the daemon restarts), the
client reconnects with capped exponential backoff, says HELLO with the same client id, waits for
WELCOME, and resends every in-flight request in request-id order. The daemon's dedup table makes
application exactly-once; a reply may arrive twice, and a reply for a request no longer in flight
is ignored. A REDIRECT names the socket to use instead. If the daemon stays unreachable for
`reconnect_timeout_s`, the waiting call raises `ConnectionLost`; the requests stay in flight and
the next call starts reconnecting again.

`Session` holds all of that state and every decision, and does no I/O (h11's shape, in
`sequencer/client/protocol.py` terms one level up): the shells in `blocking.py` and `aio.py` own
the socket and the clock, tell the session what happened, and do what it answers.

    events from the shell                       what the session answers
    begin_attempt(now)                          the socket path to connect to
    connection_made()                           HELLO appended to `outgoing`
    receive_data(data, now)                     replies delivered to their requests, events
                                                buffered, PONGs and resends in `outgoing`;
                                                or Retry / Fail when the connection must end
    connection_lost(error, now)                 Retry(delay_s) or Fail(error)
    add(request)                                the COMMAND appended to `outgoing`, or held
    has_room(), timed_out(doing)                the window; the TimedOut to raise

`outgoing` holds the bytes the shell must write to the current connection, in order; the shell
writes them whenever it can and deletes what was written. `Retry(delay_s)` means: close the socket
(the session has already forgotten it), wait `delay_s`, then `begin_attempt` again. `Fail(error)`
means: close the socket and raise (or report) `error`; the outage is over, and the next call
starts a new one. Time enters only as `now` arguments, in seconds on any monotonic clock.

The window bounds how far the newest request may run ahead of `acked_request_id`: a request is
submitted only while `request_id - acked_request_id <= window`. That span, not the count in flight,
is what the daemon must keep saved replies for, so it is what the window bounds; when replies
arrive in order (always, on one connection) the two are equal. After a reconnect to a node that
advertises a smaller window, the requests beyond it are held and sent as replies make room.
"""

from __future__ import annotations

import collections
from typing import Any, Final, Protocol

from .errors import CommandRejected, ConnectionLost, Duplicate, ProtocolViolation, TimedOut
from .protocol import (
    COMMAND_HEADER,
    FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
    Connection,
    Error,
    Event,
    Frame,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Redirect,
    Reply,
    ReplyStatus,
    Side,
    Welcome,
    decode_rejection,
)
from .reconnect import (
    RECONNECT_BACKOFF_S_MAX,
    RECONNECT_BACKOFF_S_MIN,
    REDIRECTS_MAX,
    RETRYABLE_ERRNOS,
    RETRYABLE_ERROR_CODES,
    SOCKET_PATH_BYTES_MAX,
    Action,
    ConnectionEnded,
    Fail,
    Retry,
    socket_path_problem,
)
from .view import SessionView

__all__ = [
    "EVENTS_BUFFERED_MAX",
    "IN_FLIGHT_LIMIT_MAX",
    "RECONNECT_BACKOFF_S_MAX",
    "RECONNECT_BACKOFF_S_MIN",
    "REDIRECTS_MAX",
    "RETRYABLE_ERRNOS",
    "RETRYABLE_ERROR_CODES",
    "SEND_BATCH_BYTES",
    "SOCKET_PATH_BYTES_MAX",
    "Action",
    "ClientSchema",
    "ConnectionEnded",
    "Fail",
    "Request",
    "Retry",
    "Session",
    "SessionView",
]

# Each in-flight request is kept (payload included) until its reply arrives, for resending; the
# window bounds that memory and the daemon's saved replies per client. The daemon keeps at most
# this many unacknowledged replies per client (the blp's dedup table,
# `sequencer.processor.SAVED_REPLIES_MAX`); a larger window could lose a reply across a reconnect:
# the resent request would find its reply forgotten and get DUPLICATE instead.
IN_FLIGHT_LIMIT_MAX: Final = 1024
# Queued command bytes that make `submit` write at once instead of waiting for a flush or a wait:
# about a socket buffer's worth, so one write system call carries a few hundred small commands.
SEND_BATCH_BYTES: Final = 64 * 1024
# Events received but not yet taken by the application. Past this the oldest are dropped and
# counted (`events_dropped`): an application that subscribes and never reads must not grow
# without bound, and an event carries its log index, so a reader can see the gap.
EVENTS_BUFFERED_MAX: Final = 65536
_COMMAND_FRAME_OVERHEAD_BYTES: Final = FRAME_HEADER_BYTES + COMMAND_HEADER.size

assert SEND_BATCH_BYTES <= FRAME_BYTES_MAX


class ClientSchema(Protocol):
    """What the client needs from an app's `sequencer.schema.Schema`."""

    def encode_command(self, command: Any) -> tuple[int, bytes]: ...

    def decode_reply(self, version: int, data: Any) -> Any: ...

    def decode_event(self, version: int, data: Any) -> Any: ...


class Log(Protocol):
    """Where the session reports what an operator may want to know (a `logging.Logger`)."""

    def info(self, message: str, /, *args: object) -> None: ...

    def warning(self, message: str, /, *args: object) -> None: ...


# A connection that was up ended: reconnect at once, the outage has only just begun.
_RETRY_AT_ONCE: Final = Retry(0.0)


class Request:
    """A submitted request, in flight until its reply arrives (in `_reply`).

    The shells subclass it with what their callers wait on.
    """

    __slots__ = ("_reply", "payload", "request_id", "version")

    def __init__(self, request_id: int, version: int, payload: bytes) -> None:
        self.request_id = request_id
        self.version = version
        self.payload = payload
        self._reply: Reply | None = None

    def done(self) -> bool:
        return self._reply is not None


class _State:
    """Where the current connection is (plain ints: compared on the hot path)."""

    DISCONNECTED: Final = 0  # no socket; begin_attempt starts one
    HANDSHAKING: Final = 1  # HELLO sent, waiting for WELCOME or REDIRECT
    CONNECTED: Final = 2  # welcomed: commands flow


class Session:
    """One client session's state and decisions, driven by a shell (see the module docstring).

    Args:
        client_id: stable identity for dedup, in 1..2**64-1.
        socket_path: the daemon's Unix socket (changed by REDIRECT).
        schema: the app's schema; without one, commands are bytes and replies `Reply` frames.
        timeout_s: the shells' default timeout of a call.
        first_request_id: the first request id to use (>= 1).
        in_flight_max: the window (1..IN_FLIGHT_LIMIT_MAX); a node may advertise a smaller one.
        reconnect_timeout_s: how long an outage may last before `ConnectionLost`.
        subscribe_events, client_name: sent in HELLO.
        log: where notices go (the shells pass a `logging.Logger`).

    Raises:
        ValueError: an argument is out of its range (the message names the bound).
    """

    def __init__(
        self,
        client_id: int,
        socket_path: str,
        schema: ClientSchema | None,
        timeout_s: float,
        first_request_id: int,
        in_flight_max: int,
        reconnect_timeout_s: float,
        subscribe_events: bool,
        client_name: str,
        log: Log,
    ) -> None:
        if not 0 < client_id < 1 << 64:
            raise ValueError(f"client_id={client_id} must be in 1..2**64-1")
        problem = socket_path_problem(socket_path)
        if problem is not None:
            raise ValueError(problem)
        if first_request_id < 1:
            raise ValueError(f"first_request_id={first_request_id} must be >= 1")
        if not 1 <= in_flight_max <= IN_FLIGHT_LIMIT_MAX:
            raise ValueError(
                f"in_flight_max={in_flight_max} must be in "
                f"1..IN_FLIGHT_LIMIT_MAX={IN_FLIGHT_LIMIT_MAX}"
            )
        if timeout_s <= 0 or reconnect_timeout_s <= 0:
            raise ValueError(
                f"timeout_s={timeout_s} and reconnect_timeout_s={reconnect_timeout_s} must be > 0"
            )
        self.client_id = client_id
        self.socket_path = socket_path
        self.schema = schema
        self.timeout_s = timeout_s
        self.in_flight_max = in_flight_max
        self.reconnect_timeout_s = reconnect_timeout_s
        self.subscribe_events = subscribe_events
        self.client_name = client_name
        self.log = log
        # Requests whose reply has not arrived, by request id; insertion order is request-id
        # order, which is the order to resend them in.
        self.in_flight: dict[int, Request] = {}
        self.next_request_id = first_request_id
        # Invariant: every request id <= acked_request_id has its reply, and none is in flight;
        # acked_request_id + 1 is in flight or is next_request_id.
        self.acked_request_id = first_request_id - 1
        # The effective window: in_flight_max, capped by what the node advertises in WELCOME.
        self.window = in_flight_max
        # The lowest request id not yet written to the current connection; 0 while there is no
        # welcomed connection. Invariant when not 0: acked_request_id < unsent_request_id <=
        # next_request_id; it equals next_request_id unless requests are held (window shrank).
        self.unsent_request_id = 0
        self.frame_bytes_max = FRAME_BYTES_MAX
        self.session_id = 0
        self.node = ""
        # The node's query replicas (WELCOME) and the highest log index of a reply received:
        # a query's default consistency waits until a replica has applied it (read-your-writes).
        self.replicas: list[str] = []
        self.last_index = 0
        self.events: collections.deque[Event] = collections.deque()
        self.outgoing = bytearray()
        # A shell that wakes a waiter per reply sets a list here: receive_data appends every
        # request it answers, and the shell takes them. None: nobody needs telling (the blocking
        # shell looks at the request it waits for).
        self.answered: list[Any] | None = None
        self.connection: Connection | None = None
        self.state = _State.DISCONNECTED
        # The outage: from the first attempt after a connection was lost (or the very first
        # attempt) to the next WELCOME, or to a Fail. None while connected or between outages.
        self.outage_started_s: float | None = None
        self.backoff_s = RECONNECT_BACKOFF_S_MIN
        self.redirects = 0
        self.last_error: BaseException | None = None
        self.reconnects = 0
        self.replies_ignored = 0
        self.events_dropped = 0

    @property
    def connected(self) -> bool:
        """Welcomed: commands flow on the current connection."""
        return self.state == _State.CONNECTED

    @property
    def give_up_at(self) -> float:
        """When the current outage becomes `ConnectionLost`: bound each attempt by it."""
        assert self.outage_started_s is not None
        return self.outage_started_s + self.reconnect_timeout_s

    # -- requests -----------------------------------------------------------------------------

    def encode(self, command: Any) -> tuple[int, bytes]:
        """The version and payload of `command`, checked against the frame limit.

        Raises:
            TypeError: a command that is not bytes without a schema.
            ValueError: the command does not fit in a frame.
        """
        if self.schema is None:
            if not isinstance(command, bytes | bytearray | memoryview):
                raise TypeError(
                    f"without a schema a command is bytes, got {type(command).__name__}: "
                    "pass schema=YourApp.schema to send structs"
                )
            version, payload = 1, bytes(command)
        else:
            version, payload = self.schema.encode_command(command)
        if len(payload) + _COMMAND_FRAME_OVERHEAD_BYTES > self.frame_bytes_max:
            raise ValueError(
                f"command encodes to {len(payload)} bytes; with the {_COMMAND_FRAME_OVERHEAD_BYTES}"
                f"-byte frame and command headers that exceeds frame_bytes_max="
                f"{self.frame_bytes_max}: make the command smaller or store its data elsewhere"
            )
        return version, payload

    def has_room(self) -> bool:
        """Whether the window admits the next request (`add` may be called)."""
        return self.next_request_id - self.acked_request_id <= self.window

    def skip_to(self, request_id: int) -> None:
        """Number the next request `request_id`, leaving the ids between unused: a bridge numbers
        its requests by the source's log index (docs/integration.md). An unused id needs no reply,
        so `acked_request_id` passes over it like over an answered one.

        Raises:
            ValueError: `request_id` is below `next_request_id` (ids only go up).
        """
        if request_id < self.next_request_id:
            raise ValueError(
                f"request_id={request_id} is below next_request_id={self.next_request_id}: "
                "request ids only go up (a lower one would be a resend of another command)"
            )
        if self.acked_request_id == self.next_request_id - 1:  # nothing in flight
            self.acked_request_id = request_id - 1
        if self.unsent_request_id == self.next_request_id:  # welcomed, nothing held
            self.unsent_request_id = request_id
        self.next_request_id = request_id

    def add(self, request: Request) -> None:
        """Put `request` in flight, and its COMMAND in `outgoing` (or held, past the window).

        The request must be numbered `next_request_id` and the window must have room
        (`has_room()`): the shells check both just before, so this once-per-request path does not.
        """
        request_id = request.request_id
        self.next_request_id = request_id + 1
        self.in_flight[request_id] = request
        if self.unsent_request_id == request_id:
            # Welcomed and nothing held: the fast path of a pipelining client.
            self.unsent_request_id = request_id + 1
            self.connection.send_command_into(  # type: ignore[union-attr]
                self.outgoing, request_id, self.acked_request_id, request.version, request.payload
            )

    def outcome(self, request: Request) -> Any:
        """The decoded reply of an answered request.

        Raises:
            CommandRejected, Duplicate: the daemon's answer.
            ProtocolViolation: a REJECTED reply whose payload does not decode.
        """
        reply = request._reply
        assert reply is not None, request.request_id
        status = reply.status
        if status == ReplyStatus.OK:
            if self.schema is None:
                return reply
            return self.schema.decode_reply(reply.version, reply.payload)
        if status == ReplyStatus.REJECTED:
            try:
                code, message = decode_rejection(reply.payload)
            except ProtocolError as error:
                raise ProtocolViolation(error.code, error.message) from None
            raise CommandRejected(code, message, request.request_id)
        assert status == ReplyStatus.DUPLICATE, status
        raise Duplicate(request.request_id, reply.index)

    def decode_event(self, event: Event) -> Any:
        if self.schema is None:
            return event
        return self.schema.decode_event(event.version, event.payload)

    def timed_out(self, doing: str) -> TimedOut:
        """The error for a call whose own deadline passed while `doing`."""
        if self.state != _State.CONNECTED and self.last_error is not None:
            return TimedOut(
                f"timed out {doing}: the daemon at {self.socket_path} is unreachable "
                f"(last error: {self.last_error!r}); requests in flight stay in flight"
            )
        return TimedOut(
            f"timed out {doing} (client {self.client_id}, {len(self.in_flight)} requests in "
            "flight); requests in flight stay in flight and may still be applied: wait again "
            "or raise the timeout"
        )

    # -- the connection -----------------------------------------------------------------------

    def begin_attempt(self, now: float) -> str:
        """A connection attempt starts at `now`: the socket path to connect to."""
        assert self.state == _State.DISCONNECTED, self.state
        if self.outage_started_s is None:
            self.outage_started_s = now
        return self.socket_path

    def connection_made(self) -> None:
        """The socket is connected: HELLO goes first."""
        assert self.state == _State.DISCONNECTED, self.state
        assert self.outage_started_s is not None, "begin_attempt first"
        self.connection = Connection(Side.CLIENT)
        self.state = _State.HANDSHAKING
        self.outgoing.clear()
        self.connection.send_into(
            self.outgoing,
            Hello(
                client_id=self.client_id,
                subscribe_events=self.subscribe_events,
                client_name=self.client_name,
            ),
        )

    def abandon(self) -> None:
        """The shell dropped the connection itself (close, cancellation, an interrupt)."""
        self._disconnect()

    def connection_lost(self, error: BaseException | None, now: float) -> Action:
        """The attempt or the connection failed: EOF (None), an OSError, or a handshake timeout.

        A welcomed connection is retried at once. A failed attempt is retried after a backoff,
        unless `error` is an OSError that waiting will not cure (EACCES: fail at once), or the
        outage has lasted reconnect_timeout_s (ConnectionLost).
        """
        was_connected = self.state == _State.CONNECTED
        if error is None:
            error = ConnectionEnded("EOF" if was_connected else "EOF during the handshake")
        elif isinstance(error, TimeoutError) and self.state == _State.HANDSHAKING:
            error = ConnectionEnded("no WELCOME in time: the daemon took the connection but did "
                                    "not answer HELLO")
        if (
            not was_connected
            and isinstance(error, OSError)
            and not isinstance(error, TimeoutError)
            and error.errno not in RETRYABLE_ERRNOS
        ):
            if error.filename is None and error.strerror is not None:
                error.filename = self.socket_path  # so the message names the socket
            return self._fail(error)
        return self._ended(error, now)

    def receive_data(self, data: bytes, now: float) -> Action | None:
        """Bytes read from the current connection (not EOF: that is `connection_lost`).

        Replies go to their requests (`Request._reply`, and `answered` when set); events to
        `events`; PONGs, resends and held commands to `outgoing`. Returns None to carry on, or how
        the connection ends (replies before the end are delivered all the same).
        """
        assert data, "EOF is connection_lost(None, now)"
        connection = self.connection
        assert connection is not None, "receive_data without a connection"
        connection.receive_data(data)
        in_flight = self.in_flight
        answered = self.answered
        while True:
            try:
                frames = connection.next_frames()
            except ProtocolError as error:
                return self._fail(self._garbage(error))
            if not frames:
                break
            for frame in frames:
                if type(frame) is Reply:
                    request = in_flight.pop(frame.request_id, None)
                    if request is None:
                        # A duplicate after a resend, or a reply to a request from before a restart.
                        self.replies_ignored += 1
                        continue
                    request._reply = frame
                    if frame.index > self.last_index:
                        self.last_index = frame.index
                    if answered is not None:
                        answered.append(request)
                    if frame.request_id == self.acked_request_id + 1:
                        acked = frame.request_id
                        next_request_id = self.next_request_id
                        while acked + 1 < next_request_id and acked + 1 not in in_flight:
                            acked += 1
                        self.acked_request_id = acked
                else:
                    action = self._control(frame, now)
                    if action is not None:
                        return action
        if 0 < self.unsent_request_id < self.next_request_id:
            self._send_held()
        return None

    # -- inside ---------------------------------------------------------------------------------

    def _control(self, frame: Frame, now: float) -> Action | None:
        if type(frame) is Event:
            events = self.events
            if len(events) >= EVENTS_BUFFERED_MAX:
                events.popleft()
                self.events_dropped += 1
            events.append(frame)
        elif type(frame) is Ping:
            assert self.connection is not None
            self.connection.send_into(self.outgoing, Pong(nonce=frame.nonce))
        elif type(frame) is Pong:
            pass
        elif isinstance(frame, Welcome):
            self._welcomed(frame)
        elif isinstance(frame, Redirect):
            return self._redirected(frame, now)
        elif isinstance(frame, Error):
            if frame.code in RETRYABLE_ERROR_CODES:
                # The daemon said "not now": back off and reconnect.
                return self._ended(ConnectionEnded(f"{frame.code}: {frame.message}"), now)
            if frame.fatal:
                return self._fail(ProtocolViolation(frame.code, frame.message))
            self.log.warning("seqd daemon warns: %s: %s", frame.code, frame.message)
        else:
            raise AssertionError(f"the codec let an unexpected frame through: {frame!r}")
        return None

    def _welcomed(self, welcome: Welcome) -> None:
        assert self.state == _State.HANDSHAKING, self.state  # the codec refuses a second WELCOME
        self.state = _State.CONNECTED
        self.session_id = welcome.session_id
        self.node = welcome.node
        self.replicas = list(welcome.replicas)
        self.frame_bytes_max = min(FRAME_BYTES_MAX, welcome.frame_bytes_max)
        # The node's advertised window caps ours (a WELCOME without the key decodes to the
        # default a version 1 daemon enforces).
        self.window = max(1, min(self.in_flight_max, welcome.in_flight_max))
        if self.reconnects or self.in_flight:
            self.log.info(
                "seqd client %d connected to %s, resending %d requests",
                self.client_id,
                self.socket_path,
                len(self.in_flight),
            )
        self.reconnects += 1
        self.outage_started_s = None
        self.backoff_s = RECONNECT_BACKOFF_S_MIN
        self.redirects = 0
        self.last_error = None
        # Resend everything unanswered (within the window), in request-id order; the daemon
        # dedups. They follow whatever is queued already (the HELLO, or a PONG).
        self.unsent_request_id = self.acked_request_id + 1
        self._send_held()

    def _send_held(self) -> None:
        """Write the in-flight requests not yet sent on this connection, up to the window."""
        connection = self.connection
        assert connection is not None
        in_flight = self.in_flight
        acked = self.acked_request_id
        request_id = self.unsent_request_id
        stop = min(self.next_request_id, acked + self.window + 1)
        while request_id < stop:
            request = in_flight.get(request_id)
            if request is not None:
                connection.send_command_into(
                    self.outgoing, request_id, acked, request.version, request.payload
                )
            request_id += 1
        self.unsent_request_id = max(request_id, self.unsent_request_id)

    def _redirected(self, redirect: Redirect, now: float) -> Action:
        self.redirects += 1
        if self.redirects > REDIRECTS_MAX:
            return self._fail(
                ConnectionLost(
                    f"followed {REDIRECTS_MAX} redirects without reaching a leader (last: "
                    f"{redirect.leader} at {redirect.socket_path!r}): the cluster cannot "
                    "agree on a leader; check `seqd status` on every node"
                )
            )
        self.log.info("seqd redirects to leader %s at %r", redirect.leader, redirect.socket_path)
        problem = socket_path_problem(redirect.socket_path) if redirect.socket_path else None
        if problem is not None:
            return self._fail(
                ProtocolViolation("bad_redirect", f"the daemon redirected to a bad path: {problem}")
            )
        ended = ConnectionEnded(f"redirected to {redirect.leader}")
        if redirect.socket_path:
            self.socket_path = redirect.socket_path
            self._disconnect()
            self.last_error = ended
            if self.outage_started_s is None:
                self.outage_started_s = now
            return _RETRY_AT_ONCE
        # The node does not know where the leader is (an election is under way): wait and ask again.
        return self._ended(ended, now)

    def _garbage(self, error: ProtocolError) -> ProtocolViolation:
        if self.state == _State.HANDSHAKING:
            return ProtocolViolation(
                error.code, f"the daemon answered HELLO with garbage: {error.message}"
            )
        return ProtocolViolation(
            error.code,
            f"the daemon sent bytes that break the protocol ({error.message}); the connection "
            "was dropped and the next call reconnects",
        )

    def _ended(self, error: BaseException, now: float) -> Action:
        """The connection ended for a reason that time may cure: when to try again."""
        was_connected = self.state == _State.CONNECTED
        self._disconnect()
        self.last_error = error
        if was_connected:
            self.outage_started_s = now
            return _RETRY_AT_ONCE
        if self.outage_started_s is None:
            self.outage_started_s = now
        give_up_at = self.outage_started_s + self.reconnect_timeout_s
        if now >= give_up_at:
            return self._fail(ConnectionLost(self._lost_message()))
        delay_s = min(self.backoff_s, give_up_at - now)
        self.backoff_s = min(2 * self.backoff_s, RECONNECT_BACKOFF_S_MAX)
        return Retry(delay_s)

    def _fail(self, error: Exception) -> Fail:
        """The connection ends with `error` for the caller; the outage is over."""
        self._disconnect()
        self.outage_started_s = None
        self.backoff_s = RECONNECT_BACKOFF_S_MIN
        self.redirects = 0
        return Fail(error)

    def _disconnect(self) -> None:
        self.state = _State.DISCONNECTED
        self.connection = None
        self.unsent_request_id = 0
        self.outgoing.clear()

    def _lost_message(self) -> str:
        return (
            f"could not reach the seqd daemon at {self.socket_path} for "
            f"{self.reconnect_timeout_s} s (last error: {self.last_error!r}). Check that seqd is "
            "running and the path is right; requests in flight stay in flight and are resent by "
            "the next call, which reconnects again"
        )
