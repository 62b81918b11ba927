"""The peer protocol: authenticated frames between the nodes of a cluster, as a sans-I/O codec.

Theory of operation
-------------------

Every directed pair of nodes has its own TCP connection: node A dials node B to send A's messages
to B, and B dials A for its own (`docs/peer-transport.md` says why). Each connection opens with a
three-frame challenge-response handshake, and from then on every frame carries a sequence number
and an HMAC-SHA256 over the frame.

    dialler D                                              acceptor A
    HELLO      cluster_id, D, A, nonce_d           ->
               <- CHALLENGE  cluster_id, A, D, nonce_a, proof_a
    AUTH       proof_d                             ->
    MESSAGES / COMMANDS  sequence 1, 2, ... + MAC  ->      (either way; the transport's
                                                           acceptors send none)

Both ends derive one session key from the cluster secret and the whole transcript (protocol label,
cluster id, the dialler's and the acceptor's node ids, both nonces), then four keys from it, each
with its own label: the acceptor's proof, the dialler's proof, the dialler-to-acceptor frame key,
the acceptor-to-dialler frame key. So:

- a proof or a frame from one connection is worthless on another (fresh nonces from both ends
  give a fresh session key);
- a proof or frame reflected back to its sender fails (each direction and each role has its own
  label, hence its own key);
- a replayed, dropped or reordered frame fails: each direction numbers its frames 1, 2, ... and
  the receiver accepts only the next number (TCP delivers in order, so any other number is an
  attack or a bug). The sequence number is in the header and covered by the MAC, so the receiver
  can tell a replay (`replayed_frame`) from tampering (`bad_mac`);
- the dialler proves nothing until the acceptor has proved it holds the secret, so a process that
  answers a node's dial learns nothing from it; the acceptor's proof, given to anyone who dials,
  lets an eavesdropper or a dialler test guesses of the secret offline, which is why the secret
  must be random and at least `SECRET_BYTES_MIN` bytes (not a password).

Before the handshake completes the codec accepts only the next handshake frame, of its exact
size, so an unauthenticated process can make it buffer no more than one read and can never reach
a decoder: it is refused at the 8-byte header or at the proof. The frames carry integrity, not
secrecy: run the peer network on a private network or under WireGuard/IPsec if the commands are
confidential.

Frames
------

    offset 0  u32 length    body bytes (the header is not counted)
    offset 4  u8  kind      FrameKind
    offset 5  u8  version   PROTOCOL_VERSION
    offset 6  u16 flags     0
    offset 8  body

Handshake bodies are fixed binary structs. A data frame's body is `u64 sequence`, a 32-byte MAC,
then a msgpack array: of the Raft core's messages (MESSAGES) or of `ForwardedCommand`s (COMMANDS).
The MAC covers the 8-byte header, the sequence and the payload, under the direction's frame key.

`PeerConnection(identity, side, nonce, peer_id)` holds the bytes received and what is needed to
judge the next frame. It touches no socket, file, clock or event loop (the h11 shape:
`receive_data`, `next_event`, `send_*` -> bytes, `data_to_send` for the handshake's own frames);
the transport shell (`sequencer.raft.transport`) does the I/O and the tests drive it with bytes.
Every refusal raises `PeerProtocolError(code, message)`, after which the connection is unusable:
the shell counts the code and closes the socket.

Bounds
------

    frame, header included   <= PEER_FRAME_BYTES_MAX       (a longer declared frame is refused)
    receive buffer           <= RECEIVE_BUFFER_BYTES_MAX   (a partial frame + one read)
    items in one frame       <= ITEMS_PER_FRAME_MAX        (the sender splits a longer batch)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Final, Protocol, get_args

import msgspec

from sequencer.raft.messages import (
    MESSAGE_TYPES,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    RequestVote,
    RequestVoteResponse,
)

__all__ = [
    "AUTH_BODY",
    "CHALLENGE_BODY",
    "CLOSED",
    "DATA_HEADER",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "HELLO_BODY",
    "ITEMS_PER_FRAME_MAX",
    "MAC_BYTES",
    "NEED_DATA",
    "NONCE_BYTES",
    "PEER_FRAME_BYTES_MAX",
    "PROTOCOL_VERSION",
    "READ_BYTES_MAX",
    "RECEIVE_BUFFER_BYTES_MAX",
    "REFUSAL_CODES",
    "SECRET_BYTES_MIN",
    "Authenticated",
    "ClusterIdentity",
    "CommandBatch",
    "ForwardedCommand",
    "FrameKind",
    "LocalPeerProtocolError",
    "MessageBatch",
    "PeerConnection",
    "PeerEvent",
    "PeerProtocolError",
    "ReconnectBackoff",
    "Sentinel",
    "Side",
]

PROTOCOL_VERSION: Final = 1

FRAME_HEADER: Final = struct.Struct("<IBBH")  # body length, kind, version, flags
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size
# Data frame body header: the direction's frame sequence number, then the MAC.
DATA_HEADER: Final = struct.Struct("<Q32s")
MAC_BYTES: Final = 32  # HMAC-SHA256, untruncated
NONCE_BYTES: Final = 32  # 256 random bits from each end: a repeated nonce pair is never seen
# A captured handshake lets anyone test guesses of the secret offline (the acceptor's proof is a
# function of the secret and public values), so the secret must be a random 256-bit key, the
# strength of HMAC-SHA256 itself; a short or human-chosen secret would fall to a dictionary.
SECRET_BYTES_MIN: Final = 32
NODE_ID_MAX: Final = (1 << 32) - 1  # u32 on the wire
CLUSTER_ID_MAX: Final = (1 << 64) - 1  # u64 on the wire

HELLO_BODY: Final = struct.Struct("<QII32s")  # cluster_id, dialler id, acceptor id, nonce_d
CHALLENGE_BODY: Final = struct.Struct("<QII32s32s")  # cluster_id, acceptor, dialler, nonce_a, proof
AUTH_BODY: Final = struct.Struct("<32s")  # the dialler's proof
_TRANSCRIPT_IDS: Final = struct.Struct("<QII")  # cluster_id, dialler id, acceptor id
_TRANSCRIPT_LABEL: Final = b"seqd peer protocol v1"

# Largest frame, header included. One AppendEntries must carry at least one largest record (a
# client command is at most the client protocol's FRAME_BYTES_MAX = 1 MiB, plus its 48-byte record
# header and msgpack framing), with room to batch: 4 MiB holds four of them, and thousands of
# ordinary records (asserted in `sequencer.raft.transport`, so this module need not import the
# client package). Larger would stall the loop: the whole frame is MACed before any of it is
# used, at ~1.4 GB/s for SHA-256 here (2.9 ms for 4 MiB), which stays below a 10 ms heartbeat.
# Memory: a receiver holds at most one partial frame + one read per inbound peer (4 peers of a
# 5-node cluster: ~17 MiB). The replicator must keep AppendEntries and snapshot chunks under it.
PEER_FRAME_BYTES_MAX: Final = 4 << 20
_BODY_BYTES_MAX: Final = PEER_FRAME_BYTES_MAX - FRAME_HEADER_BYTES
_DATA_BODY_BYTES_MIN: Final = DATA_HEADER.size + 1  # a payload is at least a msgpack array header
# Bytes a shell passes to receive_data per call: asyncio's stream read size (uvloop reads 256000).
READ_BYTES_MAX: Final = 256 * 1024
# At most one incomplete frame plus one read, when the shell drains next_event() until NEED_DATA
# before each receive_data(). Anything more is a shell bug, not a peer's.
RECEIVE_BUFFER_BYTES_MAX: Final = PEER_FRAME_BYTES_MAX + READ_BYTES_MAX
# Messages or commands in one frame. msgspec decodes ~1-2 M small structs/s, so 4096 keeps one
# frame's decode and the callback's list to a few milliseconds; the core sends far fewer per loop
# pass (one AppendEntries per follower carries up to 1024 entries as two lists, one message).
ITEMS_PER_FRAME_MAX: Final = 4096

assert FRAME_HEADER_BYTES == 8, FRAME_HEADER_BYTES
assert DATA_HEADER.size == 8 + MAC_BYTES, DATA_HEADER.size
assert HELLO_BODY.size == 48, HELLO_BODY.size
assert CHALLENGE_BODY.size == 80, CHALLENGE_BODY.size
assert AUTH_BODY.size == MAC_BYTES, AUTH_BODY.size
assert RECEIVE_BUFFER_BYTES_MAX >= PEER_FRAME_BYTES_MAX + READ_BYTES_MAX
assert ITEMS_PER_FRAME_MAX >= 1


class FrameKind(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    MESSAGES = 4
    COMMANDS = 5


_KIND_NAMES: Final = {int(kind): kind.name for kind in FrameKind}
_HANDSHAKE_BODY_BYTES: Final[dict[int, int]] = {
    FrameKind.HELLO: HELLO_BODY.size,
    FrameKind.CHALLENGE: CHALLENGE_BODY.size,
    FrameKind.AUTH: AUTH_BODY.size,
}


class Side(enum.Enum):
    DIALLER = "dialler"
    ACCEPTOR = "acceptor"


class Sentinel(enum.Enum):
    """What `next_event` returns when it has no event: wait for bytes, or the peer has gone."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED

