"""The peer protocol codec, bytes in and out: handshake, every refusal, replay, tamper, bounds."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sequencer.raft import peer_protocol
from sequencer.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
)
from sequencer.raft.peer_protocol import (
    CHALLENGE_BODY,
    CLOSED,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    HELLO_BODY,
    ITEMS_PER_FRAME_MAX,
    NEED_DATA,
    PEER_FRAME_BYTES_MAX,
    PROTOCOL_VERSION,
    RECEIVE_BUFFER_BYTES_MAX,
    REFUSED_REASON_CHARS_MAX,
    SECRET_BYTES_MIN,
    Authenticated,
    ClusterIdentity,
    ForwardedRecord,
    ForwardsRefused,
    FrameKind,
    LocalPeerProtocolError,
    MessageBatch,
    PeerConnection,
    PeerEvent,
    PeerProtocolError,
    ReconnectBackoff,
    RecordBatch,
    RecordsRefused,
    Sentinel,
    Side,
)
from sequencer.record import RecordType, encode_record

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
CLUSTER = 7
MEMBERS = frozenset({1, 2, 3})
DATA_OFFSET = FRAME_HEADER_BYTES + 8 + 32  # header, sequence, MAC: where the payload starts


def identity(
    node: int, cluster: int = CLUSTER, secret: bytes = SECRET, members: frozenset[int] = MEMBERS
) -> ClusterIdentity:
    return ClusterIdentity(cluster_id=cluster, node_id=node, members=members, secret=secret)


_nonces = random.Random(0)


def nonce() -> bytes:
    return _nonces.randbytes(32)


def dialler(node: int = 1, peer: int = 2, **options: object) -> PeerConnection:
    return PeerConnection(identity(node, **options), Side.DIALLER, nonce(), peer)  # type: ignore[arg-type]


def acceptor(node: int = 2, **options: object) -> PeerConnection:
    return PeerConnection(identity(node, **options), Side.ACCEPTOR, nonce())  # type: ignore[arg-type]


def events(connection: PeerConnection) -> list[PeerEvent | Sentinel]:
    """Every event until NEED_DATA or CLOSED (the last item)."""
    found: list[PeerEvent | Sentinel] = []
    while True:
        event = connection.next_event()
        found.append(event)
        if isinstance(event, Sentinel):
            return found


def handshake(
    dialling: PeerConnection | None = None, accepting: PeerConnection | None = None
) -> tuple[PeerConnection, PeerConnection, list[bytes]]:
    """Run a handshake to completion; returns both ends and the dialler's frames (HELLO, AUTH)."""
    dialling = dialling or dialler()
    accepting = accepting or acceptor()
    hello = dialling.data_to_send()
    accepting.receive_data(hello)
    assert events(accepting) == [NEED_DATA]
    dialling.receive_data(accepting.data_to_send())
    assert events(dialling) == [Authenticated(accepting.identity.node_id), NEED_DATA]
    auth = dialling.data_to_send()
    accepting.receive_data(auth)
    assert events(accepting) == [Authenticated(dialling.identity.node_id), NEED_DATA]
    return dialling, accepting, [hello, auth]


def heartbeat(source: int = 1, target: int = 2, term: int = 3, commit: int = 0) -> Heartbeat:
    return Heartbeat(CLUSTER, source, target, term, commit, 0)


def refused(connection: PeerConnection, data: bytes, code: str) -> PeerProtocolError:
    """Feed `data`; the codec must refuse with `code` and deliver nothing before it."""
    connection.receive_data(data)
    with pytest.raises(PeerProtocolError) as caught:
        while True:
            event = connection.next_event()
            assert event is NEED_DATA or isinstance(event, Authenticated), event
            if event is NEED_DATA:
                connection.receive_data(b"")  # EOF: what is buffered must be judged now
    assert caught.value.code == code, caught.value
    assert connection.error is caught.value
    return caught.value


# -- the handshake --------------------------------------------------------------------------------


