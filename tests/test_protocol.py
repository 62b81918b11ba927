"""The client protocol codec (sequencer.client.protocol): framing, gateway validation, fuzzing."""

from __future__ import annotations

import itertools
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sequencer import egress
from sequencer.client.protocol import (
    CLOSED,
    COMMAND_BYTES_MAX,
    FRAME_BODY_BYTES_MAX,
    FRAME_BYTES_MAX,
    FRAME_HEADER,
    FRAMES_PER_CALL_MAX,
    IN_FLIGHT_MAX,
    NEED_DATA,
    READ_BYTES_MAX,
    RECEIVE_BUFFER_BYTES_MAX,
    Command,
    Connection,
    Error,
    ErrorCode,
    Event,
    Frame,
    FrameKind,
    Hello,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    Redirect,
    Reply,
    ReplyStatus,
    Sentinel,
    Side,
    Welcome,
    decode_rejection,
    encode_rejection,
)

WELCOME = Welcome(session_id=3, node="n1", frame_bytes_max=FRAME_BYTES_MAX, leader="n1")


def open_pair() -> tuple[Connection, Connection]:
    """A client and a server connection past the handshake."""
    client, server = Connection(Side.CLIENT), Connection(Side.SERVER)
    server.receive_data(client.send(Hello(client_id=1)))
    assert isinstance(server.next_frame(), Hello)
    client.receive_data(server.send(WELCOME))
    assert client.next_frame() == WELCOME
    return client, server


