"""A fake seqd daemon for the client tests, and tests that it keeps the dedup rules.

`FakeDaemon` plays the sequencer and the blp in one asyncio loop on its own thread, using the
SERVER side of `sequencer.client.protocol`. It applies commands to a dict and keeps, per client,
the last applied request id and the replies not yet acknowledged, as docs/contracts.md says:

- a request id above the last applied one is applied, and its reply saved;
- a request id at or below it gets its saved reply again, or DUPLICATE once that reply was
  acknowledged (`acked_request_id`) and forgotten;
- every saved reply up to a command's `acked_request_id` is forgotten.

Its dedup state survives `restart()`, as the blp's survives a daemon restart (snapshot + journal).
Faults on demand: drop the connection right after the Nth command is applied (its batch's replies
unsent), send garbage instead of a reply, hold commands unanswered (`pause`), redirect a HELLO,
refuse the next HELLOs with an ERROR code each (`refuse_hellos`).

Commands are bytes: `incr:<key>` (reply: the new value), `echo:<text>`, `reject:<code>`,
`publish:<text>` (an event to subscribed sessions).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sequencer.client.protocol import (
    CLOSED,
    FRAME_BYTES_MAX,
    Command,
    Connection,
    Error,
    Event,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Redirect,
    Reply,
    ReplyStatus,
    Sentinel,
    Side,
    Welcome,
    encode_rejection,
)

WAIT_S = 10.0  # upper bound on any wait for the fake's thread; a test never gets near it


@dataclass
class ClientRecord:
    """The blp's per-client dedup state."""

    last_applied_request_id: int = 0
    # request id -> (index, status, payload), for replies not yet acknowledged, in id order.
    replies: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)


