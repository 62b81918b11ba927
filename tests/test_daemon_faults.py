"""Bad clients against a real node: each gets an error frame or a disconnect; nobody else notices."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from sequencer.apps.ledger import Balance, Ledger
from sequencer.client import Client, protocol
from tests.node_fixtures import balances, node_factory, open_accounts  # noqa: F401

ACCOUNTS = ["a", "b"]


def _raw(socket_path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(socket_path)
    return sock


def _answer(sock: socket.socket) -> tuple[str, str]:
    """Read until the daemon closes: the last frame it sent (kind, error code), or ('eof', '')."""
    import msgspec

    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    sock.close()
    last = ("eof", "")
    offset = 0
    while len(data) - offset >= protocol.FRAME_HEADER_BYTES:
        length, kind, _, _ = protocol.FRAME_HEADER.unpack_from(data, offset)
        body = data[offset + protocol.FRAME_HEADER_BYTES : offset + protocol.FRAME_HEADER_BYTES + length]
        offset += protocol.FRAME_HEADER_BYTES + length
        if kind == protocol.FrameKind.ERROR:
            last = ("error", msgspec.msgpack.decode(body, type=protocol.Error).code)
        else:
            last = (protocol.FrameKind(kind).name.lower(), "")
    return last


def _hello(client_id: int = 99) -> bytes:
    return protocol.Connection(protocol.Side.CLIENT).send(protocol.Hello(client_id=client_id))


BAD_INPUTS = {
    "garbage": b"\xde\xad\xbe\xef" * 64,
    "oversized_frame": protocol.FRAME_HEADER.pack(protocol.FRAME_BYTES_MAX, protocol.FrameKind.HELLO, 1, 0),
    "wrong_version": protocol.FRAME_HEADER.pack(0, protocol.FrameKind.HELLO, 99, 0),
    "unknown_kind": protocol.FRAME_HEADER.pack(0, 200, 1, 0),
    "command_before_hello": protocol.FRAME_HEADER.pack(24, protocol.FrameKind.COMMAND, 1, 0) + bytes(24),
    "reply_from_client": _hello() + protocol.FRAME_HEADER.pack(24, protocol.FrameKind.REPLY, 1, 0) + bytes(24),
    "malformed_hello": protocol.FRAME_HEADER.pack(3, protocol.FrameKind.HELLO, 1, 0) + b"\xc1\xc1\xc1",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_an_error_frame_and_only_that_connection_closes(node_factory, case: str) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, ACCOUNTS)
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=10) as bystander:
        assert bystander.call(Balance("a")).balance > 0
        sock = _raw(node.socket_path)
        sock.sendall(BAD_INPUTS[case])
        kind, code = _answer(sock)
        assert kind == "error", (case, kind)
        assert code, case
        # The other client's session is undisturbed, and the node still accepts new ones.
        assert bystander.call(Balance("a")).balance > 0
        open_accounts(node.socket_path, [f"later-{case}"])
    assert node.read_counters()["errors.protocol"] >= 1


def test_truncated_frame_then_disconnect_loses_nothing_for_others(node_factory) -> None:  # noqa: F811
    node = node_factory()
    open_accounts(node.socket_path, ACCOUNTS)
    sock = _raw(node.socket_path)
    command = protocol.FRAME_HEADER.pack(100, protocol.FrameKind.COMMAND, 1, 0) + b"\x00" * 10
    sock.sendall(_hello(5) + command)
    sock.close()  # mid-frame
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=10) as client:
        assert client.call(Balance("b")).balance > 0


def test_client_that_never_reads_is_disconnected_and_others_keep_being_served(node_factory) -> None:  # noqa: F811
    node = node_factory({"socket": {"client_write_buffer_bytes_max": 64 * 1024}})
    open_accounts(node.socket_path, ACCOUNTS)
    hog = _raw(node.socket_path)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    codec = protocol.Connection(protocol.Side.CLIENT)
    out = bytearray(codec.send(protocol.Hello(client_id=77)))
    version, payload = Ledger.schema.encode_command(Balance("a"))
    # Request ids run on and nobody reads the replies: the daemon's buffer for this client fills.
    sent = 0
    deadline = time.monotonic() + 30
    disconnected = False
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=10) as bystander:
        while time.monotonic() < deadline and not disconnected:
            for _ in range(500):
                sent += 1
                codec.send_command_into(out, sent, 0, version, payload)
            try:
                hog.sendall(bytes(out))
            except OSError:
                disconnected = True
            out.clear()
            if node.read_counters()["errors.slow_client"] >= 1:
                disconnected = True
            assert bystander.call(Balance("a")).balance > 0
    hog.close()
    assert disconnected, f"sent {sent} commands without reading and was never disconnected"
    assert node.read_counters()["errors.slow_client"] >= 1


def test_frame_codec_layout_matches_the_daemon(node_factory) -> None:  # noqa: F811
    """A hand-built COMMAND frame, byte by byte as docs/client.md says, gets its REPLY."""
    node = node_factory()
    open_accounts(node.socket_path, ACCOUNTS)
    sock = _raw(node.socket_path)
    version, payload = Ledger.schema.encode_command(Balance("a"))
    body = struct.pack("<QQH6x", 1, 0, version) + payload
    sock.sendall(_hello(123) + struct.pack("<IBBH", len(body), 3, 1, 0) + body)
    codec = protocol.Connection(protocol.Side.CLIENT)
    frames: list[object] = []
    while len(frames) < 2:
        chunk = sock.recv(65536)
        assert chunk, "daemon closed the connection"
        codec.receive_data(chunk)
        frames.extend(codec.next_frames())
    sock.close()
    assert isinstance(frames[0], protocol.Welcome)
    reply = frames[1]
    assert isinstance(reply, protocol.Reply)
    assert reply.request_id == 1
    assert reply.status == protocol.ReplyStatus.OK
    assert Ledger.schema.decode_reply(reply.version, reply.payload).balance > 0


def test_full_ring_stops_reading_sockets_and_resumes_without_losing_a_command(node_factory) -> None:  # noqa: F811
    """Backpressure: a stalled blp fills the log ring; the sequencer stops reading (bounded
    memory, nothing dropped) and every command completes once the blp runs again."""
    import os
    import signal

    import psutil

    from sequencer.apps.ledger import Transfer

    node = node_factory({
        "ring": {"log_capacity_bytes": 1 << 16},
        "socket": {"command_bytes_max": 16 << 10},
    })
    open_accounts(node.socket_path, ACCOUNTS)
    blp = node.role_pid("blp")
    sequencer = psutil.Process(node.role_pid("sequencer"))
    os.kill(blp, signal.SIGSTOP)
    try:
        with Client(node.socket_path, schema=Ledger.schema, timeout_s=60, in_flight_max=1024) as client:
            pending = [client.submit(Transfer("a", "b", 1)) for _ in range(1024)]
            client.poll()
            time.sleep(1.0)
            client.poll()
            stalled = node.read_counters()
            rss_stalled = sequencer.memory_info().rss
            # The ring holds at most 64 KiB of records (~700 transfers): the rest waits in the
            # sockets, not in the daemon's memory.
            assert stalled["log.published.index"] - stalled["blp.applied.index"] < 800
            assert not any(request.done() for request in pending)
            os.kill(blp, signal.SIGCONT)
            for request in pending:
                request.result()
        assert sequencer.memory_info().rss < rss_stalled + (32 << 20)
    finally:
        os.kill(blp, signal.SIGCONT)
    final = balances(node.socket_path, ACCOUNTS)
    assert final["b"] - final["a"] == 2 * 1024


def test_command_over_the_configured_size_is_rejected_without_being_sequenced(node_factory) -> None:  # noqa: F811
    from sequencer.client import CommandRejected

    node = node_factory({"socket": {"command_bytes_max": 1024}})
    open_accounts(node.socket_path, ACCOUNTS)
    with Client(node.socket_path, timeout_s=10) as client:
        with pytest.raises(CommandRejected) as rejected:
            client.call(b"\x00" * 2048)
        assert rejected.value.code == "command_too_large"
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=10) as client:
        assert client.call(Balance("a")).balance > 0
    assert node.stop() == 0
    from sequencer.journal import read_records
    from sequencer.record import RecordType

    commands = [record for record in read_records(node.config.journal_dir) if record.type == RecordType.COMMAND]
    assert commands, "the journal holds the accepted commands"
    assert max(len(record.payload) for record in commands) < 1024, "the oversized command was sequenced"


def test_undecodable_command_is_rejected_and_the_node_survives_its_replay(node_factory) -> None:  # noqa: F811
    """A command the app cannot decode is in the journal for good: it must be refused, not crash
    the blp at every recovery."""
    from sequencer.client import CommandRejected

    node = node_factory()
    open_accounts(node.socket_path, ACCOUNTS)
    with Client(node.socket_path, timeout_s=10) as client:
        with pytest.raises(CommandRejected) as rejected:
            client.call(b"\xc1\xc1 not msgpack")
        assert rejected.value.code == "bad_command"
    # A newer schema version than the app's is refused at the gateway: once in the log it would
    # stop every replay (the blp refuses to misread it).
    from sequencer.client import protocol as wire

    sock = _raw(node.socket_path)
    body = struct.pack("<QQH6x", 1, 0, 99) + b"\x80"
    sock.sendall(_hello(4242) + struct.pack("<IBBH", len(body), 3, 1, 0) + body)
    codec = wire.Connection(wire.Side.CLIENT)
    frames: list[object] = []
    while len(frames) < 2:
        chunk = sock.recv(65536)
        assert chunk
        codec.receive_data(chunk)
        frames.extend(codec.next_frames())
    sock.close()
    reply = frames[1]
    assert isinstance(reply, wire.Reply)
    assert reply.status == wire.ReplyStatus.REJECTED
    assert wire.decode_rejection(reply.payload)[0] == "unknown_version"
    node.kill()
    node.start()
    assert balances(node.socket_path, ACCOUNTS)["a"] > 0
    assert "giving up" not in node.log_text()


def test_client_refused_for_sessions_max_retries_and_gets_in_when_a_session_closes(node_factory) -> None:  # noqa: F811
    import threading

    node = node_factory({"socket": {"sessions_max": 1}})
    open_accounts(node.socket_path, ACCOUNTS)
    first = Client(node.socket_path, schema=Ledger.schema, timeout_s=10)
    results: list[object] = []

    def second() -> None:
        try:
            with Client(node.socket_path, schema=Ledger.schema, timeout_s=20, reconnect_timeout_s=20) as client:
                results.append(client.call(Balance("b")).balance)
        except Exception as error:
            results.append(error)

    try:
        assert first.call(Balance("a")).balance > 0
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)
        assert results == [], "the second client got in while sessions_max=1 was taken"
    finally:
        first.close()
    thread.join(30)
    assert len(results) == 1
    assert isinstance(results[0], int), results