def header(length: int, kind: int, version: int = 1, flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(length, kind, version, flags)


def refusal(connection: Connection, data: bytes) -> ProtocolError:
    connection.receive_data(data)
    with pytest.raises(ProtocolError) as caught:
        while connection.next_frame() is not NEED_DATA:
            pass
    return caught.value


# -- framing ---------------------------------------------------------------------------------------


def test_every_frame_kind_round_trips_in_its_direction() -> None:
    client, server = open_pair()
    to_server: list[Frame] = [
        Command(1, 0, 2, b"payload"),
        Command(2**64 - 1, 2**64 - 2, 65535, b""),
        Ping(nonce=5),
        Pong(nonce=6),
        Error(code="bye", message="closing", fatal=False),
    ]
    to_client: list[Frame] = [
        Reply(1, 10, ReplyStatus.OK, 3, b"ok"),
        Reply(2, 11, ReplyStatus.REJECTED, 1, encode_rejection("no", "because")),
        Reply(3, 0, ReplyStatus.DUPLICATE, 0, b""),
        Event(12, 4, b"event"),
        Redirect(leader="n2", socket_path="/run/seqd/n2.sock"),
        Ping(nonce=1),
        Pong(nonce=2),
        Error(code="slow", message="warning", fatal=False),
    ]
    server.receive_data(b"".join(client.send(frame) for frame in to_server))
    assert server.next_frames() == to_server
    client.receive_data(b"".join(server.send(frame) for frame in to_client))
    assert client.next_frames() == to_client
    assert server.next_frame() is NEED_DATA


def test_hot_frames_have_the_documented_byte_layout() -> None:
    client, server = open_pair()
    command = client.send(Command(7, 6, 2, b"xy"))
    assert command == struct.pack("<IBBHQQH6x", 26, 3, 1, 0, 7, 6, 2) + b"xy"
    reply = server.send(Reply(7, 99, ReplyStatus.REJECTED, 2, b"z"))
    assert reply == struct.pack("<IBBHQQBxH4x", 25, 4, 1, 0, 7, 99, 1, 2) + b"z"
    event = server.send(Event(99, 3, b""))
    assert event == struct.pack("<IBBHQH6x", 16, 5, 1, 0, 99, 3)


def test_control_frame_bodies_are_msgpack_maps() -> None:
    client = Connection(Side.CLIENT)
    data = client.send(Hello(client_id=9, subscribe_events=True, client_name="c"))
    length, kind, version, flags = FRAME_HEADER.unpack_from(data)
    assert (length, kind, version, flags) == (len(data) - 8, FrameKind.HELLO, 1, 0)
    assert msgspec.msgpack.decode(data[8:]) == {
        "client_id": 9,
        "protocol_version": 1,
        "subscribe_events": True,
        "client_name": "c",
    }


def test_unknown_control_fields_from_a_newer_peer_are_ignored() -> None:
    server = Connection(Side.SERVER)
    body = msgspec.msgpack.encode({"client_id": 4, "future_option": [1, 2]})
    server.receive_data(header(len(body), FrameKind.HELLO) + body)
    assert server.next_frame() == Hello(client_id=4)


def test_server_batch_encoding_equals_frame_by_frame_encoding() -> None:
    _, server = open_pair()
    out = bytearray()
    for request_id in range(1, 50):
        server.send_reply_into(out, request_id, request_id + 100, 0, 1, b"r%d" % request_id)
    server.send_event_into(out, 150, 1, b"e")
    one_by_one = b"".join(
        server.send(Reply(request_id, request_id + 100, 0, 1, b"r%d" % request_id))
        for request_id in range(1, 50)
    ) + server.send(Event(150, 1, b"e"))
    assert bytes(out) == one_by_one


def test_many_pipelined_commands_parse_from_reads_of_read_size() -> None:
    client, server = open_pair()
    out = bytearray()
    for request_id in range(1, 20001):
        client.send_command_into(out, request_id, request_id - 1, 1, b"c" * 64)
    received: list[Frame] = []
    for start in range(0, len(out), READ_BYTES_MAX):
        server.receive_data(out[start : start + READ_BYTES_MAX])
        while frames := server.next_frames():
            received.extend(frames)
    assert len(received) == 20000
    assert all(
        isinstance(frame, Command) and frame.request_id == i and frame.payload == b"c" * 64
        for i, frame in enumerate(received, start=1)
    )
    assert server.buffered_bytes == 0


def test_next_frames_returns_at_most_frames_max_per_call() -> None:
    client, server = open_pair()
    out = bytearray()
    for request_id in range(1, FRAMES_PER_CALL_MAX + 11):
        client.send_command_into(out, request_id, 0, 1, b"")
    server.receive_data(out)
    first = server.next_frames()
    second = server.next_frames()
    assert len(first) == FRAMES_PER_CALL_MAX
    assert len(second) == 10
    assert [frame.request_id for frame in first + second] == list(  # type: ignore[union-attr]
        range(1, FRAMES_PER_CALL_MAX + 11)
    )


def test_rejection_payload_round_trips_and_garbage_is_refused() -> None:
    assert decode_rejection(encode_rejection("code", "message")) == ("code", "message")
    with pytest.raises(ProtocolError, match="malformed_frame"):
        decode_rejection(b"\xc1")
    with pytest.raises(ProtocolError, match="malformed_frame"):
        decode_rejection(msgspec.msgpack.encode({"code": "only"}))


def test_eof_between_frames_is_closed_and_inside_a_frame_is_truncation() -> None:
    client, server = open_pair()
    server.receive_data(client.send(Ping(nonce=1)))
    server.receive_data(b"")
    assert server.next_frame() == Ping(nonce=1)
    assert server.next_frame() is CLOSED
    client, server = open_pair()
    server.receive_data(client.send(Command(1, 0, 1, b"abc"))[:-1])
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="truncated_frame"):
        server.next_frame()


# -- gateway validation --------------------------------------------------------------------------


def test_oversized_frame_is_refused_as_soon_as_its_header_arrives() -> None:
    _, server = open_pair()
    # Only the 8-byte header: the body (1 MiB) never needs to arrive or be buffered.
    error = refusal(server, header(FRAME_BODY_BYTES_MAX + 1, FrameKind.COMMAND))
    assert error.code == "frame_too_large"
    assert f"FRAME_BYTES_MAX={FRAME_BYTES_MAX}" in error.message
    assert server.buffered_bytes == 0


def test_largest_frame_is_accepted() -> None:
    client, server = open_pair()
    payload = b"p" * (FRAME_BODY_BYTES_MAX - 24)
    data = client.send(Command(1, 0, 1, payload))
    assert len(data) == FRAME_BYTES_MAX
    server.receive_data(data)
    frame = server.next_frame()
    assert isinstance(frame, Command)
    assert frame.payload == payload


