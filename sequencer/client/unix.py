"""Client sessions over the daemon's Unix socket: a blocking `Client` and an asyncio `AsyncClient`.

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

Both clients use the sans-I/O codec in `protocol.py`. The blocking client has no thread: it does
socket I/O only inside the caller's calls (submit, result, flush, next_event), with one poll loop
that writes queued commands and reads replies at the same time, so a large pipeline can never
deadlock with both sides blocked in write. The asyncio client does the same from protocol
callbacks and batches every command submitted in one loop iteration into one write.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import random
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Final, Protocol, cast

from .errors import (
    ClientClosed,
    ClientError,
    CommandRejected,
    ConnectionLost,
    Duplicate,
    ProtocolViolation,
    TimedOut,
)
from .protocol import (
    COMMAND_HEADER,
    FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
    NEED_DATA,
    READ_BYTES_MAX,
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

__all__ = [
    "EVENTS_BUFFERED_MAX",
    "IN_FLIGHT_LIMIT_MAX",
    "RECONNECT_BACKOFF_S_MAX",
    "RECONNECT_BACKOFF_S_MIN",
    "REDIRECTS_MAX",
    "SEND_BATCH_BYTES",
    "AsyncClient",
    "AsyncPendingRequest",
    "Client",
    "ClientSchema",
    "PendingRequest",
    "new_client_id",
]

log = logging.getLogger(__name__)

# First and largest pause between reconnect attempts. A restarting daemon is back within a second
# or so (snapshot + journal replay), so retrying every 10 ms at first catches a quick restart, and
# a probe per second of a dead socket costs nothing.
RECONNECT_BACKOFF_S_MIN: Final = 0.01
RECONNECT_BACKOFF_S_MAX: Final = 1.0
# Redirects followed within one reconnect: a cluster has at most 5 nodes, so a correct one never
# needs more than a couple of hops; more means the nodes disagree about the leader.
REDIRECTS_MAX: Final = 8
# Each in-flight request is kept (payload included) until its reply arrives, for resending; the
# window bounds that memory and the daemon's saved replies per client. 65536 x 64-byte commands
# is 4 MiB; beyond that, pipelining gains nothing over a socket buffer's worth.
# The daemon keeps at most this many unacknowledged replies per client (the blp's dedup table,
# `sequencer.processor.SAVED_REPLIES_MAX`). A larger window could lose a reply across a reconnect:
# the resent request would find its reply forgotten and get DUPLICATE instead.
IN_FLIGHT_LIMIT_MAX: Final = 1024
# ERROR codes that mean "not now" (a draining node, sessions_max reached): the client backs off
# and reconnects instead of failing.
RETRYABLE_ERROR_CODES: Final = frozenset({"unavailable", "disk_full"})
# Queued command bytes that make `submit` write at once instead of waiting for a flush or a wait:
# about a socket buffer's worth, so one write system call carries a few hundred small commands.
SEND_BATCH_BYTES: Final = 64 * 1024
# Events received but not yet taken by the application. Past this the oldest are dropped and
# counted (`events_dropped`): an application that subscribes and never reads must not grow
# without bound, and an event carries its log index, so a reader can see the gap.
EVENTS_BUFFERED_MAX: Final = 65536
# Client ids are unsigned 64-bit on the wire; random ones use 63 bits so they also fit a signed
# 64-bit column in whatever the application stores them in.
_CLIENT_ID_BITS: Final = 63
_COMMAND_FRAME_OVERHEAD_BYTES: Final = FRAME_HEADER_BYTES + COMMAND_HEADER.size
# errnos that mean "the daemon is not there (yet)": retry, with backoff.
_RETRYABLE_ERRNOS: Final = frozenset(
    {
        errno.ENOENT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EPIPE,
        errno.EAGAIN,
        errno.ENOTCONN,
        errno.ECONNABORTED,
    }
)

assert RECONNECT_BACKOFF_S_MIN <= RECONNECT_BACKOFF_S_MAX
assert SEND_BATCH_BYTES <= FRAME_BYTES_MAX


class ClientSchema(Protocol):
    """What the client needs from an app's `sequencer.schema.Schema`."""

    def encode_command(self, command: Any) -> tuple[int, bytes]: ...

    def decode_reply(self, version: int, data: Any) -> Any: ...

    def decode_event(self, version: int, data: Any) -> Any: ...


def new_client_id() -> int:
    """A random client id. Store it and pass it again after a restart to keep exactly-once."""
    return random.SystemRandom().randrange(1, 1 << _CLIENT_ID_BITS)


class _Disconnected(Exception):
    """The socket closed or failed under us (EOF, ECONNRESET, EPIPE): reconnect."""