def test_handshake_authenticates_both_ends_and_batches_flow_both_ways() -> None:
    dialling, accepting, _ = handshake()
    assert dialling.authenticated and accepting.authenticated
    assert (dialling.peer_id, accepting.peer_id) == (2, 1)
    batch: list[Message] = [heartbeat(), RequestVote(CLUSTER, 1, 2, 4, 10, 3, False)]
    accepting.receive_data(dialling.send_messages(batch))
    assert events(accepting) == [MessageBatch(batch), NEED_DATA]
    answer: list[Message] = [HeartbeatResponse(CLUSTER, 2, 1, 3, 0)]
    dialling.receive_data(accepting.send_messages(answer))
    assert events(dialling) == [MessageBatch(answer), NEED_DATA]
    records = [ForwardedRecord(encode_record(RecordType.COMMAND, 2, 0, 0, 7, 9, 5, b"payload"))]
    accepting.receive_data(dialling.send_records(records))
    assert events(accepting) == [RecordBatch(records), NEED_DATA]
    assert (dialling.frames_sent, accepting.frames_received) == (2, 2)


def test_the_dialler_sends_no_proof_until_the_acceptor_proved_it_holds_the_secret() -> None:
    # An impostor answering at a peer's address (another secret) learns nothing it could replay.
    dialling = dialler()
    impostor = acceptor(secret=OTHER_SECRET)
    impostor.receive_data(dialling.data_to_send())
    events(impostor)
    refused(dialling, impostor.data_to_send(), "bad_proof")
    assert dialling.data_to_send() == b""


def test_an_acceptor_refuses_a_dialler_that_cannot_prove_the_secret() -> None:
    accepting = acceptor()
    hello = dialler().data_to_send()
    accepting.receive_data(hello)
    events(accepting)
    assert accepting.data_to_send()  # its CHALLENGE
    forged_auth = FRAME_HEADER.pack(32, FrameKind.AUTH, PROTOCOL_VERSION, 0) + bytes(32)
    refused(accepting, forged_auth, "bad_proof")
    assert not accepting.authenticated


def test_an_acceptor_refuses_its_own_proof_reflected_as_the_diallers() -> None:
    accepting = acceptor()
    accepting.receive_data(dialler().data_to_send())
    events(accepting)
    answer = accepting.data_to_send()
    proof_a = answer[-32:]
    refused(accepting, FRAME_HEADER.pack(32, FrameKind.AUTH, PROTOCOL_VERSION, 0) + proof_a, "bad_proof")


def test_a_replayed_handshake_fails_against_the_acceptors_fresh_nonce() -> None:
    _, _, (hello, auth) = handshake()
    fresh = acceptor()
    fresh.receive_data(hello)
    events(fresh)
    refused(fresh, auth, "bad_proof")


@pytest.mark.parametrize(
    ("dialling", "accepting", "code"),
    [
        pytest.param(dict(cluster=8), {}, "wrong_cluster", id="another-cluster"),
        pytest.param(
            dict(members=frozenset({1, 2, 3, 4}), node=4), {}, "unknown_node", id="non-member"
        ),
        pytest.param(dict(peer=3), {}, "unknown_node", id="dialled-another-node"),
    ],
)
def test_an_acceptor_refuses_a_hello_from_outside_the_cluster(
    dialling: dict[str, object], accepting: dict[str, object], code: str
) -> None:
    options = dict(dialling)
    node = options.pop("node", 1)
    peer = options.pop("peer", 2)
    hello = PeerConnection(identity(node, **options), Side.DIALLER, nonce(), peer).data_to_send()  # type: ignore[arg-type]
    connection = acceptor(**accepting)
    error = refused(connection, hello, code)
    assert connection.data_to_send() == b"", "nothing is answered to a refused HELLO"
    assert "check" in error.message


def test_an_acceptor_refuses_a_hello_claiming_to_be_itself() -> None:
    # A dialler cannot be built for that, so forge the HELLO.
    hello = FRAME_HEADER.pack(HELLO_BODY.size, FrameKind.HELLO, PROTOCOL_VERSION, 0)
    hello += HELLO_BODY.pack(CLUSTER, 2, 2, nonce())
    refused(acceptor(), hello, "unknown_node")


def challenge(cluster: int, acceptor_id: int, dialler_id: int) -> bytes:
    """A CHALLENGE as an acceptor would answer (its proof is checked after the ids)."""
    frame = FRAME_HEADER.pack(CHALLENGE_BODY.size, FrameKind.CHALLENGE, PROTOCOL_VERSION, 0)
    return frame + CHALLENGE_BODY.pack(cluster, acceptor_id, dialler_id, nonce(), bytes(32))


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        pytest.param(challenge(8, 2, 1), "wrong_cluster", id="another-cluster"),
        # Node 3 answering at node 2's address: the dialler checks whom it reached.
        pytest.param(challenge(CLUSTER, 3, 1), "unknown_node", id="another-node"),
        pytest.param(challenge(CLUSTER, 2, 3), "unknown_node", id="answers-another-dialler"),
    ],
)
def test_a_dialler_refuses_an_answer_from_outside_the_cluster(answer: bytes, code: str) -> None:
    dialling = dialler(peer=2)
    dialling.data_to_send()
    refused(dialling, answer, code)
    assert dialling.data_to_send() == b"", "no proof is sent"


