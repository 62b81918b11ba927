"""Idle strategies: backoff escalates and resets; blocking wakes on a ring and times out."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import ipc
from ipc.doorbell import Doorbell, bell_name
from ipc.idle import BackoffIdleStrategy, BlockingIdleStrategy
from ipc.platform import lock_fence


@pytest.fixture
def doorbell(unique: str) -> Iterator[Doorbell]:
    bell = Doorbell.create(bell_name(ipc.segment_name(unique, "ring"), "r"))
    yield bell
    bell.close()
    bell.unlink()


def test_backoff_spins_then_yields_then_sleeps_doubling_to_its_cap_and_resets_on_work():
    idle = BackoffIdleStrategy(spins_max=3, yields_max=2, sleep_ns_min=1_000, sleep_ns_max=8_000)
    phases = []
    sleeps = []
    for _ in range(12):
        phases.append(idle.phase)
        sleeps.append(idle.sleep_ns)
        idle.idle(0)
    assert phases[:4] == ["spinning"] * 4
    assert phases[4:7] == ["yielding"] * 3
    assert phases[7:] == ["sleeping"] * 5
    assert sleeps[7:] == [1_000, 2_000, 4_000, 8_000, 8_000]  # doubled after each sleep, capped
    idle.idle(1)
    assert (idle.phase, idle.spins, idle.yields, idle.sleep_ns) == ("spinning", 0, 0, 1_000)


def test_idle_strategy_builds_each_named_strategy(doorbell):
    assert isinstance(ipc.idle_strategy("spin"), ipc.SpinIdleStrategy)
    assert isinstance(ipc.idle_strategy("yield"), ipc.YieldIdleStrategy)
    assert isinstance(ipc.idle_strategy("backoff"), ipc.BackoffIdleStrategy)
    blocking = ipc.idle_strategy("blocking", doorbell)
    assert isinstance(blocking, ipc.BlockingIdleStrategy)
    assert blocking.doorbell is doorbell
    with pytest.raises(ValueError, match="needs a doorbell"):
        ipc.idle_strategy("blocking")
    with pytest.raises(ValueError, match="choose one of spin, yield, backoff, blocking"):
        ipc.idle_strategy("nap")


def test_blocking_times_out_when_nobody_rings(doorbell):
    idle = BlockingIdleStrategy(doorbell, timeout_ms=30, yields_before_park=1)
    idle.idle(0)  # yields first
    assert (idle.wakes, idle.timeouts) == (0, 0)
    idle.idle(0)
    assert (idle.wakes, idle.timeouts) == (0, 1)


def test_blocking_wakes_when_rung(doorbell):
    idle = BlockingIdleStrategy(doorbell, timeout_ms=20_000, yields_before_park=0)
    def ring_later() -> None:
        time.sleep(0.05)
        doorbell.ring()

    ringer = threading.Thread(target=ring_later)
    ringer.start()
    try:
        idle.idle(0)
    finally:
        ringer.join(30)
    assert (idle.wakes, idle.timeouts) == (1, 0)


def test_blocking_does_not_wait_when_work_arrived_while_parking(doorbell):
    ready = doorbell.bind(parked=(memoryview(bytearray(8)).cast("q"), 0), ready=lambda: True)
    idle = BlockingIdleStrategy(ready, timeout_ms=20_000, yields_before_park=0)
    idle.idle(0)
    assert (idle.wakes, idle.timeouts) == (0, 0)
    assert not ready.parked  # unparked again


def test_the_default_blocking_strategy_parks_at_the_first_empty_cycle_without_a_yield(doorbell):
    # A yield before parking is a system call (and on a busy machine a switch away and back) that
    # at a low rate never finds work: one more per wake-up (benches/RESULTS.md, "per wake-up").
    checks = []
    flag = memoryview(bytearray(8)).cast("q")
    ready = doorbell.bind(parked=(flag, 0), ready=lambda: checks.append(flag[0]) or True)
    idle = BlockingIdleStrategy(ready)
    idle.idle(0)
    assert checks == [1], "the first empty cycle did not park (and re-check while parked)"
    assert (idle.wakes, idle.timeouts) == (0, 0)


def test_a_timeout_that_finds_work_waiting_is_counted_as_a_missed_ring(doorbell):
    # Work appears after the re-check and nobody rings: exactly the wake a missed ring causes.
    checks = iter([False, True])
    missed = doorbell.bind(parked=(memoryview(bytearray(8)).cast("q"), 0), ready=lambda: next(checks))
    idle = BlockingIdleStrategy(missed, timeout_ms=1, yields_before_park=0)
    idle.idle(0)
    assert (idle.wakes, idle.timeouts, idle.timeouts_with_work) == (0, 1, 1)
    nothing = doorbell.bind(parked=(memoryview(bytearray(8)).cast("q"), 0), ready=lambda: False)
    idle = BlockingIdleStrategy(nothing, timeout_ms=1, yields_before_park=0)
    idle.idle(0)
    assert (idle.wakes, idle.timeouts, idle.timeouts_with_work) == (0, 1, 0)


class RecordingWord:
    """A parked flag that records every load and store, in order, with the fences."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.value = 0

    def __getitem__(self, index: int) -> int:
        self.events.append("load flag")
        return self.value

    def __setitem__(self, index: int, value: int) -> None:
        self.events.append(f"store flag = {value}")
        self.value = value