def test_bad_protocol_version_is_refused_with_the_versions_spoken() -> None:
    server = Connection(Side.SERVER)
    error = refusal(server, header(10, FrameKind.HELLO, version=2))
    assert error.code == "bad_version"
    assert "versions [1]" in error.message
    frame = Connection(Side.CLIENT)
    data = server.send(error.to_frame())
    frame.receive_data(data)
    assert frame.next_frame() == Error(code="bad_version", message=error.message, fatal=True)


def test_hello_asking_for_an_unknown_version_is_refused() -> None:
    body = msgspec.msgpack.encode({"client_id": 1, "protocol_version": 9})
    error = refusal(Connection(Side.SERVER), header(len(body), FrameKind.HELLO) + body)
    assert error.code == "bad_version"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (header(0, FrameKind.HELLO, flags=1), "bad_flags"),
        (header(0, 200), "unknown_kind"),
        (header(0, 0), "unknown_kind"),
        (header(0, FrameKind.PING), "hello_required"),
        (header(24, FrameKind.COMMAND), "hello_required"),
        (header(0, FrameKind.REPLY), "unexpected_kind"),
        (header(3, FrameKind.HELLO) + b"\xc1\xc1\xc1", "malformed_frame"),
        (header(1, FrameKind.HELLO) + b"\x80", "malformed_frame"),  # {} lacks client_id
    ],
)
def test_server_refuses_bad_first_frames(data: bytes, code: str) -> None:
    assert refusal(Connection(Side.SERVER), data).code == code


def test_hello_with_client_id_zero_is_refused() -> None:
    body = msgspec.msgpack.encode({"client_id": 0})
    assert refusal(Connection(Side.SERVER), header(len(body), 1) + body).code == "malformed_frame"


def test_second_hello_and_short_command_are_refused() -> None:
    _, server = open_pair()
    assert refusal(server, Connection(Side.CLIENT).send(Hello(client_id=1))).code == (
        "unexpected_kind"
    )
    _, server = open_pair()
    assert refusal(server, header(23, FrameKind.COMMAND) + b"\0" * 23).code == "malformed_frame"


def test_client_refuses_replies_before_welcome_and_unknown_statuses() -> None:
    client = Connection(Side.CLIENT)
    client.send(Hello(client_id=1))
    assert refusal(client, header(24, FrameKind.REPLY) + b"\0" * 24).code == "unexpected_kind"
    client, _ = open_pair()
    bad_status = struct.pack("<QQBxH4x", 1, 1, 7, 1)
    assert refusal(client, header(24, FrameKind.REPLY) + bad_status).code == "malformed_frame"
    client, _ = open_pair()
    assert refusal(client, header(0, FrameKind.COMMAND)).code == "unexpected_kind"


def test_frames_before_garbage_are_delivered_then_the_error_is_raised() -> None:
    client, server = open_pair()
    good = client.send(Command(1, 0, 1, b"a")) + client.send(Command(2, 0, 1, b"b"))
    server.receive_data(good + b"\xff" * 8)
    assert [frame.request_id for frame in server.next_frames()] == [1, 2]  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="bad_version"):
        server.next_frames()


def test_failed_connection_refuses_further_use_except_one_error_frame() -> None:
    _, server = open_pair()
    error = refusal(server, b"\0" * 4 + b"\x03\x05\x00\x00")
    with pytest.raises(LocalProtocolError, match="connection_failed"):
        server.next_frame()
    with pytest.raises(LocalProtocolError, match="connection_failed"):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError, match="connection_failed"):
        server.send(Reply(1, 1, 0, 1, b""))
    assert server.send(error.to_frame())
    with pytest.raises(LocalProtocolError, match="connection_closed"):
        server.send(error.to_frame())


def test_receive_buffer_bound_is_enforced() -> None:
    _, server = open_pair()
    # A partial largest frame, then reads: the buffer never needs more than one frame + one read.
    server.receive_data(header(FRAME_BODY_BYTES_MAX, FrameKind.COMMAND))
    assert server.next_frame() is NEED_DATA
    server.receive_data(b"\0" * (FRAME_BYTES_MAX - 8 - 1))
    assert server.next_frame() is NEED_DATA
    server.receive_data(b"\0" * READ_BYTES_MAX)  # completes the frame; the rest is the next one
    assert server.buffered_bytes == RECEIVE_BUFFER_BYTES_MAX - 1
    server.receive_data(b"\0")  # exactly at the bound
    with pytest.raises(LocalProtocolError, match="receive_buffer_full"):
        server.receive_data(b"\0")  # the shell forgot to drain: refused, not buffered
    assert server.buffered_bytes == RECEIVE_BUFFER_BYTES_MAX


