"""The fault proxy, mode by mode, in front of a small echo server on 127.0.0.1."""

from __future__ import annotations

import gc
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from daemon.faultproxy import (
    PIPE_BUFFER_BYTES_MAX,
    Direction,
    FaultNetwork,
    FaultProxy,
    ProxyLink,
)

WAIT_S = 20.0  # bound on a condition the proxy reaches by itself
QUIET_S = 0.3  # how long "nothing arrives" is watched; absence under load stays absence


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte; counts connections and bytes received."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.accepted = 0
        self.received = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _EchoHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]  # type: ignore[no-any-return]


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: EchoServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.accepted += 1
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            with server.lock:
                server.received += len(data)
            try:
                self.request.sendall(data)
            except OSError:
                return


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy() as running:
        yield running


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {WAIT_S} s waiting for {what}"
        time.sleep(0.005)


def connect(link: ProxyLink) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", link.port), timeout=WAIT_S)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def receive_exactly(client: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = client.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data


def nothing_arrives(client: socket.socket) -> bool:
    """No byte (and no close) within QUIET_S; consumes a byte if one does arrive."""
    client.settimeout(QUIET_S)
    try:
        client.recv(1)
    except TimeoutError:
        return True
    finally:
        client.settimeout(WAIT_S)
    return False