def _check_arguments(
    client_id: int | None,
    first_request_id: int,
    in_flight_max: int,
    timeout_s: float,
    reconnect_timeout_s: float,
) -> int:
    if client_id is None:
        client_id = new_client_id()
    if not 0 < client_id < 1 << 64:
        raise ValueError(f"client_id={client_id} must be in 1..2**64-1")
    if first_request_id < 1:
        raise ValueError(f"first_request_id={first_request_id} must be >= 1")
    if not 1 <= in_flight_max <= IN_FLIGHT_LIMIT_MAX:
        raise ValueError(
            f"in_flight_max={in_flight_max} must be in 1..IN_FLIGHT_LIMIT_MAX={IN_FLIGHT_LIMIT_MAX}"
        )
    if timeout_s <= 0 or reconnect_timeout_s <= 0:
        raise ValueError(
            f"timeout_s={timeout_s} and reconnect_timeout_s={reconnect_timeout_s} must be > 0"
        )
    return client_id


class _Session:
    """The state both clients share: request numbering, the in-flight table and decoding."""

    def __init__(
        self,
        client_id: int,
        schema: ClientSchema | None,
        first_request_id: int,
        in_flight_max: int,
    ) -> None:
        self.client_id = client_id
        self.schema = schema
        self.in_flight_max = in_flight_max
        # Requests whose reply has not arrived, by request id; insertion order is request-id
        # order, which is the order to resend them in.
        self.in_flight: dict[int, Any] = {}
        self.next_request_id = first_request_id
        # Invariant: every request id <= acked_request_id has its reply, and none is in flight.
        self.acked_request_id = first_request_id - 1
        self.frame_bytes_max = FRAME_BYTES_MAX
        self.replies_ignored = 0
        self.events_dropped = 0
        self.reconnects = 0
        self.session_id = 0
        self.node = ""

    def window_full(self) -> bool:
        """No room for the next request: the daemon refuses a request_id above acked_request_id +
        in_flight_max (`window_exceeded`), so the window spans request ids, not only unanswered
        requests. A request answered early (refused at the gateway) above one still unanswered
        frees no room until the lower one is answered."""
        return self.next_request_id > self.acked_request_id + self.in_flight_max

    def encode(self, command: Any) -> tuple[int, bytes]:
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

    def take_reply(self, reply: Reply) -> Any:
        """The in-flight request `reply` answers (now answered), or None for a stale reply."""
        pending = self.in_flight.pop(reply.request_id, None)
        if pending is None:
            # A duplicate after a resend, or a reply to a request from before a restart.
            self.replies_ignored += 1
            return None
        if reply.request_id == self.acked_request_id + 1:
            acked = reply.request_id
            in_flight = self.in_flight
            while acked + 1 < self.next_request_id and acked + 1 not in in_flight:
                acked += 1
            self.acked_request_id = acked
        return pending

    def outcome(self, request_id: int, reply: Reply) -> Any:
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
            raise CommandRejected(code, message, request_id)
        assert status == ReplyStatus.DUPLICATE, status
        raise Duplicate(request_id, reply.index)

    def decode_event(self, event: Event) -> Any:
        if self.schema is None:
            return event
        return self.schema.decode_event(event.version, event.payload)

    def buffer_event(self, events: collections.deque[Event], event: Event) -> None:
        if len(events) >= EVENTS_BUFFERED_MAX:
            events.popleft()
            self.events_dropped += 1
        events.append(event)

    def welcome(self, welcome: Welcome) -> None:
        self.session_id = welcome.session_id
        self.node = welcome.node
        self.frame_bytes_max = min(FRAME_BYTES_MAX, welcome.frame_bytes_max)


def _lost_message(socket_path: str, reconnect_timeout_s: float, error: BaseException | None) -> str:
    return (
        f"could not reach the seqd daemon at {socket_path} for {reconnect_timeout_s} s "
        f"(last error: {error!r}). Check that seqd is running and the path is right; requests in "
        "flight stay in flight and are resent by the next call, which reconnects again"
    )


# -- the blocking client ---------------------------------------------------------------------------