def test_park_fences_after_setting_the_flag_and_ring_fences_before_loading_it(doorbell, monkeypatch):
    # Each side's order in the park/wake protocol (ipc.doorbell, P1-P2 and R2-R3); that the order
    # is enough is proved in tests/test_doorbell_protocol.py.
    events: list[str] = []
    fences = ipc.platform.StoreLoadFences(
        "lock", lambda: events.append("parker fence"), lambda: events.append("ringer fence")
    )
    monkeypatch.setattr(ipc.platform, "_chosen", (os.getpid(), fences))
    bound = doorbell.bind(parked=(RecordingWord(events), 0))
    bound.park()
    assert events == ["store flag = 1", "parker fence"]
    events.clear()
    assert bound.ring()
    assert events == ["ringer fence", "load flag"]
    bound.unpark()


def test_store_load_fences_follow_the_environment(monkeypatch):
    monkeypatch.setattr(ipc.platform, "_chosen", None)
    monkeypatch.setenv(ipc.platform.FENCES_ENV, "lock")
    fences = ipc.platform.store_load_fences()
    assert (fences.kind, fences.parker, fences.ringer) == ("lock", lock_fence, lock_fence)
    monkeypatch.setattr(ipc.platform, "_chosen", None)
    monkeypatch.setenv(ipc.platform.FENCES_ENV, "fast")
    with pytest.raises(ipc.PlatformError, match="SEQD_STORE_LOAD_FENCES='fast' is not one of"):
        ipc.platform.store_load_fences()
    monkeypatch.setattr(ipc.platform, "_chosen", None)
    monkeypatch.delenv(ipc.platform.FENCES_ENV)
    fences = ipc.platform.store_load_fences()
    assert fences.kind in ("membarrier", "lock")
    assert (fences.ringer is None) == (fences.kind == "membarrier")
    fences.parker()  # a working fence: membarrier returned 0, or the lock was free


REGISTERED_PROBE = """
import ctypes, sys
import ipc
ring = ipc.Ring.attach(sys.argv[1])
syscall = ctypes.CDLL(None).syscall
syscall.restype = ctypes.c_long
print(syscall(324, 1 << 9, 0, 0))  # membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS), Linux 6.3+
ring.close()
"""


def test_a_process_that_attaches_a_ring_is_registered_for_membarrier_before_it_can_ring(
    unique, monkeypatch
):
    # With membarrier the ringers take no fence of their own: a parker's membarrier reaches only
    # processes registered for it, so every process that can ring must be. A fresh interpreter,
    # not a fork: a forked child would inherit this process's registration.
    monkeypatch.delenv(ipc.platform.FENCES_ENV, raising=False)
    if ipc.platform._choose_fences("auto").kind != "membarrier":
        pytest.skip("membarrier is not available here")
    name = ipc.segment_name(unique, "ring")
    ring = ipc.Ring.create(name, 1024, readers=("r",))
    try:
        probe = subprocess.run(
            [sys.executable, "-c", REGISTERED_PROBE, name],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    finally:
        ring.close()
        ring.unlink()
    registrations = int(probe.stdout)
    if registrations < 0:
        pytest.skip("this kernel cannot report membarrier registrations (Linux 6.3+)")
    assert registrations & ipc.platform._MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, registrations


def test_a_ring_left_pending_is_taken_without_parking_and_the_next_empty_cycle_parks(doorbell, monkeypatch):
    # A ringer that loaded the flag before the last unpark posts late: the semaphore holds a
    # ring with no work behind it the reader has not polled. Taking it costs no fence (a
    # membarrier: an IPI to every CPU) and no wait; the caller polls once more, then parks.
    events: list[str] = []
    fences = ipc.platform.StoreLoadFences("lock", lambda: events.append("parker fence"), None)
    monkeypatch.setattr(ipc.platform, "_chosen", (os.getpid(), fences))
    bound = doorbell.bind(parked=(RecordingWord(events), 0), ready=lambda: events.append("ready?") or False)
    doorbell.ring()
    doorbell.ring()
    idle = BlockingIdleStrategy(bound, timeout_ms=1, yields_before_park=0)
    idle.idle(0)
    assert events == [], "parked although a ring was pending"
    assert (idle.pending_taken, idle.wakes, idle.timeouts) == (1, 0, 0)
    idle.idle(0)  # both rings were taken: this one parks and times out
    assert events == ["store flag = 1", "parker fence", "ready?", "ready?", "store flag = 0"]
    assert (idle.pending_taken, idle.wakes, idle.timeouts) == (1, 0, 1)


def test_bound_doorbell_rings_only_a_parked_waiter(doorbell):
    flag = memoryview(bytearray(8)).cast("q")
    bound = doorbell.bind(parked=(flag, 0))
    assert not bound.ring()
    assert not bound.wait(0)  # nothing pending
    bound.park()
    assert bound.ring()
    assert bound.wait(0)
    bound.unpark()


def test_a_pile_of_rings_is_drained_after_one_wake(doorbell):
    for _ in range(5):
        doorbell.ring()
    assert doorbell.wait(0)
    assert not doorbell.wait(0)


def test_pin_restricts_this_process_and_can_be_undone():
    cpus = ipc.available_cpus()
    before = ipc.pin(cpus[0])
    try:
        assert ipc.pinned_cpus() == [cpus[0]]
    finally:
        ipc.pin(before)
    assert ipc.pinned_cpus() == cpus
    with pytest.raises(ValueError, match="this machine has CPUs"):
        ipc.pin(10_000)
