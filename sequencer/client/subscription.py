"""Blocking shells around `replica.ReplicaSession`: catch-up subscriptions and queries.

`Subscription` is an iterator of `SubscriptionItem`s that reconnects and resumes on its own
(`docs/client.md`, "Catch-up subscriptions and queries"); `ReplicaQueries` sends queries to a
replica and waits for the answers. Both only move bytes and sleep; the decisions are the core's.
`Client.subscribe` and `Client.query` build them with the node's replica sockets (WELCOME).
"""

from __future__ import annotations

import logging
import math
import socket
import time
from typing import Any

from .errors import ClientClosed, ConnectionLost, TimedOut
from .ids import new_client_id
from .protocol import READ_BYTES_MAX
from .reconnect import RECONNECT_BACKOFF_S_MAX, RECONNECT_BACKOFF_S_MIN, RETRYABLE_ERRNOS
from .replica import Consistency, QueryResult, ReplicaSession, SubscriptionItem, replica_wait_ms

__all__ = ["ReplicaQueries", "Subscription"]

log = logging.getLogger("sequencer.client")


class _Link:
    """One blocking connection to a replica at a time, reconnecting with backoff."""

    def __init__(self, session: ReplicaSession, reconnect_timeout_s: float) -> None:
        self.session = session
        self.reconnect_timeout_s = reconnect_timeout_s
        self.socket: socket.socket | None = None
        self.closed = False
        self.last_error: BaseException | None = None

    def close(self) -> None:
        self.closed = True
        self._drop()

    def _drop(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        self.session.connection_lost()

    def lost(self, error: BaseException | None) -> None:
        self.last_error = error
        self._drop()

    def ensure_connected(self, deadline: float) -> None:
        """Connect and handshake, trying the replicas in turn with backoff.

        Raises:
            TimedOut: `deadline` passed first.
            ConnectionLost: no replica answered for reconnect_timeout_s.
            ClientClosed: closed.
        """
        if self.closed:
            raise ClientClosed("the subscription or client was closed")
        if self.socket is not None:
            return
        session = self.session
        give_up_at = time.monotonic() + self.reconnect_timeout_s
        backoff_s = RECONNECT_BACKOFF_S_MIN
        while True:
            path = session.begin_attempt()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(min(deadline, give_up_at) - time.monotonic(), 0.001))
                sock.connect(path)
                session.connection_made()
                while not session.connected:
                    if session.outgoing:
                        sock.sendall(session.outgoing)
                        session.outgoing.clear()
                    data = sock.recv(READ_BYTES_MAX)
                    if not data:
                        raise ConnectionResetError(f"the replica at {path} closed the connection")
                    session.receive_data(data)
                if session.outgoing:
                    sock.sendall(session.outgoing)
                    session.outgoing.clear()
                self.socket = sock
                return
            except OSError as error:
                sock.close()
                session.connection_lost()
                self.last_error = error
                if error.errno is not None and error.errno not in RETRYABLE_ERRNOS and not isinstance(error, TimeoutError):
                    raise
            now = time.monotonic()
            if now >= give_up_at:
                raise ConnectionLost(
                    f"no query replica answered for {self.reconnect_timeout_s} s (tried "
                    f"{session.socket_paths}; last error: {self.last_error!r}). Check that the node "
                    "runs its replicas (`seqd status`) or that `seqd replica` runs"
                )
            if now >= deadline:
                raise TimedOut(f"timed out connecting to a query replica (last error: {self.last_error!r})")
            time.sleep(min(backoff_s, deadline - now))
            backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_S_MAX)

    def exchange(self, deadline: float) -> None:
        """Write what is queued, then read once (waiting until `deadline`).

        Raises:
            TimedOut: nothing arrived before `deadline` (the connection stays).
            OSError: the connection failed (the caller calls `lost` and tries again).
        """
        sock = self.socket
        assert sock is not None
        session = self.session
        if session.outgoing:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(session.outgoing)
            session.outgoing.clear()
        timeout_s = deadline - time.monotonic()
        if timeout_s <= 0:
            raise TimedOut("timed out waiting for the query replica")
        sock.settimeout(min(timeout_s, 3600.0))
        try:
            data = sock.recv(READ_BYTES_MAX)
        except TimeoutError:
            raise TimedOut("timed out waiting for the query replica") from None
        if not data:
            raise ConnectionResetError(f"the replica at {session.socket_path} closed the connection")
        session.receive_data(data)


