"""The record format of docs/contracts.md: byte layout, padding, iteration, payload helpers."""

from __future__ import annotations

import itertools
import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sequencer.record import (
    ADMIN_NODE_START,
    COMMAND_HEAD,
    COMMAND_PREFIX,
    FRAME_HEADER,
    FRAME_HEADER_BYTES,
    RECORD_HEADER,
    RECORD_HEADER_BYTES,
    RECORD_KEY,
    RECORD_TAIL,
    RecordError,
    RecordHeader,
    RecordType,
    aligned,
    decode_admin,
    decode_command,
    decode_header,
    decode_session_open,
    encode_admin,
    encode_command,
    encode_record,
    encode_session_open,
    frame_type,
    iter_records,
    pack_record_into,
    pack_tail_into,
    split_frame_type,
    walk_records,
)

U64 = st.integers(0, (1 << 64) - 1)


def test_header_fields_sit_at_the_contract_offsets():
    record = encode_record(RecordType.TIMER_FIRED, 3, 7, 2, -5, 11, 13, b"abc")
    assert struct.unpack_from("<I", record, 0) == (RECORD_HEADER_BYTES + 3,)
    assert struct.unpack_from("<HH", record, 4) == (RecordType.TIMER_FIRED, 3)
    assert struct.unpack_from("<QQqQQ", record, 8) == (7, 2, -5, 11, 13)
    assert record[48:51] == b"abc"


def test_record_is_zero_padded_to_eight_bytes():
    for size in range(0, 17):
        record = encode_record(RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"\xff" * size)
        assert len(record) == aligned(RECORD_HEADER_BYTES + size)
        assert len(record) % 8 == 0
        assert record[RECORD_HEADER_BYTES + size :] == bytes(
            len(record) - RECORD_HEADER_BYTES - size
        )


def test_pack_into_a_dirty_buffer_leaves_zero_padding():
    buffer = bytearray(b"\xaa" * 128)
    written = pack_record_into(buffer, 8, RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"x")
    assert written == 56
    assert bytes(buffer[8 : 8 + written]) == encode_record(
        RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"x"
    )


def test_pack_into_refuses_a_record_that_does_not_fit():
    with pytest.raises(RecordError, match="does not fit"):
        pack_record_into(bytearray(60), 0, RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"0123456789abc")


def test_ring_frame_header_is_the_first_eight_bytes_of_a_record():
    record = encode_record(RecordType.COMMAND, 9, 1, 1, 0, 0, 0, b"p")
    length, ring_type = struct.unpack_from("<II", record, 0)
    assert length == RECORD_HEADER_BYTES + 1
    assert ring_type == frame_type(RecordType.COMMAND, 9)
    assert split_frame_type(ring_type) == (RecordType.COMMAND, 9)
    assert frame_type(RecordType.PADDING, 0xFFFF) == 0xFFFF_FFFF
    assert FRAME_HEADER_BYTES + RECORD_TAIL.size == RECORD_HEADER.size


def test_tail_packed_after_a_ring_frame_header_makes_the_same_record():
    payload = b"hello"
    view = bytearray(aligned(RECORD_HEADER_BYTES + len(payload)))
    struct.pack_into(
        "<II", view, 0, RECORD_HEADER_BYTES + len(payload), frame_type(RecordType.COMMAND, 2)
    )
    pack_tail_into(view, FRAME_HEADER_BYTES, 5, 6, 7, 8, 9)
    view[RECORD_HEADER_BYTES : RECORD_HEADER_BYTES + len(payload)] = payload
    assert bytes(view) == encode_record(RecordType.COMMAND, 2, 5, 6, 7, 8, 9, payload)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 0xFFFE),
            st.integers(0, 0xFFFF),
            U64,
            U64,
            st.integers(-(1 << 63), (1 << 63) - 1),
            U64,
            U64,
            st.binary(max_size=40),
        ),
        max_size=20,
    )
)
def test_iter_records_returns_what_was_encoded(specs):
    run = b"".join(encode_record(*spec) for spec in specs)
    seen = list(iter_records(run))
    assert len(seen) == len(specs)
    offset = 0
    for (header, payload, at), spec in zip(seen, specs, strict=True):
        assert at == offset
        assert header == RecordHeader(RECORD_HEADER_BYTES + len(spec[7]), *spec[:7])
        assert bytes(payload) == spec[7]
        assert decode_header(run, at) == header
        offset += aligned(header.length)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 0xFFFE), st.integers(0, 0xFFFF), U64, U64,
            st.integers(-(1 << 63), (1 << 63) - 1), U64, U64, st.binary(max_size=40),
        ),
        max_size=20,
    )
)  # fmt: skip
def test_every_walk_over_a_run_sees_each_record_at_its_offset_with_the_fields_asked_for(specs):
    run = memoryview(b"".join(encode_record(*spec) for spec in specs))
    offsets = [0]
    for spec in specs:
        offsets.append(offsets[-1] + aligned(RECORD_HEADER_BYTES + len(spec[7])))
    bounds = list(itertools.pairwise(offsets))
    whole = list(walk_records(run))
    assert [(start, after) for _fields, start, after in whole] == bounds
    assert [fields for fields, _start, _after in whole] == [
        (RECORD_HEADER_BYTES + len(spec[7]), *spec[:7]) for spec in specs
    ]
    frames = [(fields, start) for fields, start, _after in walk_records(run, FRAME_HEADER)]
    assert frames == [
        ((RECORD_HEADER_BYTES + len(spec[7]), frame_type(spec[0], spec[1])), start)
        for spec, (start, _after) in zip(specs, bounds, strict=True)
    ]
    keys = [fields for fields, _start, _after in walk_records(run, RECORD_KEY)]
    assert keys == [(RECORD_HEADER_BYTES + len(spec[7]), spec[0], spec[2], spec[3]) for spec in specs]
    viewed = list(walk_records(run, views=True))
    assert [bytes(item[-1]) for item in viewed] == [bytes(run[start:after]) for start, after in bounds]
    assert [bytes(item[-2]) for item in viewed] == [spec[7] for spec in specs]
    assert [item[:-2] for item in viewed] == [fields for fields, _start, _after in whole]