# -- nothing before the handshake -------------------------------------------------------------------


def test_no_data_frame_is_accepted_before_the_handshake_completes() -> None:
    dialling, _, _ = handshake()
    frame = dialling.send_messages([heartbeat()])
    refused(acceptor(), frame, "unexpected_kind")  # before HELLO
    half = acceptor()
    half.receive_data(dialler().data_to_send())
    events(half)
    refused(half, frame, "unexpected_kind")  # after HELLO, before AUTH


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "bad_version", id="http"),
        pytest.param(FRAME_HEADER.pack(48, FrameKind.HELLO, PROTOCOL_VERSION, 1), "bad_flags", id="flags"),
        pytest.param(FRAME_HEADER.pack(48, 99, PROTOCOL_VERSION, 0), "unknown_kind", id="kind"),
        pytest.param(FRAME_HEADER.pack(48, FrameKind.HELLO, PROTOCOL_VERSION + 1, 0), "bad_version", id="version"),
        pytest.param(
            FRAME_HEADER.pack(1 << 30, FrameKind.HELLO, PROTOCOL_VERSION, 0), "malformed_frame", id="huge"
        ),
        pytest.param(FRAME_HEADER.pack(47, FrameKind.HELLO, PROTOCOL_VERSION, 0), "malformed_frame", id="short"),
        pytest.param(FRAME_HEADER.pack(48, FrameKind.HELLO, PROTOCOL_VERSION, 0)[:5], "truncated_frame", id="eof"),
    ],
)
def test_an_unauthenticated_peer_is_refused_at_the_header(garbage: bytes, code: str) -> None:
    connection = acceptor()
    refused(connection, garbage, code)
    assert connection.buffered_bytes == 0


def test_a_large_declared_frame_is_refused_before_its_body_is_buffered() -> None:
    _, accepting, _ = handshake()
    header = FRAME_HEADER.pack(
        PEER_FRAME_BYTES_MAX - FRAME_HEADER_BYTES + 1, FrameKind.MESSAGES, PROTOCOL_VERSION, 0
    )
    accepting.receive_data(header)
    with pytest.raises(PeerProtocolError) as caught:
        accepting.next_event()
    assert caught.value.code == "frame_too_large"
    assert "PEER_FRAME_BYTES_MAX" in caught.value.message


def test_a_frame_of_exactly_the_size_bound_round_trips() -> None:
    dialling, accepting, _ = handshake()
    # The msgpack around one entry's bytes: find the payload that makes the frame exactly full.
    probe, _, _ = handshake()
    overhead = len(probe.send_messages([_append_entries([b"x" * 70000])])) - 70000
    message = _append_entries([b"x" * (PEER_FRAME_BYTES_MAX - overhead)])
    data = dialling.send_messages([message])
    assert len(data) == PEER_FRAME_BYTES_MAX
    for start in range(0, len(data), 256 * 1024):
        accepting.receive_data(data[start : start + 256 * 1024])
        found = events(accepting)
    assert found == [MessageBatch([message]), NEED_DATA]


def test_receive_buffer_is_bounded_when_the_shell_does_not_drain() -> None:
    accepting = acceptor()
    accepting.receive_data(b"\0" * (RECEIVE_BUFFER_BYTES_MAX - 10))
    with pytest.raises(LocalPeerProtocolError) as caught:
        accepting.receive_data(b"\0" * 11)
    assert caught.value.code == "receive_buffer_full"


# -- authenticated frames: tamper, replay, reorder, cross-connection ------------------------------


