"""The asyncio client: `AsyncClient`, a thin transport-and-futures shell around the session core.

Every decision (numbering, the window, the handshake, resends, backoff, redirects, which errors
are retried) is `session.Session`'s; this module only moves bytes, sleeps and wakes waiters. The
connection is made by `connect()` (or the first call) and re-made by a background task whenever it
drops. Commands submitted in one event-loop iteration go out in one write. Works under uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Generator
from typing import Any, cast

from .aio_subscription import AsyncReplicaQueries, AsyncSubscription
from .errors import ClientClosed, ClientError, TimedOut
from .ids import new_client_id
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

__all__ = ["AsyncClient", "AsyncPendingRequest"]

log = logging.getLogger("sequencer.client")


class AsyncPendingRequest(Request):
    """A submitted request; `await pending` or `await pending.result(timeout_s)`."""

    __slots__ = ("_client", "_future")

    def __init__(
        self,
        client: AsyncClient,
        request_id: int,
        version: int,
        payload: bytes,
        future: asyncio.Future[None],
    ) -> None:
        # Request's fields, assigned here: this runs once per submit.
        self.request_id = request_id
        self.version = version
        self.payload = payload
        self._reply = None
        self._client = client
        self._future = future  # resolved when the reply arrives

    async def result(self, timeout_s: float | None = None) -> Any:
        """The decoded reply; raises as `PendingRequest.result`."""
        if self._reply is None:
            await self._client._wait(
                self._future, timeout_s, f"waiting for the reply to request {self.request_id}"
            )
        return self._client._session.outcome(self)

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result().__await__()

    def __repr__(self) -> str:
        return f"AsyncPendingRequest(request_id={self.request_id}, done={self.done()})"


class _ClientProtocol(asyncio.Protocol):
    """Hands one socket's bytes and its end to the client, which feeds the session."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.client._connection_made(self)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(self, data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(self, exc)