class _Session(asyncio.Protocol):
    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.connection = Connection(Side.SERVER)
        self.transport: asyncio.Transport | None = None
        self.client_id = 0
        self.subscribed = False
        self.held: list[Command] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.daemon.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.sessions.discard(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.connection.receive_data(data)
        out = bytearray()
        while True:
            try:
                frames = self.connection.next_frames()
            except ProtocolError as error:
                self.daemon.protocol_errors.append(error.code)
                self.connection.send_into(out, error.to_frame())
                self.transport.write(bytes(out))
                self.transport.close()
                return
            if not frames:
                break
            for frame in frames:
                if not self.daemon.handle(self, frame, out):
                    self.transport.abort()
                    return
                if self.transport.is_closing():
                    return  # refused or redirected: what it wrote goes out, then the close
        if out:
            self.transport.write(bytes(out))


class FakeDaemon:
    def __init__(self, socket_path: Path | str, node: str = "n1") -> None:
        self.socket_path = str(socket_path)
        self.node = node
        self.clients: dict[int, ClientRecord] = {}
        self.applications: collections.Counter[tuple[int, int]] = collections.Counter()
        self.values: dict[bytes, int] = {}
        self.index = 0
        self.hellos = 0
        self.commands_received = 0
        self.received: list[tuple[int, int]] = []  # (client id, request id) in arrival order
        self.unacked_max = 0  # the most requests a client had sent and not seen answered
        self.protocol_errors: list[str] = []
        self.sessions: set[_Session] = set()
        # Fault knobs, set from the test thread.
        self.drop_after_commands: int | None = None  # one-shot
        self.garbage_next_reply = False  # one-shot
        self.redirect_to: str | None = None
        self.refuse_hellos: list[str] = []  # ERROR codes for the next HELLOs, one each
        self.paused = False
        self.ping_after_welcome = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None

    # -- test-thread API ---------------------------------------------------------------------

    def run(self, coroutine_or_callable: object) -> object:
        if asyncio.iscoroutine(coroutine_or_callable):
            future = asyncio.run_coroutine_threadsafe(coroutine_or_callable, self._loop)
            return future.result(WAIT_S)

        async def call() -> object:
            return coroutine_or_callable()  # type: ignore[operator]

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(WAIT_S)

    def start(self) -> None:
        async def start() -> None:
            self._server = await self._loop.create_unix_server(
                lambda: _Session(self), self.socket_path
            )

        self.run(start())

    def stop(self) -> None:
        """Crash: close the socket and every connection, and remove the socket file."""

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for session in list(self.sessions):
                assert session.transport is not None
                session.transport.abort()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

        self.run(stop())

    def restart_later(self, delay_s: float) -> None:
        self._loop.call_soon_threadsafe(self._loop.call_later, delay_s, self._start_soon)

    def _start_soon(self) -> None:
        self._loop.create_task(self._start_task())

    async def _start_task(self) -> None:
        self._server = await self._loop.create_unix_server(
            lambda: _Session(self), self.socket_path
        )

    def pause(self) -> None:
        self.run(lambda: setattr(self, "paused", True))

    def resume(self) -> None:
        def resume() -> None:
            self.paused = False
            for session in list(self.sessions):
                out = bytearray()
                held, session.held = session.held, []
                for command in held:
                    self._command(session, command, out)
                if out and session.transport is not None:
                    session.transport.write(bytes(out))

        self.run(resume)

    def drop_connections(self) -> None:
        """Abort every connection, and return once their sockets are closed."""

        async def drop() -> None:
            dropped = list(self.sessions)
            for session in dropped:
                assert session.transport is not None
                session.transport.abort()
            for _ in range(1000):  # connection_lost (which closes the socket) runs soon after
                # (an asyncio client may already have opened a new session: that one stays)
                if not self.sessions.intersection(dropped):
                    return
                await asyncio.sleep(0.001)
            raise AssertionError(f"{len(self.sessions)} sessions did not close")

        self.run(drop())

    def close(self) -> None:
        self.stop()

        async def shutdown() -> None:
            await asyncio.sleep(0)

        self.run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_S)
        self._loop.close()

    def saved_replies(self, client_id: int) -> list[int]:
        return list(self.run(lambda: list(self.clients[client_id].replies)))  # type: ignore[call-overload]

    # -- the daemon's part (its own thread) --------------------------------------------------

    def handle(self, session: _Session, frame: object, out: bytearray) -> bool:
        """Process one frame; False to drop the connection at once (unsent replies are lost)."""
        if isinstance(frame, Hello):
            self.hellos += 1
            if self.refuse_hellos:
                code = self.refuse_hellos.pop(0)
                session.connection.send_into(out, Error(code=code, message=f"refused: {code}"))
                assert session.transport is not None
                session.transport.write(bytes(out))
                session.transport.close()
                out.clear()
                return True
            if self.redirect_to is not None:
                session.connection.send_into(
                    out, Redirect(leader="n2", socket_path=self.redirect_to)
                )
                assert session.transport is not None
                session.transport.write(bytes(out))
                session.transport.close()
                out.clear()
                return True
            session.client_id = frame.client_id
            session.subscribed = frame.subscribe_events
            self.clients.setdefault(frame.client_id, ClientRecord())
            session.connection.send_into(
                out,
                Welcome(
                    session_id=len(self.sessions), node=self.node, frame_bytes_max=FRAME_BYTES_MAX
                ),
            )
            if self.ping_after_welcome:
                session.connection.send_into(out, Ping(nonce=7))
            return True
        if isinstance(frame, Command):
            self.commands_received += 1
            self.received.append((session.client_id, frame.request_id))
            self.unacked_max = max(self.unacked_max, frame.request_id - frame.acked_request_id)
            if self.paused:
                session.held.append(frame)
                return True
            self._command(session, frame, out)
            if self.drop_after_commands is not None:
                self.drop_after_commands -= 1
                if self.drop_after_commands == 0:
                    self.drop_after_commands = None
                    return False
            return True
        if isinstance(frame, Ping):
            session.connection.send_into(out, Pong(nonce=frame.nonce))
        return True

    def _command(self, session: _Session, command: Command, out: bytearray) -> None:
        record = self.clients[session.client_id]
        while record.replies and next(iter(record.replies)) <= command.acked_request_id:
            del record.replies[next(iter(record.replies))]
        request_id = command.request_id
        if request_id <= record.last_applied_request_id:
            saved = record.replies.get(request_id)
            if saved is None:
                session.connection.send_reply_into(
                    out, request_id, 0, ReplyStatus.DUPLICATE, 1, b""
                )
            else:
                index, status, payload = saved
                session.connection.send_reply_into(out, request_id, index, status, 1, payload)
            return
        self.index += 1
        self.applications[(session.client_id, request_id)] += 1
        status, payload = self._apply(command.payload)
        record.last_applied_request_id = request_id
        record.replies[request_id] = (self.index, status, payload)
        if self.garbage_next_reply:
            self.garbage_next_reply = False
            out += b"\x10\x00\x00\x00\x04\x63\x00\x00" + b"\xee" * 16  # protocol version 0x63
            return
        session.connection.send_reply_into(out, request_id, self.index, status, 1, payload)

    def _apply(self, payload: bytes) -> tuple[int, bytes]:
        verb, _, argument = payload.partition(b":")
        if verb == b"incr":
            self.values[argument] = self.values.get(argument, 0) + 1
            return ReplyStatus.OK, str(self.values[argument]).encode()
        if verb == b"echo":
            return ReplyStatus.OK, argument
        if verb == b"reject":
            return ReplyStatus.REJECTED, encode_rejection(argument.decode(), "refused on request")
        if verb == b"publish":
            for session in self.sessions:
                if session.subscribed and session.transport is not None:
                    frame = session.connection.send(Event(self.index, 1, argument))
                    session.transport.write(frame)
            return ReplyStatus.OK, b"published"
        return ReplyStatus.REJECTED, encode_rejection("unknown_verb", repr(verb))