def _append_entries(payloads: list[bytes], source: int = 1, target: int = 2) -> AppendEntries:
    return AppendEntries(CLUSTER, source, target, 5, 0, 0, 0, [5] * len(payloads), payloads)


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(4, id="kind"),  # MESSAGES <-> COMMANDS: the header is under the MAC
        pytest.param(FRAME_HEADER_BYTES, id="sequence"),
        pytest.param(FRAME_HEADER_BYTES + 8, id="mac"),
        pytest.param(DATA_OFFSET, id="payload-first"),
        pytest.param(-1, id="payload-last"),
    ],
)
def test_a_tampered_frame_fails_its_mac(offset: int) -> None:
    dialling, accepting, _ = handshake()
    frame = bytearray(dialling.send_messages([_append_entries([b"transfer 10 to bob"])]))
    frame[offset] ^= 0x01
    refused(accepting, bytes(frame), "bad_mac")


def test_a_frames_mac_is_the_hmac_sha256_an_earlier_build_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec keys OpenSSL's HMAC itself (not `hmac.new`'s wrapper, for speed): the bytes on
    the wire must stay what `hmac.new(key, digestmod=sha256)` gives over the header, the sequence
    and the payload, or a node of the previous build would refuse every frame (bad_mac)."""
    import hashlib
    import hmac

    keys: list[bytes] = []
    keyed = peer_protocol._frame_mac  # type: ignore[attr-defined]
    monkeypatch.setattr(peer_protocol, "_frame_mac", lambda key: keys.append(key) or keyed(key))
    dialling, accepting, _ = handshake()
    send_key = keys[0]  # the dialler's send key (it authenticates first, send key first)
    frame = dialling.send_messages([_append_entries([b"transfer 10 to bob", b"x" * 300])])
    expected = hmac.new(send_key, frame[: FRAME_HEADER_BYTES + 8] + frame[DATA_OFFSET:], hashlib.sha256)
    assert frame[FRAME_HEADER_BYTES + 8 : DATA_OFFSET] == expected.digest()
    accepting.receive_data(frame)
    assert type(accepting.next_event()) is MessageBatch


@settings(max_examples=200, deadline=None)
@given(bit=st.integers(min_value=0))
def test_any_single_bit_flip_delivers_nothing(bit: int) -> None:
    dialling, accepting, _ = handshake()
    frame = bytearray(dialling.send_messages([heartbeat(), _append_entries([b"abc", b"def"])]))
    bit %= len(frame) * 8
    frame[bit // 8] ^= 1 << (bit % 8)
    accepting.receive_data(bytes(frame))
    with pytest.raises(PeerProtocolError):
        while True:
            event = accepting.next_event()
            assert event is NEED_DATA, event  # never a batch
            accepting.receive_data(b"")


def test_a_replayed_frame_is_refused() -> None:
    dialling, accepting, _ = handshake()
    frame = dialling.send_messages([heartbeat()])
    accepting.receive_data(frame)
    assert events(accepting) == [MessageBatch([heartbeat()]), NEED_DATA]
    refused(accepting, frame, "replayed_frame")


def test_reordered_frames_are_refused() -> None:
    dialling, accepting, _ = handshake()
    first = dialling.send_messages([heartbeat(term=1)])
    second = dialling.send_messages([heartbeat(term=2)])
    refused(accepting, second + first, "replayed_frame")


def test_a_dropped_frame_is_noticed_at_the_next_one() -> None:
    dialling, accepting, _ = handshake()
    dialling.send_messages([heartbeat(term=1)])  # lost
    refused(accepting, dialling.send_messages([heartbeat(term=2)]), "replayed_frame")


def test_a_frame_from_another_connection_between_the_same_nodes_fails_its_mac() -> None:
    first_dialler, _, _ = handshake()
    _, second_acceptor, _ = handshake()
    # Sequence 1 on both: only the per-connection key tells them apart.
    refused(second_acceptor, first_dialler.send_messages([heartbeat()]), "bad_mac")


def test_a_frame_reflected_back_to_its_sender_fails_its_mac() -> None:
    dialling, _, _ = handshake()
    refused(dialling, dialling.send_messages([heartbeat()]), "bad_mac")


def test_a_peer_cannot_speak_for_another_node_even_with_the_secret() -> None:
    dialling, accepting, _ = handshake()
    spoofed = heartbeat(source=3)
    error = refused(accepting, dialling.send_messages([spoofed]), "malformed_frame")
    assert "from node 3" in error.message


def test_a_forwarded_record_shorter_than_a_record_header_is_refused() -> None:
    dialling, accepting, _ = handshake()
    bad = ForwardedRecord(b"x" * 47)
    refused(accepting, dialling.send_records([bad]), "malformed_frame")


def test_a_frame_with_more_items_than_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    dialling, accepting, _ = handshake()
    monkeypatch.setattr(peer_protocol, "ITEMS_PER_FRAME_MAX", ITEMS_PER_FRAME_MAX + 1)
    frame = dialling.send_messages([heartbeat()] * (ITEMS_PER_FRAME_MAX + 1))
    monkeypatch.setattr(peer_protocol, "ITEMS_PER_FRAME_MAX", ITEMS_PER_FRAME_MAX)
    refused(accepting, frame, "malformed_frame")


def test_an_authenticated_messages_frame_with_no_message_is_refused() -> None:
    # An empty MESSAGES frame, MACed as an honest sender would: its item count is out of bounds
    # (1..ITEMS_PER_FRAME_MAX; an honest sender never sends one), whatever decodes it.
    dialling, accepting, _ = handshake()
    frame = bytearray(dialling.send_messages([heartbeat()])[:DATA_OFFSET] + b"\x90")  # msgpack []
    FRAME_HEADER.pack_into(frame, 0, len(frame) - FRAME_HEADER_BYTES, FrameKind.MESSAGES, PROTOCOL_VERSION, 0)
    refused(accepting, _remac(dialling, bytes(frame)), "malformed_frame")


def test_an_authenticated_frame_that_does_not_decode_is_refused() -> None:
    dialling, accepting, _ = handshake()
    # A COMMANDS frame carrying messages, MACed as an honest sender would: only the decoder
    # can object.
    frame = bytearray(dialling.send_messages([heartbeat()]))
    frame[4] = FrameKind.RECORDS
    refused(accepting, _remac(dialling, bytes(frame)), "malformed_frame")


def _remac(sender: PeerConnection, frame: bytes) -> bytes:
    """Recompute a frame's MAC with the sender's key (a test of what lies behind the MAC)."""
    import hmac as hmac_module

    key_state = sender._send_mac  # type: ignore[attr-defined]
    assert key_state is not None
    check: hmac_module.HMAC = key_state.copy()
    check.update(frame[: FRAME_HEADER_BYTES + 8])
    check.update(frame[DATA_OFFSET:])
    return frame[: FRAME_HEADER_BYTES + 8] + check.digest() + frame[DATA_OFFSET:]


# -- the end of a connection ------------------------------------------------------------------


def test_eof_between_frames_is_a_clean_close_and_inside_one_is_truncation() -> None:
    dialling, accepting, _ = handshake()
    accepting.receive_data(dialling.send_messages([heartbeat()]))
    accepting.receive_data(b"")
    assert events(accepting) == [MessageBatch([heartbeat()]), CLOSED]
    dialling, accepting, _ = handshake()
    frame = dialling.send_messages([heartbeat()])
    refused(accepting, frame[:-1], "truncated_frame")


def test_frames_arrive_whole_however_the_bytes_are_split() -> None:
    dialling = dialler()
    accepting = acceptor()
    batch: list[Message] = [heartbeat(term=t) for t in range(1, 6)]
    received: list[PeerEvent | Sentinel] = []

    def feed(target: PeerConnection, data: bytes) -> None:
        for byte in data:
            target.receive_data(bytes([byte]))
            received.extend(e for e in events(target) if e is not NEED_DATA)

    feed(accepting, dialling.data_to_send())
    feed(dialling, accepting.data_to_send())
    feed(accepting, dialling.data_to_send())
    feed(accepting, dialling.send_messages(batch))
    assert received == [Authenticated(2), Authenticated(1), MessageBatch(batch)]


def test_a_read_the_caller_may_change_afterwards_is_copied_not_parsed_in_place() -> None:
    # A read of bytes is parsed where it is (no copy); a bytearray or memoryview belongs to the
    # caller, who may reuse it once receive_data returns: the codec must not keep it.
    batch: list[Message] = [heartbeat(term=t) for t in range(1, 6)]
    for make in (bytearray, lambda data: memoryview(bytearray(data))):
        dialling, accepting, _ = handshake()
        stream = dialling.send_messages(batch) + dialling.send_messages(batch)
        cut = len(stream) // 2 + 3  # a whole frame and part of the next
        read = make(stream[:cut])
        accepting.receive_data(read)
        received = [e for e in events(accepting) if e is not NEED_DATA]
        read[:] = bytes(len(read))  # the caller reuses its buffer for the next read
        accepting.receive_data(make(stream[cut:]))
        received += [e for e in events(accepting) if e is not NEED_DATA]
        assert received == [MessageBatch(batch), MessageBatch(batch)]


def test_a_failed_connection_refuses_every_further_use() -> None:
    _, accepting, _ = handshake()
    refused(accepting, b"\xff" * 8, "bad_version")
    with pytest.raises(LocalPeerProtocolError):
        accepting.next_event()
    with pytest.raises(LocalPeerProtocolError):
        accepting.receive_data(b"x")
    with pytest.raises(LocalPeerProtocolError):
        accepting.send_messages([heartbeat(source=2, target=1)])


def test_sending_before_the_handshake_is_a_local_error() -> None:
    with pytest.raises(LocalPeerProtocolError) as caught:
        dialler().send_messages([heartbeat()])
    assert caught.value.code == "handshake_required"


# -- batching and the size bound ------------------------------------------------------------------


def test_a_batch_over_the_frame_bound_is_split_into_frames_that_all_arrive() -> None:
    dialling, accepting, _ = handshake()
    big = [_append_entries([bytes([i]) * (1 << 20)]) for i in range(6)]  # ~6 MiB in all
    data = dialling.send_messages(big)
    assert dialling.frames_sent > 1
    received: list[Message] = []
    for start in range(0, len(data), 256 * 1024):
        accepting.receive_data(data[start : start + 256 * 1024])
        for event in events(accepting):
            if isinstance(event, MessageBatch):
                received.extend(event.messages)
    assert received == big


def test_a_batch_over_the_item_bound_is_split() -> None:
    dialling, accepting, _ = handshake()
    batch = [heartbeat(term=t) for t in range(ITEMS_PER_FRAME_MAX + 5)]
    accepting.receive_data(dialling.send_messages(batch))
    found = events(accepting)
    assert [len(e.messages) for e in found if isinstance(e, MessageBatch)] == [
        ITEMS_PER_FRAME_MAX,
        5,
    ]


def test_one_message_over_the_frame_bound_fails_its_whole_batch_and_the_connection_goes_on() -> (
    None
):
    dialling, accepting, _ = handshake()
    too_large = _append_entries([b"x" * PEER_FRAME_BYTES_MAX])
    with pytest.raises(LocalPeerProtocolError) as caught:
        # The first heartbeats fit in frames of their own before the large message is found.
        dialling.send_messages([heartbeat(term=1), heartbeat(term=2), too_large, heartbeat()])
    assert caught.value.code == "message_too_large"
    assert dialling.frames_sent == 0, "the frames built before the failure are not counted"
    accepting.receive_data(dialling.send_messages([heartbeat()]))
    assert events(accepting) == [MessageBatch([heartbeat()]), NEED_DATA]


# -- a refusal of forwarded records --------------------------------------------------------------


def test_the_node_dialled_tells_its_dialler_why_it_refused_its_forwards_in_one_authenticated_frame() -> None:
    dialling, accepting, _ = handshake()
    accepting_frame = accepting.send_refusal("node 2 does not lead (term 3, leader 1)")
    dialling.receive_data(accepting_frame)
    assert events(dialling) == [RecordsRefused("node 2 does not lead (term 3, leader 1)"), NEED_DATA]
    # A long reason is cut to the bound, and still arrives.
    dialling.receive_data(accepting.send_refusal("x" * (2 * REFUSED_REASON_CHARS_MAX)))
    assert events(dialling) == [RecordsRefused("x" * REFUSED_REASON_CHARS_MAX), NEED_DATA]


def test_only_the_node_dialled_refuses_forwards() -> None:
    dialling, accepting, _ = handshake()
    with pytest.raises(LocalPeerProtocolError) as caught:
        dialling.send_refusal("no")
    assert caught.value.code == "refusal_from_dialler"
    # A broken dialler that sends one anyway is refused by the node it dialled.
    forged = dialling._send(FrameKind.REFUSED, [ForwardsRefused("no")])
    refused(accepting, forged, "unexpected_kind")


def test_a_dialler_refuses_forwarded_records_from_the_node_it_dialled() -> None:
    """A node forwards only on the connection it dialled; records the other way are a broken
    sender's (refused like any unexpected frame, not taken and then refused as forwards)."""
    dialling, accepting, _ = handshake()
    records = [ForwardedRecord(encode_record(RecordType.COMMAND, 1, 0, 0, 7, 9, 5, b"payload"))]
    refused(dialling, accepting.send_records(records), "unexpected_kind")


