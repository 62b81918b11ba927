"""The replicator's ticks (daemon/roles/replicator_ticks.py, `TickTimer`): the first pass at or
after a tick's deadline takes it, the timer only when no pass did within `TICK_SLACK`; the core's
clock keeps its rate either way. A real `Replicator` (tests/replicator_driven.py) on a simulated
event loop and clock, so the count is exact on any machine: every `core.tick()` is noted with the
time it happened. Over a driven interval, with a loaded loop (a pass every 1-3 ms, as peer
messages and fdatasyncs make them) and an idle one (no pass but the timer's), and a loop held up
past several deadlines: no tick is lost (each one within the slack of its deadline, a tick
apart), none is merged with another (never two in one pass, nor closer than a tick less the
slack), and under load the timer takes none (its wakes are what this saves)."""

from __future__ import annotations

import heapq
import itertools
import random
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import daemon.roles.replicator as replicator_module
from daemon.roles.replicator_ticks import TICK_SLACK, TickTimer
from tests.replicator_driven import DrivenReplicator, driven_replicator
from tests.test_replicator_driven import following

pytestmark = pytest.mark.timeout(60)
TICK_S = 0.01  # the default `tick_ms`
SLACK_S = TICK_S * TICK_SLACK
DRIVEN_S = 3.0  # 300 ticks
HELD_S = 0.037  # a pass that holds the loop past three deadlines


class SimulatedLoop:
    """The event loop the replicator uses (`call_soon`, `call_later`), on a clock the test moves.
    `run_until` runs the handles in time order (ties in the order they were made)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._handles: list[tuple[float, int, SimulatedHandle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_soon(self, callback: Callable[[], None]) -> SimulatedHandle:
        return self.call_later(0.0, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> SimulatedHandle:
        handle = SimulatedHandle(callback)
        heapq.heappush(self._handles, (self.now + max(delay, 0.0), next(self._order), handle))
        return handle

    def run_until(self, end: float) -> None:
        while self._handles and self._handles[0][0] <= end:
            when, _, handle = heapq.heappop(self._handles)
            self.now = max(self.now, when)
            if not handle.cancelled():
                handle.callback()
        self.now = max(self.now, end)


class SimulatedHandle:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


class Ticks:
    """The replicator on the simulated loop: the times its core ticked, and its timer's ticks."""

    def __init__(self, driven: DrivenReplicator, loop: SimulatedLoop) -> None:
        replicator = driven.replicator
        self.loop = loop
        self.times: list[float] = []
        self.by_timer = 0
        core_tick = replicator.core.tick
        timer_tick = replicator._tick

        def tick() -> None:
            self.times.append(loop.now)
            core_tick()

        def timer_fired() -> None:
            ticks = len(self.times)
            timer_tick()
            self.by_timer += len(self.times) - ticks

        replicator.core.tick = tick  # type: ignore[method-assign]
        replicator.loop = loop  # type: ignore[assignment]  # `_schedule`'s
        replicator.tick_timer = TickTimer(loop, replicator.tick_s, timer_fired)  # type: ignore[arg-type]
        replicator.tick_timer.start(loop.now)  # `serve`'s

    def gaps(self, since: int) -> list[float]:
        times = self.times[since:]
        return [b - a for a, b in itertools.pairwise(times)]


@pytest.fixture
def ticking(tmp_dir: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DrivenReplicator, Ticks]]:
    loop = SimulatedLoop()
    monkeypatch.setattr(replicator_module, "time", types.SimpleNamespace(monotonic=loop.time))
    with driven_replicator(tmp_dir, unique, 2, cluster={"tick_ms": round(TICK_S * 1000)}) as driven:
        following(driven)  # node 2 follows node 1 (then hears nothing: it stands for election)
        driven.transport.sent.clear()
        yield driven, Ticks(driven, loop)


