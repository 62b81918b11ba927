"""A connection to a query replica, as a sans-I/O core: catch-up subscriptions and queries.

Theory of operation
-------------------

A query replica (`daemon/roles/replica.py`) applies the node's committed log to its own copy of
the state and serves two things on its own Unix socket, with the client protocol's frames
(`sequencer.client.protocol`, `Service.REPLICA`):

- a **subscription**: SUBSCRIBE(from_index, records) then ITEM frames, every event the state
  machine published from `from_index` on (and, with `records`, every record before its events),
  from the journal while behind, then live, in index order with no gap and no duplicate;
- **queries**: QUERY(query_id, name, args, consistency) answered by ANSWER(query_id, index,
  result) as of the replica's applied `index`.

A subscription survives disconnects and restarts of the replica or of the node. The core keeps
the resume point: the index of the last item the caller took (`resume_index`) and how many items
of that index it took (`taken_at_resume_index`). On a new connection it subscribes again from
`resume_index` and drops that many items of it: the items of one index are the same on every
replay (the state machine is deterministic), so dropping by count is exact, and an index whose
events were only partly taken is neither lost nor repeated.

`ReplicaSession` does no I/O and reads no clock (h11's shape, like `sequencer.client.session`):

    events from the shell                    what the session answers
    begin_attempt()                          the socket path to connect to (they rotate)
    connection_made()                        HELLO (and SUBSCRIBE) appended to `outgoing`
    receive_data(data)                       items in `items`, answers in `answers`; or an
                                             exception for the caller (`SubscriptionError`)
    connection_lost()                        the next attempt goes to the next replica
    take_item()                              the next item, and the resume point moves past it

Items are read from the socket only while `items` is empty (the shells do so), so a subscriber
that does not iterate leaves the bytes in the kernel and then in the replica's bounded buffer,
and never grows this process.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Final

import msgspec

from .errors import ClientError, ProtocolViolation
from .protocol import (
    Answer,
    Connection,
    Error,
    Hello,
    Item,
    ItemKind,
    Ping,
    Pong,
    ProtocolError,
    Query,
    Service,
    Side,
    Subscribe,
    Welcome,
)
from .reconnect import SOCKET_PATH_BYTES_MAX

__all__ = [
    "CONSISTENCY_LEVELS",
    "QUERY_ANSWER_MARGIN_S",
    "RETRYABLE_SUBSCRIPTION_CODES",
    "Consistency",
    "ItemKind",
    "QueryError",
    "QueryResult",
    "ReplicaSession",
    "SubscriptionError",
    "SubscriptionItem",
    "replica_wait_ms",
]


# An `after` query waits at the replica this much less than the caller's timeout, so the
# replica's `not_applied_in_time` arrives before the caller gives up with a bare TimedOut.
QUERY_ANSWER_MARGIN_S: Final = 0.1


def replica_wait_ms(timeout_s: float) -> int:
    """How long the replica may wait for `after_index` within a caller's `timeout_s`."""
    return max(1, int(max(timeout_s - QUERY_ANSWER_MARGIN_S, timeout_s / 2) * 1000))


class Consistency(enum.StrEnum):
    """How fresh a query's answer must be (docs/query-side.md, "Consistency")."""

    LOCAL = "local"  # whatever the replica has applied
    AFTER = "after"  # at or after `after_index` (read-your-writes: the client's last reply)
    LINEARIZABLE = "linearizable"  # after a read index: a cluster's ReadIndex, a node's commit


CONSISTENCY_LEVELS: Final = frozenset(level.value for level in Consistency)
# ERROR codes of a replica after which a subscription reconnects and resumes on its own: the
# replica dropped a subscriber too far behind (it resumes from where it was, fed from the
# journal), or it is stopping (restart, drain).
RETRYABLE_SUBSCRIPTION_CODES: Final = frozenset(
    {"subscriber_too_slow", "replica_stopping", "unavailable"}
)


