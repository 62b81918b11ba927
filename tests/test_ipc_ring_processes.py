"""The ring across processes: many wraps with three readers, a slow reader, a writer killed mid-batch.

Children are forked, attach by name like unrelated processes, use the backoff or blocking idle
strategies (never spin), and are always killed and reaped in `finally` blocks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import time
import traceback
import zlib
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import ipc
from ipc.ring import Ring
from ipc.segment import SegmentError, remove_stale

FORK = multiprocessing.get_context("fork")
WAIT_S = 60.0  # bound on any wait for a child; far above what a run needs on 2 loaded cores
DATA, STOP = 5, 6


def checked(sequence: int, length: int) -> bytes:
    """A payload that proves itself: sequence number, CRC-32 of the body, body."""
    body = bytes((sequence * 7 + i) & 0xFF for i in range(max(0, length - 12)))
    return struct.pack("<QI", sequence, zlib.crc32(body)) + body


def verify(payload: bytes | memoryview, expected: int) -> None:
    sequence, crc = struct.unpack_from("<QI", payload)
    if sequence != expected:
        raise AssertionError(f"record {sequence} arrived where {expected} was due")
    if zlib.crc32(payload[12:]) != crc:
        raise AssertionError(f"record {sequence} is corrupt (CRC mismatch)")


class Children:
    """Forked children that are always killed and reaped."""

    def __init__(self) -> None:
        self.processes: list[Any] = []

    def start(self, target: Any, *args: Any) -> Any:
        process = FORK.Process(target=target, args=args, daemon=True)
        process.start()
        self.processes.append(process)
        return process

    def reap(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(10)
        self.processes.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    group = Children()
    try:
        yield group
    finally:
        group.reap()


def _guarded(report: Any, body: Any) -> None:
    try:
        report.send(("ok", body()))
    except BaseException:
        report.send(("error", traceback.format_exc()))


def _receive(pipe: Any, what: str) -> Any:
    assert pipe.poll(WAIT_S), f"{what}: no report within {WAIT_S} s"
    status, value = pipe.recv()
    assert status == "ok", f"{what} failed:\n{value}"
    return value


# ---- 1 writer, 3 reader processes, many wraps -------------------------------------------------


def _reader_process(name: str, reader_name: str, mode: str, upstream: tuple[str, ...], report: Any) -> None:
    def body() -> int:
        ring = Ring.attach(name)
        try:
            reader = ring.reader(reader_name, upstream=upstream)
            idle = ipc.BackoffIdleStrategy()
            expected = 0
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                frames: list[tuple[int, bytes | memoryview]]
                if mode == "read":
                    frame = reader.read()
                    frames = [] if frame is None else [frame]
                elif mode == "poll":
                    frames = list(reader.poll(7))
                else:
                    frames = []
                    _, region = reader.poll_region(300)
                    offset = 0
                    while offset < region.nbytes:
                        length, type_ = struct.unpack_from("<II", region, offset)
                        frames.append((type_, bytes(region[offset + 8 : offset + length])))
                        offset += (length + 7) & ~7
                    reader.release()
                for type_, payload in frames:
                    if type_ == STOP:
                        return expected
                    assert type_ == DATA, type_
                    verify(payload, expected)
                    expected += 1
                idle.idle(len(frames))
            raise TimeoutError(f"reader {reader_name} stopped at record {expected}")
        finally:
            ring.close()

    _guarded(report, body)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    capacity=st.sampled_from([256, 512, 1024]),
    sizes=st.lists(st.integers(0, 100), min_size=1, max_size=20),
    batches=st.lists(st.integers(1, 9), min_size=1, max_size=10),
    records=st.integers(100, 1500),
    chained=st.booleans(),
)
def test_every_reader_sees_every_record_once_in_order_intact(
    unique, children, capacity, sizes, batches, records, chained
):
    name = ipc.segment_name(unique, "wraps")
    ring = Ring.create(name, capacity, readers=("r0", "r1", "r2"))
    try:
        writer = ring.writer()
        pipes = []
        for reader_name, mode in (("r0", "read"), ("r1", "poll"), ("r2", "region")):
            upstream = ("r0",) if chained and reader_name == "r2" else ()
            receiver, sender = FORK.Pipe(duplex=False)
            children.start(_reader_process, name, reader_name, mode, upstream, sender)
            pipes.append(receiver)
        idle = ipc.BackoffIdleStrategy()
        deadline = time.monotonic() + WAIT_S
        sequence = 0
        shape = 0
        while sequence < records:
            count = min(batches[shape % len(batches)], records - sequence)
            shape += 1
            batch = [checked(sequence + i, sizes[(sequence + i) % len(sizes)]) for i in range(count)]
            while batch:
                assert time.monotonic() < deadline, "writer gated for too long: a reader is stuck"
                written = writer.try_write_batch(batch, DATA)
                batch = batch[written:]
                sequence += written
                idle.idle(written)
        while not writer.try_write(b"", STOP):
            idle.idle(0)
        assert writer.published_position > 4 * capacity or records * 8 < 4 * capacity
        counts = [_receive(pipe, f"reader r{i}") for i, pipe in enumerate(pipes)]
        assert counts == [records] * 3
    finally:
        children.reap()
        ring.close()
        ring.unlink()


# ---- a slow reader holds the writer back -----------------------------------------------------


def _slow_reader(name: str, commands: Any, report: Any) -> None:
    ring = Ring.attach(name)
    try:
        reader = ring.reader("slow")
        expected = 0
        while commands.poll(WAIT_S):
            amount = commands.recv()
            if amount is None:
                break
            try:
                for _ in range(amount):
                    frame = reader.read()
                    assert frame is not None, f"record {expected} missing"
                    verify(frame[1], expected)
                    expected += 1
                report.send(("ok", reader.position))
            except BaseException:
                report.send(("error", traceback.format_exc()))
                return
    finally:
        ring.close()


def test_slow_reader_holds_the_writer_back_and_it_resumes_when_it_advances(unique, children):
    name = ipc.segment_name(unique, "slow")
    ring = Ring.create(name, 1024, readers=("fast", "slow"))
    try:
        writer, fast = ring.writer(), ring.reader("fast")
        commands_out, commands_in = FORK.Pipe(duplex=False)
        reports_in, reports_out = FORK.Pipe(duplex=False)
        children.start(_slow_reader, name, commands_out, reports_out)
        sequence = 0
        while sequence < 1000 and writer.try_write(checked(sequence, 52), DATA):  # 64-byte frames
            sequence += 1
            while fast.read() is not None:
                pass
        assert sequence == 1024 // 64  # exactly one ring's worth, none overwritten
        assert writer.published_position - ring.cursor("slow") == 1024
        assert not writer.try_write(checked(sequence, 52), DATA)  # still gated
        commands_in.send(3)
        assert _receive(reports_in, "slow reader") == 3 * 64
        for _ in range(3):
            assert writer.try_write(checked(sequence, 52), DATA)
            sequence += 1
        assert not writer.try_write(checked(sequence, 52), DATA)
        commands_in.send(sequence - 3)  # the rest: every record intact, in order
        assert _receive(reports_in, "slow reader") == sequence * 64
        commands_in.send(None)
    finally:
        children.reap()
        ring.close()
        ring.unlink()


# ---- kill -9 of the writer -------------------------------------------------------------------

COMPLETE_RECORDS = 40


def _writer_killed_mid_batch(name: str, created: Any, mid_batch: Any) -> None:
    ring = Ring.create(name, 4096, readers=("r",))
    writer = ring.writer()
    created.set()
    for sequence in range(COMPLETE_RECORDS):
        while not writer.try_write(checked(sequence, 40), DATA):
            time.sleep(0.001)
    # A batch claimed and half written, never published.
    for sequence in range(COMPLETE_RECORDS, COMPLETE_RECORDS + 5):
        view = writer.try_claim(40, DATA)
        assert view is not None
        payload = checked(sequence, 40)
        if sequence == COMPLETE_RECORDS + 4:
            view[:20] = payload[:20]  # killed while copying this one
        else:
            view[:] = payload
    mid_batch.set()
    time.sleep(WAIT_S)


def _writer_killed_anywhere(name: str, created: Any) -> None:
    ring = Ring.create(name, 2048, readers=("r",))
    writer = ring.writer()
    created.set()
    idle = ipc.BackoffIdleStrategy()
    sequence = 0
    while True:
        batch = [checked(sequence + i, 10 + (sequence + i) % 90) for i in range(1 + sequence % 7)]
        while batch:
            written = writer.try_write_batch(batch, DATA)
            batch = batch[written:]
            sequence += written
            idle.idle(written)


def _drain_checked(reader: Any, expected: int) -> int:
    while (frame := reader.read()) is not None:
        assert frame[0] == DATA
        verify(frame[1], expected)
        expected += 1
    return expected


def test_reader_never_sees_a_partial_record_after_writer_sigkill(unique, children):
    name = ipc.segment_name(unique, "killed")
    created, mid_batch = FORK.Event(), FORK.Event()
    writer = children.start(_writer_killed_mid_batch, name, created, mid_batch)
    assert created.wait(WAIT_S)
    ring = Ring.attach(name)
    try:
        reader = ring.reader("r")
        assert mid_batch.wait(WAIT_S)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(WAIT_S)
        assert writer.exitcode == -signal.SIGKILL
        assert _drain_checked(reader, 0) == COMPLETE_RECORDS  # no record of the unpublished batch
        with pytest.raises(SegmentError, match=r"created by pid \d+, which has exited \(stale segment\)"):
            Ring.attach(name)
        with pytest.raises(SegmentError, match="stale segment"):
            Ring.create(name, 4096, readers=("r",))
    finally:
        ring.close()
        assert remove_stale(name)
    # A new writer on a fresh segment under the same name works.
    fresh = Ring.create(name, 4096, readers=("r",))
    try:
        fresh_writer, fresh_reader = fresh.writer(), fresh.reader("r")
        assert fresh_writer.try_write_batch([checked(i, 30) for i in range(10)], DATA) == 10
        assert _drain_checked(fresh_reader, 0) == 10
    finally:
        fresh.close()
        fresh.unlink()


@pytest.mark.parametrize("kill_after_records", [1, 150, 900])
def test_writer_killed_at_any_moment_leaves_only_whole_records(unique, children, kill_after_records):
    name = ipc.segment_name(unique, "anywhere")
    created = FORK.Event()
    writer = children.start(_writer_killed_anywhere, name, created)
    assert created.wait(WAIT_S)
    ring = Ring.attach(name)
    try:
        reader = ring.reader("r")
        idle = ipc.BackoffIdleStrategy()
        seen = 0
        deadline = time.monotonic() + WAIT_S
        while seen < kill_after_records:
            assert time.monotonic() < deadline
            before = seen
            seen = _drain_checked(reader, seen)
            idle.idle(seen - before)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(WAIT_S)
        seen = _drain_checked(reader, seen)
        assert seen >= kill_after_records
        assert reader.position == ring.published_position
    finally:
        ring.close()
        remove_stale(name)


# ---- the blocking idle strategy across processes ---------------------------------------------


def _blocking_reader(name: str, report: Any) -> None:
    def body() -> tuple[bytes, int, int]:
        ring = Ring.attach(name)
        try:
            reader = ring.reader("r")
            # A timeout far above the test's pace: a wake by timeout (a missing ring) shows up
            # as `timeouts` > 0, not as a hang.
            idle = ipc.BlockingIdleStrategy(reader.doorbell, timeout_ms=20_000, yields_before_park=0)
            while True:
                frame = reader.read()
                if frame is not None:
                    return frame[1], idle.wakes, idle.timeouts
                idle.idle(0)
        finally:
            ring.close()

    _guarded(report, body)


def test_parked_reader_is_woken_by_the_writers_publish(unique, children):
    name = ipc.segment_name(unique, "bell")
    ring = Ring.create(name, 1024, readers=("r",))
    try:
        writer = ring.writer()
        doorbell = ring.doorbell("r")
        receiver, sender = FORK.Pipe(duplex=False)
        children.start(_blocking_reader, name, sender)
        deadline = time.monotonic() + WAIT_S
        while not doorbell.parked:
            assert time.monotonic() < deadline, "the reader never parked"
            time.sleep(0.001)
        assert writer.try_write(b"wake up", DATA)
        payload, wakes, timeouts = _receive(receiver, "blocking reader")
        assert (payload, wakes, timeouts) == (b"wake up", 1, 0)
    finally:
        children.reap()
        ring.close()
        ring.unlink()
