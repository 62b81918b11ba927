"""The processor's per-client bookkeeping: open sessions, the dedup table and client expiry
(sans-I/O).

Exactly-once. Each client numbers its requests. Per client id (stable across reconnects and
failovers) we keep the last applied request id and the replies not yet acknowledged; a command
whose request id is not above the last applied is a resend: it gets the saved reply (status and
payload of the original, the original index) or, once the client has acknowledged that reply
(`acked_request_id` in the COMMAND payload prefix) and it was pruned, status DUPLICATE. It is
never applied twice. The table is part of the state, so it survives snapshots and failover.

The processor applies a COMMAND against these entries inline (`Processor.apply_frame`, the hot
path, reads `ClientTable.sessions` and a `ClientEntry`'s fields directly); this module owns the
rest: opening and closing sessions, and forgetting clients idle past the expiry.
"""

from __future__ import annotations

__all__ = [
    "CLIENT_EXPIRY_NS_DEFAULT",
    "SAVED_REPLIES_MAX",
    "ClientEntry",
    "ClientTable",
    "SessionEntry",
]

# A client may pipeline requests; the replies it has not acknowledged are kept so a resend after a
# reconnect gets the original reply. A well-behaved client acks as replies arrive, so it holds a
# handful; the bound stops a client that never acks from growing the state without limit. Beyond
# it the oldest saved reply is dropped, and a resend of that request gets DUPLICATE (it was
# applied; its reply is gone). 1024 covers the client library's in-flight window with room.
CLIENT_EXPIRY_NS_DEFAULT = 24 * 3600 * 1_000_000_000  # a day without a session: forget the client
SAVED_REPLIES_MAX = (
    1024  # per client; the client library caps its window at this (IN_FLIGHT_LIMIT_MAX)
)


class ClientEntry:
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


class SessionEntry:
    """An open session: its client id, the node it was opened on, and its client's entry."""

    __slots__ = ("client", "client_id", "local", "node")

    def __init__(self, client_id: int, node: str, client: ClientEntry, local: bool) -> None:
        self.client_id = client_id
        self.node = node
        self.client = client
        self.local = local  # replies to it are emitted by this node


class ClientTable:
    """The open sessions and the dedup entry of every client id still remembered.

    Args:
        node: this node's name; a session opened on it is `local` (its replies are emitted
            here). None: every session is local (single node, tests, replays).
        expiry_ns: how long a client id without a session is remembered (log time). Every
            replica and every replay must use the same: it decides what is deduplicated.

    Invariants (between calls): `sessions`, `clients` and `idle` are never rebound, so a caller
    may hold them (the processor's hot path does); every session's client is in `clients`;
    `idle` holds exactly the clients with no open session, oldest idle first.
    """

    __slots__ = ("clients", "expired", "expiry_ns", "idle", "node", "sessions")

    def __init__(self, node: str | None, expiry_ns: int) -> None:
        assert expiry_ns > 0, expiry_ns
        self.node = node
        self.expiry_ns = expiry_ns
        self.expired = 0  # client ids forgotten so far
        self.sessions: dict[int, SessionEntry] = {}
        self.clients: dict[int, ClientEntry] = {}
        # Clients with no open session, oldest idle first: client_id -> idle since (log time).
        self.idle: dict[int, int] = {}

    def client(self, client_id: int) -> ClientEntry:
        """The entry of `client_id`, created empty if it is not remembered."""
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = ClientEntry()
        return client

    def attach(self, session_id: int, client_id: int, node: str) -> None:
        """Records an open session of `client_id` on `node` (no expiry: restore uses it too)."""
        client = self.client(client_id)
        client.sessions += 1
        local = self.node is None or node == self.node
        self.sessions[session_id] = SessionEntry(client_id, node, client, local)

    def open(self, session_id: int, client_id: int, node: str, now_ns: int) -> None:
        """A SESSION_OPEN at log time `now_ns`: the client is no longer idle."""
        self.attach(session_id, client_id, node)
        self.idle.pop(client_id, None)
        self.expire(now_ns)

    def close(self, session_id: int, now_ns: int) -> SessionEntry | None:
        """A SESSION_CLOSE at log time `now_ns`: the closed session, or None if it was not open
        (closed already, e.g. by a node_start: closing twice is a no-op)."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return None
        client = session.client
        client.sessions -= 1
        assert client.sessions >= 0, (session.client_id, client.sessions)
        if client.sessions == 0:
            client.idle_since_ns = now_ns
            self.idle[session.client_id] = now_ns
        self.expire(now_ns)
        return session

    def sessions_on(self, node: str) -> list[int]:
        """The ids of the sessions opened on `node`, in opening order."""
        return [sid for sid, session in self.sessions.items() if session.node == node]

    def expire(self, now_ns: int) -> None:
        """Forget the dedup state of clients without a session for `expiry_ns`.

        Without this the table grows with every client id ever seen (a client that takes a
        random id per process makes one per run). The queue is in idle-time order (log time is
        non-decreasing), so each check looks at its head only. A client that comes back after
        expiry with requests it never saw answered could have them applied twice: the expiry
        (a day by default) must be far longer than any client's reconnect timeout. Kafka's
        idempotent producer makes the same trade (`producer.id.expiration.ms`).
        """
        idle = self.idle
        deadline = now_ns - self.expiry_ns
        while idle:
            client_id = next(iter(idle))
            if idle[client_id] > deadline:
                break
            del idle[client_id]
            del self.clients[client_id]
            self.expired += 1

    def rebuild_idle(self, snapshot_ns: int) -> None:
        """After a restore: the idle queue in the order the live processor built it, by idle
        time, ties in the clients' order (the order of eviction among ties does not change what
        is evicted). A client saved before expiry existed is idle since the snapshot's time."""
        for client in self.clients.values():
            if client.sessions == 0 and client.idle_since_ns == 0:
                client.idle_since_ns = snapshot_ns
        idle = sorted(
            (client.idle_since_ns, position, client_id)
            for position, (client_id, client) in enumerate(self.clients.items())
            if client.sessions == 0
        )
        self.idle.clear()
        self.idle.update((client_id, since) for since, _, client_id in idle)
