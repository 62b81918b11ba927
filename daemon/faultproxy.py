"""A fault proxy for cluster tests: a TCP proxy on 127.0.0.1 per directed peer link, whose faults
the test process changes at run time while real node processes talk through it.

Theory of operation
-------------------

Each node dials every other node for its own messages (`sequencer.raft.transport`), so the link
A -> B is one TCP connection at a time, opened by A. Give node A, as B's peer address, the port of
the proxy link ("A", "B"), which forwards to B's real peer port: the test now owns that link.

    node A --dials--> [link A->B :p1] --> node B's peer port
    node B --dials--> [link B->A :p2] --> node A's peer port

A link applies a fault to every connection through it, now and later. Per direction of the TCP
connection (UPSTREAM: the dialler's bytes to the target, DOWNSTREAM: the answers):

- pass (`heal()`): bytes flow as they come;
- `delay(ms)`: each chunk is held `ms` after it was read, order kept (TCP never reorders);
- `blackhole()`: bytes are neither read nor forwarded. This is a partition as TCP sees it: the
  packets vanish, the sender's kernel buffers fill, nothing is lost, and on `heal()` everything
  held flows on (TCP retransmits). A new connection is accepted (the proxy's kernel answers the
  SYN) but not forwarded to the target while UPSTREAM is blackholed, so the dialler sees a
  handshake that never completes, as behind a dropped SYN.

And for the whole link:

- `drop()`: every open connection is reset (RST), and each new one is reset as soon as it is
  accepted, until `heal()`: the peer looks down (a crashed process, a REJECT rule);
- `reset()`: reset the open connections once; new ones pass (a middlebox forgetting its state).

A one-way partition is either a whole link cut (`FaultNetwork.cut(A, B)`: A's messages no longer
reach B while B's reach A) or one direction of one link blackholed (`blackhole(UPSTREAM)`).

The proxies run on one asyncio loop in a daemon thread of the test process. The control methods
are plain blocking calls that return once the change is in force: after `blackhole()` returns, no
further byte is forwarded. Living in the test process, the proxy needs no control protocol, and it
stops by itself: when the test process ends, however it ends (a daemon thread leaves no orphan
process holding ports), and when the test drops its last reference to the proxy and its links;
`stop()` (or leaving the `with` block) closes everything at once.

Bounds: each direction of each connection holds at most `PIPE_BUFFER_BYTES_MAX` bytes (the
reader stops reading beyond it, so a delayed or stalled stream pushes back on its sender instead of
growing the test's memory), a link serves at most `CONNECTIONS_PER_LINK_MAX` connections, and a
delay is at most `DELAY_MS_MAX`. Only loopback addresses are used: the proxy listens on 127.0.0.1
and refuses a target that is not a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, Final, TypeVar

__all__ = [
    "CONNECTIONS_PER_LINK_MAX",
    "DELAY_MS_MAX",
    "PIPE_BUFFER_BYTES_MAX",
    "Direction",
    "FaultNetwork",
    "FaultProxy",
    "ProxyLink",
    "free_loopback_ports",
]

LISTEN_HOST: Final = "127.0.0.1"
# Bytes read per call: asyncio's own stream chunk.
CHUNK_BYTES: Final = 64 * 1024
# Bytes one direction of one connection may hold (read, not yet written): four reads. Beyond it
# the proxy stops reading, so back-pressure reaches the sender; a peer frame larger than this
# still flows, in pieces. Memory: links x connections x 2 directions x 256 KiB, a few MiB for a
# 5-node cluster (20 links, one connection each).
PIPE_BUFFER_BYTES_MAX: Final = 4 * CHUNK_BYTES
# Connections through one link at once: the transport keeps one per directed link (two while a
# reconnect replaces a stale one); 64 leaves room for a test's own probes and bounds a runaway.
CONNECTIONS_PER_LINK_MAX: Final = 64
# A longer delay is a test bug (no cluster test waits a minute for one message).
DELAY_MS_MAX: Final = 60_000.0
# A control call waits this long for the proxy loop; the loop answers in microseconds unless it is
# wedged, which is a bug to report rather than wait out.
CONTROL_TIMEOUT_S: Final = 10.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

assert PIPE_BUFFER_BYTES_MAX >= CHUNK_BYTES

T = TypeVar("T")


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1, for configs that must name each other's ports
    before anything listens (a cluster's peer addresses). Another process may take one between
    this call and the node's bind: rare on a test machine (the kernel picks from ~28k ephemeral
    ports at random), and then the bind fails loudly with EADDRINUSE rather than misbehaving."""
    sockets = [socket.create_server((LISTEN_HOST, 0)) for _ in range(count)]
    try:
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Direction(enum.Flag):
    UPSTREAM = 1  # from the dialler to the target
    DOWNSTREAM = 2  # from the target back to the dialler
    BOTH = 3


