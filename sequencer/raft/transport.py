"""The peer transport: the peer protocol over TCP, on asyncio or uvloop, for the replication role.

Theory of operation
-------------------

Each node dials every other member and sends its own messages to that member on the connection
it dialled; the member dials back for its messages. So there is exactly one TCP connection per
ordered pair of nodes, its sender owns it, and a fault proxy can cut, delay or stall the link
A -> B without touching B -> A (`docs/peer-transport.md` weighs this against one shared
connection per pair). An acceptor sends nothing after the handshake but, when it refuses
forwarded records, one REFUSED frame before it closes: what it receives goes to the
`on_messages` / `on_records` callbacks, tagged with the authenticated peer's id.

All protocol logic is in the sans-I/O `sequencer.raft.peer_protocol`; this module reads and
writes sockets, keeps time (handshake timeouts, reconnect backoff) and counts:

- `send(messages)` routes each message to its target's outbound queue and schedules one flush for
  the end of the loop pass (`loop.call_soon`): every message sent during a pass leaves in one
  frame per peer and one `write`.
- a message to a peer with no authenticated connection, or whose batch would take its socket
  past `send_buffer_bytes_max` unsent bytes, is dropped and counted (`messages_dropped`): Raft
  resends what matters after a timeout, and a slow or dead peer must not grow this node's memory.
  The bound is checked before each pass's batch, which then goes whole, so a peer that does not
  drain holds at most `send_buffer_bytes_max` plus one pass's batch of Raft's messages in this
  process's memory (a batch toward one peer is within the leader's byte window; and its
  forwarded records, below, at most the follower's pending set), and never stalls the other
  links (each has its own buffer; nothing here waits). So is a batch holding a message too large
  for any frame (a caller bug, logged);
- forwarded records (`forward`) are dropped when the socket already holds `send_buffer_bytes_max`
  unsent bytes, but not held to the room left: a restart resends a whole pending set at once (up
  to forwards.py's PENDING_BYTES_MAX, which bounds their memory), and a strict bound would drop
  that resend again at every restart, for good. Each link's records form a stream
  that must stay gapless (sequencer/cluster/forwards.py): the link numbers its forward stream
  (`forward_stream`), and every authenticated connection and every dropped record starts a new
  one; records sent on an older stream are dropped (counted), so nothing behind a dropped record
  leaves until the caller restarts the stream, with its ordered resend, on the new number. On the
  receiving side, `on_records` answers False, or why not, when it did not take a batch: nothing
  after the refused batch is delivered, and that connection is aborted, or, with a reason, closed
  after a last REFUSED frame that carries it (the one frame an acceptor ever sends after the
  handshake): half-closed, what still arrives dropped unread until the dialler closes or a bound
  (`peer_refusals.LingeringClose`: a plain close with unread bytes resets the connection, and the
  reset can cost the dialler the frame); its dialler logs and counts the reason
  (`forward_refusals_received`) and reconnects;
- a refused connection (any `PeerProtocolError`, a handshake that does not finish within
  `handshake_timeout_ms`, or more than `HANDSHAKES_PENDING_MAX` unauthenticated connections) is
  counted by its code, logged the first time and at every power of two, and aborted;
- a dialler whose connection fails or ends redials after `ReconnectBackoff`'s delay (doubling
  from `reconnect_first_ms` to `reconnect_max_ms`, reset once a connection authenticates);
- a newly authenticated inbound connection from a peer replaces the previous one (the peer
  restarted, or its old connection is half-open).

The listener binds the configured address only; a non-loopback one is refused unless the config
says `allow_non_loopback` (a cluster spread over machines), so a test or a single-machine setup can
never expose the peer port by accident.

Callbacks run inside the protocol's `data_received`: they must not block. An exception in one is a
bug; asyncio logs it and closes that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from sequencer.raft.messages import Message
from sequencer.raft.peer_protocol import (
    CLOSED,
    NEED_DATA,
    NONCE_BYTES,
    Authenticated,
    ForwardedRecord,
    LocalPeerProtocolError,
    MessageBatch,
    PeerConnection,
    PeerProtocolError,
    ReconnectBackoff,
    RecordBatch,
    RecordsRefused,
    Side,
)
from sequencer.raft.peer_refusals import LingeringClose, Refusals, RefusedCallback
from sequencer.raft.transport_config import (
    TRANSPORT_REFUSAL_CODES,
    TransportConfig,
    TransportCounters,
)

__all__ = [
    "HANDSHAKES_PENDING_MAX",
    "TRANSPORT_REFUSAL_CODES",
    "PeerTransport",
    "TransportConfig",
    "TransportCounters",
]

log = logging.getLogger("seqd.peer")

# Unauthenticated inbound connections at once. Each member dials once (twice while a stale
# connection is replaced), so a 5-node cluster needs at most 8; more is a port scanner or a flood,
# and each costs a codec and up to one read of buffer: refuse beyond this.
HANDSHAKES_PENDING_MAX: Final = 64
# close(): how long to wait for aborted connections and the server to finish closing. An abort
# closes a socket at once; the wait only lets their callbacks run. A role stops after it even if
# one never reports closed (a stop must not hang on a peer: the supervisor would kill the role).
CLOSE_WAIT_S: Final = 2.0
# A forwarded command, or an AppendEntries carrying one largest client command, always fits a
# peer frame, with room for its headers and a second one.
# That a peer frame carries the largest forwarded client command is a relation between the
# client protocol and this one, which raft may not import: tests/test_peer_transport.py holds it.


class _Link:
    """This node's outbound side towards one peer."""

    __slots__ = ("connected", "forward_stream", "host", "messages", "peer_id", "port", "records",
                 "stream", "task")  # fmt: skip

    def __init__(self, peer_id: int, host: str, port: int) -> None:
        self.peer_id = peer_id
        self.host = host
        self.port = port
        self.stream: _PeerStream | None = None  # set while an authenticated connection is up
        self.connected = asyncio.Event()
        self.messages: list[Message] = []  # to send at the next flush
        self.records: list[ForwardedRecord] = []  # of the current forward stream only
        self.forward_stream = 0  # a new number per connection and per dropped record
        self.task: asyncio.Task[None] | None = None


