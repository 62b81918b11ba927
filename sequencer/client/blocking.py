"""The blocking client: `Client`, a thin socket-and-poll shell around the session core.

Every decision (numbering, the window, the handshake, resends, backoff, redirects, which errors
are retried) is `session.Session`'s; this module only moves bytes and sleeps. It has no thread:
it does socket I/O only inside the caller's calls (submit, result, flush, poll, next_event), with
one poll loop that writes queued commands and reads replies at the same time, so a large pipeline
can never deadlock with both sides blocked in write.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ClientClosed, ClientError, TimedOut
from .ids import new_client_id
from .protocol import READ_BYTES_MAX
from .replica import Consistency, QueryResult
from .session import (
    SEND_BATCH_BYTES,
    Action,
    ClientSchema,
    Fail,
    Request,
    Session,
    SessionView,
)
from .subscription import ReplicaQueries, Subscription

__all__ = ["Client", "PendingRequest"]

log = logging.getLogger("sequencer.client")


class _Disconnected(Exception):
    """The socket failed under us (an OSError, or EOF when `error` is None): reconnect."""

    def __init__(self, error: OSError | None) -> None:
        super().__init__(error)
        self.error = error


class PendingRequest(Request):
    """A submitted request; `result()` waits for its reply."""

    __slots__ = ("_client",)

    def __init__(self, client: Client, request_id: int, version: int, payload: bytes) -> None:
        # Request's fields, assigned here: this runs once per submit.
        self.request_id = request_id
        self.version = version
        self.payload = payload
        self._reply = None
        self._client = client

    def result(self, timeout_s: float | None = None) -> Any:
        """The decoded reply (a `Reply` without a schema).

        Raises:
            CommandRejected, Duplicate: the daemon's answer.
            TimedOut: no reply within timeout_s (default: the client's); still in flight.
            ConnectionLost, ProtocolViolation: see `Client`.
        """
        if self._reply is None:
            self._client._wait_reply(self, timeout_s)
        return self._client._session.outcome(self)

    def __repr__(self) -> str:
        return f"PendingRequest(request_id={self.request_id}, done={self.done()})"


class Client(SessionView):
    """A blocking client session. Use it from one thread at a time (it holds no lock).

    Args:
        socket_path: the daemon's Unix socket.
        client_id: stable identity for dedup; random when None (see `.client_id`). Pass the same
            id (and a `first_request_id` above every id used before) after a restart to resume.
        schema: the app's schema; without one, commands are `bytes` and replies `Reply` frames.
        timeout_s: default timeout of every call.
        in_flight_max: the window: how far the newest request may run ahead of the oldest
            unanswered one; `submit` waits while it is reached. A node may advertise a smaller one.
        reconnect_timeout_s: how long the daemon may be unreachable before `ConnectionLost`.
        subscribe_events: receive the events the state machine publishes.
        first_request_id: the first request id to use.
        client_name: shown in the daemon's session list.

    Raises:
        ConnectionLost: the daemon was unreachable for reconnect_timeout_s at construction.
        ProtocolViolation: the daemon refused the handshake (for example `bad_version`).
        OSError: connecting failed in a way waiting will not cure (PermissionError on the socket).
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
        self._session = Session(
            new_client_id() if client_id is None else client_id,
            str(socket_path),
            schema,
            timeout_s,
            first_request_id,
            in_flight_max,
            reconnect_timeout_s,
            subscribe_events,
            client_name,
            log,
        )
        self._events = self._session.events
        self._socket: socket.socket | None = None  # connected and welcomed, or None
        self._poller = select.poll()
        self._closed = False
        self._queries: ReplicaQueries | None = None
        self._reconnect(math.inf, "connecting")

    # -- public API ----------------------------------------------------------------------------

    def call(self, command: Any, timeout_s: float | None = None) -> Any:
        """Send one command and wait for its reply (see `PendingRequest.result`)."""
        deadline = self._deadline(timeout_s)
        pending = self.submit(command, timeout_s)
        return pending.result(max(deadline - time.monotonic(), 1e-9))

    def submit(
        self, command: Any, timeout_s: float | None = None, request_id: int | None = None
    ) -> PendingRequest:
        """Queue one command for sending and return at once, unless the window is full.

        `request_id`: number it so instead of `next_request_id` (at least that; the ids skipped
        are never used). A bridge sends the source's log index (docs/integration.md).

        Raises:
            TimedOut: the window stayed full for timeout_s; the command was not submitted.
            TypeError, ValueError: the command cannot be encoded or is too large, or
                `request_id` is below `next_request_id`.
        """
        self._check_open()
        session = self._session
        version, payload = session.encode(command)
        if request_id is not None:
            session.skip_to(request_id)
        if not session.has_room():
            self._pump(
                session.has_room,
                self._deadline(timeout_s),
                "waiting for room in the in-flight window",
            )
        pending = PendingRequest(self, session.next_request_id, version, payload)
        session.add(pending)
        if len(session.outgoing) >= SEND_BATCH_BYTES and self._socket is not None:
            try:
                self._write_some()
            except _Disconnected as lost:
                # The request is in flight: the next blocking call reconnects and resends it.
                # Raising here would invite the caller to submit it again.
                self._lost(lost)
        return pending

    def poll(self, wait_s: float = 0.0) -> int:
        """Send what is queued and take the replies received, waiting at most `wait_s` for the
        daemon's next bytes when none are there yet (0, the default: never block).

        For a caller with its own schedule (an open-loop load generator, an event loop of its
        own): `submit` batches commands until `SEND_BATCH_BYTES` or the next blocking call, and
        `poll` sends them now. A generator that waits with `poll(until_next_due_s)` takes each
        reply as it arrives, where a sleep would take it only when the sleep ends. A lost
        connection is dropped here and re-established, with every unanswered request resent, by
        the next blocking call.

        Returns:
            How many requests are still in flight.
        """
        self._check_open()
        if self._socket is not None:
            try:
                if self._session.outgoing:
                    self._write_some()
                if wait_s > 0:
                    # select, not the poller: poll(2) counts milliseconds, select microseconds.
                    select.select([self._socket], [], [], wait_s)
                self._read_some()
            except _Disconnected as lost:
                self._lost(lost)
        return len(self._session.in_flight)

    def flush(self, timeout_s: float | None = None) -> None:
        """Write every submitted command to the socket."""
        self._check_open()
        outgoing = self._session.outgoing
        self._pump(
            lambda: self._socket is not None and not outgoing,
            self._deadline(timeout_s),
            "flushing commands",
        )

    def next_event(self, timeout_s: float | None = None) -> Any:
        """The next published event (decoded by the schema, or an `Event` frame).

        Raises:
            TimedOut: no event within timeout_s.
        """
        self._check_open()
        session = self._session
        if not session.subscribe_events:
            raise ClientError("this client did not subscribe: pass subscribe_events=True")
        events = session.events
        if not events:
            self._pump(lambda: bool(events), self._deadline(timeout_s), "waiting for an event")
        return session.decode_event(events.popleft())

    def events(self, timeout_s: float | None = None) -> Iterator[Any]:
        """Events as they arrive; the iteration ends after timeout_s without one (None: never)."""
        while True:
            try:
                yield self.next_event(math.inf if timeout_s is None else timeout_s)
            except TimedOut:
                return

    def subscribe(
        self,
        from_index: int = 1,
        records: bool = False,
        *,
        replicas: list[str] | None = None,
        reconnect_timeout_s: float | None = None,
    ) -> Subscription:
        """A catch-up subscription to the node's committed stream, served by its query replicas.

        Iterate over it for `SubscriptionItem`s (index, timestamp_ns, kind, version, payload,
        event decoded by this client's schema): every event published from `from_index` on
        (with `records`, every record too, before its events), then live. It resumes on its own
        across disconnects and restarts, without gap or duplicate (docs/query-side.md).

        Args:
            from_index: the first log index wanted (0 and 1: from the beginning).
            records: also every committed record, whole.
            replicas: the replica sockets; default: the node's, from its WELCOME.

        Raises:
            ValueError: the node runs no query replica and none was given.
        """
        self._check_open()
        return Subscription(
            self._replica_paths(replicas), from_index, records, self._session.schema,
            self.client_id,
            self._session.reconnect_timeout_s if reconnect_timeout_s is None else reconnect_timeout_s,
        )  # fmt: skip

    def query(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        consistency: str = Consistency.AFTER,
        after_index: int | None = None,
        timeout_s: float | None = None,
        result_type: Any = Any,
        replicas: list[str] | None = None,
    ) -> QueryResult:
        """Run the app's query `name(**args)` on a query replica, never on the blp.

        Args:
            consistency: "after" (default): answered once the replica has applied
                `after_index`, by default the index of this client's last reply, so a query
                sees this client's own writes; "local": whatever the replica has applied;
                "linearizable": every write acknowledged before the query, on any node (a read
                index: the leader's, through ReadIndex, on a cluster; `no_quorum` without one).
            result_type: the type to decode the result into (default: plain msgpack values).

        Returns:
            QueryResult(value, index): the result and the log index of the state it reflects.

        Raises:
            QueryError: the replica refused or failed it (`unknown_query`, `bad_query_args`,
                `query_failed`, `not_applied_in_time`, `no_quorum`, `consistency_unavailable`).
            TimedOut, ConnectionLost: as for commands.
        """
        self._check_open()
        if self._queries is None:
            self._queries = ReplicaQueries(
                self._replica_paths(replicas), self.client_id, self._session.timeout_s,
                self._session.reconnect_timeout_s,
            )  # fmt: skip
        if after_index is None:
            after_index = self._session.last_index
        return self._queries.query(
            name, args, consistency=consistency, after_index=after_index, timeout_s=timeout_s,
            result_type=result_type,
        )  # fmt: skip

    def _replica_paths(self, replicas: list[str] | None) -> list[str]:
        return list(replicas) if replicas is not None else list(self._session.replicas)

    def close(self) -> None:
        """Write what is queued if the socket takes it now, and close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._queries is not None:
            self._queries.close()
        if self._socket is not None:
            try:
                self._write_some()
            except _Disconnected:
                pass
        self._session.abandon()
        self._close_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Client(socket_path={self.socket_path!r}, client_id={self.client_id}, "
            f"in_flight={self.in_flight}, connected={self._socket is not None})"
        )

    # -- the poll loop -------------------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self._session.timeout_s if timeout_s is None else timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client was closed; make a new Client to send more commands")

    def _wait_reply(self, pending: PendingRequest, timeout_s: float | None) -> None:
        self._check_open()
        self._pump(
            pending.done,
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
                if self._session.outgoing:
                    self._write_some()
                    if done():
                        return
                self._io_once(deadline, doing)
            except _Disconnected as lost:
                self._lost(lost)

    def _io_once(self, deadline: float, doing: str) -> None:
        assert self._socket is not None
        timeout_s = deadline - time.monotonic()
        if timeout_s <= 0:
            raise self._session.timed_out(doing)
        outgoing = self._session.outgoing
        self._poller.modify(self._socket, select.POLLIN | (select.POLLOUT if outgoing else 0))
        if not self._poller.poll(math.ceil(min(timeout_s, 3600.0) * 1000)):
            return
        if outgoing:
            self._write_some()
        self._read_some()

    def _write_some(self) -> None:
        assert self._socket is not None
        outgoing = self._session.outgoing
        try:
            written = self._socket.send(outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            raise _Disconnected(error) from None
        del outgoing[:written]

    def _read_some(self) -> None:
        assert self._socket is not None
        try:
            data = self._socket.recv(READ_BYTES_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            raise _Disconnected(error) from None
        if not data:
            # The daemon closed or crashed. Complete frames were taken after the last read; a
            # partial frame left behind is lost with the connection and its request is resent.
            raise _Disconnected(None)
        action = self._session.receive_data(data, time.monotonic())
        if action is not None:
            # A welcomed connection ended: Retry is always at once (the pump reconnects).
            self._close_socket()
            if isinstance(action, Fail):
                raise action.error

    def _lost(self, lost: _Disconnected) -> None:
        # The session answers Retry at once for a welcomed connection; the pump reconnects.
        self._session.connection_lost(lost.error, time.monotonic())
        self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            try:
                self._poller.unregister(self._socket)
            except (KeyError, ValueError):
                pass
            self._socket.close()
        self._socket = None

    # -- reconnecting --------------------------------------------------------------------------

    def _reconnect(self, deadline: float, doing: str) -> None:
        """Connect and handshake (the session queues every in-flight request for resending).

        Raises:
            TimedOut: `deadline` passed first; the outage goes on and the next call resumes it.
            ConnectionLost, ProtocolViolation, OSError: as the session decides (`Fail`).
        """
        self._check_open()
        assert self._socket is None
        session = self._session
        while True:
            action = self._connect_once(deadline)
            if action is None:
                return
            if isinstance(action, Fail):
                raise action.error
            now = time.monotonic()
            if now >= deadline:
                raise session.timed_out(doing)
            if action.delay_s:
                time.sleep(min(action.delay_s, deadline - now))

    def _connect_once(self, deadline: float) -> Action | None:
        """One attempt: connect, HELLO, then None once welcomed, or how it ended."""
        session = self._session
        path = session.begin_attempt(time.monotonic())
        attempt_deadline = min(deadline, session.give_up_at)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(attempt_deadline - time.monotonic(), 0.001))
            sock.connect(path)
            session.connection_made()
            while not session.connected:
                if session.outgoing:  # HELLO, or a PONG
                    sock.sendall(session.outgoing)
                    session.outgoing.clear()
                sock.settimeout(max(attempt_deadline - time.monotonic(), 0.001))
                data = sock.recv(READ_BYTES_MAX)
                action = (
                    session.receive_data(data, time.monotonic())
                    if data
                    else session.connection_lost(None, time.monotonic())
                )
                if action is not None:
                    sock.close()
                    return action
        except OSError as error:
            sock.close()
            return session.connection_lost(error, time.monotonic())
        except BaseException:
            session.abandon()
            sock.close()
            raise
        sock.setblocking(False)
        self._socket = sock
        self._poller.register(sock, select.POLLIN)
        return None
