"""A REFUSED frame reaches its dialler over real TCP on 127.0.0.1 although the dialler kept sending:
the node that refused half-closes and drops what still arrives until the dialler closes, within
bounds (sequencer/raft/peer_refusals.py, LingeringClose)."""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import termios
from contextlib import AsyncExitStack

import pytest

from daemon.faultproxy import free_loopback_ports
from sequencer.raft import peer_refusals
from sequencer.raft.peer_protocol import CLOSED, NEED_DATA, ForwardedRecord, RecordsRefused
from tests.test_peer_transport import (
    TEST_S,
    Node,
    Runner,
    config,
    dial_by_hand,
    heartbeat,
    run,  # noqa: F401 - a fixture
    start_nodes,
    until,
)
from tests.test_peer_transport_forwards import _REQUEST_ID, NOT_LEADING, record

# Sent behind the refused batch before the node that refuses reads any of it: more than one read
# of either loop (256 KiB), less than loopback's socket buffers hold (~4 MiB measured here).
BEHIND_BYTES = 2 << 20
BEHIND_PAYLOAD = b"p" * (64 << 10)


def queued_bytes(transport: asyncio.BaseTransport | None) -> int:
    """Bytes the kernel holds unread on the socket under an asyncio or uvloop transport."""
    assert transport is not None
    sock = transport.get_extra_info("socket")
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def refusing(node: Node, batches: list[list[int]], queued: list[int]) -> None:
    """Make `node` refuse every forwarded batch as a node that does not lead does, noting each
    batch's request ids and what its socket still held unread then."""
    transport = node.transport

    def refuse(peer: int, records: list[ForwardedRecord]) -> str:
        batches.append([int.from_bytes(r.record[_REQUEST_ID], "little") for r in records])
        stream = transport._inbound.get(peer)  # gone once a batch of it is refused
        queued.append(-1 if stream is None else queued_bytes(stream.transport))
        return NOT_LEADING

    transport._on_records = refuse