# -- our own side's mistakes -----------------------------------------------------------------------


def test_local_misuse_raises_local_protocol_error() -> None:
    client = Connection(Side.CLIENT)
    with pytest.raises(LocalProtocolError, match="hello_required"):
        client.send(Command(1, 0, 1, b""))
    client.send(Hello(client_id=1))
    with pytest.raises(LocalProtocolError, match="may not send REPLY"):
        client.send(Reply(1, 1, 0, 1, b""))
    with pytest.raises(LocalProtocolError, match="frame_too_large"):
        client.send(Command(1, 0, 1, b"x" * FRAME_BODY_BYTES_MAX))
    with pytest.raises(LocalProtocolError, match="bad_field"):
        client.send(Command(-1, 0, 1, b""))
    server = Connection(Side.SERVER)
    with pytest.raises(LocalProtocolError, match="hello_required"):
        server.send(WELCOME)
    server.receive_data(client.send(Ping(nonce=1)))  # not refused locally: the server refuses it
    with pytest.raises(ProtocolError, match="hello_required"):
        server.next_frame()
    server = Connection(Side.SERVER)
    server.receive_data(Connection(Side.CLIENT).send(Hello(client_id=2)))
    server.next_frame()
    with pytest.raises(LocalProtocolError, match="welcome_required"):
        server.send_reply_into(bytearray(), 1, 1, 0, 1, b"")
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"")
        client.receive_data(b"x")


# -- fuzzing ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    side=st.sampled_from([Side.CLIENT, Side.SERVER]),
    handshake=st.booleans(),
    chunks=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
)
def test_arbitrary_bytes_yield_frames_or_protocol_error_only(
    side: Side, handshake: bool, chunks: list[bytes]
) -> None:
    if handshake:
        client, server = open_pair()
        connection = client if side is Side.CLIENT else server
    else:
        connection = Connection(side)
        if side is Side.CLIENT:
            connection.send(Hello(client_id=1))
    try:
        for chunk in [*chunks, b""]:
            connection.receive_data(chunk)
            while True:
                frame = connection.next_frame()
                if isinstance(frame, Sentinel):
                    break
    except ProtocolError:
        with pytest.raises(ProtocolError):
            connection.next_frame()


def header_fuzz() -> st.SearchStrategy[bytes]:
    """Plausible headers with one field off: reaches the checks random bytes rarely hit."""
    return st.builds(
        lambda length, kind, version, flags, body: header(length, kind, version, flags) + body,
        st.sampled_from([0, 1, 16, 24, FRAME_BODY_BYTES_MAX, FRAME_BODY_BYTES_MAX + 1, 2**32 - 1]),
        st.integers(0, 12),
        st.sampled_from([0, 1, 2, 255]),
        st.sampled_from([0, 0, 1]),
        st.binary(max_size=40),
    )


@settings(max_examples=300, deadline=None)
@given(side=st.sampled_from([Side.CLIENT, Side.SERVER]), data=st.lists(header_fuzz(), max_size=4))
def test_plausible_garbage_after_the_handshake_never_crashes(side: Side, data: list[bytes]) -> None:
    client, server = open_pair()
    connection = client if side is Side.CLIENT else server
    try:
        connection.receive_data(b"".join(data))
        while not isinstance(connection.next_frame(), Sentinel):
            pass
    except ProtocolError:
        pass


u64 = st.integers(0, 2**64 - 1)
u16 = st.integers(0, 2**16 - 1)
payloads = st.binary(max_size=100)
client_frames = st.one_of(
    st.builds(Command, u64, u64, u16, payloads),
    st.builds(Ping, nonce=st.integers(0, 2**63)),
    st.builds(Pong, nonce=st.integers(0, 2**63)),
)
server_frames = st.one_of(
    st.builds(Reply, u64, u64, st.sampled_from(list(ReplyStatus)).map(int), u16, payloads),
    st.builds(Event, u64, u16, payloads),
    st.builds(Redirect, leader=st.text(max_size=10), socket_path=st.text(max_size=20)),
    st.builds(Ping, nonce=st.integers(0, 2**63)),
    st.builds(Error, code=st.text(max_size=10), message=st.text(max_size=30), fatal=st.just(False)),
)


