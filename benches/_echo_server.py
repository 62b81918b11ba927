"""The transport's ceiling: a uvloop Unix-socket server that answers every COMMAND at once.

It speaks the client protocol with the same codec as the sequencer (HELLO -> WELCOME, COMMAND ->
REPLY) but does no sequencing, journalling or business logic: each reply carries a fixed, valid
ledger reply payload so the unmodified load generator can decode it.

    python -m benches._echo_server SOCKET_PATH
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvloop

from sequencer.apps.ledger import Ledger, Transferred
from sequencer.client import protocol

_VERSION = Ledger.schema.version
_PAYLOAD = Ledger.schema.encode_reply(Transferred("a", "b", 1, 0))


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.connection = protocol.Connection(protocol.Side.SERVER)
        self.transport: asyncio.Transport | None = None
        self.index = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        connection.receive_data(data)
        out = bytearray()
        for frame in connection.next_frames():
            if type(frame) is protocol.Command:
                self.index += 1
                connection.send_reply_into(out, frame.request_id, self.index, 0, _VERSION, _PAYLOAD)
            elif type(frame) is protocol.Hello:
                out += connection.send(
                    protocol.Welcome(session_id=1, node="echo", frame_bytes_max=protocol.FRAME_BYTES_MAX, leader="echo")
                )
        if out and self.transport is not None:
            self.transport.write(bytes(out))


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_unix_server(Echo, path=path)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    os.unlink(path)


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(sys.argv[1]))