def load(driven: DrivenReplicator, loop: SimulatedLoop, until: float, rng: random.Random,
         held_at: float | None = None) -> None:  # fmt: skip
    """Until `until`, a pass every 1-3 ms (a peer message, an fdatasync: `_schedule`); the one
    at or after `held_at` holds the loop `HELD_S` before it (a pass that runs long)."""
    at = loop.now
    while at < until:
        at += rng.uniform(0.001, 0.003)
        if held_at is not None and at >= held_at:
            loop.run_until(at)
            loop.now = at = at + HELD_S
            held_at = None
        driven.replicator._schedule()
        loop.run_until(at)
    loop.run_until(until)


def assert_a_tick_apart(gaps: list[float]) -> None:
    """Lost: a gap of more than a tick and the slack (the next deadline went by untaken). Merged:
    two in one pass (a gap of 0) or closer than the grid allows."""
    assert gaps, "no ticks"
    lost = [gap for gap in gaps if gap > TICK_S + SLACK_S + 1e-9]
    merged = [gap for gap in gaps if gap < TICK_S - SLACK_S - 1e-9]
    assert not lost and not merged, (lost, merged)


def test_an_idle_replicator_ticks_by_its_timer_a_tick_apart(ticking: tuple[DrivenReplicator, Ticks]) -> None:
    driven, ticks = ticking
    start = ticks.loop.now
    ticks.loop.run_until(start + DRIVEN_S)
    assert ticks.by_timer == len(ticks.times)
    assert ticks.times[0] - start <= TICK_S + SLACK_S + 1e-9
    assert_a_tick_apart(ticks.gaps(0))
    # The grid: an idle loop's ticks are exactly a tick apart, as many as the interval holds.
    assert len(ticks.times) == int((DRIVEN_S - SLACK_S) / TICK_S + 1e-6), len(ticks.times)
    assert driven.transport.sent, "its election timeout passed: it stood for election"


def test_a_loaded_replicators_passes_take_its_ticks_at_the_same_rate(ticking: tuple[DrivenReplicator, Ticks]) -> None:
    driven, ticks = ticking
    loop = ticks.loop
    start = loop.now
    replicator = driven.replicator
    heartbeat_before = replicator.context.heartbeat.get()
    sender_ticks: list[float] = []
    sender_tick = replicator.snapshot_sender.tick

    def counted_sender_tick(now_s: float) -> None:
        sender_ticks.append(now_s)
        sender_tick(now_s)

    replicator.snapshot_sender.tick = counted_sender_tick  # type: ignore[method-assign]
    load(driven, loop, start + DRIVEN_S, random.Random(7))
    assert ticks.by_timer == 0, f"the timer took {ticks.by_timer} ticks: each one a wake under load"
    # A tick a pass takes is a whole tick: the supervisor's heartbeat (its watchdog's liveness) and
    # the snapshot sender's clock move with every one, as with the timer's.
    assert replicator.context.heartbeat.get() - heartbeat_before == len(ticks.times)
    assert len(sender_ticks) == len(ticks.times)
    assert_a_tick_apart(ticks.gaps(0))
    assert abs(len(ticks.times) - DRIVEN_S / TICK_S) <= 1, len(ticks.times)
    # Idle again: the timer takes over, still a tick apart.
    loaded = len(ticks.times)
    loop.run_until(loop.now + DRIVEN_S / 3)
    assert ticks.by_timer >= DRIVEN_S / 3 / TICK_S - 2
    assert_a_tick_apart(ticks.gaps(loaded - 1))


def test_a_loop_held_past_deadlines_takes_one_tick_late_not_the_missed_ones_at_once(
    ticking: tuple[DrivenReplicator, Ticks],
) -> None:
    driven, ticks = ticking
    loop = ticks.loop
    start = loop.now
    load(driven, loop, start + DRIVEN_S, random.Random(11), held_at=start + DRIVEN_S / 2)
    gaps = ticks.gaps(0)
    (long,) = [gap for gap in gaps if gap > TICK_S + SLACK_S]  # the hold
    assert long <= HELD_S + TICK_S + SLACK_S, long
    del gaps[gaps.index(long)]
    assert_a_tick_apart(gaps)  # after it, none bunched to catch up
    assert len(ticks.times) >= (DRIVEN_S - HELD_S) / TICK_S - 1, len(ticks.times)
