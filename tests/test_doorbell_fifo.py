"""The FIFO doorbell (`ipc.doorbell_fifo`): a reader in an event loop is woken through a named FIFO
that unrelated processes find by name, that loses nothing when full, and that leaves nothing
behind. The protocol itself is checked on a modelled store buffer (tests/test_doorbell_protocol.py)
and under load between processes (tests/test_doorbell_stress.py)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

import ipc
from daemon.layout import egress_name
from ipc.doorbell import bell_name
from ipc.doorbell_fifo import LoopWaiter, fifo_path
from ipc.ring import Ring
from ipc.segment import remove_stale
from tests.node_fixtures import DEPOSIT, balances, node_factory, open_accounts  # noqa: F401 (fixture)

CONTEXT = multiprocessing.get_context("fork")
WAIT_S = 10.0  # any wait here that takes longer is a lost wake-up or a hang: fail
RINGS_PAST_FULL = 1 << 17  # twice what a pipe holds by default (64 KiB), one byte a ring
DATA = 1


def _loop_reader(ring_name: str, started: Any, report: Any) -> None:
    """A reader in an event loop: park with a LoopWaiter, report the first frame, exit."""
    ring = Ring.attach(ring_name)
    try:
        reader = ring.reader("loop")
        loop = asyncio.new_event_loop()
        done: asyncio.Future[bytes] = loop.create_future()

        def on_ready() -> None:
            frame = reader.read()
            if frame is not None and not done.done():
                done.set_result(bytes(frame[1]))

        waiter = LoopWaiter(loop, reader.doorbell, on_ready)
        waiter.start()
        started.set()
        try:
            report.send(loop.run_until_complete(asyncio.wait_for(done, WAIT_S)))
        finally:
            waiter.stop()
            loop.close()
    finally:
        ring.close()


def test_a_restarted_loop_reader_finds_the_fifo_by_name_and_no_ring_lost_to_a_full_pipe_stalls_it(
    unique: str,
) -> None:
    # Roles restart independently: the reader is SIGKILLed while parked, so its flag stays set
    # and the writer keeps ringing into a pipe nobody reads until it is full; a new reader
    # process attaches by name, and the first publish after it parks wakes it.
    ring = Ring.create(ipc.segment_name(unique, "egress"), 4096, readers=("loop",), pollable=("loop",))
    try:
        writer = ring.writer()
        first = CONTEXT.Event()
        receiver, sender = CONTEXT.Pipe(duplex=False)
        doomed = CONTEXT.Process(target=_loop_reader, args=(ring.name, first, sender))
        doomed.start()
        assert first.wait(WAIT_S)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join(WAIT_S)
        bell = ring.doorbell("loop")
        assert bell.parked  # a dead reader's flag: every ring goes to the FIFO
        for _ in range(RINGS_PAST_FULL):
            bell.ring()  # a full pipe drops the ring (EAGAIN) without an error
        started = CONTEXT.Event()
        restarted = CONTEXT.Process(target=_loop_reader, args=(ring.name, started, sender))
        restarted.start()
        try:
            assert started.wait(WAIT_S)
            assert writer.try_write(b"the reply", DATA)
            assert receiver.poll(WAIT_S), "the restarted reader was never woken"
            assert receiver.recv() == b"the reply"
        finally:
            restarted.join(WAIT_S)
        assert restarted.exitcode == 0
    finally:
        ring.close()
        ring.unlink()


def test_a_ring_into_a_full_pipe_leaves_a_pending_wake(unique: str) -> None:
    with Ring.create(ipc.segment_name(unique, "egress"), 4096, readers=("loop",), pollable=("loop",)) as ring:
        try:
            reader = ring.reader("loop")
            bell = reader.doorbell
            bell.park()
            for _ in range(RINGS_PAST_FULL):
                bell.ring()
            assert bell.wait(0.0)  # pending: the wait returns at once and swallows what it can
            while bell.drain():
                pass
            assert not bell.wait(0.0)  # nothing pending once drained
            bell.ring()
            assert bell.wait(WAIT_S * 1000)
        finally:
            ring.unlink()


def test_fifo_doorbells_are_created_0600_and_removed_with_their_ring_or_when_stale(unique: str) -> None:
    name = ipc.segment_name(unique, "egress")
    path = fifo_path(bell_name(name, "loop"))
    ring = Ring.create(name, 4096, readers=("loop", "other"), pollable=("loop",))
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600, stat.filemode(mode)
        assert not fifo_path(bell_name(name, "other")).exists()  # a semaphore reader
        assert Ring.attach(name).pollable == ("loop",)
    finally:
        ring.close()
    ring.unlink()
    assert not path.exists()
    # A creator that died: remove_stale takes the FIFO with the segment.
    child = CONTEXT.Process(target=lambda: Ring.create(name, 4096, readers=("loop",), pollable=("loop",)).close())
    child.start()
    child.join(WAIT_S)
    assert path.exists()
    assert remove_stale(name)
    assert not path.exists()


def test_a_file_planted_at_a_fifo_doorbells_path_is_refused(unique: str) -> None:
    name = ipc.segment_name(unique, "egress")
    path = fifo_path(bell_name(name, "loop"))
    Path(path).write_bytes(b"")
    try:
        with pytest.raises(PermissionError, match="not a FIFO owned by uid"):
            Ring.create(name, 4096, readers=("loop",), pollable=("loop",))
        assert not Path("/dev/shm", name[1:]).exists()  # the segment went with the failed create
    finally:
        path.unlink(missing_ok=True)


def test_the_sequencer_serves_egress_from_its_event_loop_without_a_thread(
    node_factory: Callable[..., Any],  # noqa: F811 (the fixture)
) -> None:
    # Issue 13: the egress waker thread cost 1.1-1.4 us of CPU per command in GIL hand-offs.
    node = node_factory()
    open_accounts(node.socket_path, ["a", "b"])  # each reply came through egress
    assert balances(node.socket_path, ["a", "b"]) == {"a": DEPOSIT, "b": DEPOSIT}
    sequencer = psutil.Process(node.role_pid("sequencer"))
    assert sequencer.num_threads() == 1, [thread.id for thread in sequencer.threads()]
    fifos = [os.readlink(f"/proc/{sequencer.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{sequencer.pid}/fd")]
    assert str(fifo_path(bell_name(egress_name(node.node), "sequencer"))) in fifos, fifos


class _Routed:
    """The gateway's side of `Sequencer._drain_egress`: keeps what it is handed."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.waiting = False

    def route_egress(self, frames: list[tuple[int, memoryview]], dirty: list[Any]) -> bool:
        self.payloads.extend(bytes(view) for _, view in frames)
        return False