class _PeerStream(asyncio.Protocol):
    """One TCP connection, either way: feeds the codec and hands its events to the transport."""

    def __init__(self, owner: PeerTransport, codec: PeerConnection, link: _Link | None) -> None:
        self.owner = owner
        self.codec = codec
        self.link = link  # the outbound link this stream serves; None for an inbound stream
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.was_authenticated = False
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.owner._stream_opened(self):
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.owner.config.handshake_timeout_ms / 1000, self._handshake_timed_out
        )
        self._write(self.codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        self.owner.counters.bytes_in += len(data)
        self.codec.receive_data(data)
        self._drain()

    def eof_received(self) -> bool:
        if not self._ended:
            self.codec.receive_data(b"")
            self._drain()
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        self.owner._stream_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        self._ended = True
        if self.transport is not None:
            self.transport.abort()

    def close_after(self, data: bytes) -> None:
        """Write `data` (a last frame), then close without losing it: nothing more is delivered;
        what the peer still sends is dropped until it closes, or a bound (LingeringClose)."""
        if self._ended:
            return  # aborted, or closing after its last frame already
        self._ended = True
        if self.transport is not None:
            self._write(data)
            LingeringClose(self.transport, self, self.owner.counters)

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.owner.counters.bytes_out += len(data)
            self.transport.write(data)

    def _drain(self) -> None:
        owner = self.owner
        codec = self.codec
        while not self._ended:
            try:
                event = codec.next_event()
            except PeerProtocolError as error:
                owner._refuse(self, error.code, error.message)
                return
            if not self.was_authenticated:
                # The handshake's own frames go out before anything the event triggers (the
                # dialler's AUTH before its first data frame); after it the codec makes none.
                self._write(codec.data_to_send())
            if event is NEED_DATA:
                return
            if event is CLOSED:
                assert self.transport is not None
                self.transport.close()
                return
            if isinstance(event, MessageBatch):
                owner._deliver_messages(codec.peer_id, event.messages)
            elif isinstance(event, RecordBatch):
                owner._deliver_records(self, event.records)
            elif isinstance(event, RecordsRefused):
                owner._forwards_refused(codec.peer_id, event.reason)
            else:
                assert isinstance(event, Authenticated), event
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self.was_authenticated = True
                owner._authenticated(self)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self.codec.authenticated and not self._ended:
            self.owner._refuse(
                self,
                "handshake_timeout",
                f"no authenticated handshake within {self.owner.config.handshake_timeout_ms} ms",
            )

    def describe(self) -> str:
        if self.link is not None:
            return f"outbound to node {self.link.peer_id} ({self.link.host}:{self.link.port})"
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        claimed = f" (says node {self.codec.peer_id})" if self.codec.peer_id else ""
        return f"inbound from {peer}{claimed}"


MessagesCallback = Callable[[int, list[Message]], None]
RecordsCallback = Callable[[int, list[ForwardedRecord]], "bool | str"]


class PeerTransport:
    """This node's connections to its peers. Create it, `await start()`, `send`, `await close()`.

    Args:
        config: addresses, identity, timeouts.
        on_messages: called with (peer id, messages) for each authenticated batch received.
        on_records: called with (peer id, forwarded records); answers whether it took them all:
            True, else False or why not (a sentence, sent back to the peer in a REFUSED frame);
            a refusal closes that connection (nothing after the batch is delivered). Records are
            dropped (counted in `records_in` only) when None.
        on_refused: called with (peer id, reason) when a peer this node dialled refused its
            forwarded records and said why (counted in `forward_refusals_received` and logged
            here either way).
        random_source: for the backoff's jitter (a seeded one in tests).
    """

    def __init__(
        self,
        config: TransportConfig,
        on_messages: MessagesCallback,
        on_records: RecordsCallback | None = None,
        *,
        on_refused: RefusedCallback | None = None,
        random_source: random.Random | None = None,
    ) -> None:
        self.config = config
        self.identity = config.identity
        self.counters = TransportCounters()
        self._on_messages = on_messages
        self._on_records = on_records
        # Refusals both ways, and the close after saying why, in their own module (its docstring)
        # so their counts, sparse logging and lingering close are read and tested in one place.
        self._refusals = Refusals(config.node_id, self.counters, on_refused)
        self._random = random_source if random_source is not None else random.Random()
        self._links = {peer: _Link(peer, host, port) for peer, (host, port) in config.peers.items()}
        self._inbound: dict[int, _PeerStream] = {}  # authenticated inbound streams by peer id
        self._pending: set[_PeerStream] = set()  # inbound streams still in their handshake
        self._streams: set[_PeerStream] = set()  # every open stream, to close them all
        self._server: asyncio.AbstractServer | None = None
        self._flush_scheduled = False
        self._closing = False
        self._listen_port = 0
        # The loop that runs the transport, found once: `asyncio.get_running_loop()` costs a
        # getpid() system call each time (a fork check), and a flush is scheduled every pass.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the configured address and start dialling every peer.

        Raises:
            OSError: the listen address cannot be bound (in use, or not this machine's).
        """
        assert self._server is None, "start() once"
        loop = asyncio.get_running_loop()
        config = self.config
        self._server = await loop.create_server(
            self._accept, config.listen_host, config.listen_port, reuse_address=True
        )
        sockets = self._server.sockets
        assert len(sockets) == 1, [s.getsockname() for s in sockets]
        bound_host, self._listen_port = sockets[0].getsockname()[:2]
        assert config.allow_non_loopback or ipaddress.ip_address(bound_host).is_loopback, bound_host
        for link in self._links.values():
            link.task = loop.create_task(self._dial(link), name=f"seqd-peer-dial-{link.peer_id}")
            link.task.add_done_callback(self._dial_ended)

    async def close(self) -> None:
        """Stop dialling and listening, and abort every connection; idempotent."""
        if self._closing:
            return
        self._closing = True
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        streams = list(self._streams)
        for stream in streams:
            stream.abort()
        server = self._server
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    *(stream.closed for stream in streams),
                    *(() if server is None else (server.wait_closed(),)),
                ),
                CLOSE_WAIT_S,
            )
        except TimeoutError:
            log.warning("node %d: peer connections not closed within %.0f s of close(); stopping anyway",
                        self.identity.node_id, CLOSE_WAIT_S)  # fmt: skip

    async def __aenter__(self) -> PeerTransport:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def listen_port(self) -> int:
        """The bound port (the one chosen, when the config says 0)."""
        assert self._server is not None, "start() first"
        return self._listen_port

    def is_connected(self, peer_id: int) -> bool:
        """This node's outbound connection to `peer_id` is authenticated (messages can leave)."""
        return self._links[peer_id].stream is not None

    @property
    def pending_handshakes(self) -> int:
        """Inbound connections not yet authenticated."""
        return len(self._pending)

    def inbound_peers(self) -> set[int]:
        """Peers with an authenticated connection to this node (their messages can arrive)."""
        return set(self._inbound)

    async def wait_connected(self, peer_ids: Iterable[int] | None = None) -> None:
        """Wait until the outbound connections to `peer_ids` (default: all) are authenticated.
        Wrap it in a timeout: a peer that is down is waited for forever."""
        for peer in self._links if peer_ids is None else peer_ids:
            await self._links[peer].connected.wait()

    # -- sending --------------------------------------------------------------------------------

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages for their targets; they leave at the end of this loop pass.

        Raises:
            ValueError: a message's target is not a peer of this node (a bug in the caller).
        """
        links = self._links
        for message in messages:
            link = links.get(message.target)
            if link is None:
                raise ValueError(
                    f"a {type(message).__name__} is addressed to node {message.target}, not a "
                    f"peer of node {self.identity.node_id} (peers: {sorted(links)})"
                )
            if link.stream is None:
                self.counters.messages_dropped += 1
                continue
            link.messages.append(message)
        self._schedule_flush()

    def forward(self, target: int, records: Sequence[ForwardedRecord], stream: int) -> None:
        """Queue forwarded records for `target` (the leader) on its forward stream `stream`
        (`forward_stream`); they leave this loop pass. Dropped (counted) when `stream` is not the
        link's current one; when the link has no connection, dropped and the stream ended.

        Raises:
            ValueError: `target` is not a peer of this node.
        """
        link = self._link(target)
        if stream != link.forward_stream:
            self.counters.records_dropped += len(records)
        elif link.stream is None:
            self._break_forwards(link, len(records))
        elif records:
            link.records.extend(records)
            self._schedule_flush()

    def forward_stream(self, target: int) -> int:
        """The number of the link's current forward stream: new with every authenticated
        connection and after every dropped record (module docstring)."""
        return self._link(target).forward_stream

    def unsent_bytes(self, target: int) -> int:
        """Bytes written to the connection to `target` that its socket has not taken yet (this
        process's send buffer for that peer, at most `send_buffer_bytes_max`); 0 unconnected."""
        stream = self._link(target).stream
        if stream is None or stream.transport is None:
            return 0
        return stream.transport.get_write_buffer_size()

    def forward_writable(self, target: int) -> bool:
        """The link to `target` is connected and its socket holds under half the unsent bytes at
        which it drops: a restart's resend has room to leave."""
        stream = self._links[target].stream
        if stream is None or stream.transport is None:
            return False
        return stream.transport.get_write_buffer_size() <= self.config.send_buffer_bytes_max // 2

    def drop_forwards(self, target: int, count: int) -> None:
        """`count` records forwarded to `target` were dropped on the way (the replicator's fault
        hook SEQD_FAULT_DROP_COMMAND_FORWARD): counted, and the stream ended, like any drop."""
        self._break_forwards(self._link(target), count)

    def close_forwards_from(self, peer_ids: Iterable[int], reason: str | None = None) -> None:
        """Close the inbound connections of `peer_ids`: records they forwarded were discarded here
        (this node stopped leading), so each must restart its stream (module docstring); each is
        told `reason` first."""
        for peer in peer_ids:
            stream = self._inbound.get(peer)
            if stream is not None:
                self._refuse_forwards(stream, reason)

    def _link(self, target: int) -> _Link:
        link = self._links.get(target)
        if link is None:
            raise ValueError(
                f"node {target} is not a peer of node {self.identity.node_id} "
                f"(peers: {sorted(self._links)})"
            )
        return link

    def _break_forwards(self, link: _Link, dropped: int) -> None:
        """`dropped` records to `link` were dropped: so are the ones queued behind them, and the
        stream ends (a new number: whatever is sent on the old one is dropped too)."""
        self.counters.records_dropped += dropped + len(link.records)
        self.counters.forward_streams_broken += 1
        link.records = []
        link.forward_stream += 1

    def _refuse_forwards(self, stream: _PeerStream, reason: str | None = None) -> None:
        """The receiver did not take records from `stream`: close it, delivering nothing later on
        it (with `reason`, what still arrives is read and dropped unread until the close: see
        LingeringClose), so its sender restarts its forward stream on a new connection; with
        `reason`, tell the sender why first (a REFUSED frame), so its log says it."""
        peer = stream.codec.peer_id
        self._refusals.forwards_refused(peer, reason)
        if self._inbound.get(peer) is stream:
            del self._inbound[peer]  # nothing more arrives on it, nor is refused again
        if reason is None or not stream.codec.authenticated:
            stream.abort()
            return
        stream.close_after(stream.codec.send_refusal(reason))

    def _forwards_refused(self, peer_id: int, reason: str) -> None:
        """The leader `peer_id` did not take this node's forwarded records, and said why."""
        self._refusals.refusal_received(peer_id, reason)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._closing:
            self._flush_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop pass: every peer's queued messages in as few frames as fit, one write."""
        self._flush_scheduled = False
        counters = self.counters
        buffer_max = self.config.send_buffer_bytes_max
        for link in self._links.values():
            if not link.messages and not link.records:
                continue
            messages, link.messages = link.messages, []
            records, link.records = link.records, []
            stream = link.stream
            room = 0 if stream is None or stream.transport is None else buffer_max - stream.transport.get_write_buffer_size()
            if room <= 0:
                counters.messages_dropped += len(messages)
                if records:
                    self._break_forwards(link, len(records))
                continue
            assert stream is not None
            codec = stream.codec
            frames_before = codec.frames_sent
            data = b""  # the codec's bytes as they are: a leader's appends are ~10-100 KiB a pass
            if messages:
                # Not held to the room left either: a catch-up's batch (up to the pass's read
                # budget, within the byte window) dropped because the socket still held the last
                # one's tail cost a Raft repair, a rejection and a probe, each time (catch-up read
                # 106-135k records/s in three runs with that, 111-176k without; this figure varies
                # widely between identical runs: benches/RESULTS.md, the lead's re-measure).
                try:
                    data = codec.send_messages(messages)
                    counters.messages_out += len(messages)
                except LocalPeerProtocolError as error:
                    counters.messages_dropped += len(messages)
                    self._batch_refused(link.peer_id, error)
            if records:
                # Not held to the room: a stream's records must all go, in order, and a restart
                # resends the whole pending set at once (up to sequencer/cluster/forwards.py's
                # PENDING_BYTES_MAX, more than this buffer by default), which a strict bound would
                # drop again at every restart, for good. Their bytes are bounded by that pending
                # set; the buffer's room only decides whether they go now (above).
                try:
                    data += codec.send_records(records)
                    counters.records_out += len(records)
                except LocalPeerProtocolError as error:
                    self._break_forwards(link, len(records))
                    self._batch_refused(link.peer_id, error)
            counters.frames_out += codec.frames_sent - frames_before
            stream._write(data)

    def _batch_refused(self, peer_id: int, error: LocalPeerProtocolError) -> None:
        """A batch the codec would not frame (a message over PEER_FRAME_BYTES_MAX): a bug in the
        caller. The batch is dropped and counted; the connection goes on."""
        log.error("node %d dropped a batch for node %d: %s", self.identity.node_id, peer_id, error)

    # -- receiving ------------------------------------------------------------------------------

    def _deliver_messages(self, peer_id: int, messages: list[Message]) -> None:
        self.counters.frames_in += 1
        self.counters.messages_in += len(messages)
        self._on_messages(peer_id, messages)

    def _deliver_records(self, stream: _PeerStream, records: list[ForwardedRecord]) -> None:
        self.counters.frames_in += 1
        self.counters.records_in += len(records)
        if self._on_records is None:
            return
        taken = self._on_records(stream.codec.peer_id, records)
        if taken is not True:
            self._refuse_forwards(stream, taken or None)

    # -- connections ----------------------------------------------------------------------------

    def _accept(self) -> _PeerStream:
        return _PeerStream(
            self,
            PeerConnection(self.identity, Side.ACCEPTOR, secrets.token_bytes(NONCE_BYTES)),
            None,
        )

    async def _dial(self, link: _Link) -> None:
        """Keep one authenticated outbound connection to `link`'s peer, redialling with backoff."""
        config = self.config
        loop = asyncio.get_running_loop()
        backoff = ReconnectBackoff(config.reconnect_first_ms, config.reconnect_max_ms, self._random)
        failures = 0
        # `_closing` is checked after each await as well as by the cancel close() sends: on Python
        # 3.11 wait_for swallows a cancel that arrives as the connect fails, and a loop that went
        # on would hold close() forever.
        while not self._closing:
            codec = PeerConnection(
                self.identity, Side.DIALLER, secrets.token_bytes(NONCE_BYTES), link.peer_id
            )
            stream = _PeerStream(self, codec, link)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: stream, link.host, link.port),  # noqa: B023
                    config.connect_timeout_ms / 1000,
                )
            except OSError as error:  # TimeoutError included
                self.counters.connect_failures += 1
                failures += 1
                if failures & (failures - 1) == 0:
                    log.warning(
                        "node %d cannot connect to node %d at %s:%d (%s); %d failures in a row, "
                        "retrying with backoff",
                        self.identity.node_id, link.peer_id, link.host, link.port,
                        error or "timed out", failures,
                    )  # fmt: skip
            else:
                if self._closing:
                    return  # connected as close() began: close() aborts the stream
                # Shielded: cancelling this loop must not cancel the future close() awaits.
                await asyncio.shield(stream.closed)
                if stream.was_authenticated:
                    failures = 0
                    backoff.reset()
            if self._closing:
                return
            await asyncio.sleep(backoff.next_delay_ms() / 1000)

    def _dial_ended(self, task: asyncio.Task[None]) -> None:
        """A dial loop ends only when cancelled or closing; anything else is a bug that would
        silently stop this node from ever reaching a peer again, so say so loudly."""
        if not task.cancelled() and task.exception() is not None:
            log.critical(
                "node %d: the dial loop %s died; this node no longer reaches that peer",
                self.identity.node_id, task.get_name(), exc_info=task.exception(),
            )  # fmt: skip

    def _stream_opened(self, stream: _PeerStream) -> bool:
        """Register a new connection; False (and aborted) when it must be refused at once."""
        if self._closing:
            stream.abort()
            return False
        if stream.link is None:
            if len(self._pending) >= HANDSHAKES_PENDING_MAX:
                self._refuse(
                    stream,
                    "handshakes_pending_full",
                    f"{len(self._pending)} inbound connections are still in their handshake "
                    f"(HANDSHAKES_PENDING_MAX={HANDSHAKES_PENDING_MAX}): a scanner or a flood",
                )
                return False
            self._pending.add(stream)
        self._streams.add(stream)
        return True

    def _authenticated(self, stream: _PeerStream) -> None:
        peer = stream.codec.peer_id
        link = stream.link
        if link is not None:
            self.counters.connects += 1
            self.counters.records_dropped += len(link.records)  # none: flushed in their pass
            link.records = []
            link.forward_stream += 1  # a new stream: the caller restarts it with its resend
            link.stream = stream
            link.connected.set()
            log.info("node %d connected to node %d", self.identity.node_id, peer)
            return
        self.counters.accepts += 1
        self._pending.discard(stream)
        previous = self._inbound.get(peer)
        if previous is not None:
            previous.abort()  # the peer redialled: its old connection is dead or half-open
        self._inbound[peer] = stream

    def _stream_closed(self, stream: _PeerStream) -> None:
        self._streams.discard(stream)
        self._pending.discard(stream)
        if stream.was_authenticated:
            self.counters.disconnects += 1
        else:
            self.counters.handshakes_failed += 1
        link = stream.link
        if link is not None:
            if link.stream is stream:
                link.stream = None
                link.connected.clear()
        elif self._inbound.get(stream.codec.peer_id) is stream:
            del self._inbound[stream.codec.peer_id]

    def _refuse(self, stream: _PeerStream, code: str, message: str) -> None:
        """Count a refused connection by `code`, log it sparingly, abort it."""
        self._refusals.connection_refused(stream.describe(), code, message)
        # abort() reports connection_lost on a later pass; free the pending slot now.
        self._pending.discard(stream)
        stream.abort()
