"""Asyncio shells around `replica.ReplicaSession`: `AsyncSubscription` and `AsyncReplicaQueries`.

The asyncio twins of `subscription.Subscription` and `subscription.ReplicaQueries`: the same
core, the same decisions (resume point, replicas in turn, which errors end a subscription), with
asyncio streams for I/O. `AsyncClient.subscribe` and `AsyncClient.query` build them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from .errors import ClientClosed, ConnectionLost, TimedOut
from .ids import new_client_id
from .protocol import READ_BYTES_MAX
from .reconnect import RECONNECT_BACKOFF_S_MAX, RECONNECT_BACKOFF_S_MIN, RETRYABLE_ERRNOS
from .replica import Consistency, QueryResult, ReplicaSession, SubscriptionItem, replica_wait_ms

__all__ = ["AsyncReplicaQueries", "AsyncSubscription"]

log = logging.getLogger("sequencer.client")


class _AsyncLink:
    """One asyncio connection to a replica at a time, reconnecting with backoff."""

    def __init__(self, session: ReplicaSession, reconnect_timeout_s: float) -> None:
        self.session = session
        self.reconnect_timeout_s = reconnect_timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False
        self.last_error: BaseException | None = None

    def close(self) -> None:
        self.closed = True
        self.lost(None)

    def lost(self, error: BaseException | None) -> None:
        if error is not None:
            self.last_error = error
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.session.connection_lost()

    async def ensure_connected(self, deadline: float) -> None:
        """Connect and handshake, trying the replicas in turn with backoff (as `_Link`)."""
        if self.closed:
            raise ClientClosed("the subscription or client was closed")
        if self.writer is not None:
            return
        loop = asyncio.get_running_loop()
        session = self.session
        give_up_at = loop.time() + self.reconnect_timeout_s
        backoff_s = RECONNECT_BACKOFF_S_MIN
        while True:
            path = session.begin_attempt()
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout_at(min(deadline, give_up_at)):
                    reader, writer = await asyncio.open_unix_connection(path)
                    session.connection_made()
                    while not session.connected:
                        writer.write(bytes(session.outgoing))
                        session.outgoing.clear()
                        data = await reader.read(READ_BYTES_MAX)
                        if not data:
                            raise ConnectionResetError(f"the replica at {path} closed the connection")
                        session.receive_data(data)
                    if session.outgoing:
                        writer.write(bytes(session.outgoing))
                        session.outgoing.clear()
                self.reader, self.writer = reader, writer
                return
            except (OSError, TimeoutError) as error:
                if writer is not None:
                    writer.close()
                session.connection_lost()
                self.last_error = error
                if isinstance(error, OSError) and not isinstance(error, TimeoutError) and (
                    error.errno is not None and error.errno not in RETRYABLE_ERRNOS
                ):
                    raise
            now = loop.time()
            if now >= give_up_at:
                raise ConnectionLost(
                    f"no query replica answered for {self.reconnect_timeout_s} s (tried "
                    f"{session.socket_paths}; last error: {self.last_error!r})"
                )
            if now >= deadline:
                raise TimedOut(f"timed out connecting to a query replica (last error: {self.last_error!r})")
            await asyncio.sleep(min(backoff_s, deadline - now))
            backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_S_MAX)

    async def exchange(self, deadline: float) -> None:
        """Write what is queued, then read once, until `deadline` (TimedOut; the link stays)."""
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        session = self.session
        if session.outgoing:
            writer.write(bytes(session.outgoing))
            session.outgoing.clear()
        try:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(READ_BYTES_MAX)
        except TimeoutError:
            raise TimedOut("timed out waiting for the query replica") from None
        if not data:
            raise ConnectionResetError(f"the replica at {session.socket_path} closed the connection")
        session.receive_data(data)


class AsyncSubscription:
    """`Subscription` for asyncio: `async for item in subscription`, or `await next(timeout_s)`.
    Arguments, resume rules and errors as `Subscription`."""

    def __init__(
        self,
        socket_paths: list[str] | str,
        from_index: int = 1,
        records: bool = False,
        schema: Any | None = None,
        client_id: int | None = None,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        paths = [socket_paths] if isinstance(socket_paths, str) else list(socket_paths)
        self._session = ReplicaSession(
            new_client_id() if client_id is None else client_id, paths, schema,
            subscribe=(from_index, records),
        )  # fmt: skip
        self._link = _AsyncLink(self._session, reconnect_timeout_s)

    @property
    def resume_index(self) -> int:
        return self._session.resume_index

    @property
    def taken_at_resume_index(self) -> int:
        return self._session.taken_at_resume_index

    @property
    def reconnects(self) -> int:
        return self._session.reconnects

    async def next(self, timeout_s: float | None = None) -> SubscriptionItem:
        """The next item, waiting at most `timeout_s` (None: for ever); TimedOut after that."""
        session = self._session
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout_s is None else loop.time() + timeout_s
        link = self._link
        while not session.items:
            await link.ensure_connected(deadline)
            try:
                await link.exchange(min(deadline, loop.time() + 3600.0))
            except TimedOut:
                if loop.time() >= deadline:
                    raise TimedOut(
                        f"no subscription item within {timeout_s} s (resume index "
                        f"{session.resume_index})"
                    ) from None
            except OSError as error:
                log.info("subscription: connection to %s lost (%s); resuming from index %d",
                         session.socket_path, error, session.resume_index)  # fmt: skip
                link.lost(error)
        return session.take_item()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> SubscriptionItem:
        return await self.next(None)

    async def items(self, timeout_s: float) -> list[SubscriptionItem]:
        """Every item that arrives until none has come for `timeout_s`."""
        taken: list[SubscriptionItem] = []
        while True:
            try:
                taken.append(await self.next(timeout_s))
            except TimedOut:
                return taken

    def close(self) -> None:
        self._link.close()

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class AsyncReplicaQueries:
    """`ReplicaQueries` for asyncio: one connection, queries answered in turn."""

    def __init__(
        self,
        socket_paths: list[str] | str,
        client_id: int | None = None,
        timeout_s: float = 10.0,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        paths = [socket_paths] if isinstance(socket_paths, str) else list(socket_paths)
        self._session = ReplicaSession(new_client_id() if client_id is None else client_id, paths)
        self._link = _AsyncLink(self._session, reconnect_timeout_s)
        self._lock = asyncio.Lock()  # one query on the connection at a time
        self.timeout_s = timeout_s

    async def query(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        consistency: str = Consistency.LOCAL,
        after_index: int = 0,
        timeout_s: float | None = None,
        result_type: Any = Any,
    ) -> QueryResult:
        """As `ReplicaQueries.query`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        session = self._session
        query = session.query_frame(name, args, consistency, after_index, replica_wait_ms(timeout_s))
        link = self._link
        async with self._lock:
            sent_on: object = None
            while True:
                await link.ensure_connected(deadline)
                if sent_on is not link.writer:
                    session.send_query(query)  # again after a reconnect: queries change nothing
                    sent_on = link.writer
                try:
                    await link.exchange(deadline)
                except OSError as error:
                    link.lost(error)
                    continue
                answer = session.answers.pop(query.query_id, None)
                session.answers.clear()  # late answers to queries that timed out
                if answer is not None:
                    return session.result(query, answer, result_type)

    def close(self) -> None:
        self._link.close()
