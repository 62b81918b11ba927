"""The peer transport over real TCP on 127.0.0.1: delivery, reconnection, and attackers refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest
import uvloop

from daemon.faultproxy import FaultNetwork, FaultProxy, free_loopback_ports
from sequencer.raft.messages import AppendEntries, Heartbeat, Message
from sequencer.raft.peer_protocol import (
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    PEER_FRAME_BYTES_MAX,
    PROTOCOL_VERSION,
    Authenticated,
    ClusterIdentity,
    ForwardedRecord,
    FrameKind,
    PeerConnection,
    PeerProtocolError,
    Side,
)
from sequencer.raft.transport import HANDSHAKES_PENDING_MAX, PeerTransport, TransportConfig
from sequencer.record import RecordType, encode_record

SECRET = bytes(range(32))
CLUSTER = 7
TEST_S = 60.0  # one test's coroutine; far above what any needs
WAIT_S = 20.0  # one condition; a loaded machine takes well under a second

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coroutine: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(coroutine, TEST_S))

    return run


def run_uvloop(coroutine: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coroutine, TEST_S))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition the transport reaches by itself (bounded: fails after WAIT_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        await asyncio.sleep(0.005)


class Node:
    """A transport and what it received: (peer id, message) and (peer id, command) in order."""

    def __init__(self, config: TransportConfig) -> None:
        self.messages: list[tuple[int, Message]] = []
        self.commands: list[tuple[int, ForwardedRecord]] = []
        self.transport = PeerTransport(config, self._on_messages, self._on_records)

    def _on_messages(self, peer: int, messages: list[Message]) -> None:
        self.messages.extend((peer, message) for message in messages)

    def _on_records(self, peer: int, commands: list[ForwardedRecord]) -> bool:
        self.commands.extend((peer, command) for command in commands)
        return True

    @property
    def counters(self) -> dict[str, int]:
        return self.transport.counters.as_dict()


def config(node: int, ports: dict[int, int], **options: Any) -> TransportConfig:
    options.setdefault("handshake_timeout_ms", 2000.0)
    return TransportConfig(
        cluster_id=options.pop("cluster_id", CLUSTER),
        node_id=node,
        secret=options.pop("secret", SECRET),
        listen_host="127.0.0.1",
        listen_port=ports[node],
        peers={peer: ("127.0.0.1", port) for peer, port in ports.items() if peer != node},
        **options,
    )


async def start_nodes(
    stack: AsyncExitStack, ports: dict[int, int], **options: Any
) -> dict[int, Node]:
    nodes = {node: Node(config(node, ports, **options)) for node in ports}
    for node in nodes.values():
        await stack.enter_async_context(node.transport)
    for node in nodes.values():
        await asyncio.wait_for(node.transport.wait_connected(), WAIT_S)
    return nodes


async def through_proxy(
    stack: AsyncExitStack, ports: dict[int, int], via: int, connect: bool = True, **options: Any
) -> tuple[Node, Node]:
    """Node 2, and node 1 (its transport built with `options`) dialling it through the fault
    proxy's port `via`, both started; connected unless `connect` is False."""
    receiver = Node(config(2, ports))
    sender = Node(replace(config(1, ports, **options), peers={2: ("127.0.0.1", via)}))
    await stack.enter_async_context(receiver.transport)
    await stack.enter_async_context(sender.transport)
    if connect:
        await asyncio.wait_for(sender.transport.wait_connected([2]), WAIT_S)
    return receiver, sender


def heartbeat(source: int, target: int, term: int = 1) -> Heartbeat:
    return Heartbeat(CLUSTER, source, target, term, 0, 0)


# -- delivery ----------------------------------------------------------------------------------


