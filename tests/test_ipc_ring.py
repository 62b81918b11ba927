"""The ring in one process: framing, gating, upstream and limit, batch/per-record equivalence."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import ipc
from ipc.ring import FRAME_HEADER_BYTES, PADDING_TYPE, RecordTooLarge, Ring, RingError, frame_bytes
from ipc.segment import SegmentError


@pytest.fixture
def make_ring(unique: str) -> Iterator:
    rings: list[Ring] = []
    counter = [0]

    def make(capacity: int = 1024, readers=("a",)) -> Ring:
        counter[0] += 1
        ring = Ring.create(ipc.segment_name(unique, f"r{counter[0]}"), capacity, readers=readers)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()
        ring.unlink()


def checked(sequence: int, length: int) -> bytes:
    """A payload that proves itself: sequence number, CRC-32 of the body, body."""
    body = bytes((sequence * 7 + i) & 0xFF for i in range(max(0, length - 12)))
    return struct.pack("<QI", sequence, zlib.crc32(body)) + body


def check(payload: bytes) -> int:
    sequence, crc = struct.unpack_from("<QI", payload)
    assert zlib.crc32(payload[12:]) == crc, f"record {sequence} is corrupt"
    return sequence


def drain_read(reader) -> list[tuple[int, bytes]]:
    out = []
    while (frame := reader.read()) is not None:
        out.append(frame)
    return out


def test_frame_is_header_payload_and_zero_pad_to_8(make_ring):
    ring = make_ring(256)
    writer = ring.writer()
    # Dirty the ring first so the zero pad must really be written.
    assert writer.try_write(b"\xff" * 200, 9)
    reader = ring.reader("a")
    assert reader.read() == (9, b"\xff" * 200)
    view = writer.try_claim(5, 3)
    view[:] = b"hello"
    writer.publish()
    start = 208  # where the first frame ended: 8 + 200 rounded to 8
    data = bytes(ring._data)
    assert data[start : start + 16] == struct.pack("<II", 13, 3) + b"hello" + b"\0\0\0"
    assert frame_bytes(5) == 16
    assert reader.read() == (3, b"hello")


def test_padding_frame_fills_the_lap_end_and_readers_skip_it(make_ring):
    ring = make_ring(128)
    writer, reader = ring.writer(), ring.reader("a")
    assert writer.try_write(b"x" * 80, 1)  # frame 0..88
    assert reader.read() == (1, b"x" * 80)
    assert writer.try_write(b"y" * 40, 2)  # 48 bytes do not fit in the 40 left: pad, then wrap
    assert struct.unpack_from("<II", ring._data, 88) == (40, PADDING_TYPE)
    assert struct.unpack_from("<II", ring._data, 0) == (48, 2)
    assert writer.published_position == 128 + 48
    assert reader.read() == (2, b"y" * 40)
    assert reader.position == 176


def test_writer_never_overwrites_a_record_a_reader_has_not_passed(make_ring):
    ring = make_ring(256, readers=("fast", "slow"))
    writer = ring.writer()
    fast, slow = ring.reader("fast"), ring.reader("slow")
    written = 0
    while written < 1000 and writer.try_write(checked(written, 20), 1):
        written += 1
        drain_read(fast)
    # 20-byte payloads make 32-byte frames: exactly capacity / 32 fit before slow gates.
    assert written == 256 // 32
    assert writer.published_position - slow.position == 256
    assert writer.try_claim(0, 1) is None
    assert writer.try_write_batch([b"z"], 1) == 0
    assert [check(p) for _, p in drain_read(slow)] == list(range(written))
    assert writer.try_write(checked(written, 20), 1)  # slow advanced: the writer resumes


def test_record_larger_than_the_ring_is_refused_with_a_clear_error(make_ring):
    ring = make_ring(256)
    writer = ring.writer()
    with pytest.raises(RecordTooLarge, match=r"frame of 264 bytes .* capacity 256 bytes"):
        writer.try_write(b"x" * 250, 1)
    with pytest.raises(RecordTooLarge, match="can never fit"):
        writer.try_claim(249, 1)
    with pytest.raises(RecordTooLarge):
        writer.try_write_batch([b"ok", b"x" * 300], 1)
    assert writer.published_position == 0  # nothing of the refused batch was written
    assert writer.try_write(b"x" * (256 - FRAME_HEADER_BYTES), 1)  # the largest frame fits


def test_frame_as_large_as_the_ring_never_deadlocks_at_the_wrap(make_ring):
    # Padding and frame together exceed the capacity: the padding must be claimed on its own.
    ring = make_ring(256)
    writer, reader = ring.writer(), ring.reader("a")
    for round_ in range(6):
        assert writer.try_write(b"s" * (40 + round_), 1)
        drain_read(reader)
        big = bytes([round_]) * 200
        assert writer.try_write(big, 2) or (drain_read(reader) == [] and writer.try_write(big, 2))
        assert drain_read(reader) == [(2, big)]


def test_reader_with_upstream_reads_only_what_upstream_has_passed(make_ring):
    ring = make_ring(1024, readers=("journaller", "blp"))
    writer = ring.writer()
    journaller = ring.reader("journaller")
    blp = ring.reader("blp", upstream=("journaller",))
    assert writer.try_write_batch([b"a", b"b", b"c"], 1) == 3
    assert blp.read() is None
    assert journaller.read() == (1, b"a")
    assert blp.poll(10) == [(1, memoryview(b"a"))]
    assert blp.poll(10) == []
    drain_read(journaller)
    assert [bytes(v) for _, v in blp.poll(10)] == [b"b", b"c"]


def test_reader_never_passes_its_limit_counter(make_ring, unique):
    counters = ipc.Counters.create(ipc.segment_name(unique, "counters"), ["commit"])
    try:
        commit = counters["commit"]
        ring = make_ring(1024)
        writer = ring.writer()
        reader = ring.reader("a", limit=commit)
        writer.try_write_batch([b"one", b"two", b"three"], 1)
        assert reader.read() is None
        commit.set(frame_bytes(3))
        assert reader.read() == (1, b"one")
        assert reader.read() is None
        commit.set(frame_bytes(3) + 4)  # inside the next frame: still not readable
        assert reader.poll(10) == []
        assert reader.poll_region(1024)[1].nbytes == 0
        commit.set(writer.published_position)
        assert [bytes(v) for _, v in reader.poll(10)] == [b"two", b"three"]
    finally:
        counters.close()
        counters.unlink()


def test_poll_region_takes_a_vouched_for_limit_without_a_walk_and_release_to_gives_back_the_rest(make_ring, unique):
    counters = ipc.Counters.create(ipc.segment_name(unique, "counters"), ["commit"])
    try:
        commit = counters["commit"]
        ring = make_ring(1024)
        writer = ring.writer()
        reader = ring.reader("a", limit=commit)
        writer.try_write_batch([b"one", b"two", b"three"], 1)
        commit.set(2 * frame_bytes(3))  # after "two"
        start, region = reader.poll_region(1024, limit_on_frames=True)
        assert (start, region.nbytes) == (0, 2 * frame_bytes(3))
        reader.release_to(frame_bytes(3))  # the caller took "one" only
        assert reader.position == ring.cursor("a") == frame_bytes(3)
        start, region = reader.poll_region(1024, limit_on_frames=True)
        assert (start, bytes(region[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + 3])) == (frame_bytes(3), b"two")
        reader.release()
        assert ring.cursor("a") == 2 * frame_bytes(3)
        # A limit inside a frame: without the caller's word the walk finds no whole frame; with
        # it, the region ends at the limit (the caller must not take the frame it cuts).
        commit.set(2 * frame_bytes(3) + 12)
        assert reader.poll_region(1024)[1].nbytes == 0
        assert reader.poll_region(1024, limit_on_frames=True)[1].nbytes == 8
        with pytest.raises(AssertionError):
            reader.release_to(2 * frame_bytes(3) + 16)  # past what was returned
    finally:
        counters.close()
        counters.unlink()


def test_a_parked_reader_with_a_limit_is_rung_by_the_limits_advancer_not_by_each_publish(make_ring, unique):
    # The blp parks on the commit position: a publish below it is no work, so waking it for
    # each publish cost a second wake-up per command (benches/RESULTS.md, "per wake-up").
    counters = ipc.Counters.create(ipc.segment_name(unique, "counters"), ["commit"])
    try:
        commit = counters["commit"]
        ring = make_ring(1024, readers=("limited", "plain"))
        writer = ring.writer()
        limited = ring.reader("limited", limit=commit)
        plain = ring.reader("plain")
        limited.doorbell.park()
        plain.doorbell.park()
        assert not limited.doorbell.ready()
        assert writer.try_write(b"one", 1)
        assert plain.doorbell.drain() == 1, "an unbounded parked reader is rung by the publish"
        assert limited.doorbell.drain() == 0, "the publish rang a reader it gave nothing to read"
        assert not limited.doorbell.ready()
        commit.set(writer.published_position)
        advancer = ring.doorbell("limited")
        assert advancer.parked
        assert advancer.ring()
        assert limited.doorbell.drain() == 1
        assert limited.doorbell.ready()
        limited.doorbell.unpark()
        assert not advancer.ring(), "rung while running"
        advancer.close()
    finally:
        counters.close()
        counters.unlink()


def test_poll_views_stay_valid_until_the_next_poll_releases_them(make_ring):
    ring = make_ring(256)
    writer, reader = ring.writer(), ring.reader("a")
    assert writer.try_write_batch([b"p" * 56] * 4, 1) == 4  # 4 x 64 bytes: the ring is full
    frames = reader.poll(10)
    assert len(frames) == 4
    assert reader.position == 0  # not released: the writer is still held back
    assert not writer.try_write(b"q", 1)
    assert all(bytes(v) == b"p" * 56 for _, v in frames)
    assert reader.poll(10) == []  # releases the previous batch
    assert reader.position == 256
    assert writer.try_write(b"q", 1)


def test_poll_region_returns_whole_frames_and_never_crosses_the_wrap(make_ring):
    ring = make_ring(256)
    writer, reader = ring.writer(), ring.reader("a")
    assert writer.try_write_batch([b"a" * 8, b"b" * 24, b"c" * 100], 1) == 3  # 16 + 32 + 112
    start, region = reader.poll_region(60)
    assert start == 0
    assert bytes(region) == struct.pack("<II", 16, 1) + b"a" * 8 + struct.pack("<II", 32, 1) + b"b" * 24
    reader.release()
    start, region = reader.poll_region(1000)
    assert (start, region.nbytes) == (48, 112)
    reader.release()
    assert writer.try_write(b"d" * 100, 1)  # needs 112, 96 left: pads and wraps
    start, region = reader.poll_region(1000)
    assert (start, region.nbytes) == (256, 112)  # padding skipped, region starts the next lap


def test_next_frame_bytes_is_the_next_frames_length_past_the_padding(make_ring):
    ring = make_ring(256)
    writer, reader = ring.writer(), ring.reader("a")
    assert reader.next_frame_bytes() == 0  # nothing readable
    assert writer.try_write_batch([b"a" * 8, b"c" * 100], 1) == 2  # 16 + 112
    assert reader.next_frame_bytes() == 16
    assert reader.poll_region(16)[1].nbytes == 16
    assert reader.next_frame_bytes() == 112  # past what the poll holds, not yet released
    assert reader.poll_region(100)[1].nbytes == 0  # the bound a caller gives: too small for it
    assert reader.poll_region(reader.next_frame_bytes())[1].nbytes == 112  # alone
    assert writer.try_write(b"b" * 100, 1)  # to 240
    assert reader.poll_region(112)[1].nbytes == 112
    reader.release()
    assert writer.try_write(b"d" * 30, 1)  # needs 40, 16 left in the lap: pads and wraps
    assert reader.next_frame_bytes() == 40  # the padding is not a frame
    assert reader.poll_region(40)[0] == 256


def test_reader_names_must_be_declared_and_held_once(make_ring):
    ring = make_ring(256, readers=("journaller", "blp"))
    with pytest.raises(RingError, match=r"reader 'replicator' was not declared; declared readers are \['journaller', 'blp'\]"):
        ring.reader("replicator")
    with pytest.raises(RingError, match="not declared"):
        ring.reader("blp", upstream=("nobody",))
    ring.reader("blp")
    with pytest.raises(RingError, match="already has reader 'blp'"):
        ring.reader("blp")
    ring.writer()
    with pytest.raises(RingError, match="already has the writer"):
        ring.writer()


def test_attach_refuses_wrong_capacity(make_ring):
    ring = make_ring(1024)
    with pytest.raises(SegmentError, match="has capacity 1024 bytes, expected 2048"):
        Ring.attach(ring.name, capacity_bytes=2048)
    attached = Ring.attach(ring.name, capacity_bytes=1024)
    attached.close()


def test_attach_with_another_epoch_is_refused_before_a_slot_is_claimed(unique):
    name = ipc.segment_name(unique, "epoch")
    ring = Ring.create(name, 1024, readers=("a",), epoch=41)
    try:
        with pytest.raises(SegmentError, match="this process expects 0x000000000000002a"):
            Ring.attach(name, epoch=42)
        attached = Ring.attach(name, epoch=41)
        attached.reader("a").close()  # the slot is free: the refused attach claimed nothing
        attached.close()
    finally:
        ring.close()
        ring.unlink()


def test_attach_refuses_a_corrupt_capacity(make_ring):
    ring = make_ring(1024)
    ring.segment._whole.cast("Q")[3] = 1000  # the header's capacity field: not a power of two
    with pytest.raises(SegmentError, match="not a power of two"):
        Ring.attach(ring.name)


def test_capacity_must_be_a_power_of_two(unique):
    with pytest.raises(ValueError, match="power of two"):
        Ring.create(ipc.segment_name(unique, "bad"), 1000)


# ---- the oracle: every read API sees exactly the written sequence ----------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 120)),
        st.tuples(st.just("batch"), st.lists(st.integers(0, 120), min_size=1, max_size=12)),
        st.tuples(st.just("claim"), st.integers(0, 120)),
        st.tuples(st.sampled_from(["read", "poll", "region"]), st.integers(1, 400)),
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(capacity=st.sampled_from([256, 512, 4096]), script=operations)
def test_per_record_batch_and_region_reads_see_the_same_records(make_ring, capacity, script):
    ring = make_ring(capacity, readers=("by_read", "by_poll", "by_region"))
    writer = ring.writer()
    readers = {name: ring.reader(name) for name in ring.readers}
    seen: dict[str, list[bytes]] = {name: [] for name in ring.readers}
    written: list[bytes] = []

    def read_some(name: str, amount: int) -> None:
        reader = readers[name]
        if name == "by_read":
            for _ in range(amount):
                frame = reader.read()
                if frame is None:
                    break
                assert frame[0] == 5
                seen[name].append(frame[1])
        elif name == "by_poll":
            seen[name].extend(bytes(v) for t, v in reader.poll(amount) if t == 5)
        else:
            _, region = reader.poll_region(amount)
            offset = 0
            while offset < region.nbytes:
                length, type_ = struct.unpack_from("<II", region, offset)
                assert type_ == 5
                seen[name].append(bytes(region[offset + 8 : offset + length]))
                offset += (length + 7) & ~7
            assert offset == region.nbytes
            reader.release()

    def write(payloads: list[bytes]) -> None:
        # Readers drain until everything fits: the writer is never allowed to lose a record.
        while payloads:
            count = writer.try_write_batch(payloads, 5)
            written.extend(payloads[:count])
            payloads = payloads[count:]
            if payloads:
                for name in readers:
                    read_some(name, 10_000)

    for op, arg in script:
        if op == "write":
            write([checked(len(written), arg)])
        elif op == "batch":
            write([checked(len(written) + i, n) for i, n in enumerate(arg)])
        elif op == "claim":
            payload = checked(len(written), arg)
            view = writer.try_claim(len(payload), 5)
            while view is None:
                for name in readers:
                    read_some(name, 10_000)
                view = writer.try_claim(len(payload), 5)
            view[:] = payload
            writer.publish()
            written.append(payload)
        else:
            name = {"read": "by_read", "poll": "by_poll", "region": "by_region"}[op]
            read_some(name, arg)
    for name in readers:
        for _ in range(len(written) + 2):
            read_some(name, 10_000)
        assert seen[name] == written, name
    assert [check(p) for p in written] == list(range(len(written)))


def test_mixed_type_batch_is_read_back_in_order_across_wraps(unique: str) -> None:
    """try_write_frames: frames of several types, one publish, identical to writing them one by one."""
    import random

    from ipc.ring import Ring

    rng = random.Random(5)
    ring = Ring.create(f"/seqd.{unique}.mixed", 1024, readers=("r",))
    try:
        writer = ring.writer()
        reader = ring.reader("r")
        expected: list[tuple[int, bytes]] = []
        seen: list[tuple[int, bytes]] = []
        for round_number in range(200):
            frames = [(rng.randrange(1, 5), bytes([round_number % 256]) * rng.randrange(0, 40)) for _ in range(rng.randrange(1, 6))]
            pending = frames
            while pending:
                written = writer.try_write_frames(pending)
                expected.extend(pending[:written])
                pending = pending[written:]
                while (item := reader.read()) is not None:
                    seen.append(item)
        while (item := reader.read()) is not None:
            seen.append(item)
        assert seen == expected
        assert len(expected) > 300
    finally:
        ring.close()
        ring.unlink()


def test_whole_frames_written_joined_read_back_as_written_and_never_cross_the_wrap(unique: str) -> None:
    """try_write_joined: frames laid out as the ring holds them (a journal's or another ring's
    records) are written with one copy when they fit before the wrap and below the gate; otherwise
    nothing is written and False says to write them one by one."""
    import random

    from ipc.ring import Ring
    from sequencer.record import FRAME_HEADER, aligned

    rng = random.Random(7)
    ring = Ring.create(f"/seqd.{unique}.joined", 1024, readers=("r",))
    try:
        writer = ring.writer()
        reader = ring.reader("r")
        expected: list[tuple[int, bytes]] = []
        seen: list[tuple[int, bytes]] = []
        refused = 0
        for round_number in range(200):
            frames = [(rng.randrange(1, 5), bytes([round_number % 256]) * rng.randrange(0, 60)) for _ in range(rng.randrange(1, 4))]
            whole = b"".join(FRAME_HEADER.pack(len(payload) + 8, kind) + payload + bytes(aligned(len(payload) + 8) - len(payload) - 8)
                             for kind, payload in frames)  # fmt: skip
            position = writer.published_position
            if writer.try_write_joined(whole):
                assert writer.published_position == position + len(whole)
                expected.extend(frames)
            else:
                refused += 1
                assert writer.published_position == position  # nothing written
                assert writer.try_write_frames(frames) == len(frames)  # one by one, over the wrap
                expected.extend(frames)
            while (item := reader.read()) is not None:
                seen.append(item)
        assert seen == expected
        assert refused > 10  # the wrap was met, and the run went one by one there
    finally:
        ring.close()
        ring.unlink()