def feed_in_chunks(connection: Connection, data: bytes, cuts: list[int]) -> list[object]:
    received: list[object] = []
    edges = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(edges):
        connection.receive_data(data[start:end])
        received.extend(connection.next_frames(frames_max=3))
        received.extend(connection.next_frames())
    connection.receive_data(b"")
    while (frame := connection.next_frame()) is not CLOSED:
        received.append(frame)
    return received


@settings(max_examples=200, deadline=None)
@given(
    to_server=st.lists(client_frames, max_size=20),
    to_client=st.lists(server_frames, max_size=20),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_valid_frame_sequences_round_trip_in_any_chunking(
    to_server: list[Frame], to_client: list[Frame], cuts: list[int]
) -> None:
    client, server = Connection(Side.CLIENT), Connection(Side.SERVER)
    upstream = client.send(Hello(client_id=3)) + b"".join(client.send(f) for f in to_server)
    assert feed_in_chunks(server, upstream, cuts) == [Hello(client_id=3), *to_server]
    server_out = bytearray()
    server.send_into(server_out, WELCOME)
    for frame in to_client:
        server.send_into(server_out, frame)
    assert feed_in_chunks(client, bytes(server_out), cuts) == [WELCOME, *to_client]


def test_welcome_without_the_limit_fields_means_the_version_1_defaults() -> None:
    client = Connection(Side.CLIENT)
    client.send(Hello(client_id=1))
    body = msgspec.msgpack.encode({"session_id": 3, "node": "n1", "frame_bytes_max": FRAME_BYTES_MAX})
    client.receive_data(header(len(body), FrameKind.WELCOME) + body)
    welcome = client.next_frame()
    assert isinstance(welcome, Welcome)
    assert welcome.command_bytes_max == COMMAND_BYTES_MAX == FRAME_BODY_BYTES_MAX - 24
    assert welcome.in_flight_max == welcome.saved_replies_max == IN_FLIGHT_MAX


@pytest.mark.parametrize("field", ["command_bytes_max", "in_flight_max"])
def test_welcome_with_a_limit_below_1_is_refused_as_malformed(field: str) -> None:
    client, server = Connection(Side.CLIENT), Connection(Side.SERVER)
    server.receive_data(client.send(Hello(client_id=1)))
    server.next_frame()
    welcome = msgspec.structs.replace(WELCOME, **{field: 0})
    error = refusal(client, server.send(welcome))
    assert error.code == ErrorCode.MALFORMED_FRAME
    assert field in error.message


def test_protocol_errors_carry_error_code_members_that_encode_as_their_string() -> None:
    error = refusal(Connection(Side.SERVER), header(0, 200))
    assert error.code is ErrorCode.UNKNOWN_KIND
    frame = error.to_frame()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(frame)) == {
        "code": "unknown_kind", "message": error.message, "fatal": True
    }  # fmt: skip


@given(
    session_id=st.integers(1, 2**64 - 1),
    request_id=st.integers(1, 2**64 - 1),
    index=st.integers(1, 2**64 - 1),
    status=st.sampled_from(list(ReplyStatus)),
    version=st.integers(1, 2**16 - 1),
    payload=st.binary(max_size=64),
)
def test_a_reply_framed_from_its_egress_output_is_the_reply_framed_from_its_fields(
    session_id: int, request_id: int, index: int, status: int, version: int, payload: bytes
) -> None:
    # The gateway frames a blp reply from the egress bytes after the session id, unparsed.
    _, server = open_pair()
    output = egress.REPLY_HEADER.pack(session_id, request_id, index, status, version) + payload
    from_output, from_fields = bytearray(), bytearray()
    server.send_reply_body_into(from_output, memoryview(output)[8:])
    server.send_reply_into(from_fields, request_id, index, status, version, payload)
    assert from_output == from_fields