def test_messages_and_commands_flow_between_every_ordered_pair_of_three_nodes(run: Runner) -> None:
    async def main() -> None:
        ports = dict(zip((1, 2, 3), free_loopback_ports(3), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            for source, node in nodes.items():
                node.transport.send(
                    heartbeat(source, target) for target in ports if target != source
                )
            command = ForwardedRecord(encode_record(RecordType.COMMAND, 1, 0, 0, 3, 11, 5, b"transfer"))
            nodes[2].transport.forward(1, [command], nodes[2].transport.forward_stream(1))
            await until(lambda: all(len(n.messages) == 2 for n in nodes.values()), "messages")
            await until(lambda: nodes[1].commands == [(2, command)], "the forwarded command")
            for target, node in nodes.items():
                assert sorted(node.messages) == sorted(
                    (source, heartbeat(source, target)) for source in ports if source != target
                )
            totals = {
                key: sum(n.counters[key] for n in nodes.values()) for key in nodes[1].counters
            }
            assert totals["messages_out"] == totals["messages_in"] == 6
            assert totals["records_out"] == totals["records_in"] == 1
            assert totals["frames_out"] == totals["frames_in"] == 7
            assert totals["connects"] == totals["accepts"] == 6  # one per ordered pair
            assert totals["refused_total"] == totals["messages_dropped"] == 0
            assert totals["bytes_out"] == totals["bytes_in"] > 0

    run(main())


def test_messages_sent_in_one_loop_pass_leave_in_one_frame_per_peer() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            sender = nodes[1].transport
            for term in range(1, 301):  # 300 separate calls in one pass of the loop
                sender.send([heartbeat(1, 2, term)])
            await until(lambda: len(nodes[2].messages) == 300, "300 messages")
            assert [m.term for _, m in nodes[2].messages] == list(range(1, 301))
            assert sender.counters.frames_out == 1
            assert nodes[2].transport.counters.frames_in == 1

    run_uvloop(main())


def test_messages_to_a_peer_without_a_connection_are_dropped_and_counted() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        lonely = Node(config(1, ports))  # node 2 never starts
        async with lonely.transport:
            lonely.transport.send([heartbeat(1, 2)])
            record = ForwardedRecord(encode_record(RecordType.COMMAND, 1, 0, 0, 0, 1, 1, b"x"))
            lonely.transport.forward(2, [record], lonely.transport.forward_stream(2))
            assert not lonely.transport.is_connected(2)
            assert lonely.counters["messages_dropped"] == 1
            assert lonely.counters["records_dropped"] == 1
            await until(lambda: lonely.counters["connect_failures"] >= 2, "redials")
            with pytest.raises(ValueError, match="not a peer"):
                lonely.transport.send([heartbeat(1, 3)])

    run_uvloop(main())


def test_a_batch_with_a_message_too_large_for_a_frame_is_dropped_and_the_link_goes_on() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            sender = nodes[1].transport
            too_large = AppendEntries(CLUSTER, 1, 2, 1, 0, 0, 0, [1], [b"x" * PEER_FRAME_BYTES_MAX])
            sender.send([heartbeat(1, 2, term=1), too_large, heartbeat(1, 2, term=2)])
            await asyncio.sleep(0)  # the flush runs at the end of this pass
            sender.send([heartbeat(1, 2, term=3)])
            await until(lambda: nodes[2].messages == [(1, heartbeat(1, 2, 3))], "the next one")
            assert sender.counters.messages_dropped == 3
            assert nodes[2].counters["refused_total"] == 0
            assert sender.is_connected(2)

    run_uvloop(main())


def test_a_dialler_reconnects_after_its_peer_restarts(run: Runner) -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            first = nodes[1].transport
            await nodes[2].transport.close()
            await until(lambda: not first.is_connected(2), "node 1 to notice node 2 is gone")
            first.send([heartbeat(1, 2, term=2)])  # no link: dropped, counted
            assert first.counters.messages_dropped == 1
            restarted = Node(config(2, ports))
            await stack.enter_async_context(restarted.transport)
            await asyncio.wait_for(first.wait_connected([2]), WAIT_S)
            await asyncio.wait_for(restarted.transport.wait_connected([1]), WAIT_S)
            first.send([heartbeat(1, 2, term=3)])
            restarted.transport.send([heartbeat(2, 1, term=3)])
            await until(lambda: restarted.messages == [(1, heartbeat(1, 2, 3))], "node 2's message")
            await until(lambda: (2, heartbeat(2, 1, 3)) in nodes[1].messages, "node 1's message")
            assert first.counters.connects == 2

    run(main())


async def dial_by_hand(
    port: int, node: int = 1, peer: int = 2
) -> tuple[PeerConnection, asyncio.StreamReader, asyncio.StreamWriter]:
    """An authenticated connection from `node` to `peer`, driven by hand over a raw socket."""
    identity = ClusterIdentity(
        cluster_id=CLUSTER, node_id=node, members=frozenset({node, peer}), secret=SECRET
    )
    codec = PeerConnection(identity, Side.DIALLER, bytes(range(32)), peer)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(codec.data_to_send())
    codec.receive_data(await asyncio.wait_for(reader.read(65536), WAIT_S))
    assert codec.next_event() == Authenticated(peer)
    writer.write(codec.data_to_send())
    return codec, reader, writer


def test_an_inbound_connection_from_a_restarted_peer_replaces_the_old_one() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            receiver = Node(config(2, ports))
            await stack.enter_async_context(receiver.transport)
            # Node 1's old connection, left half-open by a crash: authenticated, never closed.
            _, old_reader, old_writer = await dial_by_hand(ports[2])
            await until(lambda: receiver.transport.inbound_peers() == {1}, "the old connection")
            restarted = Node(config(1, ports))
            await stack.enter_async_context(restarted.transport)
            await asyncio.wait_for(restarted.transport.wait_connected([2]), WAIT_S)
            assert await read_until_closed(old_reader) == b"", "the old connection is closed"
            old_writer.close()
            assert receiver.counters["accepts"] == 2
            assert receiver.transport.inbound_peers() == {1}
            restarted.transport.send([heartbeat(1, 2, term=9)])
            await until(lambda: receiver.messages == [(1, heartbeat(1, 2, 9))], "the message")

    run_uvloop(main())


async def nothing_arrives(received: list[tuple[int, Message]], count: int) -> bool:
    """Watch a quiet while: no message beyond the first `count` arrives (absence stays absence
    on a loaded machine, so this is not a timed assertion)."""
    await asyncio.sleep(0.3)
    return len(received) == count


def test_a_link_blackholed_by_the_fault_proxy_holds_messages_until_healed() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        with FaultProxy() as proxy:
            network = FaultNetwork(proxy)
            via = network.add(1, 2, ports[2])
            async with AsyncExitStack() as stack:
                receiver, sender = await through_proxy(stack, ports, via)
                network.cut(1, 2)
                sender.transport.send([heartbeat(1, 2, term=5)])
                assert await nothing_arrives(receiver.messages, 0)
                network.heal()
                await until(lambda: receiver.messages == [(1, heartbeat(1, 2, 5))], "the message")
                assert sender.transport.counters.connects == 1, "the same connection carried it"

    run_uvloop(main())


def test_a_link_dropped_by_the_fault_proxy_is_redialled_once_healed() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        with FaultProxy() as proxy:
            network = FaultNetwork(proxy)
            via = network.add(1, 2, ports[2])
            async with AsyncExitStack() as stack:
                receiver, sender = await through_proxy(stack, ports, via)
                network.cut(1, 2, how="drop")
                await until(lambda: not sender.transport.is_connected(2), "the reset")
                link = network.links[(1, 2)]
                await until(lambda: link.stats()["connections_reset"] >= 3, "refused redials")
                assert not sender.transport.is_connected(2)
                network.heal()
                await asyncio.wait_for(sender.transport.wait_connected([2]), WAIT_S)
                sender.transport.send([heartbeat(1, 2, term=6)])
                await until(lambda: receiver.messages == [(1, heartbeat(1, 2, 6))], "the message")
                assert sender.transport.counters.connects == 2

    run_uvloop(main())


def test_a_dialler_behind_a_blackhole_times_out_its_handshake_and_connects_once_healed() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        with FaultProxy() as proxy:
            network = FaultNetwork(proxy)
            via = network.add(1, 2, ports[2])
            network.cut(1, 2)  # before node 1 ever dials: its HELLO goes nowhere
            async with AsyncExitStack() as stack:
                receiver, sender = await through_proxy(stack, ports, via, connect=False,
                                                       handshake_timeout_ms=200.0)
                await until(
                    lambda: sender.counters["refused_handshake_timeout"] >= 2, "two timeouts"
                )
                assert not sender.transport.is_connected(2)
                network.heal()
                await asyncio.wait_for(sender.transport.wait_connected([2]), WAIT_S)
                sender.transport.send([heartbeat(1, 2, term=7)])
                await until(lambda: receiver.messages == [(1, heartbeat(1, 2, 7))], "the message")

    run_uvloop(main())


# -- attackers ---------------------------------------------------------------------------------


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the transport sends an attacker before it closes the connection."""
    received = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), WAIT_S)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_garbage_on_the_peer_port_is_refused_counted_and_injects_nothing(run: Runner) -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            target = nodes[2]
            for garbage, code in [
                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_version"),
                (FRAME_HEADER.pack(1 << 30, FrameKind.MESSAGES, PROTOCOL_VERSION, 0), "unexpected_kind"),
                (FRAME_HEADER.pack(48, FrameKind.HELLO, PROTOCOL_VERSION, 0) + bytes(48), "wrong_cluster"),
            ]:
                reader, writer = await asyncio.open_connection("127.0.0.1", ports[2])
                writer.write(garbage)
                assert await read_until_closed(reader) == b""
                writer.close()
                await until(lambda code=code: target.counters[f"refused_{code}"] == 1, code)
            assert target.messages == []
            assert target.counters["refused_total"] == 3
            nodes[1].transport.send([heartbeat(1, 2)])  # the real link is untouched
            await until(lambda: target.messages == [(1, heartbeat(1, 2))], "node 1's message")

    run(main())


@pytest.mark.parametrize(
    ("identity_options", "dialled", "code"),
    [
        pytest.param(dict(cluster_id=8), 2, "wrong_cluster", id="another-cluster"),
        pytest.param(
            dict(node_id=4, members=frozenset({1, 2, 4})), 2, "unknown_node", id="non-member"
        ),
        pytest.param(dict(secret=bytes(32)), 2, "bad_proof", id="another-secret"),
    ],
)
def test_a_dialler_outside_the_cluster_is_refused_counted_and_injects_nothing(
    identity_options: dict[str, Any], dialled: int, code: str
) -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports)
            fields: dict[str, Any] = dict(
                cluster_id=CLUSTER, node_id=1, members=frozenset({1, 2}), secret=SECRET
            )
            fields.update(identity_options)
            intruder = PeerConnection(ClusterIdentity(**fields), Side.DIALLER, bytes(32), dialled)
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[2])
            writer.write(intruder.data_to_send())
            answer = await asyncio.wait_for(reader.read(65536), WAIT_S)
            if answer:
                # A CHALLENGE: the intruder cannot verify it (another secret), and forges a proof
                # and a data frame anyway.
                intruder.receive_data(answer)
                with pytest.raises(PeerProtocolError):
                    intruder.next_event()
                writer.write(FRAME_HEADER.pack(32, FrameKind.AUTH, PROTOCOL_VERSION, 0) + bytes(32))
                writer.write(FRAME_HEADER.pack(41, FrameKind.MESSAGES, PROTOCOL_VERSION, 0) + bytes(41))
            await read_until_closed(reader)
            writer.close()
            await until(lambda: nodes[2].counters[f"refused_{code}"] == 1, code)
            assert nodes[2].messages == []
            assert nodes[2].transport.inbound_peers() == {1}

    run_uvloop(main())


class Interceptor:
    """A man in the middle on node 1's link to node 2: relays whole frames and, when told,
    replays the last data frame it relayed into the live stream."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.captured: list[bytes] = []  # every frame node 1 sent, in order
        self.replay = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def backwards() -> None:
            while chunk := await target_reader.read(65536):
                writer.write(chunk)
            writer.close()

        task = asyncio.create_task(backwards())
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER_BYTES)
                length = FRAME_HEADER.unpack(header)[0]
                frame = header + await reader.readexactly(length)
                self.captured.append(frame)
                target_writer.write(frame)
                if self.replay.is_set() and header[4] == FrameKind.MESSAGES:
                    self.replay.clear()
                    target_writer.write(frame)  # the same genuine frame, a second time
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            target_writer.close()
            task.cancel()
            writer.close()


def test_a_frame_replayed_into_the_live_connection_is_refused_and_the_link_recovers() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        interceptor = Interceptor(ports[2])
        via = await interceptor.start()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(interceptor.close)
            receiver = Node(config(2, ports))
            await stack.enter_async_context(receiver.transport)
            sender = Node(config(1, ports))
            sender.transport = PeerTransport(
                TransportConfig(
                    cluster_id=CLUSTER, node_id=1, secret=SECRET, listen_host="127.0.0.1",
                    listen_port=ports[1], peers={2: ("127.0.0.1", via)},
                ),
                sender._on_messages,
            )  # fmt: skip
            await stack.enter_async_context(sender.transport)
            await asyncio.wait_for(sender.transport.wait_connected([2]), WAIT_S)
            interceptor.replay.set()
            sender.transport.send([heartbeat(1, 2, term=1)])
            await until(lambda: receiver.counters["refused_replayed_frame"] == 1, "the refusal")
            assert receiver.messages == [(1, heartbeat(1, 2, 1))], "delivered once, not twice"
            # Node 1 redials (through the interceptor, a fresh connection) and the link works.
            await until(lambda: sender.transport.counters.connects == 2, "the redial")
            sender.transport.send([heartbeat(1, 2, term=2)])
            await until(lambda: len(receiver.messages) == 2, "the next message")
            assert receiver.messages[1] == (1, heartbeat(1, 2, 2))

            # The whole captured first connection, replayed on a new one, gets nowhere either.
            first_connection = interceptor.captured[:3]  # HELLO, AUTH, the data frame
            assert [frame[4] for frame in first_connection] == [1, 3, 4]
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[2])
            writer.write(b"".join(first_connection))
            await read_until_closed(reader)
            writer.close()
            await until(lambda: receiver.counters["refused_bad_proof"] == 1, "bad_proof")
            assert len(receiver.messages) == 2

    run_uvloop(main())