# -- configuration and backoff --------------------------------------------------------------------


def test_the_identity_refuses_a_short_secret_and_a_node_outside_the_membership() -> None:
    with pytest.raises(ValueError, match="SECRET_BYTES_MIN"):
        identity(1, secret=b"hunter2")
    with pytest.raises(ValueError, match="not among the members"):
        identity(4)
    assert len(SECRET) == SECRET_BYTES_MIN
    assert SECRET.hex() not in repr(identity(1)) and "secret" not in repr(identity(1))


def test_a_dialler_cannot_be_built_for_itself_or_a_non_member() -> None:
    for peer in (1, 9):
        with pytest.raises(ValueError, match="cannot dial"):
            dialler(node=1, peer=peer)


def test_reconnect_backoff_doubles_to_its_bound_with_jitter_and_resets() -> None:
    backoff = ReconnectBackoff(20, 1000, random.Random(1))
    delays = [backoff.next_delay_ms() for _ in range(12)]
    bases = [min(20 * 2**i, 1000) for i in range(12)]
    assert all(base / 2 <= delay <= base for delay, base in zip(delays, bases, strict=True))
    assert max(delays) <= 1000
    backoff.reset()
    assert 10 <= backoff.next_delay_ms() <= 20


def test_importing_the_raft_package_loads_no_event_loop_and_no_client() -> None:
    # The simulator and the core import sequencer.raft; the peer protocol must not drag asyncio
    # or the client package (sockets) in behind it.
    code = "import sys, sequencer.raft; print(sorted({'asyncio', 'socket', 'sequencer.client'} & set(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert loaded == "[]", loaded