# Every code PeerProtocolError carries, so a counter set can be laid out before any is seen.
REFUSAL_CODES: Final = (
    "bad_version",  # the peer speaks another protocol version
    "bad_flags",  # non-zero reserved flags
    "unknown_kind",  # not a FrameKind: garbage, or not a seqd peer
    "unexpected_kind",  # a frame this side may not receive now (data before the handshake, ...)
    "frame_too_large",  # a declared length over the bound, refused before buffering the body
    "malformed_frame",  # wrong handshake size, undecodable payload, a message not for this link
    "truncated_frame",  # EOF in the middle of a frame
    "wrong_cluster",  # the peer belongs to another cluster id
    "unknown_node",  # the peer's node id is not in the membership, or not the one dialled
    "bad_proof",  # the handshake proof does not verify: another secret, or a replayed handshake
    "bad_mac",  # a data frame's MAC does not verify: tampered, or from another connection
    "replayed_frame",  # a genuine frame of this connection, out of sequence: replayed or reordered
)


class PeerProtocolError(Exception):
    """The peer broke the protocol or failed authentication: count `code`, close the socket.

    `code` is one of `REFUSAL_CODES`; `message` says what was wrong and what to do.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalPeerProtocolError(PeerProtocolError):
    """Our own side tried something the protocol forbids: a bug in the caller, not the peer."""


# -- what travels --------------------------------------------------------------------------------

# msgpack integers stop at 2**64-1 by format, so `ge=0` makes a u64 (msgspec takes no bound
# beyond int64 in a constraint).
_U64 = Annotated[int, msgspec.Meta(ge=0)]
_U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]


class ForwardedCommand(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A client command a follower forwards to the leader, to be sequenced with its session's id.

    The transport carries it opaquely; the replication role fills and reads it. `payload` is the
    client's command bytes, never decoded on the way. gc=False is safe: ints and bytes only.
    """

    session_id: _U64
    client_id: _U64
    request_id: _U64
    acked_request_id: _U64
    version: _U16
    payload: bytes