@contextlib.contextmanager
def running_fake_daemon(socket_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(socket_path)
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def daemon(tmp_dir: Path) -> Iterator[FakeDaemon]:
    with running_fake_daemon(tmp_dir / "seqd.sock") as fake:
        yield fake


# -- the fake's own rules, so the client tests rest on a correct oracle -----------------------------


class RawClient:
    """Frames over a plain blocking socket, for driving the fake byte by byte."""

    def __init__(self, path: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(WAIT_S)
        self.socket.connect(path)
        self.connection = Connection(Side.CLIENT)

    def send(self, *frames: object) -> None:
        out = bytearray()
        for frame in frames:
            self.connection.send_into(out, frame)  # type: ignore[arg-type]
        self.socket.sendall(out)

    def receive(self) -> object:
        while True:
            frame = self.connection.next_frame()
            if not isinstance(frame, Sentinel) or frame is CLOSED:
                return frame
            self.connection.receive_data(self.socket.recv(65536))

    def close(self) -> None:
        self.socket.close()


def test_fake_daemon_returns_saved_reply_and_applies_once(daemon: FakeDaemon) -> None:
    raw = RawClient(daemon.socket_path)
    try:
        raw.send(Hello(client_id=9))
        assert isinstance(raw.receive(), Welcome)
        raw.send(Command(1, 0, 1, b"incr:a"), Command(1, 0, 1, b"incr:a"))
        first, second = raw.receive(), raw.receive()
        assert isinstance(first, Reply) and isinstance(second, Reply)
        assert (first.payload, second.payload) == (b"1", b"1")
        assert first.index == second.index
        assert daemon.applications[(9, 1)] == 1
        # Acknowledge 1 with request 2; request 1 again is then a DUPLICATE.
        raw.send(Command(2, 1, 1, b"incr:a"), Command(1, 1, 1, b"incr:a"))
        third, fourth = raw.receive(), raw.receive()
        assert isinstance(third, Reply) and isinstance(fourth, Reply)
        assert third.payload == b"2"
        assert fourth.status == ReplyStatus.DUPLICATE
        assert daemon.saved_replies(9) == [2]
    finally:
        raw.close()


def test_fake_daemon_answers_a_bad_protocol_version_with_bad_version_error(
    daemon: FakeDaemon,
) -> None:
    raw = RawClient(daemon.socket_path)
    try:
        hello = bytearray(Connection(Side.CLIENT).send(Hello(client_id=1)))
        hello[5] = 2  # protocol_version 2
        raw.socket.sendall(hello)
        error = raw.receive()
        assert isinstance(error, Error)
        assert error.code == "bad_version"
        assert "[1]" in error.message
    finally:
        raw.close()