def test_one_egress_drain_takes_a_publish_that_crosses_the_rings_wrap(unique: str) -> None:
    # A poll stops at the wrap, and a publish that straddles it rings once: a drain that stopped
    # at its first short poll left the rest until some later ring (none, in a closed loop whose
    # clients all wait for these replies; the waker thread's re-check used to hide it).
    from daemon.roles.sequencer import Sequencer

    with Ring.create(ipc.segment_name(unique, "egress"), 256, readers=("sequencer",), pollable=("sequencer",)) as ring:
        try:
            writer = ring.writer()
            reader = ring.reader("sequencer")
            gateway = _Routed()
            shell = SimpleNamespace(egress_reader=reader, gateway=gateway, egress_consumed=SimpleNamespace(set=int),
                                    blocked=[], blocked_retry=None)  # fmt: skip
            for lap in range(8):  # frames of 40 bytes in a 256-byte ring: each lap ends differently
                batch = [(DATA, bytes([lap, number]) * 16) for number in range(4)]
                assert writer.try_write_frames(batch) == len(batch)
                Sequencer._drain_egress(shell)  # type: ignore[arg-type]
                assert gateway.payloads == [payload for _, payload in batch], lap
                assert reader.position == writer.published_position
                gateway.payloads.clear()
        finally:
            ring.unlink()