class SubscriptionItem(msgspec.Struct, frozen=True, gc=False):
    """One item of a catch-up subscription.

    Attributes:
        index: the log index of the record (RECORD), or of the record whose application
            published the event (EVENT, EVENT_OMITTED).
        timestamp_ns: that record's timestamp (leader time, ns since the epoch).
        kind: `ItemKind.RECORD`, `ItemKind.EVENT` or `ItemKind.EVENT_OMITTED`.
        version: the event's schema version; a record's version field.
        payload: the event's bytes (msgpack); a RECORD's whole record (48-byte header, then its
            payload: `sequencer.record.decode_header`); EVENT_OMITTED: msgpack {code, message}.
        event: the event decoded by the schema (None without a schema or for other kinds).
        record_type: a RECORD's `sequencer.record.RecordType` (0 for other kinds).
    """

    index: int
    timestamp_ns: int
    kind: ItemKind
    version: int
    payload: bytes
    event: Any = None
    record_type: int = 0


class QueryResult(msgspec.Struct, frozen=True):
    """A query's result and the log index of the state it was computed on."""

    value: Any
    index: int


class QueryError(ClientError):
    """The replica could not answer the query: `code` says why (docs/client.md)."""

    def __init__(self, code: str, message: str, name: str) -> None:
        super().__init__(f"query {name!r}: {code}: {message}")
        self.code = code
        self.message = message
        self.name = name


