"""Events from a node's catch-up subscription (its query replicas): the live path.

`Client.subscribe(from_index)` yields every event from an index on, fed from the journal until
it reaches the live stream, then live, resuming on its own across disconnects and restarts
(docs/query-side.md, "Catch-up subscriptions"). This source hands its events on as
`SourceEvent`s and yields `None` when none has come for `idle_s`, so the projector commits what
it holds. Only committed records are served, on a cluster too, so nothing this source yields is
ever taken back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sequencer.projection.projection import ProjectionError, SourceEvent

__all__ = ["IDLE_S_DEFAULT", "SubscriptionSource"]

IDLE_S_DEFAULT = 0.05  # no event for this long: the projector commits what it holds


class SubscriptionSource:
    """See the module docstring.

    Args:
        socket_path: the node's client socket.
        schema: the app's schema (decodes the events).
        replicas: the query replicas' sockets; default: the node's (from its WELCOME).
        idle_s: how long without an event before `None`.
        reconnect_timeout_s: how long no replica may answer before the iteration raises.
    """

    def __init__(
        self,
        socket_path: str,
        schema: Any,
        *,
        replicas: list[str] | None = None,
        idle_s: float = IDLE_S_DEFAULT,
        reconnect_timeout_s: float = 60.0,
    ) -> None:
        self.socket_path = socket_path
        self.schema = schema
        self.replicas = replicas
        self.idle_s = idle_s
        self.reconnect_timeout_s = reconnect_timeout_s

    def read(self, from_index: int) -> Iterator[SourceEvent | None]:
        """Every event at index >= from_index, then live; never ends by itself.

        Raises:
            SubscriptionError: the node no longer holds `from_index` (retention); ConnectionLost:
                no replica answered for reconnect_timeout_s; ProjectionError: an event was too
                large to publish.
        """
        from sequencer.client import Client, TimedOut

        # The client connects at once; its WELCOME names the replicas. The subscription keeps
        # connections of its own to them.
        with Client(self.socket_path, schema=self.schema, timeout_s=self.reconnect_timeout_s) as client:
            subscription = client.subscribe(  # type: ignore[attr-defined]
                from_index, replicas=self.replicas, reconnect_timeout_s=self.reconnect_timeout_s
            )
        try:
            while True:
                try:
                    item = subscription.next(self.idle_s)
                except TimedOut:
                    yield None
                    continue
                kind = getattr(item.kind, "name", str(item.kind))
                if kind == "EVENT":
                    yield SourceEvent(item.index, item.timestamp_ns, item.event)
                elif kind == "EVENT_OMITTED":
                    raise ProjectionError(
                        f"the event at index {item.index} was larger than an event may be "
                        "(sequencer.egress.EVENT_PAYLOAD_BYTES_MAX), so the node published an "
                        "EVENT_OMITTED marker instead: no read model can include it. Publish "
                        "smaller events"
                    )
        finally:
            subscription.close()