# -- round trip -----------------------------------------------------------------------------------

_u63 = st.integers(min_value=0, max_value=2**63 - 1)
_payloads = st.lists(st.binary(max_size=40), max_size=6)


def _entries_message(term: int, previous: int, commit: int, payloads: list[bytes]) -> Message:
    return AppendEntries(
        CLUSTER, 1, 2, term, previous, term, commit, [term] * len(payloads), payloads
    )


_messages = st.one_of(
    st.builds(lambda t, i, lt, p: RequestVote(CLUSTER, 1, 2, t, i, lt, p), _u63, _u63, _u63, st.booleans()),
    st.builds(lambda t, g, p: RequestVoteResponse(CLUSTER, 1, 2, t, g, p), _u63, st.booleans(), st.booleans()),
    st.builds(_entries_message, _u63, _u63, _u63, _payloads),
    st.builds(
        lambda t, s, i, hi, ht: AppendEntriesResponse(CLUSTER, 1, 2, t, s, i, hi, ht),
        _u63, st.booleans(), _u63, _u63, _u63,
    ),
    st.builds(lambda t, c, r: Heartbeat(CLUSTER, 1, 2, t, c, r), _u63, _u63, _u63),
    st.builds(lambda t, r: HeartbeatResponse(CLUSTER, 1, 2, t, r), _u63, _u63),
    st.builds(
        lambda t, i, d: InstallSnapshot(CLUSTER, 1, 2, t, Snapshot(i, t, d)),
        _u63, _u63, st.binary(max_size=200),
    ),
)  # fmt: skip
_commands = st.builds(ForwardedRecord, st.binary(min_size=48, max_size=200))


@settings(max_examples=150, deadline=None)
@given(
    batches=st.lists(
        st.one_of(
            st.lists(_messages, min_size=1, max_size=20),
            st.lists(_commands, min_size=1, max_size=20),
        ),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=30),
)
def test_batches_round_trip_in_order_however_the_stream_is_cut(
    batches: list[list[Message] | list[ForwardedRecord]], cuts: list[int]
) -> None:
    dialling, accepting, _ = handshake()
    stream = bytearray()
    for batch in batches:
        if isinstance(batch[0], ForwardedRecord):
            stream += dialling.send_records(batch)  # type: ignore[arg-type]
        else:
            stream += dialling.send_messages(batch)  # type: ignore[arg-type]
    received: list[list[object]] = []
    position = 0
    for cut in [*cuts, len(stream)]:
        accepting.receive_data(bytes(stream[position : position + cut]))
        position += cut
        for event in events(accepting):
            if isinstance(event, MessageBatch):
                received.append(list(event.messages))
            elif isinstance(event, RecordBatch):
                received.append(list(event.records))
        if position >= len(stream):
            break
    assert received == batches
