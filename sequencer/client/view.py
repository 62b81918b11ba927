"""SessionView: what both clients expose of their session (they differ only in how they do I/O).

`Client` (blocking) and `AsyncClient` (asyncio) inherit it; it only reads the sans-I/O core,
`sequencer.client.session.Session`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import Session

__all__ = ["SessionView"]


class SessionView:
    """What both clients expose of their session (they differ only in how they do I/O)."""

    _session: Session

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
        return self._session.socket_path

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
    def last_index(self) -> int:
        """The highest log index of a reply received: what a query waits for by default."""
        return self._session.last_index

    @property
    def replicas(self) -> list[str]:
        """The node's query replica sockets, from its WELCOME (empty: it runs none)."""
        return list(self._session.replicas)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: reconnects, stale replies ignored, events dropped."""
        session = self._session
        return {
            "reconnects": session.reconnects,
            "replies_ignored": session.replies_ignored,
            "events_dropped": session.events_dropped,
        }