def test_a_refusal_with_megabytes_queued_behind_it_still_reaches_its_sender_with_its_reason(
    run: Runner,  # noqa: F811
) -> None:
    """The dialler sends the refused batch and 2 MiB more before it reads, and writes again before
    it reads (a loaded follower's order). A plain close with those bytes unread made Linux reset
    the connection, the dialler's next write failed, and its event loop closed the socket
    without reading the REFUSED frame the kernel still held: no reason heard, no count."""

    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            sender, receiver = nodes[1].transport, nodes[2]
            batches: list[list[int]] = []
            queued: list[int] = []
            heard: list[tuple[int, str]] = []
            refusing(receiver, batches, queued)
            sender._refusals.on_refused = lambda peer, reason: heard.append((peer, reason))
            outbound = sender._links[2].stream
            inbound = receiver.transport._inbound[1]
            assert outbound is not None and outbound.transport is not None
            assert inbound.transport is not None
            outbound.transport.pause_reading()  # the sender reads nothing until told
            inbound.transport.pause_reading()  # nor the receiver, until everything is sent
            stream = sender.forward_stream(2)
            for request_id in range(1, 2 + BEHIND_BYTES // len(BEHIND_PAYLOAD)):
                payload = b"x" if request_id == 1 else BEHIND_PAYLOAD
                sender.forward(2, [record(request_id, payload)], stream)
                await asyncio.sleep(0)  # its flush: one frame each
            await asyncio.sleep(0.05)  # into the kernel's buffers (no condition to wait for)
            inbound.transport.resume_reading()
            await until(lambda: batches != [], "the refusal")
            await asyncio.sleep(0.05)  # the refusing side's close, if it closes, is done
            sender.send([heartbeat(1, 2, term=5)])  # written before the sender reads
            await asyncio.sleep(0.05)
            outbound.transport.resume_reading()
            await until(lambda: sender.counters.connects == 2, "the sender to reconnect")
            assert queued[0] > 0, "unread bytes behind the refused batch: a plain close resets"
            assert heard == [(2, NOT_LEADING)], "the sender heard why"
            assert sender.counters.forward_refusals_received == 1
            assert batches == [[1]], "nothing after the refused batch was delivered"
            assert receiver.messages == [], "nothing sent after the refusal was delivered"
            await until(lambda: receiver.counters["disconnects"] == 1, "the linger to end")
            assert receiver.counters["linger_bytes_discarded"] >= BEHIND_BYTES // 2
            assert receiver.counters["lingers_cut"] == 0, "it ended at the sender's close"

    run(main())


async def refused_by_hand(ports: dict[int, int], receiver: Node) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:  # fmt: skip
    """Node 1 by hand: forward one batch and, in the same write, a message and another batch;
    read the REFUSED frame and the FIN behind it, and close nothing."""
    codec, reader, writer = await dial_by_hand(ports[2])
    writer.write(codec.send_records([record(1)]) + codec.send_messages([heartbeat(1, 2)])
                 + codec.send_records([record(2)]))  # fmt: skip
    events: list[object] = []
    while CLOSED not in events:
        codec.receive_data(await reader.read(65536))
        while (event := codec.next_event()) is not NEED_DATA:
            events.append(event)
            if event is CLOSED:
                break
    assert events == [RecordsRefused(NOT_LEADING), CLOSED], "the reason, then the FIN"
    return reader, writer


def test_a_dialler_that_never_closes_is_cut_after_the_linger_time_bound(
    run: Runner,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peer_refusals, "LINGER_S", 0.2)

    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        receiver = Node(config(2, ports))
        batches: list[list[int]] = []
        refusing(receiver, batches, [])
        async with receiver.transport:
            _, writer = await refused_by_hand(ports, receiver)
            receiver.transport.close_forwards_from([1], "it stopped leading")  # while lingering
            assert receiver.transport.inbound_peers() == set(), "a lingering one is not inbound"
            assert receiver.counters["forward_streams_refused"] == 1, "nor refused twice"
            (stream,) = receiver.transport._streams  # the lingering one: node 1 is not listening
            bytes_out = receiver.counters["bytes_out"]
            stream.close_after(b"a second last frame")  # the stream ended: nothing written
            assert receiver.counters["bytes_out"] == bytes_out, "nothing after the REFUSED frame"
            await until(lambda: receiver.counters["lingers_cut"] == 1, "the linger's time bound")
            await until(lambda: receiver.counters["disconnects"] == 1, "the cut connection's end")
            assert batches == [[1]] and receiver.messages == [], "nothing after it delivered"
            writer.close()

    run(main())


def test_a_dialler_that_keeps_sending_is_cut_after_the_linger_byte_bound(
    run: Runner,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peer_refusals, "LINGER_S", 3600.0)  # never, in this test
    monkeypatch.setattr(peer_refusals, "LINGER_BYTES_MAX", 1 << 20)

    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        receiver = Node(config(2, ports))
        refusing(receiver, [], [])
        async with receiver.transport:
            _, writer = await refused_by_hand(ports, receiver)
            writer.write(b"\0" * (4 << 20))  # garbage: dropped unread, never parsed
            await until(lambda: receiver.counters["lingers_cut"] == 1, "the linger's byte bound")
            discarded = receiver.counters["linger_bytes_discarded"]
            assert 1 << 20 < discarded < 4 << 20, discarded
            assert receiver.counters["refused_total"] == 0, "not read as frames"
            await until(lambda: receiver.counters["disconnects"] == 1, "the cut connection's end")
            writer.close()

    run(main())


@pytest.mark.parametrize("refused_by", ["on_records", "close_forwards_from"])
def test_a_reset_before_the_half_close_ends_the_stream_and_raises_nothing(
    refused_by: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The dialler's reset lands between the REFUSED frame's write and the half-close: asyncio's
    write_eof (shutdown) then fails with ENOTCONN. Nothing may escape into the caller (the
    replicator's term start calls close_forwards_from) or the loop, and the stream must still end:
    out of the transport's table, counted, and close() not left waiting for it. asyncio only:
    uvloop's transport cannot be patched, and its write_eof reports no such error."""

    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        receiver = Node(config(2, ports))
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _, context: loop_errors.append(context))
        async with receiver.transport:
            codec, _, writer = await dial_by_hand(ports[2])
            await until(lambda: receiver.transport.inbound_peers() == {1}, "node 1 inbound")
            inbound = receiver.transport._inbound[1]
            assert isinstance(inbound.transport, asyncio.Transport)

            def write_eof() -> None:
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

            inbound.transport.write_eof = write_eof  # type: ignore[method-assign]
            if refused_by == "on_records":
                receiver.transport._on_records = lambda peer, records: NOT_LEADING
                writer.write(codec.send_records([record(1)]))
            else:
                receiver.transport.close_forwards_from([1], NOT_LEADING)  # raises nothing
            await until(lambda: inbound.closed.done(), "the stream's end")
            assert inbound not in receiver.transport._streams
            assert receiver.counters["disconnects"] == 1
            assert receiver.counters["forward_streams_refused"] == 1
            assert loop_errors == []
            writer.close()
        assert "not closed within" not in caplog.text, "close() waited for the stream"

    asyncio.run(asyncio.wait_for(main(), TEST_S))