class SubscriptionError(ClientError):
    """The subscription cannot go on: `code` says why (`index_below_retention`: start again from
    a snapshot; docs/client.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ReplicaSession:
    """One client's connection to the replicas of a node, across reconnects.

    Args:
        client_id: sent in HELLO (a replica has no dedup table; it names the client in logs).
        socket_paths: the replicas' sockets, tried in turn (from WELCOME's `replicas`, or given).
        schema: decodes events (`decode_event(version, payload)`); None leaves them as bytes.
        subscribe: (from_index, records) for a subscription; None for a query connection.

    Raises:
        ValueError: no socket path, a path too long, or from_index < 0.
    """

    def __init__(
        self,
        client_id: int,
        socket_paths: list[str],
        schema: Any | None = None,
        subscribe: tuple[int, bool] | None = None,
    ) -> None:
        if not socket_paths:
            raise ValueError(
                "no query replica to connect to: the node runs none ([replicas] count = 0 in its "
                "config) and no replica socket was given. Set [replicas] count = 1 or more, or "
                "pass the socket of a replica started with `seqd replica`"
            )
        for path in socket_paths:
            if len(path.encode()) > SOCKET_PATH_BYTES_MAX:
                raise ValueError(f"replica socket path {path!r} is over {SOCKET_PATH_BYTES_MAX} bytes")
        self.client_id = client_id
        self.socket_paths = list(socket_paths)
        self._next_path = client_id % len(socket_paths)  # spread clients over the replicas
        self.socket_path = self.socket_paths[self._next_path]
        self.schema = schema
        self.subscribing = subscribe is not None
        from_index, records = subscribe if subscribe is not None else (1, False)
        if from_index < 0:
            raise ValueError(f"from_index={from_index} is negative: log indexes start at 1")
        self.records = records
        # The resume point: the caller took `taken_at_resume_index` items of `resume_index`.
        self.resume_index = max(from_index, 1)
        self.taken_at_resume_index = 0
        self._to_drop = 0  # items of resume_index to drop on this connection (taken before)
        self.connection: Connection | None = None
        self.connected = False
        self.outgoing = bytearray()
        self.items: collections.deque[SubscriptionItem] = collections.deque()
        self.answers: dict[int, Answer] = {}
        self.next_query_id = 1
        self.replica_applied_index = 0  # from the replica's WELCOME
        self.reconnects = 0

    # -- the connection ---------------------------------------------------------------------

    def begin_attempt(self) -> str:
        """The socket to connect to next: the replicas in turn, starting with this client's."""
        self.socket_path = self.socket_paths[self._next_path]
        self._next_path = (self._next_path + 1) % len(self.socket_paths)
        return self.socket_path

    def connection_made(self) -> None:
        """Connected: HELLO, then SUBSCRIBE from the resume point (a subscription)."""
        self.connection = Connection(Side.CLIENT, Service.REPLICA)
        self.connected = False
        self.outgoing.clear()
        self.items.clear()  # received but not taken: they come again from the resume point
        self.reconnects += 1
        self.connection.send_into(self.outgoing, Hello(client_id=self.client_id))

    def connection_lost(self) -> None:
        """The connection ended (EOF, an OSError, a retryable ERROR): the next attempt may go to
        another replica; queries in flight are to be sent again by the shell."""
        self.connection = None
        self.connected = False
        self.items.clear()

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the current connection.

        Raises:
            SubscriptionError: the replica refused the subscription for good (its code).
            ConnectionResetError: the replica asked us to go (a retryable ERROR): reconnect.
            ProtocolViolation: the replica broke the protocol.
        """
        connection = self.connection
        assert connection is not None, "receive_data without a connection"
        connection.receive_data(data)
        while True:
            try:
                frames = connection.next_frames()
            except ProtocolError as error:
                raise ProtocolViolation(error.code, error.message) from None
            if not frames:
                return
            for frame in frames:
                if type(frame) is Item:
                    self._item(frame)
                elif type(frame) is Answer:
                    self.answers[frame.query_id] = frame
                elif type(frame) is Welcome:
                    self._welcomed(frame)
                elif type(frame) is Ping:
                    connection.send_into(self.outgoing, Pong(nonce=frame.nonce))
                elif type(frame) is Error:
                    self._error(frame)

    def _welcomed(self, welcome: Welcome) -> None:
        assert self.connection is not None
        self.connected = True
        self.replica_applied_index = welcome.applied_index
        if self.subscribing:
            self._to_drop = self.taken_at_resume_index
            self.connection.send_into(
                self.outgoing, Subscribe(from_index=self.resume_index, records=self.records)
            )

    def _item(self, frame: Item) -> None:
        if self._to_drop and frame.index == self.resume_index:
            self._to_drop -= 1  # taken on an earlier connection
            return
        self._to_drop = 0
        kind = ItemKind(frame.kind)
        event = None
        if kind is ItemKind.EVENT and self.schema is not None:
            event = self.schema.decode_event(frame.version, frame.payload)
        self.items.append(
            SubscriptionItem(
                frame.index, frame.timestamp_ns, kind, frame.version, frame.payload, event,
                frame.record_type,
            )
        )  # fmt: skip

    def _error(self, frame: Error) -> None:
        if not frame.fatal:
            return
        if frame.code in RETRYABLE_SUBSCRIPTION_CODES:
            raise ConnectionResetError(f"the replica at {self.socket_path} ended the connection: {frame.code}: {frame.message}")
        if self.subscribing:
            raise SubscriptionError(frame.code, frame.message)
        raise ProtocolViolation(frame.code, frame.message)

    def take_item(self) -> SubscriptionItem:
        """The next item received; the resume point moves past it."""
        item = self.items.popleft()
        if item.index == self.resume_index:
            self.taken_at_resume_index += 1
        else:
            assert item.index > self.resume_index, (item.index, self.resume_index)
            self.resume_index = item.index
            self.taken_at_resume_index = 1
        return item

    # -- queries ----------------------------------------------------------------------------

    def query_frame(
        self, name: str, args: dict[str, Any] | None, consistency: str, after_index: int,
        wait_ms: int,
    ) -> Query:  # fmt: skip
        """A QUERY with a fresh query id.

        Raises:
            ValueError: `consistency` is not one of CONSISTENCY_LEVELS.
        """
        if consistency not in CONSISTENCY_LEVELS:
            raise ValueError(
                f"consistency={consistency!r} is not one of {sorted(CONSISTENCY_LEVELS)}"
            )
        query_id = self.next_query_id
        self.next_query_id += 1
        return Query(
            query_id=query_id, name=name, args=dict(args or {}), consistency=consistency,
            after_index=after_index, wait_ms=wait_ms,
        )  # fmt: skip

    def send_query(self, query: Query) -> None:
        assert self.connection is not None and self.connected
        self.connection.send_into(self.outgoing, query)

    @staticmethod
    def result(query: Query, answer: Answer, result_type: Any = Any) -> QueryResult:
        """The answer as a QueryResult.

        Raises:
            QueryError: the replica refused or failed the query (its code and message).
        """
        if answer.code:
            raise QueryError(answer.code, answer.message, query.name)
        value = msgspec.msgpack.decode(answer.result, type=result_type)
        return QueryResult(value, answer.index)