@pytest.mark.parametrize("layout", [RECORD_HEADER, RECORD_KEY, FRAME_HEADER], ids=["header", "key", "frame"])
@pytest.mark.parametrize("length", [0, 7, 8, 47])
def test_walk_refuses_a_length_that_would_not_move_it_past_a_header(layout, length):
    """A zeroed or damaged length can never make a walk loop in place or step inside a header."""
    good = encode_record(RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"abc")
    bad = bytearray(encode_record(RecordType.COMMAND, 1, 2, 1, 0, 0, 0, b"abc"))
    struct.pack_into("<I", bad, 0, length)
    walk = walk_records(good + bytes(bad), layout)
    assert next(walk)[1] == 0
    with pytest.raises(RecordError, match=f"offset {len(good)} has length {length}"):
        next(walk)


def test_iter_records_names_the_offset_of_a_short_length():
    good = encode_record(RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"abc")
    bad = bytearray(encode_record(RecordType.COMMAND, 1, 2, 1, 0, 0, 0, b"abc"))
    struct.pack_into("<I", bad, 0, 47)
    with pytest.raises(RecordError, match=f"offset {len(good)} has length 47"):
        list(iter_records(good + bytes(bad)))


def test_iter_records_names_the_offset_of_a_record_past_the_end():
    good = encode_record(RecordType.COMMAND, 1, 1, 1, 0, 0, 0, b"abc")
    with pytest.raises(RecordError, match="offset 0 of length 51"):
        list(iter_records(good[:-8]))
    with pytest.raises(RecordError, match=f"at offset {len(good)} are too few"):
        list(iter_records(good + bytes(16)))


def test_command_payload_carries_acked_request_id_then_app_bytes():
    payload = encode_command(42, b"\x81\xa1a\x01")
    assert payload[:8] == struct.pack("<Q", 42)
    acked, command = decode_command(payload)
    assert (acked, bytes(command)) == (42, b"\x81\xa1a\x01")
    with pytest.raises(RecordError):
        decode_command(b"1234")


def test_session_open_is_a_msgpack_map_with_client_id_and_node():
    payload = encode_session_open(77, "n2")
    assert msgspec.msgpack.decode(payload) == {"client_id": 77, "node": "n2"}
    opened = decode_session_open(payload)
    assert (opened.client_id, opened.node) == (77, "n2")


def test_admin_is_a_msgpack_map_with_an_op():
    payload = encode_admin(ADMIN_NODE_START, node="n1")
    assert msgspec.msgpack.decode(payload) == {"op": "node_start", "node": "n1"}
    assert decode_admin(payload) == {"op": "node_start", "node": "n1"}
    with pytest.raises(RecordError, match="no string 'op'"):
        decode_admin(msgspec.msgpack.encode({"node": "n1"}))


@given(U64, U64, st.integers(-(1 << 63), (1 << 63) - 1), U64, U64, U64, st.binary(max_size=16))
def test_command_head_reads_the_tail_then_the_prefix(index, term, timestamp_ns, session_id,
                                                     request_id, acked_request_id, command):  # fmt: skip
    """The blp's one unpack of a COMMAND (`COMMAND_HEAD`) is the tail's and the prefix's."""
    record = encode_record(RecordType.COMMAND, 1, index, term, timestamp_ns, session_id,
                           request_id, encode_command(acked_request_id, command))  # fmt: skip
    view = memoryview(record)[FRAME_HEADER_BYTES:]
    head = COMMAND_HEAD.unpack_from(view, 0)
    prefix = COMMAND_PREFIX.unpack_from(view, RECORD_TAIL.size)
    assert head == RECORD_TAIL.unpack_from(view, 0) + prefix
    assert head == (index, term, timestamp_ns, session_id, request_id, acked_request_id)