def test_a_silent_connection_is_closed_after_the_handshake_timeout() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports, handshake_timeout_ms=200.0)
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[2])
            assert await read_until_closed(reader) == b""
            writer.close()
            assert nodes[2].counters["refused_handshake_timeout"] == 1
            assert nodes[2].transport.pending_handshakes == 0

    run_uvloop(main())


def test_unauthenticated_connections_beyond_the_bound_are_refused_at_once() -> None:
    async def main() -> None:
        ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
        async with AsyncExitStack() as stack:
            nodes = await start_nodes(stack, ports, handshake_timeout_ms=60_000.0)
            target = nodes[2].transport
            silent = []
            for _ in range(HANDSHAKES_PENDING_MAX):
                silent.append(await asyncio.open_connection("127.0.0.1", ports[2]))
            await until(lambda: target.pending_handshakes == HANDSHAKES_PENDING_MAX, "the slots")
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[2])
            assert await read_until_closed(reader) == b""
            writer.close()
            assert target.counters.refused["handshakes_pending_full"] == 1
            # A real peer that redials still gets in once the flood goes away.
            for _, silent_writer in silent:
                silent_writer.close()
            await until(lambda: target.pending_handshakes == 0, "the slots to free")
            nodes[1].transport.send([heartbeat(1, 2)])
            await until(lambda: nodes[2].messages == [(1, heartbeat(1, 2))], "the message")

    run_uvloop(main())


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "localhost"])
def test_a_non_loopback_listen_address_is_refused_unless_allowed(host: str) -> None:
    fields: dict[str, Any] = dict(
        cluster_id=CLUSTER, node_id=1, secret=SECRET, listen_host=host, listen_port=0,
        peers={2: ("127.0.0.1", 1)},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"loopback|not an IP address"):
        TransportConfig(**fields)
    if host != "localhost":
        TransportConfig(**fields, allow_non_loopback=True)  # only built, never bound here


def test_config_refuses_itself_as_a_peer_and_a_short_secret() -> None:
    base: dict[str, Any] = dict(
        cluster_id=CLUSTER, node_id=1, secret=SECRET, listen_host="127.0.0.1", listen_port=0,
        peers={2: ("127.0.0.1", 1)},
    )  # fmt: skip
    with pytest.raises(ValueError, match="lists itself"):
        TransportConfig(**{**base, "peers": {1: ("127.0.0.1", 1), 2: ("127.0.0.1", 2)}})
    with pytest.raises(ValueError, match="SECRET_BYTES_MIN"):
        TransportConfig(**{**base, "secret": b"short"})
    assert SECRET.hex() not in repr(TransportConfig(**base))


def test_a_peer_frame_carries_the_largest_forwarded_client_command_with_room_to_spare() -> None:
    from sequencer.client.protocol import FRAME_BYTES_MAX as CLIENT_FRAME_BYTES_MAX
    from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX

    assert PEER_FRAME_BYTES_MAX >= 2 * CLIENT_FRAME_BYTES_MAX + 4096, (PEER_FRAME_BYTES_MAX, CLIENT_FRAME_BYTES_MAX)