class AsyncClient(SessionView):
    """An asyncio client session with the same behaviour as `Client`; works under uvloop.

        async with AsyncClient(path, schema=Ledger.schema) as client:
            reply = await client.call(Deposit(account="alice", amount=5))
            pending = [await client.submit(c) for c in commands]   # pipelined
            replies = [await p for p in pending]

    Arguments and errors as `Client`. The connection is made by `connect()` (or `async with`),
    and is re-made in the background whenever it drops.
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
        self._answered: list[AsyncPendingRequest] = []  # the session fills it; _data_received wakes
        self._session.answered = self._answered
        # The connection fed to the session (handshaking or welcomed), or None.
        self._protocol: _ClientProtocol | None = None
        self._flush_scheduled = False
        self._reconnect_task: asyncio.Task[None] | None = None
        # The attempt in progress: resolved once decided, with the decision in _attempt_action
        # (None: welcomed). A connection that ends before the task resumes overwrites it.
        self._attempt: asyncio.Future[None] | None = None
        self._attempt_action: Action | None = None
        self._closed = False
        # Futures that wake waiters: each is resolved and replaced when its condition occurs.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: asyncio.Future[Exception] | None = None  # a failure to report
        self._waiters = 0  # calls inside _wait, which a reported failure reaches
        # A welcomed connection's failure (garbage, a fatal ERROR) that no call was waiting for:
        # the next call that waits raises it, as the blocking client's next call reads and raises it.
        self._failure_held: Exception | None = None
        self._connected: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None  # room in the in-flight window
        self._event_arrived: asyncio.Future[None] | None = None
        self._queries: AsyncReplicaQueries | None = None

    # -- public API ----------------------------------------------------------------------------

    async def connect(self, timeout_s: float | None = None) -> None:
        """Connect and handshake (retrying for up to reconnect_timeout_s)."""
        self._ensure_connecting()
        if not self._session.connected:
            assert self._connected is not None
            await self._wait(self._connected, timeout_s, "connecting")

    async def call(self, command: Any, timeout_s: float | None = None) -> Any:
        """Send one command and wait for its reply."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._session.timeout_s if timeout_s is None else timeout_s)
        pending = await self.submit(command, timeout_s)
        return await pending.result(max(deadline - loop.time(), 1e-9))

    async def submit(self, command: Any, timeout_s: float | None = None) -> AsyncPendingRequest:
        """Queue one command (waiting while the window is full) and return its pending request.

        Commands submitted in the same event-loop iteration go out in one write.
        """
        self._ensure_connecting()
        session = self._session
        version, payload = session.encode(command)
        loop = self._loop
        assert loop is not None
        if not session.has_room():
            deadline = loop.time() + (session.timeout_s if timeout_s is None else timeout_s)
            while not session.has_room():
                if self._window is None or self._window.done():
                    self._window = loop.create_future()
                await self._wait(
                    self._window,
                    deadline - loop.time(),
                    "waiting for room in the in-flight window",
                )
        pending = AsyncPendingRequest(
            self, session.next_request_id, version, payload, loop.create_future()
        )
        session.add(pending)
        outgoing = session.outgoing
        if outgoing:
            if len(outgoing) >= SEND_BATCH_BYTES:
                self._flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return pending

    async def flush(self, timeout_s: float | None = None) -> None:
        """Hand every submitted command to the transport now, connecting first if needed."""
        self._ensure_connecting()
        if not self._session.connected:
            assert self._connected is not None
            await self._wait(self._connected, timeout_s, "connecting")
        self._flush()

    async def next_event(self, timeout_s: float | None = None) -> Any:
        """The next published event; raises TimedOut after timeout_s without one."""
        self._ensure_connecting()
        session = self._session
        if not session.subscribe_events:
            raise ClientError("this client did not subscribe: pass subscribe_events=True")
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + (session.timeout_s if timeout_s is None else timeout_s)
        events = session.events
        while not events:
            if self._event_arrived is None or self._event_arrived.done():
                self._event_arrived = loop.create_future()
            await self._wait(self._event_arrived, deadline - loop.time(), "waiting for an event")
        return session.decode_event(events.popleft())

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[Any]:
        """Events as they arrive; ends after timeout_s without one (None: never)."""
        while True:
            try:
                yield await self.next_event(math.inf if timeout_s is None else timeout_s)
            except TimedOut:
                return

    async def subscribe(
        self,
        from_index: int = 1,
        records: bool = False,
        *,
        replicas: list[str] | None = None,
        reconnect_timeout_s: float | None = None,
    ) -> AsyncSubscription:
        """As `Client.subscribe`, for asyncio (connecting first, to learn the node's replicas):
        `async for item in await client.subscribe(from_index=1)`."""
        if replicas is None:
            await self.connect()
        return AsyncSubscription(
            list(replicas) if replicas is not None else list(self._session.replicas),
            from_index, records, self._session.schema, self.client_id,
            self._session.reconnect_timeout_s if reconnect_timeout_s is None else reconnect_timeout_s,
        )  # fmt: skip

    async def query(
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
        """As `Client.query`, for asyncio."""
        if self._queries is None:
            if replicas is None:
                await self.connect()
            self._queries = AsyncReplicaQueries(
                list(replicas) if replicas is not None else list(self._session.replicas),
                self.client_id, self._session.timeout_s, self._session.reconnect_timeout_s,
            )  # fmt: skip
        if after_index is None:
            after_index = self._session.last_index
        return await self._queries.query(
            name, args, consistency=consistency, after_index=after_index, timeout_s=timeout_s,
            result_type=result_type,
        )  # fmt: skip

    async def close(self) -> None:
        """Write what is queued, close the connection, and fail every waiter. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._queries is not None:
            self._queries.close()
        task = self._reconnect_task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._flush()
        protocol = self._protocol
        self._protocol = None
        self._session.abandon()
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
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + (self._session.timeout_s if timeout_s is None else timeout_s)
        held = self._failure_held
        if held is not None and not future.done():
            self._failure_held = None
            raise held
        while not future.done():
            self._ensure_connecting()
            failure = self._failure
            assert failure is not None
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise self._session.timed_out(doing)
            self._waiters += 1
            try:
                await asyncio.wait(
                    (future, failure),
                    timeout=None if math.isinf(remaining_s) else remaining_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                self._waiters -= 1
            if failure.done() and not future.done():
                raise failure.result()

    def _report(self, error: Exception) -> None:
        """Wake every waiter with `error` (they raise it); later calls start afresh."""
        assert self._loop is not None
        failure = self._failure
        self._failure = self._loop.create_future()
        if failure is not None and not failure.done():
            failure.set_result(error)

    def _wake(self) -> None:
        """Wake the waiters whose condition the session's last event made true."""
        window = self._window
        if window is not None and self._session.has_room():
            self._window = None
            if not window.done():
                window.set_result(None)
        arrived = self._event_arrived
        if arrived is not None and self._session.events and not arrived.done():
            arrived.set_result(None)

    # -- the connection --------------------------------------------------------------------------

    async def _reconnect(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while True:
                try:
                    action: Action | None = await self._connect_once()
                except Exception as error:  # not the session's to decide: the caller's to see
                    action = Fail(error)
                if action is None:
                    connected = self._connected
                    assert connected is not None
                    self._connected = loop.create_future()
                    connected.set_result(None)
                    return
                if isinstance(action, Fail):
                    self._report(action.error)
                    return
                if action.delay_s:
                    await asyncio.sleep(action.delay_s)
        finally:
            self._reconnect_task = None

    async def _connect_once(self) -> Action | None:
        """One attempt: connect, HELLO, then None once welcomed, or how it ended."""
        loop = self._loop
        assert loop is not None
        session = self._session
        path = session.begin_attempt(loop.time())
        give_up_at = session.give_up_at
        attempt = self._attempt = loop.create_future()
        self._attempt_action = None
        try:
            try:
                # connection_made (below) says HELLO; the callbacks then decide the attempt.
                await asyncio.wait_for(
                    loop.create_unix_connection(lambda: _ClientProtocol(self), path),
                    max(give_up_at - loop.time(), 0.001),
                )
                await asyncio.wait_for(
                    asyncio.shield(attempt), max(give_up_at - loop.time(), 0.001)
                )
            except OSError as error:  # TimeoutError included
                if attempt.done():
                    return self._attempt_action
                self._abort()
                return session.connection_lost(error, loop.time())
            return self._attempt_action
        except BaseException:  # cancelled by close()
            self._abort()
            session.abandon()
            raise
        finally:
            self._attempt = None

    def _connection_made(self, protocol: _ClientProtocol) -> None:
        attempt = self._attempt
        if attempt is None or attempt.done() or self._protocol is not None:
            # The attempt gave up (timed out, cancelled) while the socket was connecting.
            assert protocol.transport is not None
            protocol.transport.abort()
            return
        self._protocol = protocol
        self._session.connection_made()
        self._flush()

    def _data_received(self, protocol: _ClientProtocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return  # a connection already dropped
        session = self._session
        outgoing = session.outgoing
        queued_bytes = len(outgoing)
        action = session.receive_data(data, cast(asyncio.AbstractEventLoop, self._loop).time())
        answered = self._answered
        if answered:
            for request in answered:
                future = request._future
                if not future.done():
                    future.set_result(None)
            answered.clear()
        if action is not None:
            self._abort()
            self._ended(action)
        else:
            attempt = self._attempt
            if attempt is not None and session.connected and not attempt.done():
                attempt.set_result(None)  # welcomed
            if len(outgoing) > queued_bytes:  # resends, PONGs
                self._flush()
        self._wake()

    def _connection_lost(self, protocol: _ClientProtocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return  # we dropped it ourselves, and the session knows
        self._protocol = None
        self._ended(
            self._session.connection_lost(exc, cast(asyncio.AbstractEventLoop, self._loop).time())
        )

    def _ended(self, action: Action) -> None:
        """The current connection ended; the session said what to do next."""
        attempt = self._attempt
        if attempt is not None:
            # The reconnect task has not taken its answer yet: this one replaces it.
            self._attempt_action = action
            if not attempt.done():
                attempt.set_result(None)
            return
        if isinstance(action, Fail):
            if self._waiters:
                self._report(action.error)
            else:
                self._failure_held = action.error
        elif not self._closed:
            self._ensure_connecting()  # a welcomed connection is retried at once

    def _abort(self) -> None:
        """Drop the current connection at once (the session has forgotten it, or will)."""
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing = self._session.outgoing
        protocol = self._protocol
        if outgoing and protocol is not None and protocol.transport is not None:
            protocol.transport.write(bytes(outgoing))
        outgoing.clear()