# The union of the core's messages, as a list: one decode call per frame. Checked at import against
# `MESSAGE_TYPES`, so a message type added to the core cannot be forgotten here.
_MESSAGES_DECODER: Final = msgspec.msgpack.Decoder(
    list[
        RequestVote
        | RequestVoteResponse
        | AppendEntries
        | AppendEntriesResponse
        | Heartbeat
        | HeartbeatResponse
        | InstallSnapshot
    ]
)
assert set(get_args(get_args(_MESSAGES_DECODER.type)[0])) == set(MESSAGE_TYPES), (
    "the peer protocol's message union must name exactly sequencer.raft.messages.MESSAGE_TYPES"
)
_COMMANDS_DECODER: Final = msgspec.msgpack.Decoder(list[ForwardedCommand])
_ENCODER: Final = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The handshake is done: `peer_id` proved it holds the cluster secret; data may flow."""

    peer_id: int


@dataclass(frozen=True, slots=True)
class MessageBatch:
    """Raft messages from the peer, in the order sent; each is addressed from it, to us."""

    messages: list[Message]


@dataclass(frozen=True, slots=True)
class CommandBatch:
    """Forwarded client commands from the peer, in the order sent."""

    commands: list[ForwardedCommand]


PeerEvent = Authenticated | MessageBatch | CommandBatch


@dataclass(frozen=True, slots=True)
class ClusterIdentity:
    """Who this node is, who may talk to it, and the secret they share. Validated on creation.

    Raises:
        ValueError: an id out of range, this node not a member, or a secret too short.
    """

    cluster_id: int
    node_id: int
    members: frozenset[int]
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.cluster_id <= CLUSTER_ID_MAX:
            raise ValueError(f"cluster id {self.cluster_id} is outside 0..2**64-1")
        bad = sorted(m for m in self.members if not 0 < m <= NODE_ID_MAX)
        if bad:
            raise ValueError(f"node ids {bad} are outside 1..2**32-1: use small positive ids")
        if self.node_id not in self.members:
            raise ValueError(
                f"node {self.node_id} is not among the members {sorted(self.members)}: "
                "list every node of the cluster, this one included"
            )
        if len(self.secret) < SECRET_BYTES_MIN:
            raise ValueError(
                f"the cluster secret is {len(self.secret)} bytes < SECRET_BYTES_MIN="
                f"{SECRET_BYTES_MIN}: generate a random one (python -c 'import secrets; "
                "print(secrets.token_hex(32))') and give every node the same"
            )


def _session_keys(
    identity: ClusterIdentity, dialler: int, acceptor: int, nonce_d: bytes, nonce_a: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """(acceptor proof, dialler proof, dialler->acceptor frame key, acceptor->dialler frame key).

    The session key binds the protocol, the cluster, both node ids in their roles (so the
    direction of the connection) and both nonces; each derived value has a label of its own.
    """
    transcript = (
        _TRANSCRIPT_LABEL
        + _TRANSCRIPT_IDS.pack(identity.cluster_id, dialler, acceptor)
        + nonce_d
        + nonce_a
    )
    session_key = hmac.digest(identity.secret, transcript, "sha256")
    return (
        hmac.digest(session_key, b"acceptor proof", "sha256"),
        hmac.digest(session_key, b"dialler proof", "sha256"),
        hmac.digest(session_key, b"frames dialler to acceptor", "sha256"),
        hmac.digest(session_key, b"frames acceptor to dialler", "sha256"),
    )


class PeerConnection:
    """One end of one peer connection: bytes in, events out; batches in, bytes out.

    Args:
        identity: this node's cluster id, node id, the membership and the secret.
        side: DIALLER (it opened the connection, and must name `peer_id`) or ACCEPTOR (it learns
            the peer's id from its HELLO).
        nonce: NONCE_BYTES fresh random bytes (`secrets.token_bytes`); passed in so the codec
            reads no random source and tests are reproducible.
        peer_id: the node dialled (DIALLER only).

    Invariants:
    - `_buffer[_start:]` holds received bytes not yet consumed; `_start <= len(_buffer)`.
    - `_expected_kind` is the handshake frame awaited next, 0 once the handshake is done.
    - `_send_mac`/`_receive_mac` (keyed with the two directions' frame keys) are set exactly when
      the handshake is done and no error has occurred (`authenticated`).
    - `_sequence_out` is the number of the next frame we send, `_sequence_in` the number the
      next frame received must carry; both start at 1 and only grow.
    - once `_error` is set, every call raises.
    """

    __slots__ = (
        "_buffer",
        "_error",
        "_expected_kind",
        "_identity",
        "_nonce",
        "_outgoing",
        "_peer_closed",
        "_peer_id",
        "_pending_keys",
        "_proof_expected",
        "_receive_mac",
        "_send_mac",
        "_sequence_in",
        "_sequence_out",
        "_side",
        "_start",
    )

    def __init__(
        self, identity: ClusterIdentity, side: Side, nonce: bytes, peer_id: int = 0
    ) -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce is {len(nonce)} bytes; give NONCE_BYTES={NONCE_BYTES}")
        self._identity = identity
        self._side = side
        self._nonce = bytes(nonce)
        self._buffer = bytearray()
        self._start = 0
        self._outgoing = bytearray()
        self._peer_closed = False
        self._error: PeerProtocolError | None = None
        self._proof_expected = b""
        self._pending_keys = (b"", b"")
        # Pre-keyed HMAC objects, copied per frame: keying costs two SHA-256 blocks, a copy none.
        self._send_mac: hmac.HMAC | None = None
        self._receive_mac: hmac.HMAC | None = None
        self._sequence_out = 1
        self._sequence_in = 1
        if side is Side.DIALLER:
            if peer_id not in identity.members or peer_id == identity.node_id:
                raise ValueError(
                    f"node {identity.node_id} cannot dial node {peer_id}: not another member of "
                    f"{sorted(identity.members)}"
                )
            self._peer_id = peer_id
            self._expected_kind: int = FrameKind.CHALLENGE
            self._outgoing += FRAME_HEADER.pack(
                HELLO_BODY.size, FrameKind.HELLO, PROTOCOL_VERSION, 0
            )
            self._outgoing += HELLO_BODY.pack(
                identity.cluster_id, identity.node_id, peer_id, self._nonce
            )
        else:
            assert peer_id == 0, "an acceptor learns the peer's id from its HELLO"
            self._peer_id = 0
            self._expected_kind = FrameKind.HELLO

    # -- state ----------------------------------------------------------------------------------

    @property
    def identity(self) -> ClusterIdentity:
        return self._identity

    @property
    def side(self) -> Side:
        return self._side

    @property
    def peer_id(self) -> int:
        """The peer's node id: the one dialled, or (acceptor) the one its HELLO named; else 0."""
        return self._peer_id

    @property
    def authenticated(self) -> bool:
        return self._send_mac is not None

    @property
    def peer_closed(self) -> bool:
        return self._peer_closed

    @property
    def error(self) -> PeerProtocolError | None:
        return self._error

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._start

    @property
    def frames_sent(self) -> int:
        """Data frames produced so far (the sequence number of the last one)."""
        return self._sequence_out - 1

    @property
    def frames_received(self) -> int:
        """Data frames accepted so far."""
        return self._sequence_in - 1

    def data_to_send(self) -> bytes:
        """Handshake bytes the codec produced (the dialler's HELLO at once, then the answers to
        what `next_event` consumed): write them to the socket. Empty when there are none."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -- receiving ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the socket; empty bytes mean the peer closed its end (EOF).

        Raises:
            LocalPeerProtocolError: the connection failed earlier, EOF was already passed, or the
                shell broke the buffering rule (see RECEIVE_BUFFER_BYTES_MAX).
        """
        self._check_usable()
        if self._peer_closed:
            raise LocalPeerProtocolError(
                "receive_after_eof",
                "receive_data() after EOF; make a new PeerConnection for a new socket",
            )
        if not data:
            self._peer_closed = True
            return
        buffer = self._buffer
        if self._start:
            del buffer[: self._start]
            self._start = 0
        if len(buffer) + len(data) > RECEIVE_BUFFER_BYTES_MAX:
            raise LocalPeerProtocolError(
                "receive_buffer_full",
                f"receive buffer would hold {len(buffer) + len(data)} bytes > "
                f"RECEIVE_BUFFER_BYTES_MAX={RECEIVE_BUFFER_BYTES_MAX}: drain next_event() until "
                f"NEED_DATA before each receive_data(), and pass at most "
                f"READ_BYTES_MAX={READ_BYTES_MAX} bytes per call",
            )
        buffer += data

    def next_event(self) -> PeerEvent | Sentinel:
        """The next event, `NEED_DATA`, or `CLOSED` once the peer's EOF is reached.

        After each call, write `data_to_send()` if it is not empty (the handshake's frames).

        Raises:
            PeerProtocolError: the peer broke the protocol or failed authentication; count
                `error.code` and close the socket.
        """
        self._check_usable()
        try:
            while True:
                buffer = self._buffer
                position = self._start
                available = len(buffer) - position
                if available < FRAME_HEADER_BYTES:
                    return self._need_data(available)
                length, kind, version, flags = FRAME_HEADER.unpack_from(buffer, position)
                self._check_header(length, kind, version, flags)
                body = position + FRAME_HEADER_BYTES
                frame_end = body + length
                if frame_end > len(buffer):
                    return self._need_data(available)
                self._start = frame_end
                event = self._handle_frame(kind, buffer, position, body, frame_end)
                if self._start == len(buffer):
                    buffer.clear()
                    self._start = 0
                if event is not None:
                    return event
        except PeerProtocolError as error:
            self._fail(error)
            raise

    def _need_data(self, available: int) -> Sentinel:
        if not self._peer_closed:
            return NEED_DATA
        if available:
            raise PeerProtocolError(
                "truncated_frame",
                f"node {self._peer_id or '?'} closed the connection in the middle of a frame "
                f"({available} bytes of it received); it crashed or is not a seqd peer",
            )
        return CLOSED

    def _check_header(self, length: int, kind: int, version: int, flags: int) -> None:
        """Refuse a bad header as soon as it is in, before buffering any of the body."""
        if version != PROTOCOL_VERSION:
            raise PeerProtocolError(
                "bad_version",
                f"frame has version {version}; this node speaks peer protocol version "
                f"{PROTOCOL_VERSION}: run the same seqd version on every node",
            )
        if flags:
            raise PeerProtocolError(
                "bad_flags",
                f"frame has flags={flags:#06x}; version 1 defines none: the peer is not a seqd "
                "peer, or sent garbage",
            )
        if kind not in _KIND_NAMES:
            raise PeerProtocolError(
                "unknown_kind",
                f"frame kind {kind} is not one of {sorted(_KIND_NAMES)}: the peer is not a seqd "
                "peer, or sent garbage",
            )
        if self._expected_kind:
            # Handshake: only the next handshake frame, of its exact size.
            if kind != self._expected_kind:
                raise PeerProtocolError(
                    "unexpected_kind",
                    f"a {self._side.value} expects {_KIND_NAMES[self._expected_kind]} here, got "
                    f"{_KIND_NAMES[kind]}: no data is accepted before the handshake completes",
                )
            if length != _HANDSHAKE_BODY_BYTES[kind]:
                raise PeerProtocolError(
                    "malformed_frame",
                    f"{_KIND_NAMES[kind]} body declares {length} bytes, not its "
                    f"{_HANDSHAKE_BODY_BYTES[kind]}: the peer is not a seqd peer of this version",
                )
            return
        if kind != FrameKind.MESSAGES and kind != FrameKind.COMMANDS:
            raise PeerProtocolError(
                "unexpected_kind",
                f"{_KIND_NAMES[kind]} after the handshake completed; the peer is broken or "
                "replaying a handshake",
            )
        if length > _BODY_BYTES_MAX:
            raise PeerProtocolError(
                "frame_too_large",
                f"frame declares {length + FRAME_HEADER_BYTES} bytes > PEER_FRAME_BYTES_MAX="
                f"{PEER_FRAME_BYTES_MAX}: the sender must split its batch (every node must run "
                "the same seqd version)",
            )
        if length < _DATA_BODY_BYTES_MIN:
            raise PeerProtocolError(
                "malformed_frame",
                f"{_KIND_NAMES[kind]} body is {length} bytes, shorter than its sequence, MAC and "
                "payload: the peer is not a seqd peer, or sent garbage",
            )

    def _handle_frame(
        self, kind: int, buffer: bytearray, position: int, body: int, frame_end: int
    ) -> PeerEvent | None:
        if kind == FrameKind.MESSAGES or kind == FrameKind.COMMANDS:
            return self._handle_data(kind, buffer, position, body, frame_end)
        if kind == FrameKind.HELLO:
            self._handle_hello(buffer, body)
            return None
        if kind == FrameKind.CHALLENGE:
            return self._handle_challenge(buffer, body)
        assert kind == FrameKind.AUTH, kind
        return self._handle_auth(buffer, body)

    def _check_cluster(self, cluster_id: int, peer_name: str) -> None:
        if cluster_id != self._identity.cluster_id:
            raise PeerProtocolError(
                "wrong_cluster",
                f"{peer_name} belongs to cluster {cluster_id}, this node {self._identity.node_id}"
                f" to cluster {self._identity.cluster_id}: check [cluster] id in both configs and "
                "the peer addresses",
            )

    def _handle_hello(self, buffer: bytearray, body: int) -> None:
        identity = self._identity
        cluster_id, dialler, acceptor, nonce_d = HELLO_BODY.unpack_from(buffer, body)
        self._check_cluster(cluster_id, f"a node calling itself {dialler}")
        if dialler not in identity.members or dialler == identity.node_id:
            raise PeerProtocolError(
                "unknown_node",
                f"node {dialler} dialled, but the members of cluster {identity.cluster_id} other "
                f"than this node {identity.node_id} are "
                f"{sorted(identity.members - {identity.node_id})}: check the dialler's node id "
                "and the membership in both configs",
            )
        if acceptor != identity.node_id:
            raise PeerProtocolError(
                "unknown_node",
                f"node {dialler} dialled node {acceptor}, but this is node {identity.node_id}: "
                f"check the peer addresses in node {dialler}'s config",
            )
        self._peer_id = dialler
        proof_a, proof_d, key_d2a, key_a2d = _session_keys(
            identity, dialler, identity.node_id, nonce_d, self._nonce
        )
        self._proof_expected = proof_d
        self._outgoing += FRAME_HEADER.pack(
            CHALLENGE_BODY.size, FrameKind.CHALLENGE, PROTOCOL_VERSION, 0
        )
        self._outgoing += CHALLENGE_BODY.pack(
            identity.cluster_id, identity.node_id, dialler, self._nonce, proof_a
        )
        # Kept until AUTH verifies; nothing is sent or received under them before.
        self._pending_keys = (key_a2d, key_d2a)
        self._expected_kind = FrameKind.AUTH

    def _handle_challenge(self, buffer: bytearray, body: int) -> PeerEvent:
        identity = self._identity
        cluster_id, acceptor, dialler, nonce_a, proof_a = CHALLENGE_BODY.unpack_from(buffer, body)
        self._check_cluster(cluster_id, f"the node answering at node {self._peer_id}'s address")
        if acceptor != self._peer_id:
            raise PeerProtocolError(
                "unknown_node",
                f"node {acceptor} answered at the address configured for node {self._peer_id}: "
                "check the peer addresses in this node's config",
            )
        if dialler != identity.node_id:
            raise PeerProtocolError(
                "unknown_node",
                f"node {acceptor} answered a dial from node {dialler}, but this is node "
                f"{identity.node_id}: the peer is broken or replaying another handshake",
            )
        expected_a, proof_d, key_d2a, key_a2d = _session_keys(
            identity, identity.node_id, acceptor, self._nonce, nonce_a
        )
        if not hmac.compare_digest(proof_a, expected_a):
            raise PeerProtocolError(
                "bad_proof",
                f"node {acceptor}'s handshake proof does not verify: it holds another cluster "
                "secret (give every node the same), or something else answers at its address",
            )
        self._outgoing += FRAME_HEADER.pack(AUTH_BODY.size, FrameKind.AUTH, PROTOCOL_VERSION, 0)
        self._outgoing += AUTH_BODY.pack(proof_d)
        self._become_authenticated(send_key=key_d2a, receive_key=key_a2d)
        return Authenticated(self._peer_id)

    def _handle_auth(self, buffer: bytearray, body: int) -> PeerEvent:
        (proof_d,) = AUTH_BODY.unpack_from(buffer, body)
        if not hmac.compare_digest(proof_d, self._proof_expected):
            raise PeerProtocolError(
                "bad_proof",
                f"the dialler calling itself node {self._peer_id} failed the handshake proof: it "
                "holds another cluster secret (give every node the same), or it replays a "
                "captured handshake",
            )
        send_key, receive_key = self._pending_keys
        self._become_authenticated(send_key=send_key, receive_key=receive_key)
        return Authenticated(self._peer_id)

    def _become_authenticated(self, send_key: bytes, receive_key: bytes) -> None:
        self._send_mac = hmac.new(send_key, digestmod=hashlib.sha256)
        self._receive_mac = hmac.new(receive_key, digestmod=hashlib.sha256)
        self._expected_kind = 0
        self._proof_expected = b""
        self._pending_keys = (b"", b"")

    def _handle_data(
        self, kind: int, buffer: bytearray, position: int, body: int, frame_end: int
    ) -> PeerEvent:
        assert self._receive_mac is not None
        sequence, mac = DATA_HEADER.unpack_from(buffer, body)
        payload = body + DATA_HEADER.size
        check = self._receive_mac.copy()
        with memoryview(buffer) as view:
            check.update(view[position : body + 8])  # header and sequence
            check.update(view[payload:frame_end])
        if not hmac.compare_digest(check.digest(), mac):
            raise PeerProtocolError(
                "bad_mac",
                f"a {_KIND_NAMES[kind]} frame from node {self._peer_id} fails its MAC: tampered "
                "with on the way, or injected from another connection",
            )
        if sequence != self._sequence_in:
            raise PeerProtocolError(
                "replayed_frame",
                f"a genuine frame from node {self._peer_id} carries sequence {sequence}, expected "
                f"{self._sequence_in}: a replayed or reordered frame",
            )
        self._sequence_in += 1
        try:
            # msgspec copies every bytes field out, so nothing decoded keeps the buffer exported.
            with memoryview(buffer) as view:
                if kind == FrameKind.MESSAGES:
                    messages: list[Message] = _MESSAGES_DECODER.decode(view[payload:frame_end])  # type: ignore[assignment]
                    self._check_items(messages, kind)
                    self._check_addresses(messages)
                    return MessageBatch(messages)
                commands = _COMMANDS_DECODER.decode(view[payload:frame_end])
                self._check_items(commands, kind)
                return CommandBatch(commands)
        except msgspec.DecodeError as error:  # ValidationError is a DecodeError
            raise PeerProtocolError(
                "malformed_frame",
                f"an authenticated {_KIND_NAMES[kind]} frame from node {self._peer_id} does not "
                f"decode ({error}): run the same seqd version on every node",
            ) from None

    def _check_items(self, items: Sequence[object], kind: int) -> None:
        if not 0 < len(items) <= ITEMS_PER_FRAME_MAX:
            raise PeerProtocolError(
                "malformed_frame",
                f"a {_KIND_NAMES[kind]} frame from node {self._peer_id} holds {len(items)} items,"
                f" outside 1..ITEMS_PER_FRAME_MAX={ITEMS_PER_FRAME_MAX}: its sender is broken",
            )

    def _check_addresses(self, messages: list[Message]) -> None:
        """Every message must be from the authenticated peer, to us, in our cluster: a node may
        not speak for another, even with the secret (the core checks membership again)."""
        identity = self._identity
        peer = self._peer_id
        for message in messages:
            if (
                message.source != peer
                or message.target != identity.node_id
                or message.cluster_id != identity.cluster_id
            ):
                raise PeerProtocolError(
                    "malformed_frame",
                    f"node {peer} sent a {type(message).__name__} addressed from node "
                    f"{message.source} to node {message.target} of cluster {message.cluster_id};"
                    f" on this link only {peer} -> {identity.node_id} of cluster "
                    f"{identity.cluster_id} is allowed: its sender is broken",
                )

    # -- sending --------------------------------------------------------------------------------

    def send_messages(self, messages: Sequence[Message]) -> bytes:
        """The bytes of one or more MESSAGES frames carrying `messages`, in order.

        A batch longer than ITEMS_PER_FRAME_MAX items or PEER_FRAME_BYTES_MAX bytes is split.

        Raises:
            LocalPeerProtocolError: before the handshake completed, after a failure, or one
                message alone is too large for a frame (the sender must keep messages smaller).
                Nothing of the batch is produced then, and the connection stays usable.
        """
        return self._send(FrameKind.MESSAGES, messages)

    def send_commands(self, commands: Sequence[ForwardedCommand]) -> bytes:
        """The bytes of one or more COMMANDS frames carrying `commands`, in order (split as for
        `send_messages`)."""
        return self._send(FrameKind.COMMANDS, commands)

    def _send(self, kind: int, items: Sequence[object]) -> bytes:
        self._check_usable()
        if self._send_mac is None:
            raise LocalPeerProtocolError(
                "handshake_required",
                f"{_KIND_NAMES[kind]} before the handshake completed: wait for Authenticated",
            )
        out = bytearray()
        sequence_before = self._sequence_out
        try:
            for start in range(0, len(items), ITEMS_PER_FRAME_MAX):
                self._append_frames(out, kind, items[start : start + ITEMS_PER_FRAME_MAX])
        except LocalPeerProtocolError:
            # All or nothing: the frames already built are discarded, so their sequence numbers
            # must be reused, or the peer would refuse the next frame as out of sequence.
            self._sequence_out = sequence_before
            raise
        return bytes(out)

    def _append_frames(self, out: bytearray, kind: int, items: Sequence[object]) -> None:
        """Append `items` as one frame, or halve the batch until each half fits."""
        assert self._send_mac is not None
        if not items:
            return
        start = len(out)
        payload = start + FRAME_HEADER_BYTES + DATA_HEADER.size
        _ENCODER.encode_into(items, out, payload)
        length = len(out) - start - FRAME_HEADER_BYTES
        if length > _BODY_BYTES_MAX:
            del out[start:]
            if len(items) == 1:
                raise LocalPeerProtocolError(
                    "message_too_large",
                    f"one {type(items[0]).__name__} encodes to more than PEER_FRAME_BYTES_MAX="
                    f"{PEER_FRAME_BYTES_MAX} bytes: keep entries per message and snapshot chunks "
                    "under that bound",
                )
            half = len(items) // 2
            self._append_frames(out, kind, items[:half])
            self._append_frames(out, kind, items[half:])
            return
        FRAME_HEADER.pack_into(out, start, length, kind, PROTOCOL_VERSION, 0)
        sequence = self._sequence_out
        struct.pack_into("<Q", out, start + FRAME_HEADER_BYTES, sequence)
        mac = self._send_mac.copy()
        with memoryview(out) as view:
            mac.update(view[start : start + FRAME_HEADER_BYTES + 8])
            mac.update(view[payload:])
            view[start + FRAME_HEADER_BYTES + 8 : payload] = mac.digest()
        self._sequence_out = sequence + 1

    # -- failure --------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise LocalPeerProtocolError(
                "connection_failed",
                f"this peer connection failed earlier ({self._error}); close the socket",
            )

    def _fail(self, error: PeerProtocolError) -> None:
        self._error = error
        self._send_mac = None
        self._receive_mac = None
        self._buffer.clear()
        self._start = 0


class _Uniform(Protocol):
    """What ReconnectBackoff needs of a random source (random.Random has it)."""

    def uniform(self, a: float, b: float) -> float: ...


class ReconnectBackoff:
    """Delays between a dialler's attempts: doubling from `first_ms` to `max_ms`, with jitter.

    Each delay is drawn from [base/2, base] ("equal jitter"), so nodes that lost a peer at the same
    moment do not redial in lockstep, and never waits less than half the base. `reset()` after a
    connection authenticates. The random source is passed in (a seeded one in tests).
    """

    __slots__ = ("_base_ms", "_first_ms", "_max_ms", "_random")

    def __init__(self, first_ms: float, max_ms: float, random_source: _Uniform) -> None:
        if not 0 < first_ms <= max_ms:
            raise ValueError(f"need 0 < first_ms={first_ms} <= max_ms={max_ms}")
        self._first_ms = first_ms
        self._max_ms = max_ms
        self._base_ms = first_ms
        self._random = random_source

    def next_delay_ms(self) -> float:
        base = self._base_ms
        self._base_ms = min(base * 2, self._max_ms)
        delay = self._random.uniform(base / 2, base)
        assert delay <= self._max_ms, (delay, self._max_ms)
        return delay

    def reset(self) -> None:
        self._base_ms = self._first_ms
