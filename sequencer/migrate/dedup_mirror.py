"""Following the old node's dedup decisions during a migration: which commands were new requests
and which were resends (`DedupMirror`).

A command the old node deduplicated (its request id was not above the client's last) changed
nothing, so a migration drops it; one without a session (the processor drops those) too. To
tell them apart without running the app, the mirror keeps the processor's session table, last
request id per client and client expiry, fed the old journal's records in log order.
"""

from __future__ import annotations

__all__ = ["DedupMirror"]


class _Client:
    __slots__ = ("last_request_id", "sessions")

    def __init__(self) -> None:
        self.last_request_id = 0
        self.sessions = 0


class _Session:
    __slots__ = ("client", "client_id", "node")

    def __init__(self, client_id: int, node: str, client: _Client) -> None:
        self.client_id = client_id
        self.node = node
        self.client = client


class DedupMirror:
    """The processor's session and dedup bookkeeping, without the app and the saved replies.

    It must decide exactly as `sequencer.processor.Processor` did which commands were applied:
    the same session table (SESSION_OPEN/CLOSE, `node_start` closing a node's sessions), the
    same last request id per client, the same client expiry in log time (a client without a
    session for `client_expiry_ns` is forgotten, so its next request id counts as new).
    tests/test_migrate.py checks the two against each other.
    """

    def __init__(self, client_expiry_ns: int) -> None:
        self.client_expiry_ns = client_expiry_ns
        self.sessions: dict[int, _Session] = {}
        self.clients: dict[int, _Client] = {}
        self.idle: dict[int, int] = {}  # client id -> idle since, oldest first

    def open(self, session_id: int, client_id: int, node: str, timestamp_ns: int) -> None:
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = _Client()
        client.sessions += 1
        self.idle.pop(client_id, None)
        self._expire(timestamp_ns)
        self.sessions[session_id] = _Session(client_id, node, client)

    def close(self, session_id: int, timestamp_ns: int) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        client = session.client
        client.sessions -= 1
        if client.sessions == 0:
            self.idle[session.client_id] = timestamp_ns
        self._expire(timestamp_ns)
        return True

    def close_node(self, node: str, timestamp_ns: int) -> None:
        for session_id in [sid for sid, session in self.sessions.items() if session.node == node]:
            self.close(session_id, timestamp_ns)

    def _expire(self, now_ns: int) -> None:
        idle = self.idle
        deadline = now_ns - self.client_expiry_ns
        while idle:
            client_id = next(iter(idle))
            if idle[client_id] > deadline:
                break
            del idle[client_id]
            del self.clients[client_id]