def is_reset(client: socket.socket) -> bool:
    """The proxy reset (or closed) this connection."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def new_connection_is_reset(link: ProxyLink) -> bool:
    """A new connection through `link` is reset (on loopback the RST may beat connect())."""
    try:
        with connect(link) as client:
            return is_reset(client)
    except ConnectionResetError:
        return True


def test_a_healthy_link_forwards_both_ways(proxy: FaultProxy, echo: EchoServer) -> None:
    link = proxy.add_link("1->2", echo.port)
    with connect(link) as client:
        client.sendall(b"hello")
        assert receive_exactly(client, 5) == b"hello"
    stats = link.stats()
    assert (stats["bytes_upstream"], stats["bytes_downstream"]) == (5, 5)
    assert stats["connections_accepted"] == 1


@pytest.mark.parametrize(
    ("direction", "hops"), [(Direction.BOTH, 2), (Direction.UPSTREAM, 1), (Direction.DOWNSTREAM, 1)]
)
def test_delay_holds_every_chunk_at_least_the_delay(
    proxy: FaultProxy, echo: EchoServer, direction: Direction, hops: int
) -> None:
    link = proxy.add_link("1->2", echo.port)
    delay_ms = 150.0
    link.delay(delay_ms, direction)
    with connect(link) as client:
        for message in (b"one", b"two"):
            started = time.monotonic()
            client.sendall(message)
            assert receive_exactly(client, 3) == message
            # A lower bound only: a loaded machine makes it longer, never shorter.
            assert time.monotonic() - started >= hops * delay_ms / 1000 * 0.99
    link.heal()
    with connect(link) as client:
        client.sendall(b"now")
        assert receive_exactly(client, 3) == b"now"


def test_blackhole_stalls_both_ways_and_heal_delivers_everything_held(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    link = proxy.add_link("1->2", echo.port)
    with connect(link) as client:
        client.sendall(b"before")
        assert receive_exactly(client, 6) == b"before"
        link.blackhole()
        client.sendall(b"during")
        assert nothing_arrives(client)
        assert echo.received == 6, "the target got nothing while blackholed"
        link.heal()
        assert receive_exactly(client, 6) == b"during", "held, not lost (TCP semantics)"


def test_one_way_blackhole_upstream_keeps_the_target_from_hearing(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    link = proxy.add_link("1->2", echo.port)
    with connect(link) as client:
        client.sendall(b"x")
        assert receive_exactly(client, 1) == b"x"
        link.blackhole(Direction.UPSTREAM)
        client.sendall(b"abc")
        assert nothing_arrives(client)
        assert echo.received == 1
        link.heal()
        assert receive_exactly(client, 3) == b"abc"


def test_one_way_blackhole_downstream_lets_the_target_hear_but_not_answer(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    link = proxy.add_link("1->2", echo.port)
    with connect(link) as client:
        client.sendall(b"x")
        assert receive_exactly(client, 1) == b"x"
        link.blackhole(Direction.DOWNSTREAM)
        client.sendall(b"abc")
        until(lambda: echo.received == 4, "the target to receive")
        assert nothing_arrives(client)
        link.heal()
        assert receive_exactly(client, 3) == b"abc"


def test_a_new_connection_does_not_reach_the_target_while_upstream_is_blackholed(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    link = proxy.add_link("1->2", echo.port)
    link.blackhole(Direction.UPSTREAM)
    with connect(link) as client:  # the proxy's kernel accepts, as a real SYN would be lost
        client.sendall(b"hi")
        assert nothing_arrives(client)
        assert echo.accepted == 0
        link.heal()
        assert receive_exactly(client, 2) == b"hi"
        assert echo.accepted == 1


def test_drop_resets_open_connections_and_every_new_one_until_heal(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    link = proxy.add_link("1->2", echo.port)
    with connect(link) as client:
        client.sendall(b"x")
        assert receive_exactly(client, 1) == b"x"
        link.drop()
        assert is_reset(client)
    assert new_connection_is_reset(link)
    assert link.stats()["connections_reset"] == 2
    link.heal()
    with connect(link) as client:
        client.sendall(b"back")
        assert receive_exactly(client, 4) == b"back"


def test_reset_aborts_open_connections_once(proxy: FaultProxy, echo: EchoServer) -> None:
    link = proxy.add_link("1->2", echo.port)
    with connect(link) as client:
        client.sendall(b"x")
        assert receive_exactly(client, 1) == b"x"  # the proxy has taken the connection
        link.reset()
        assert is_reset(client)
    with connect(link) as client:
        client.sendall(b"again")
        assert receive_exactly(client, 5) == b"again"


def test_a_target_that_is_down_resets_the_dialler(proxy: FaultProxy) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, not listening: connections are refused
        link = proxy.add_link("1->2", port)
        assert new_connection_is_reset(link)


def test_a_delayed_stream_is_held_in_bounded_buffers_and_pushes_back(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    link = proxy.add_link("1->2", echo.port)
    link.delay(30_000.0, Direction.UPSTREAM)
    offered = 64 << 20  # far more than kernel buffers and the proxy's bound together
    sent = 0
    chunk = b"z" * 65536
    with connect(link) as client:
        client.settimeout(1.0)
        try:
            while sent < offered:
                sent += client.send(chunk)
        except TimeoutError:
            pass  # the sender is pushed back: the proxy stopped reading
        assert sent < offered
        stats = link.stats()
        assert 0 < stats["buffered_bytes_peak"] <= PIPE_BUFFER_BYTES_MAX
        assert echo.received == 0
        link.reset()


def test_stop_closes_every_connection_and_the_listening_port(echo: EchoServer) -> None:
    proxy = FaultProxy()
    link = proxy.add_link("1->2", echo.port)
    client = connect(link)
    client.sendall(b"x")
    assert receive_exactly(client, 1) == b"x"
    proxy.stop()
    assert is_reset(client)
    client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", link.port), timeout=WAIT_S)
    with pytest.raises(RuntimeError, match="stopped"):
        link.heal()
    proxy.stop()  # idempotent


def test_a_proxy_nobody_refers_to_any_more_stops_by_itself(echo: EchoServer) -> None:
    proxy = FaultProxy()
    port = proxy.add_link("1->2", echo.port).port
    thread = proxy._thread
    del proxy  # and the link handle, which was never kept
    gc.collect()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def test_only_loopback_targets_are_proxied(proxy: FaultProxy) -> None:
    for host in ("10.0.0.1", "0.0.0.0", "example.com"):
        with pytest.raises(ValueError, match="loopback"):
            proxy.add_link(f"to {host}", 1, target_host=host)
    with pytest.raises(ValueError, match="delay_ms"):
        proxy.add_link("1->2", 1).delay(-1)


def test_a_partition_cuts_links_between_groups_only_and_heal_restores_them(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    network = FaultNetwork(proxy)
    for source in (1, 2, 3):
        for target in (1, 2, 3):
            if source != target:
                network.add(source, target, echo.port)  # one echo stands in for every node
    network.partition([1], [2, 3])

    def reachable(source: int, target: int) -> bool:
        with connect(network.links[(source, target)]) as client:
            client.sendall(b"?")
            return not nothing_arrives(client)

    assert {pair: reachable(*pair) for pair in network.links} == {
        pair: (1 not in pair) for pair in network.links
    }
    network.heal()
    network.cut(2, 3)  # one way: 2 no longer reaches 3, 3 still reaches 2
    assert not reachable(2, 3)
    assert reachable(3, 2)
    network.heal()
    assert all(reachable(*pair) for pair in network.links)


def test_stop_with_connections_open_logs_no_error(echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    # Stopping cancels each connection's task; asyncio's stream callback would then log the
    # cancelled task as "Exception in callback": noise in every test and bench that stops a proxy.
    proxy = FaultProxy()
    link = proxy.add_link("1->2", echo.port)
    clients = [connect(link) for _ in range(3)]
    for client in clients:
        client.sendall(b"x")
        assert receive_exactly(client, 1) == b"x"
    with caplog.at_level("ERROR", logger="asyncio"):
        proxy.stop()
    for client in clients:
        client.close()
    assert not [record.getMessage() for record in caplog.records if record.name == "asyncio"]