class Subscription:
    """A catch-up subscription: every event (and with `records`, every record) from
    `from_index` on, then live, each item with its index; iterate over it.

    It resumes on its own after a lost connection, a replica killed or restarted, or a node
    restart: from the last item taken, with no gap and no duplicate (`resume_index`). A process
    that restarts passes `from_index=resume_index` of its last run (or, having stored only the
    index of the last item it applied, that index + 1 when it took every item of that index).

    Args:
        socket_paths: the query replicas' sockets (`Client.subscribe` passes the node's).
        from_index: the first log index wanted (0 and 1: from the beginning).
        records: also every record, before the events it published.
        schema: decodes events into `item.event` (the app's `Schema`).
        client_id: sent in HELLO; random when None.
        reconnect_timeout_s: how long no replica may answer before `ConnectionLost`.

    Raises (from iteration):
        SubscriptionError: `index_below_retention`: the journal no longer holds `from_index`
            and no snapshot before it is kept; start again from a snapshot (the message says
            which index is the oldest that can be served).
        ConnectionLost: no replica answered for reconnect_timeout_s (iterate again to retry).
        ProtocolViolation: the replica broke the protocol.
    """

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
        self._link = _Link(self._session, reconnect_timeout_s)

    @property
    def resume_index(self) -> int:
        """Where a new subscription would resume: the index of the last item taken (with
        `taken_at_resume_index` of its items taken), or from_index before any."""
        return self._session.resume_index

    @property
    def taken_at_resume_index(self) -> int:
        return self._session.taken_at_resume_index

    @property
    def reconnects(self) -> int:
        """Connections made so far, the first one included."""
        return self._session.reconnects

    def next(self, timeout_s: float | None = None) -> SubscriptionItem:
        """The next item, waiting at most `timeout_s` (None: for ever).

        Raises:
            TimedOut: no item within timeout_s (the subscription goes on).
        """
        session = self._session
        if session.items:
            return session.take_item()
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        link = self._link
        while not session.items:
            link.ensure_connected(deadline)
            try:
                link.exchange(min(deadline, time.monotonic() + 3600.0))
            except TimedOut:
                if time.monotonic() >= deadline:
                    raise TimedOut(
                        f"no subscription item within {timeout_s} s (resume index "
                        f"{session.resume_index})"
                    ) from None
            except OSError as error:
                log.info("subscription: connection to %s lost (%s); resuming from index %d",
                         session.socket_path, error, session.resume_index)  # fmt: skip
                link.lost(error)
        return session.take_item()

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> SubscriptionItem:
        return self.next(None)

    def items(self, timeout_s: float) -> list[SubscriptionItem]:
        """Every item that arrives until none has come for `timeout_s`."""
        taken: list[SubscriptionItem] = []
        while True:
            try:
                taken.append(self.next(timeout_s))
            except TimedOut:
                return taken

    def close(self) -> None:
        self._link.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Subscription(socket_path={self._session.socket_path!r}, resume_index="
            f"{self.resume_index}, taken_at_resume_index={self.taken_at_resume_index})"
        )


class ReplicaQueries:
    """Queries to a node's query replicas over one blocking connection (reconnecting)."""

    def __init__(
        self,
        socket_paths: list[str] | str,
        client_id: int | None = None,
        timeout_s: float = 10.0,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        paths = [socket_paths] if isinstance(socket_paths, str) else list(socket_paths)
        self._session = ReplicaSession(new_client_id() if client_id is None else client_id, paths)
        self._link = _Link(self._session, reconnect_timeout_s)
        self.timeout_s = timeout_s

    def query(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        consistency: str = Consistency.LOCAL,
        after_index: int = 0,
        timeout_s: float | None = None,
        result_type: Any = Any,
    ) -> QueryResult:
        """Run the app's query `name(**args)` on a replica; see `Client.query`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        session = self._session
        query = session.query_frame(name, args, consistency, after_index, replica_wait_ms(timeout_s))
        link = self._link
        sent_on: object = None
        while True:
            link.ensure_connected(deadline)
            if sent_on is not link.socket:
                session.send_query(query)  # again after a reconnect: queries change nothing
                sent_on = link.socket
            try:
                link.exchange(deadline)
            except OSError as error:
                link.lost(error)
                continue
            answer = session.answers.pop(query.query_id, None)
            session.answers.clear()  # late answers to queries that timed out
            if answer is not None:
                return session.result(query, answer, result_type)

    def close(self) -> None:
        self._link.close()