class _SessionView:
    """What both clients keep and expose of their session (they differ only in how they do I/O)."""

    def __init__(
        self,
        socket_path: str,
        client_id: int | None,
        schema: ClientSchema | None,
        timeout_s: float,
        in_flight_max: int,
        reconnect_timeout_s: float,
        subscribe_events: bool,
        first_request_id: int,
        client_name: str,
    ) -> None:
        client_id = _check_arguments(
            client_id, first_request_id, in_flight_max, timeout_s, reconnect_timeout_s
        )
        self._session = _Session(client_id, schema, first_request_id, in_flight_max)
        self._socket_path = str(socket_path)
        self._timeout_s = timeout_s
        self._reconnect_timeout_s = reconnect_timeout_s
        self._subscribe_events = subscribe_events
        self._client_name = client_name

    @property
    def client_id(self) -> int:
        return self._session.client_id

    @property
    def session_id(self) -> int:
        """The daemon's id for the current connection's session (changes on reconnect)."""
        return self._session.session_id

    @property
    def socket_path(self) -> str:
        """The socket in use (changes when the daemon redirects)."""
        return self._socket_path

    @property
    def acked_request_id(self) -> int:
        return self._session.acked_request_id

    @property
    def next_request_id(self) -> int:
        return self._session.next_request_id

    @property
    def in_flight(self) -> int:
        return len(self._session.in_flight)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: reconnects, stale replies ignored, events dropped."""
        session = self._session
        return {
            "reconnects": session.reconnects,
            "replies_ignored": session.replies_ignored,
            "events_dropped": session.events_dropped,
        }


class PendingRequest:
    """A submitted request; `result()` waits for its reply."""

    __slots__ = ("_client", "_reply", "payload", "request_id", "version")

    def __init__(self, client: Client, request_id: int, version: int, payload: bytes) -> None:
        self._client = client
        self.request_id = request_id
        self.version = version
        self.payload = payload
        self._reply: Reply | None = None

    def done(self) -> bool:
        return self._reply is not None

    def result(self, timeout_s: float | None = None) -> Any:
        """The decoded reply (a `Reply` without a schema).

        Raises:
            CommandRejected, Duplicate: the daemon's answer.
            TimedOut: no reply within timeout_s (default: the client's); still in flight.
            ConnectionLost, ProtocolViolation: see `Client`.
        """
        if self._reply is None:
            self._client._wait_reply(self, timeout_s)
        assert self._reply is not None
        return self._client._session.outcome(self.request_id, self._reply)

    def __repr__(self) -> str:
        return f"PendingRequest(request_id={self.request_id}, done={self.done()})"


class Client(_SessionView):
    """A blocking client session. Use it from one thread at a time (it holds no lock).

    Args:
        socket_path: the daemon's Unix socket.
        client_id: stable identity for dedup; random when None (see `.client_id`). Pass the same
            id (and a `first_request_id` above every id used before) after a restart to resume.
        schema: the app's schema; without one, commands are `bytes` and replies `Reply` frames.
        timeout_s: default timeout of every call.
        in_flight_max: requests sent and not yet answered; `submit` waits while it is reached.
        reconnect_timeout_s: how long the daemon may be unreachable before `ConnectionLost`.
        subscribe_events: receive the events the state machine publishes.
        first_request_id: the first request id to use.
        client_name: shown in the daemon's session list.

    Raises:
        ConnectionLost: the daemon was unreachable for reconnect_timeout_s at construction.
        ProtocolViolation: the daemon refused the handshake (for example `bad_version`).
    """

    def __init__(
        self,
        socket_path: str,
        client_id: int | None = None,
        schema: ClientSchema | None = None,
        timeout_s: float = 10.0,
        in_flight_max: int = 256,
        reconnect_timeout_s: float = 30.0,
        subscribe_events: bool = False,
        first_request_id: int = 1,
        client_name: str = "",
    ) -> None:
        super().__init__(
            socket_path, client_id, schema, timeout_s, in_flight_max, reconnect_timeout_s,
            subscribe_events, first_request_id, client_name,
        )
        self._socket: socket.socket | None = None
        self._connection: Connection | None = None
        self._poller = select.poll()
        # Encoded frames not yet written to the current socket; rebuilt from the in-flight table
        # on every reconnect.
        self._outgoing = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        # Monotonic time the current outage began; None while connected.
        self._outage_started: float | None = None
        self._closed = False
        self._reconnect(math.inf, "connecting")

    # -- public API ----------------------------------------------------------------------------

    def call(self, command: Any, timeout_s: float | None = None) -> Any:
        """Send one command and wait for its reply (see `PendingRequest.result`)."""
        deadline = self._deadline(timeout_s)
        pending = self.submit(command, timeout_s)
        return pending.result(max(deadline - time.monotonic(), 1e-9))

    def submit(self, command: Any, timeout_s: float | None = None) -> PendingRequest:
        """Queue one command for sending and return at once, unless the window is full.

        Raises:
            TimedOut: the window stayed full for timeout_s; the command was not submitted.
            TypeError, ValueError: the command cannot be encoded or is too large.
        """
        self._check_open()
        session = self._session
        version, payload = session.encode(command)
        if session.window_full():
            self._pump(
                lambda: not session.window_full(),
                self._deadline(timeout_s),
                "waiting for room in the in-flight window",
            )
        request_id = session.next_request_id
        session.next_request_id = request_id + 1
        pending = PendingRequest(self, request_id, version, payload)
        session.in_flight[request_id] = pending
        if self._connection is not None:
            self._connection.send_command_into(
                self._outgoing, request_id, session.acked_request_id, version, payload
            )
            if len(self._outgoing) >= SEND_BATCH_BYTES:
                try:
                    self._write_some()
                except _Disconnected:
                    # The request is in flight: the next blocking call reconnects and resends
                    # it. Raising here would invite the caller to submit it again.
                    self._drop_socket()
        return pending

    def poll(self) -> int:
        """Send what is queued and take the replies already received, without blocking.

        For a caller with its own schedule (an open-loop load generator, an event loop of its
        own): `submit` batches commands until `SEND_BATCH_BYTES` or the next blocking call, and
        `poll` sends them now. A lost connection is dropped here and re-established, with every
        unanswered request resent, by the next blocking call.

        Returns:
            How many requests are still in flight.
        """
        self._check_open()
        if self._socket is not None:
            try:
                if self._outgoing:
                    self._write_some()
                self._read_some()
            except _Disconnected:
                self._drop_socket()
        return len(self._session.in_flight)

    def flush(self, timeout_s: float | None = None) -> None:
        """Write every submitted command to the socket."""
        self._check_open()
        self._pump(
            lambda: self._socket is not None and not self._outgoing,
            self._deadline(timeout_s),
            "flushing commands",
        )

    def next_event(self, timeout_s: float | None = None) -> Any:
        """The next published event (decoded by the schema, or an `Event` frame).

        Raises:
            TimedOut: no event within timeout_s.
        """
        self._check_open()
        if not self._subscribe_events:
            raise ClientError("this client did not subscribe: pass subscribe_events=True")
        if not self._events:
            self._pump(lambda: bool(self._events), self._deadline(timeout_s), "waiting for an event")
        return self._session.decode_event(self._events.popleft())

    def events(self, timeout_s: float | None = None) -> Iterator[Any]:
        """Events as they arrive; the iteration ends after timeout_s without one (None: never)."""
        while True:
            try:
                yield self.next_event(math.inf if timeout_s is None else timeout_s)
            except TimedOut:
                return

    def close(self) -> None:
        """Write what is queued if the socket takes it now, and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            try:
                self._write_some()
            except _Disconnected:
                pass
        self._drop_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Client(socket_path={self._socket_path!r}, client_id={self.client_id}, "
            f"in_flight={self.in_flight}, connected={self._connection is not None})"
        )

    # -- the poll loop -------------------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self._timeout_s if timeout_s is None else timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client was closed; make a new Client to send more commands")

    def _wait_reply(self, pending: PendingRequest, timeout_s: float | None) -> None:
        self._check_open()
        self._pump(
            lambda: pending._reply is not None,
            self._deadline(timeout_s),
            f"waiting for the reply to request {pending.request_id}",
        )

    def _pump(self, done: Callable[[], bool], deadline: float, doing: str) -> None:
        """Write queued frames and read replies until `done()`, reconnecting as needed.

        Raises:
            TimedOut: `deadline` (monotonic) passed first.
            ConnectionLost: reconnecting took longer than reconnect_timeout_s.
            ProtocolViolation: the daemon broke the protocol or sent a fatal ERROR.
        """
        while not done():
            if self._socket is None:
                self._reconnect(deadline, doing)
                continue
            try:
                if self._outgoing:
                    self._write_some()
                    if done():
                        return
                self._io_once(deadline, doing)
            except _Disconnected:
                self._drop_socket()

    def _io_once(self, deadline: float, doing: str) -> None:
        assert self._socket is not None
        timeout_s = deadline - time.monotonic()
        if timeout_s <= 0:
            raise TimedOut(
                f"timed out {doing} (client {self.client_id}, {self.in_flight} requests in "
                "flight); requests in flight stay in flight and may still be applied: wait again "
                "or raise the timeout"
            )
        self._poller.modify(self._socket, select.POLLIN | (select.POLLOUT if self._outgoing else 0))
        if not self._poller.poll(math.ceil(min(timeout_s, 3600.0) * 1000)):
            return
        if self._outgoing:
            self._write_some()
        self._read_some()

    def _write_some(self) -> None:
        assert self._socket is not None
        try:
            written = self._socket.send(self._outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            raise _Disconnected(error) from None
        del self._outgoing[:written]

    def _read_some(self) -> None:
        assert self._socket is not None
        assert self._connection is not None
        try:
            data = self._socket.recv(READ_BYTES_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            raise _Disconnected(error) from None
        if not data:
            # The daemon closed or crashed. Complete frames were drained after the last read; a
            # partial frame left behind is lost with the connection and its request is resent.
            raise _Disconnected("EOF")
        self._connection.receive_data(data)
        self._drain_frames()

    def _drain_frames(self) -> None:
        connection = self._connection
        assert connection is not None
        session = self._session
        while True:
            try:
                frames = connection.next_frames()
            except ProtocolError as error:
                self._drop_socket()
                raise ProtocolViolation(
                    error.code,
                    f"the daemon sent bytes that break the protocol ({error.message}); the "
                    "connection was dropped and the next call reconnects",
                ) from None
            if not frames:
                return
            for frame in frames:
                if type(frame) is Reply:
                    pending = session.take_reply(frame)
                    if pending is not None:
                        pending._reply = frame
                else:
                    self._control_frame(frame)

    def _control_frame(self, frame: Frame) -> None:
        assert self._connection is not None
        if type(frame) is Event:
            self._session.buffer_event(self._events, frame)
        elif type(frame) is Ping:
            self._connection.send_into(self._outgoing, Pong(nonce=frame.nonce))
        elif type(frame) is Pong:
            pass
        elif type(frame) is Error:
            if frame.code in RETRYABLE_ERROR_CODES:
                raise _Disconnected(f"{frame.code}: {frame.message}")  # back off and reconnect
            if frame.fatal:
                self._drop_socket()
                raise ProtocolViolation(frame.code, frame.message)
            log.warning("seqd daemon warns: %s: %s", frame.code, frame.message)
        elif type(frame) is Redirect:
            self._follow_redirect(frame)
            raise _Disconnected(f"redirected to {frame.leader}")
        else:
            raise AssertionError(f"the codec let an unexpected frame through: {frame!r}")

    def _follow_redirect(self, redirect: Redirect) -> None:
        log.info("seqd redirects to leader %s at %r", redirect.leader, redirect.socket_path)
        if redirect.socket_path:
            self._socket_path = redirect.socket_path

    def _drop_socket(self) -> None:
        if self._socket is not None:
            try:
                self._poller.unregister(self._socket)
            except (KeyError, ValueError):
                pass
            self._socket.close()
        self._socket = None
        self._connection = None
        self._outgoing.clear()

    # -- reconnecting --------------------------------------------------------------------------

    def _reconnect(self, deadline: float, doing: str) -> None:
        """Connect, handshake, and queue every in-flight request for resending."""
        self._check_open()
        assert self._socket is None
        now = time.monotonic()
        if self._outage_started is None:
            self._outage_started = now
        give_up_at = self._outage_started + self._reconnect_timeout_s
        backoff_s = RECONNECT_BACKOFF_S_MIN
        redirects = 0
        last_error: BaseException | None = None
        while True:
            try:
                redirect = self._connect_once(min(deadline, give_up_at))
            except OSError as error:
                if isinstance(error, TimeoutError) or error.errno in _RETRYABLE_ERRNOS:
                    last_error = error
                else:
                    raise
            except _Disconnected as error:
                last_error = error
            else:
                if redirect is None:
                    self._outage_started = None
                    return
                redirects += 1
                if redirects > REDIRECTS_MAX:
                    self._outage_started = None
                    raise ConnectionLost(
                        f"followed {REDIRECTS_MAX} redirects without reaching a leader (last: "
                        f"{redirect.leader} at {redirect.socket_path!r}): the cluster cannot "
                        "agree on a leader; check `seqd status` on every node"
                    )
                self._follow_redirect(redirect)
                if redirect.socket_path:
                    continue
            now = time.monotonic()
            if now >= give_up_at:
                self._outage_started = None
                raise ConnectionLost(
                    _lost_message(self._socket_path, self._reconnect_timeout_s, last_error)
                )
            if now >= deadline:
                raise TimedOut(
                    f"timed out {doing}: the daemon at {self._socket_path} is unreachable "
                    f"(last error: {last_error!r}); requests in flight stay in flight"
                )
            time.sleep(min(backoff_s, min(deadline, give_up_at) - now))
            backoff_s = min(2 * backoff_s, RECONNECT_BACKOFF_S_MAX)

    def _connect_once(self, deadline: float) -> Redirect | None:
        """One connection attempt: HELLO, then WELCOME (connected) or REDIRECT (returned)."""
        session = self._session
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection = Connection(Side.CLIENT)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(self._socket_path)
            sock.sendall(
                connection.send(
                    Hello(
                        client_id=session.client_id,
                        subscribe_events=self._subscribe_events,
                        client_name=self._client_name,
                    )
                )
            )
            answer = self._await_welcome(sock, connection, deadline)
        except BaseException:
            sock.close()
            raise
        if isinstance(answer, Redirect):
            sock.close()
            return answer
        session.welcome(answer)
        sock.setblocking(False)
        self._socket = sock
        self._connection = connection
        self._poller.register(sock, select.POLLIN)
        if session.reconnects or session.in_flight:
            log.info(
                "seqd client %d connected to %s, resending %d requests",
                session.client_id,
                self._socket_path,
                len(session.in_flight),
            )
        session.reconnects += 1
        # Resend everything unanswered, in request-id order; the daemon dedups.
        self._outgoing.clear()
        for pending in session.in_flight.values():
            connection.send_command_into(
                self._outgoing,
                pending.request_id,
                session.acked_request_id,
                pending.version,
                pending.payload,
            )
        try:
            self._drain_frames()  # frames that came in with the WELCOME
        except _Disconnected:
            self._drop_socket()
            raise
        return None

    def _await_welcome(
        self, sock: socket.socket, connection: Connection, deadline: float
    ) -> Welcome | Redirect:
        while True:
            try:
                frame = connection.next_frame()
            except ProtocolError as error:
                raise ProtocolViolation(
                    error.code, f"the daemon answered HELLO with garbage: {error.message}"
                ) from None
            if frame is NEED_DATA:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = sock.recv(READ_BYTES_MAX)
                if not data:
                    raise _Disconnected("EOF during the handshake")
                connection.receive_data(data)
            elif isinstance(frame, Welcome | Redirect):
                return frame
            elif isinstance(frame, Error):
                if frame.code in RETRYABLE_ERROR_CODES:
                    raise _Disconnected(f"{frame.code}: {frame.message}")  # back off and retry
                raise ProtocolViolation(frame.code, frame.message)
            elif isinstance(frame, Ping):
                sock.sendall(connection.send(Pong(nonce=frame.nonce)))
            else:
                # Pong: nothing to do. The codec lets nothing else through before WELCOME, and
                # CLOSED cannot happen: EOF is never passed to the codec here.
                assert isinstance(frame, Pong), frame


# -- the asyncio client ----------------------------------------------------------------------------


class AsyncPendingRequest:
    """A submitted request; `await pending` or `await pending.result(timeout_s)`."""

    __slots__ = ("_client", "_future", "payload", "request_id", "version")

    def __init__(
        self,
        client: AsyncClient,
        request_id: int,
        version: int,
        payload: bytes,
        future: asyncio.Future[Reply],
    ) -> None:
        self._client = client
        self.request_id = request_id
        self.version = version
        self.payload = payload
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    async def result(self, timeout_s: float | None = None) -> Any:
        """The decoded reply; raises as `PendingRequest.result`."""
        if not self._future.done():
            await self._client._wait(self._future, timeout_s, self._waiting())
        return self._client._session.outcome(self.request_id, self._future.result())

    def _waiting(self) -> str:
        return f"waiting for the reply to request {self.request_id}"

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

    def __repr__(self) -> str:
        return f"AsyncPendingRequest(request_id={self.request_id}, done={self.done()})"


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _ClientProtocol(asyncio.Protocol):
    """Feeds one socket's bytes into its codec and hands the frames to the client."""

    def __init__(self, client: AsyncClient, connection: Connection) -> None:
        self.client = client
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        # Resolved with WELCOME or REDIRECT, or failed, during the handshake.
        self.handshake: asyncio.Future[Welcome | Redirect] = (
            asyncio.get_running_loop().create_future()
        )
        # A handshake that fails after its waiter gave up is not an error worth logging.
        self.handshake.add_done_callback(_retrieve_exception)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.connection.receive_data(data)
        self.client._drain_frames(self)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(_Disconnected(exc or "EOF during the handshake"))
        self.client._on_connection_lost(self)


class AsyncClient(_SessionView):
    """An asyncio client session with the same behaviour as `Client`; works under uvloop.

        async with AsyncClient(path, schema=Ledger.schema) as client:
            reply = await client.call(Deposit(account="alice", amount=5))
            pending = [await client.submit(c) for c in commands]   # pipelined
            replies = [await p for p in pending]

    Arguments as `Client`. The connection is made by `connect()` (or `async with`), and is
    re-made in the background whenever it drops.
    """

    def __init__(
        self,
        socket_path: str,
        client_id: int | None = None,
        schema: ClientSchema | None = None,
        timeout_s: float = 10.0,
        in_flight_max: int = 256,
        reconnect_timeout_s: float = 30.0,
        subscribe_events: bool = False,
        first_request_id: int = 1,
        client_name: str = "",
    ) -> None:
        super().__init__(
            socket_path, client_id, schema, timeout_s, in_flight_max, reconnect_timeout_s,
            subscribe_events, first_request_id, client_name,
        )
        self._protocol: _ClientProtocol | None = None  # connected and welcomed, or None
        self._outgoing = bytearray()
        self._flush_scheduled = False
        self._events: collections.deque[Event] = collections.deque()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        # Futures that wake waiters: each is resolved and replaced when its condition occurs.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: asyncio.Future[ClientError] | None = None  # a failure to report
        self._connected: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None  # room in the in-flight window
        self._event_arrived: asyncio.Future[None] | None = None

    # -- public API ----------------------------------------------------------------------------

    async def connect(self, timeout_s: float | None = None) -> None:
        """Connect and handshake (retrying for up to reconnect_timeout_s)."""
        self._ensure_connecting()
        if self._protocol is None:
            assert self._connected is not None
            await self._wait(self._connected, timeout_s, "connecting")

    async def call(self, command: Any, timeout_s: float | None = None) -> Any:
        """Send one command and wait for its reply."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout_s if timeout_s is None else timeout_s)
        pending = await self.submit(command, timeout_s)
        return await pending.result(max(deadline - loop.time(), 1e-9))

    async def submit(self, command: Any, timeout_s: float | None = None) -> AsyncPendingRequest:
        """Queue one command (waiting while the window is full) and return its pending request.

        Commands submitted in the same event-loop iteration go out in one write.
        """
        self._ensure_connecting()
        session = self._session
        version, payload = session.encode(command)
        if session.window_full():
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (self._timeout_s if timeout_s is None else timeout_s)
            while session.window_full():
                if self._window is None or self._window.done():
                    self._window = loop.create_future()
                await self._wait(
                    self._window,
                    deadline - loop.time(),
                    "waiting for room in the in-flight window",
                )
        assert self._loop is not None
        request_id = session.next_request_id
        session.next_request_id = request_id + 1
        pending = AsyncPendingRequest(self, request_id, version, payload, self._loop.create_future())
        session.in_flight[request_id] = pending
        protocol = self._protocol
        if protocol is not None:
            protocol.connection.send_command_into(
                self._outgoing, request_id, session.acked_request_id, version, payload
            )
            if len(self._outgoing) >= SEND_BATCH_BYTES:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        return pending

    async def flush(self, timeout_s: float | None = None) -> None:
        """Hand every submitted command to the transport now, connecting first if needed."""
        self._ensure_connecting()
        if self._protocol is None:
            assert self._connected is not None
            await self._wait(self._connected, timeout_s, "connecting")
        self._flush()

    async def next_event(self, timeout_s: float | None = None) -> Any:
        """The next published event; raises TimedOut after timeout_s without one."""
        self._ensure_connecting()
        if not self._subscribe_events:
            raise ClientError("this client did not subscribe: pass subscribe_events=True")
        assert self._loop is not None
        loop = self._loop
        deadline = loop.time() + (self._timeout_s if timeout_s is None else timeout_s)
        while not self._events:
            if self._event_arrived is None or self._event_arrived.done():
                self._event_arrived = loop.create_future()
            await self._wait(self._event_arrived, deadline - loop.time(), "waiting for an event")
        return self._session.decode_event(self._events.popleft())

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[Any]:
        """Events as they arrive; ends after timeout_s without one (None: never)."""
        while True:
            try:
                yield await self.next_event(math.inf if timeout_s is None else timeout_s)
            except TimedOut:
                return

    async def close(self) -> None:
        """Write what is queued, close the connection, and fail every waiter. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        protocol = self._protocol
        self._flush()
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        if self._failure is not None:
            self._report(ClientClosed("the client was closed while this call waited"))

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- waiting ---------------------------------------------------------------------------------

    def _ensure_connecting(self) -> None:
        if self._closed:
            raise ClientClosed("the client was closed; make a new AsyncClient to send more")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._failure = self._loop.create_future()
            self._connected = self._loop.create_future()
        if self._protocol is None and self._reconnect_task is None:
            self._reconnect_task = self._loop.create_task(self._reconnect())

    async def _wait(self, future: asyncio.Future[Any], timeout_s: float | None, doing: str) -> None:
        """Wait for `future`, a reported failure, or the timeout, keeping the link alive."""
        assert self._loop is not None
        loop = self._loop
        deadline = loop.time() + (self._timeout_s if timeout_s is None else timeout_s)
        while not future.done():
            self._ensure_connecting()
            failure = self._failure
            assert failure is not None
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise TimedOut(
                    f"timed out {doing} (client {self.client_id}, {self.in_flight} requests in "
                    "flight); requests in flight stay in flight and may still be applied: wait "
                    "again or raise the timeout"
                )
            await asyncio.wait(
                (future, failure),
                timeout=None if math.isinf(remaining_s) else remaining_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if failure.done() and not future.done():
                raise failure.result()

    def _report(self, error: ClientError) -> None:
        """Wake every waiter with `error` (they raise it); later calls start afresh."""
        assert self._loop is not None
        failure = self._failure
        self._failure = self._loop.create_future()
        if failure is not None and not failure.done():
            failure.set_result(error)

    # -- the connection --------------------------------------------------------------------------

    async def _reconnect(self) -> None:
        assert self._loop is not None
        loop = self._loop
        give_up_at = loop.time() + self._reconnect_timeout_s
        backoff_s = RECONNECT_BACKOFF_S_MIN
        redirects = 0
        last_error: BaseException | None = None
        try:
            while True:
                try:
                    redirect = await self._connect_once(give_up_at)
                except ProtocolViolation as error:
                    self._report(error)
                    return
                except (OSError, _Disconnected) as error:
                    last_error = error
                else:
                    if redirect is None:
                        return
                    redirects += 1
                    if redirects > REDIRECTS_MAX:
                        self._report(
                            ConnectionLost(
                                f"followed {REDIRECTS_MAX} redirects without reaching a leader "
                                f"(last: {redirect.leader}): check `seqd status` on every node"
                            )
                        )
                        return
                    if redirect.socket_path:
                        self._socket_path = redirect.socket_path
                        continue
                if loop.time() >= give_up_at:
                    self._report(
                        ConnectionLost(
                            _lost_message(self._socket_path, self._reconnect_timeout_s, last_error)
                        )
                    )
                    return
                await asyncio.sleep(min(backoff_s, max(give_up_at - loop.time(), 0.0)))
                backoff_s = min(2 * backoff_s, RECONNECT_BACKOFF_S_MAX)
        finally:
            self._reconnect_task = None

    async def _connect_once(self, give_up_at: float) -> Redirect | None:
        assert self._loop is not None
        loop = self._loop
        session = self._session
        connection = Connection(Side.CLIENT)
        transport, protocol = await asyncio.wait_for(
            loop.create_unix_connection(
                lambda: _ClientProtocol(self, connection), self._socket_path
            ),
            max(give_up_at - loop.time(), 0.001),
        )
        try:
            transport.write(
                connection.send(
                    Hello(
                        client_id=session.client_id,
                        subscribe_events=self._subscribe_events,
                        client_name=self._client_name,
                    )
                )
            )
            try:
                answer = await asyncio.wait_for(
                    asyncio.shield(protocol.handshake), max(give_up_at - loop.time(), 0.001)
                )
            except TimeoutError:
                raise _Disconnected("no WELCOME before the reconnect deadline") from None
        except BaseException:
            transport.abort()
            raise
        if isinstance(answer, Redirect):
            transport.close()
            return answer
        session.welcome(answer)
        session.reconnects += 1
        self._protocol = protocol
        self._outgoing.clear()
        for pending in session.in_flight.values():
            connection.send_command_into(
                self._outgoing,
                pending.request_id,
                session.acked_request_id,
                pending.version,
                pending.payload,
            )
        self._flush()
        connected = self._connected
        assert connected is not None
        self._connected = loop.create_future()
        connected.set_result(None)
        return None

    def _flush(self) -> None:
        self._flush_scheduled = False
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None and self._outgoing:
            protocol.transport.write(bytes(self._outgoing))
        self._outgoing.clear()

    def _drain_frames(self, protocol: _ClientProtocol) -> None:
        connection = protocol.connection
        session = self._session
        while True:
            try:
                frames = connection.next_frames()
            except ProtocolError as error:
                violation = ProtocolViolation(
                    error.code,
                    f"the daemon sent bytes that break the protocol ({error.message}); the "
                    "connection was dropped and the next call reconnects",
                )
                self._drop(protocol, violation)
                return
            if not frames:
                return
            for frame in frames:
                if type(frame) is Reply:
                    pending = session.take_reply(frame)
                    if pending is not None and not pending._future.done():
                        pending._future.set_result(frame)
                    window = self._window
                    if window is not None and not session.window_full():
                        self._window = None
                        if not window.done():
                            window.set_result(None)
                elif type(frame) is Event:
                    session.buffer_event(self._events, frame)
                    arrived = self._event_arrived
                    if arrived is not None and not arrived.done():
                        arrived.set_result(None)
                elif type(frame) is Welcome or type(frame) is Redirect:
                    if not protocol.handshake.done():
                        protocol.handshake.set_result(frame)
                    else:
                        assert type(frame) is Redirect, frame
                        if frame.socket_path:
                            self._socket_path = frame.socket_path
                        self._drop(protocol, None)
                        return
                elif type(frame) is Ping:
                    assert protocol.transport is not None
                    protocol.transport.write(connection.send(Pong(nonce=frame.nonce)))
                elif type(frame) is Error:
                    if frame.code in RETRYABLE_ERROR_CODES:
                        self._drop(protocol, None)  # the daemon said "retry later": reconnect
                        return
                    if frame.fatal:
                        violation = ProtocolViolation(frame.code, frame.message)
                        if not protocol.handshake.done():
                            protocol.handshake.set_exception(violation)
                        self._drop(protocol, violation)
                        return
                    log.warning("seqd daemon warns: %s: %s", frame.code, frame.message)

    def _drop(self, protocol: _ClientProtocol, failure: ClientError | None) -> None:
        """Close `protocol`'s connection; report `failure`, or reconnect at once when None."""
        if not protocol.handshake.done():
            protocol.handshake.set_exception(failure or _Disconnected("dropped"))
        if protocol is self._protocol:
            self._protocol = None
            self._outgoing.clear()
            if failure is not None:
                self._report(failure)
            elif not self._closed:
                self._ensure_connecting()
        if protocol.transport is not None:
            protocol.transport.abort()

    def _on_connection_lost(self, protocol: _ClientProtocol) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._outgoing.clear()
            if not self._closed:
                self._ensure_connecting()
