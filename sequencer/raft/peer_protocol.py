"""The peer protocol: authenticated frames between the nodes of a cluster, as a sans-I/O codec.

Theory of operation
-------------------

Every directed pair of nodes has its own TCP connection, opened by a three-frame
challenge-response handshake (HELLO, CHALLENGE, AUTH: `sequencer.raft.peer_handshake` describes
it and why it resists reflection, replay and offline guessing). From then on every frame carries
a sequence number and an HMAC-SHA256 under its direction's frame key, and the receiver accepts
only the next number: a replayed, dropped or reordered frame fails (`replayed_frame`), and so
does one tampered with or injected from another connection (`bad_mac`). The frames carry
integrity, not secrecy: run the peer network on a private network or under WireGuard/IPsec if the
commands are confidential.

Frames
------

    offset 0  u32 length    body bytes (the header is not counted)
    offset 4  u8  kind      FrameKind
    offset 5  u8  version   PROTOCOL_VERSION
    offset 6  u16 flags     0
    offset 8  body

Handshake bodies are fixed binary structs. A data frame's body is `u64 sequence`, a 32-byte MAC,
then a msgpack array: of the Raft core's messages (MESSAGES), of `ForwardedRecord`s (RECORDS), or
one `ForwardsRefused` (REFUSED: why the node dialled did not take the dialler's forwarded records,
its last frame before it closes; only a dialler receives one). The MAC covers the 8-byte header,
the sequence and the payload, under the direction's frame key.

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

Where it lives: `peer_wire` (kinds, layouts, bounds, refusals, what frames carry),
`peer_handshake` (identity, keys, one function per step), `backoff` (the dialler's delays); this
module holds `PeerConnection` (state, handshake sequencing, authenticated framing) and re-exports
the public names of the others, so `sequencer.raft.peer_protocol` stays the one import.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import msgspec

from sequencer.raft import peer_wire
from sequencer.raft.backoff import ReconnectBackoff
from sequencer.raft.messages import Message
from sequencer.raft.peer_handshake import (
    AUTH_BODY,
    CHALLENGE_BODY,
    CLUSTER_ID_MAX,
    HELLO_BODY,
    NODE_ID_MAX,
    NONCE_BYTES,
    SECRET_BYTES_MIN,
    ClusterIdentity,
    answer_challenge,
    answer_hello,
    check_auth,
    hello_frame,
)
from sequencer.raft.peer_wire import (
    CLOSED,
    FRAME_HEADER_BYTES,
    ITEMS_PER_FRAME_MAX,
    MAC_BYTES,
    NEED_DATA,
    PEER_FRAME_BYTES_MAX,
    PROTOCOL_VERSION,
    READ_BYTES_MAX,
    RECEIVE_BUFFER_BYTES_MAX,
    REFUSAL_CODES,
    REFUSED_REASON_CHARS_MAX,
    Authenticated,
    ForwardedRecord,
    ForwardsRefused,
    FrameKind,
    LocalPeerProtocolError,
    MessageBatch,
    PeerEvent,
    PeerProtocolError,
    RecordBatch,
    RecordsRefused,
    Sentinel,
    Side,
)

__all__ = [
    "AUTH_BODY",
    "CHALLENGE_BODY",
    "CLOSED",
    "CLUSTER_ID_MAX",
    "DATA_HEADER",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "HELLO_BODY",
    "ITEMS_PER_FRAME_MAX",
    "MAC_BYTES",
    "NEED_DATA",
    "NODE_ID_MAX",
    "NONCE_BYTES",
    "PEER_FRAME_BYTES_MAX",
    "PROTOCOL_VERSION",
    "READ_BYTES_MAX",
    "RECEIVE_BUFFER_BYTES_MAX",
    "REFUSAL_CODES",
    "REFUSED_REASON_CHARS_MAX",
    "SECRET_BYTES_MIN",
    "Authenticated",
    "ClusterIdentity",
    "ForwardedRecord",
    "ForwardsRefused",
    "FrameKind",
    "LocalPeerProtocolError",
    "MessageBatch",
    "PeerConnection",
    "PeerEvent",
    "PeerProtocolError",
    "ReconnectBackoff",
    "RecordBatch",
    "RecordsRefused",
    "Sentinel",
    "Side",
]

# Assigned, not imported, on purpose: CPython 3.11 compiles `NAME.method()` on an imported NAME
# without LOAD_METHOD (~0.2 us slower per call), and these are called once per frame.
DATA_HEADER: Final = peer_wire.DATA_HEADER
FRAME_HEADER: Final = peer_wire.FRAME_HEADER
_RECORDS_DECODER: Final = peer_wire.RECORDS_DECODER
_MESSAGES_DECODER: Final = peer_wire.MESSAGES_DECODER
_REFUSED_DECODER: Final = peer_wire.REFUSED_DECODER

# The kinds a received frame is compared with, as ints: a member of an enum class read on
# CPython 3.11 goes through the metaclass's attribute hook, ~0.2 us each (~3.4k instructions a
# frame received, of ~51k: benches.replicator_paths `follower`, benches/RESULTS.md "follrec2").
_MESSAGES: Final = int(FrameKind.MESSAGES)
_RECORDS: Final = int(FrameKind.RECORDS)
_REFUSED: Final = int(FrameKind.REFUSED)
_DIALLER: Final = Side.DIALLER

_BODY_BYTES_MAX: Final = PEER_FRAME_BYTES_MAX - FRAME_HEADER_BYTES
_DATA_BODY_BYTES_MIN: Final = DATA_HEADER.size + 1  # a payload is at least a msgpack array header
_KIND_NAMES: Final = {int(kind): kind.name for kind in FrameKind}
_HANDSHAKE_BODY_BYTES: Final[dict[int, int]] = {
    FrameKind.HELLO: HELLO_BODY.size,
    FrameKind.CHALLENGE: CHALLENGE_BODY.size,
    FrameKind.AUTH: AUTH_BODY.size,
}

_ENCODER: Final = msgspec.msgpack.Encoder()


class _FrameMac(Protocol):
    def copy(self) -> _FrameMac: ...
    def update(self, data: memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


def _python_frame_mac(key: bytes) -> _FrameMac:
    return hmac.new(key, digestmod=hashlib.sha256)


# A pre-keyed HMAC-SHA256, copied per frame. OpenSSL's own object where this Python has it (what
# `hmac.new` wraps): `hmac.HMAC`'s copy, update and digest are Python methods around it, ~1 us a
# frame on each side of every link (benches/replicator_paths.py, `frames` at one entry a batch).
try:
    from _hashlib import hmac_new as _openssl_hmac_new

    def _frame_mac(key: bytes) -> _FrameMac:
        return _openssl_hmac_new(key, digestmod="sha256")

    # An OpenSSL whose policy refuses it would fail every handshake at its first frame: find out
    # now, and take `hmac.new`'s own fallback instead.
    _frame_mac(b"probe").copy().digest()
except (ImportError, ValueError):  # pragma: no cover - a Python without OpenSSL's HMAC-SHA256
    _frame_mac: Callable[[bytes], _FrameMac] = _python_frame_mac  # type: ignore[no-redef]


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
    - `_buffer[_start:]` holds received bytes not yet consumed; `_start <= len(_buffer)`. It is
      the read itself (bytes, parsed in place) when it came while nothing was held, a bytearray
      only while a frame spans reads (`receive_data`).
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
        self._buffer: bytes | bytearray = b""
        self._start = 0
        self._outgoing = bytearray()
        self._peer_closed = False
        self._error: PeerProtocolError | None = None
        self._proof_expected = b""
        self._pending_keys = (b"", b"")
        # Pre-keyed HMAC objects, copied per frame: keying costs two SHA-256 blocks, a copy none.
        self._send_mac: _FrameMac | None = None
        self._receive_mac: _FrameMac | None = None
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
            self._outgoing += hello_frame(identity, peer_id, self._nonce)
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
        if self._error is not None:
            self._check_usable()  # raises
        if self._peer_closed:
            raise LocalPeerProtocolError(
                "receive_after_eof",
                "receive_data() after EOF; make a new PeerConnection for a new socket",
            )
        if not data:
            self._peer_closed = True
            return
        buffer = self._buffer
        held = len(buffer) - self._start
        if held + len(data) > RECEIVE_BUFFER_BYTES_MAX:
            raise LocalPeerProtocolError(
                "receive_buffer_full",
                f"receive buffer would hold {held + len(data)} bytes > "
                f"RECEIVE_BUFFER_BYTES_MAX={RECEIVE_BUFFER_BYTES_MAX}: drain next_event() until "
                f"NEED_DATA before each receive_data(), and pass at most "
                f"READ_BYTES_MAX={READ_BYTES_MAX} bytes per call",
            )
        if not held and type(data) is bytes:
            # Nothing held: the read is parsed where it is (immutable, so no caller can change it
            # under the codec), not copied into a buffer first. A read of whole frames, the usual
            # one (an AppendEntries of ~40-60 KiB in one read), is never copied; a partial frame
            # at its end is, below, once the rest of it comes.
            self._buffer = data
            self._start = 0
            return
        if isinstance(buffer, bytearray):
            del buffer[: self._start]
        else:  # a read held in place ends in part of a frame: that part, then this read
            self._buffer = buffer = bytearray(memoryview(buffer)[self._start :])
        self._start = 0
        buffer += data

    def next_event(self) -> PeerEvent | Sentinel:
        """The next event, `NEED_DATA`, or `CLOSED` once the peer's EOF is reached.

        After each call, write `data_to_send()` if it is not empty (the handshake's frames).

        Raises:
            PeerProtocolError: the peer broke the protocol or failed authentication; count
                `error.code` and close the socket.
        """
        if self._error is not None:
            self._check_usable()  # raises
        try:
            while True:
                buffer = self._buffer
                position = self._start
                available = len(buffer) - position
                if available < FRAME_HEADER_BYTES:
                    return self._need_data(available) if self._peer_closed else NEED_DATA
                length, kind, version, flags = FRAME_HEADER.unpack_from(buffer, position)
                self._check_header(length, kind, version, flags)
                body = position + FRAME_HEADER_BYTES
                frame_end = body + length
                if frame_end > len(buffer):
                    return self._need_data(available)
                self._start = frame_end
                if kind == _MESSAGES or kind == _RECORDS or kind == _REFUSED:
                    event: PeerEvent | None = self._handle_data(kind, buffer, position, body, frame_end)
                else:
                    event = self._handle_frame(kind, buffer, position, body)
                if self._start == len(buffer):
                    self._buffer = b""  # all consumed: the next read is parsed in place
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
        if kind == _RECORDS and self._side is _DIALLER:
            raise PeerProtocolError(
                "unexpected_kind",
                f"RECORDS from node {self._peer_id}, which this node dialled: a node forwards only "
                "on the connection it dialled; its sender is broken",
            )
        if kind != _MESSAGES and kind != _RECORDS:
            if kind != _REFUSED:
                raise PeerProtocolError(
                    "unexpected_kind",
                    f"{_KIND_NAMES[kind]} after the handshake completed; the peer is broken or "
                    "replaying a handshake",
                )
            if self._side is not _DIALLER:
                raise PeerProtocolError(
                    "unexpected_kind",
                    f"REFUSED from node {self._peer_id}, which dialled this node: only the node "
                    "dialled refuses forwarded records; its sender is broken",
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
        self, kind: int, buffer: bytes | bytearray, position: int, body: int
    ) -> PeerEvent | None:
        if kind == FrameKind.HELLO:  # a handshake frame (`next_event` takes data frames itself)
            self._handle_hello(buffer, body)
            return None
        if kind == FrameKind.CHALLENGE:
            return self._handle_challenge(buffer, body)
        assert kind == FrameKind.AUTH, kind
        return self._handle_auth(buffer, body)

    def _handle_hello(self, buffer: bytes | bytearray, body: int) -> None:
        answer = answer_hello(self._identity, self._nonce, buffer, body)
        self._peer_id = answer.dialler
        self._proof_expected = answer.proof_expected
        self._outgoing += answer.challenge
        # Kept until AUTH verifies; nothing is sent or received under them before.
        self._pending_keys = (answer.send_key, answer.receive_key)
        self._expected_kind = FrameKind.AUTH

    def _handle_challenge(self, buffer: bytes | bytearray, body: int) -> PeerEvent:
        answer = answer_challenge(self._identity, self._peer_id, self._nonce, buffer, body)
        self._outgoing += answer.auth
        self._become_authenticated(send_key=answer.send_key, receive_key=answer.receive_key)
        return Authenticated(self._peer_id)

    def _handle_auth(self, buffer: bytes | bytearray, body: int) -> PeerEvent:
        check_auth(self._proof_expected, self._peer_id, buffer, body)
        send_key, receive_key = self._pending_keys
        self._become_authenticated(send_key=send_key, receive_key=receive_key)
        return Authenticated(self._peer_id)

    def _become_authenticated(self, send_key: bytes, receive_key: bytes) -> None:
        self._send_mac = _frame_mac(send_key)
        self._receive_mac = _frame_mac(receive_key)
        self._expected_kind = 0
        self._proof_expected = b""
        self._pending_keys = (b"", b"")

    def _handle_data(
        self, kind: int, buffer: bytes | bytearray, position: int, body: int, frame_end: int
    ) -> PeerEvent:
        assert self._receive_mac is not None
        sequence, mac = DATA_HEADER.unpack_from(buffer, body)
        payload = body + DATA_HEADER.size
        check = self._receive_mac.copy()
        # One view for the MAC and the decode; msgspec copies every bytes field out, so nothing
        # decoded keeps the buffer exported once it is released.
        with memoryview(buffer) as view, view[payload:frame_end] as data:
            check.update(view[position : body + 8])  # header and sequence
            check.update(data)
            if not hmac.compare_digest(check.digest(), mac):
                raise PeerProtocolError(
                    "bad_mac",
                    f"a {_KIND_NAMES[kind]} frame from node {self._peer_id} fails its MAC: tampered "
                    "with on the way, or injected from another connection",
                )
            if sequence != self._sequence_in:
                raise PeerProtocolError(
                    "replayed_frame",
                    f"a genuine frame from node {self._peer_id} carries sequence {sequence}, "
                    f"expected {self._sequence_in}: a replayed or reordered frame",
                )
            self._sequence_in += 1
            try:
                if kind == _MESSAGES:
                    messages: list[Message] = _MESSAGES_DECODER.decode(data)  # type: ignore[assignment]
                    if not 0 < len(messages) <= ITEMS_PER_FRAME_MAX:
                        self._check_items(messages, kind)  # raises
                    self._check_addresses(messages)
                    return MessageBatch(messages)
                if kind == _REFUSED:
                    refusals = _REFUSED_DECODER.decode(data)
                    if len(refusals) != 1:
                        raise msgspec.DecodeError(f"{len(refusals)} refusals, not one")
                    return RecordsRefused(refusals[0].reason)
                records = _RECORDS_DECODER.decode(data)
                self._check_items(records, kind)
                return RecordBatch(records)
            except msgspec.DecodeError as error:  # ValidationError is a DecodeError
                raise PeerProtocolError(
                    "malformed_frame",
                    f"an authenticated {_KIND_NAMES[kind]} frame from node {self._peer_id} does "
                    f"not decode ({error}): run the same seqd version on every node",
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

    def send_records(self, records: Sequence[ForwardedRecord]) -> bytes:
        """The bytes of one or more RECORDS frames carrying `records`, in order (split as for
        `send_messages`)."""
        return self._send(FrameKind.RECORDS, records)

    def send_refusal(self, reason: str) -> bytes:
        """The bytes of one REFUSED frame telling the peer that dialled this node why its
        forwarded records were not taken (`reason` cut to REFUSED_REASON_CHARS_MAX characters).
        Send it, then close the connection.

        Raises:
            LocalPeerProtocolError: this side dialled (only the node dialled refuses), before the
                handshake completed, or after a failure.
        """
        if self._side is not Side.ACCEPTOR:
            raise LocalPeerProtocolError(
                "refusal_from_dialler",
                f"node {self._identity.node_id} dialled node {self._peer_id}: only the node dialled "
                "refuses forwarded records",
            )
        return self._send(FrameKind.REFUSED, [ForwardsRefused(reason[:REFUSED_REASON_CHARS_MAX])])

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
        self._buffer = b""
        self._start = 0