class _Flow:
    """The fault in force for one direction of a link (shared by all its connections)."""

    __slots__ = ("delay_s", "open")

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.open = asyncio.Event()  # set while not blackholed
        self.open.set()


class _Pipe:
    """One direction of one proxied connection: a reader task and a writer task around a queue.

    Invariant: `buffered` = bytes in `queue` <= PIPE_BUFFER_BYTES_MAX.
    """

    def __init__(
        self,
        link: _LinkState,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.direction = direction
        self.flow = link.flows[direction]
        self.reader = reader
        self.writer = writer
        self.queue: deque[tuple[float, bytes]] = deque()  # (due time, chunk); b"" is EOF
        self.buffered = 0
        self.changed = asyncio.Event()  # the queue gained or lost a chunk

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.flow.open.wait()  # blackholed: read nothing, let the sender's buffers fill
            while self.buffered >= PIPE_BUFFER_BYTES_MAX:
                self.changed.clear()
                await self.changed.wait()
            data = await self.reader.read(min(CHUNK_BYTES, PIPE_BUFFER_BYTES_MAX - self.buffered))
            self.queue.append((loop.time() + self.flow.delay_s, data))
            self.buffered += len(data)
            self.link.note_buffered(len(data))
            assert self.buffered <= PIPE_BUFFER_BYTES_MAX, self.buffered
            self.changed.set()
            if not data:
                return

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.changed.clear()
                await self.changed.wait()
            due, data = self.queue[0]
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await self.flow.open.wait()  # blackholed: hold what was read
            self.queue.popleft()
            self.buffered -= len(data)
            self.link.note_buffered(-len(data))
            self.changed.set()
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            self.link.count_forwarded(self.direction, len(data))
            await self.writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: what a peer sees when the other end vanished or rejects it."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class _Connection:
    """One connection through a link: the dialler's side, the target's side, a pipe each way."""

    def __init__(self, link: _LinkState, client: asyncio.StreamWriter) -> None:
        self.link = link
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.pipes: list[_Pipe] = []

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        for pipe in self.pipes:
            self.link.note_buffered(-pipe.buffered)
            pipe.buffered = 0
            pipe.queue.clear()
        _reset(self.client)
        if self.target is not None:
            _reset(self.target)


class _LinkState:
    """A link as the proxy loop sees it. Only the loop thread touches it."""

    def __init__(self, name: str, target_host: str, target_port: int) -> None:
        self.name = name
        self.target_host = target_host
        self.target_port = target_port
        self.flows = {Direction.UPSTREAM: _Flow(), Direction.DOWNSTREAM: _Flow()}
        self.dropping = False
        self.connections: set[_Connection] = set()
        self.server: asyncio.Server | None = None
        self.stats = {
            "connections_open": 0,
            "connections_accepted": 0,
            "connections_reset": 0,  # by drop() or reset(), or refused at accept while dropping
            "bytes_upstream": 0,
            "bytes_downstream": 0,
            "buffered_bytes": 0,
            "buffered_bytes_peak": 0,  # per link, summed over its connections
        }

    def note_buffered(self, delta: int) -> None:
        stats = self.stats
        stats["buffered_bytes"] += delta
        stats["buffered_bytes_peak"] = max(stats["buffered_bytes_peak"], stats["buffered_bytes"])

    def count_forwarded(self, direction: Direction, count: int) -> None:
        key = "bytes_upstream" if direction is Direction.UPSTREAM else "bytes_downstream"
        self.stats[key] += count

    def reset_all(self) -> None:
        for connection in list(self.connections):
            connection.reset()
            self.stats["connections_reset"] += 1
        self.connections.clear()
        self.stats["connections_open"] = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One accepted connection: refuse it, or connect to the target and pump both ways."""
        stats = self.stats
        stats["connections_accepted"] += 1
        if self.dropping or len(self.connections) >= CONNECTIONS_PER_LINK_MAX:
            stats["connections_reset"] += 1
            _reset(writer)
            return
        connection = _Connection(self, writer)
        self.connections.add(connection)
        stats["connections_open"] = len(self.connections)
        try:
            # A blackholed UPSTREAM swallows the SYN too: the target sees no connection yet.
            await self.flows[Direction.UPSTREAM].open.wait()
            try:
                target_reader, target_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                stats["connections_reset"] += 1
                _reset(writer)  # the target is down: the dialler sees its connection reset
                return
            connection.target = target_writer
            if connection not in self.connections:  # reset while connecting
                _reset(target_writer)
                return
            connection.pipes = [
                _Pipe(self, Direction.UPSTREAM, reader, target_writer),
                _Pipe(self, Direction.DOWNSTREAM, target_reader, writer),
            ]
            connection.tasks = [
                asyncio.create_task(coroutine)
                for pipe in connection.pipes
                for coroutine in (pipe.read_loop(), pipe.write_loop())
            ]
            # Both directions end with EOF written; an error on either side ends the connection.
            done, _ = await asyncio.wait(connection.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                connection.reset()
            else:
                target_writer.close()
                writer.close()
        finally:
            if connection in self.connections:
                self.connections.discard(connection)
                stats["connections_open"] = len(self.connections)


class ProxyLink:
    """The test's handle on one proxied link. Every method blocks until the change is in force.

    `port`: where the dialler connects (127.0.0.1). Raises ValueError on a bad argument.
    """

    def __init__(self, proxy: FaultProxy, state: _LinkState, port: int) -> None:
        self._proxy = proxy
        self._state = state
        self.name = state.name
        self.port = port

    def heal(self) -> None:
        """Pass both ways with no delay, and accept connections again."""

        def heal() -> None:
            self._state.dropping = False
            for flow in self._state.flows.values():
                flow.delay_s = 0.0
                flow.open.set()

        self._proxy._call(heal)

    def delay(self, delay_ms: float, direction: Direction = Direction.BOTH) -> None:
        """Hold every chunk read from now on `delay_ms` before forwarding it."""
        if not 0 <= delay_ms <= DELAY_MS_MAX:
            raise ValueError(f"delay_ms={delay_ms} is outside 0..DELAY_MS_MAX={DELAY_MS_MAX}")

        def delay() -> None:
            for flow in self._flows(direction):
                flow.delay_s = delay_ms / 1000

        self._proxy._call(delay)

    def blackhole(self, direction: Direction = Direction.BOTH) -> None:
        """Stop reading and forwarding in `direction`; what is held flows on at `heal()`."""

        def blackhole() -> None:
            for flow in self._flows(direction):
                flow.open.clear()

        self._proxy._call(blackhole)

    def drop(self) -> None:
        """Reset every open connection, and every new one until `heal()`."""

        def drop() -> None:
            self._state.dropping = True
            self._state.reset_all()

        self._proxy._call(drop)

    def reset(self) -> None:
        """Reset the open connections once; new connections pass."""
        self._proxy._call(self._state.reset_all)

    def stats(self) -> dict[str, int]:
        """Connections and bytes so far (`buffered_bytes_peak` proves the bound held)."""
        return self._proxy._call(lambda: dict(self._state.stats))

    def _flows(self, direction: Direction) -> list[_Flow]:
        return [flow for d, flow in self._state.flows.items() if d & direction]


def _run_loop(loop: asyncio.AbstractEventLoop, states: list[_LinkState]) -> None:
    """The proxy thread: serve until stopped, then close every link and connection."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Cancelling a connection's task makes asyncio's stream callback call exception() on it,
        # which raises CancelledError and is logged as an "Exception in callback": a stop is no
        # error, so only that is silenced.
        loop.set_exception_handler(_ignore_cancelled)
        for state in states:
            if state.server is not None:
                state.server.close()
            state.reset_all()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop the proxy thread (it closes everything on its way out) and wait for it."""
    if not thread.is_alive():
        return
    loop.call_soon_threadsafe(loop.stop)
    if threading.current_thread() is not thread:
        thread.join(CONTROL_TIMEOUT_S)


class FaultProxy:
    """Proxy links on a private asyncio loop in a daemon thread. Use as a context manager.

    with FaultProxy() as proxy:
        link = proxy.add_link("1->2", target_port=node2_peer_port)
        ...                      # node 1 dials 127.0.0.1:link.port for node 2
        link.blackhole()
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._links: dict[str, ProxyLink] = {}
        self._states: list[_LinkState] = []
        self._thread = threading.Thread(
            target=_run_loop, args=(self._loop, self._states), name="seqd-fault-proxy", daemon=True
        )
        self._thread.start()
        # Stops with the test process (a daemon thread), at stop(), or when nothing refers to the
        # proxy any more: a test that forgets stop() does not leave ports listening all session.
        # The finalizer holds the loop and the thread, never the proxy itself.
        self._finalizer = weakref.finalize(self, _shut_down, self._loop, self._thread)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def links(self) -> dict[str, ProxyLink]:
        return dict(self._links)

    def add_link(self, name: str, target_port: int, target_host: str = LISTEN_HOST) -> ProxyLink:
        """A new link listening on 127.0.0.1 (a free port) and forwarding to the target.

        Raises:
            ValueError: the name is taken, or the target is not a loopback address.
        """
        if name in self._links:
            raise ValueError(f"a link named {name!r} exists already; give each link its own name")
        try:
            loopback = ipaddress.ip_address(target_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"target {target_host!r} is not a loopback IP address: the fault proxy is for "
                "tests on one machine and forwards only to 127.0.0.1 or ::1"
            )
        state = _LinkState(name, target_host, target_port)

        async def listen() -> int:
            state.server = await asyncio.start_server(state.serve, LISTEN_HOST, 0)
            return state.server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]

        port = self._submit(listen())
        self._states.append(state)
        link = ProxyLink(self, state, port)
        self._links[name] = link
        return link

    def stop(self) -> None:
        """Close every link and connection and end the thread; idempotent."""
        self._finalizer()

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the proxy loop and return its result."""
        if not self._finalizer.alive:
            coroutine.close()
            raise RuntimeError("the fault proxy was stopped; create a new one")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT_S)

    def _call(self, function: Callable[[], T]) -> T:
        """Run `function` on the proxy loop and return its result once it has run."""
        if not self._finalizer.alive:
            raise RuntimeError("the fault proxy was stopped; create a new one")
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller's thread
                future.set_exception(error)

        self._loop.call_soon_threadsafe(run)
        return future.result(CONTROL_TIMEOUT_S)


class FaultNetwork:
    """Directed links between node ids through one FaultProxy, with partition helpers.

    `add(source, target, target_port)` returns the port `source` must dial to reach `target`.
    Cutting a link blackholes both directions of its connections (or drops them, `how="drop"`):
    `source`'s messages stop reaching `target`, while `target`'s own link to `source` is untouched.
    """

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.links: dict[tuple[int, int], ProxyLink] = {}

    def add(self, source: int, target: int, target_port: int) -> int:
        link = self.proxy.add_link(f"{source}->{target}", target_port)
        self.links[(source, target)] = link
        return link.port

    def cut(self, source: int, target: int, how: str = "blackhole") -> None:
        """One way: `source` can no longer reach `target`."""
        link = self.links[(source, target)]
        if how == "blackhole":
            link.blackhole()
        elif how == "drop":
            link.drop()
        else:
            raise ValueError(f"how={how!r}: say 'blackhole' (packets vanish) or 'drop' (reset)")

    def partition(self, *groups: Iterable[int], how: str = "blackhole") -> None:
        """Cut every link between different groups, both ways; heal every link within a group.
        Nodes named in no group form a group of their own."""
        group_of: dict[int, int] = {}
        for number, group in enumerate(groups):
            for node in group:
                group_of[node] = number
        for source, target in self.links:
            if group_of.get(source, -1) == group_of.get(target, -1):
                self.links[(source, target)].heal()
            else:
                self.cut(source, target, how)

    def isolate(self, node: int, how: str = "blackhole") -> None:
        """Cut `node` from every other node, both ways."""
        others = {n for link in self.links for n in link} - {node}
        self.partition([node], others, how=how)

    def heal(self) -> None:
        for link in self.links.values():
            link.heal()
