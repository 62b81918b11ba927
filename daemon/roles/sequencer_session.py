"""The sequencer role's client connection: the gateway's view of a session plus its transport
(daemon/roles/sequencer.py runs the loop; this is one asyncio protocol per connection)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sequencer.gateway import GatewaySession

if TYPE_CHECKING:
    from daemon.roles.sequencer import Sequencer

__all__ = ["PEER_UNKNOWN", "Session"]

# When SO_PEERCRED cannot be read: a uid and gid that no config allows, so the peer is refused.
PEER_UNKNOWN = (0, -1, -1)


class Session(GatewaySession, asyncio.Protocol):
    """One client connection: the gateway's view of it plus the transport it writes to."""

    __slots__ = ("peer", "sequencer", "transport")

    def __init__(self, sequencer: Sequencer) -> None:
        super().__init__()
        self.sequencer = sequencer
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[int, int, int] = PEER_UNKNOWN

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self.sequencer.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.connection.receive_data(data)
        self.sequencer.on_data(self)

    def eof_received(self) -> bool:
        self.sequencer.on_eof(self)
        return True  # on_eof closes the transport itself, after any ERROR frame it owes

    def connection_lost(self, exc: Exception | None) -> None:
        self.sequencer.on_disconnect(self)

    def flush(self) -> None:
        """Write what the gateway has for the client, then close if the gateway asked to."""
        out = self.out
        if out:
            data = bytes(out)
            out.clear()
            self.write(data)
        if self.closing:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.close()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.sequencer.client_write_buffer_bytes_max:
            self.sequencer.slow_client(self)
