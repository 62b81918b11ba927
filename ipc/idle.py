"""Idle strategies: what a polling loop does when a cycle found no work.

A polling role runs `idle.idle(agent.do_work())`; `work_count > 0` resets the strategy. Choose per
process (the LMAX users' first complaint is 100% CPU from busy-spin everywhere):

- `SpinIdleStrategy`: do nothing. Lowest latency; burns a core. Only for a pinned role on a
  machine with a core to spare for it.
- `YieldIdleStrategy`: `sched_yield()`. Lets other runnable threads in; still 100% CPU when idle.
- `BackoffIdleStrategy`: spin, then yield, then sleep from 1 us doubling to 1 ms. Idle cost is
  ~1000 wakeups/s; the first message after a long idle waits up to 1 ms (plus timer slack).
- `BlockingIdleStrategy(doorbell)`: park (after `yields_before_park` yields, none by default) on
  a doorbell that the writer rings only when the reader is parked (see `ipc.doorbell`).
  Near-zero idle cost; the wake-up costs a futex wake and a context switch (tens of
  microseconds), the park a fence (~1 us).
"""

from __future__ import annotations

import os
import time

from ipc.doorbell import Doorbell

__all__ = [
    "BackoffIdleStrategy",
    "BlockingIdleStrategy",
    "IdleStrategy",
    "SpinIdleStrategy",
    "YieldIdleStrategy",
    "idle_strategy",
]

# Backoff phases (Agrona's BackoffIdleStrategy has the same shape). Spinning a few cycles catches
# work that is nanoseconds away; yielding a few more catches work that another runnable process
# is about to publish; then sleep, doubling, so a long idle settles at ~1000 wakeups/s.
BACKOFF_SPINS_MAX = 10
BACKOFF_YIELDS_MAX = 5
BACKOFF_SLEEP_NS_MIN = 1_000
BACKOFF_SLEEP_NS_MAX = 1_000_000
# A parked reader wakes at least this often even if no ring comes. No ring is missed (the park/wake
# protocol in ipc.doorbell), so this only bounds what a ringer that died or stalled between its
# store and its ring costs, and how long a thread that is stopped by a flag (the replicator's
# waker) takes to notice. 100 wakeups/s idle is nothing.
BLOCKING_TIMEOUT_MS_DEFAULT = 10.0
# Cycles without work (each ending in a sched_yield) before parking. None: a yield is a system
# call and, on a busy machine, a context switch to whatever else is runnable and back, and at a
# low rate it never finds work, so it only adds to each wake-up's cost (benches.wake_cost at
# 1,000 calls/s: one involuntary switch less per call for the journaller and the blp; under full
# load, where a cycle rarely comes up empty, CPU per command did not change; benches/RESULTS.md,
# "Target 1: each role's cost per wake-up"). Earlier, profiled on 2 cores under load
# (benches/profile.py), 4 yields put 36% of the blp's working time and 21% of the journaller's in
# sched_yield, taking the core from the role it waits for.
BLOCKING_YIELDS_BEFORE_PARK = 0
assert BACKOFF_SLEEP_NS_MIN <= BACKOFF_SLEEP_NS_MAX


class IdleStrategy:
    """Base: `idle(work_count)` after every cycle, `reset()` to start over."""

    name = "base"

    def idle(self, work_count: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        pass


class SpinIdleStrategy(IdleStrategy):
    name = "spin"

    def idle(self, work_count: int) -> None:
        pass


class YieldIdleStrategy(IdleStrategy):
    name = "yield"

    def idle(self, work_count: int) -> None:
        if work_count <= 0:
            os.sched_yield()


class BackoffIdleStrategy(IdleStrategy):
    """Spin `spins_max` cycles, yield `yields_max`, then sleep from `sleep_ns_min` doubling."""

    name = "backoff"
    SPINNING, YIELDING, SLEEPING = "spinning", "yielding", "sleeping"

    def __init__(
        self,
        spins_max: int = BACKOFF_SPINS_MAX,
        yields_max: int = BACKOFF_YIELDS_MAX,
        sleep_ns_min: int = BACKOFF_SLEEP_NS_MIN,
        sleep_ns_max: int = BACKOFF_SLEEP_NS_MAX,
    ) -> None:
        assert 0 < sleep_ns_min <= sleep_ns_max, (sleep_ns_min, sleep_ns_max)
        self.spins_max = spins_max
        self.yields_max = yields_max
        self.sleep_ns_min = sleep_ns_min
        self.sleep_ns_max = sleep_ns_max
        self.reset()

    def reset(self) -> None:
        self.phase = self.SPINNING
        self.spins = 0
        self.yields = 0
        self.sleep_ns = self.sleep_ns_min

    def idle(self, work_count: int) -> None:
        if work_count > 0:
            if self.phase is not self.SPINNING or self.spins:
                self.reset()
            return
        if self.phase is self.SPINNING:
            self.spins += 1
            if self.spins > self.spins_max:
                self.phase = self.YIELDING
            return
        if self.phase is self.YIELDING:
            self.yields += 1
            if self.yields > self.yields_max:
                self.phase = self.SLEEPING
            os.sched_yield()
            return
        time.sleep(self.sleep_ns / 1e9)
        self.sleep_ns = min(self.sleep_ns * 2, self.sleep_ns_max)


class BlockingIdleStrategy(IdleStrategy):
    """Yield `yields_before_park` empty cycles (none by default), then park on `doorbell` until
    rung or `timeout_ms` passes.

    Parking sets the doorbell's parked flag and fences (`Doorbell.park`), re-checks
    `doorbell.ready()` (work may have been published before the flag was visible; the ringer then
    did not ring) and only then waits: the protocol argued in `ipc.doorbell`. `wakes` and
    `timeouts` count how each wait ended (a signal's early wake-up counts as a timeout);
    `timeouts_with_work` counts the timeouts after which work was waiting, each one a ring that
    never came (zero unless a ringer died or stalled for the whole timeout between publishing and
    ringing). A ring already pending when a cycle found no work (a late ring from a ringer that
    saw the flag before the last unpark) is taken instead of parking (`Doorbell.take_pending`):
    the caller polls once more, and the park's fence and a wait that would return at once are
    saved; `pending_taken` counts those.
    """

    name = "blocking"

    def __init__(
        self,
        doorbell: Doorbell,
        timeout_ms: float = BLOCKING_TIMEOUT_MS_DEFAULT,
        yields_before_park: int = BLOCKING_YIELDS_BEFORE_PARK,
    ) -> None:
        assert timeout_ms > 0, timeout_ms
        self.doorbell = doorbell
        self.timeout_ms = timeout_ms
        self.yields_before_park = yields_before_park
        self.empty_cycles = 0
        self.wakes = 0
        self.timeouts = 0
        self.timeouts_with_work = 0
        self.pending_taken = 0

    def reset(self) -> None:
        self.empty_cycles = 0

    def idle(self, work_count: int) -> None:
        if work_count > 0:
            self.empty_cycles = 0
            return
        self.empty_cycles += 1
        if self.empty_cycles <= self.yields_before_park:
            os.sched_yield()
            return
        doorbell = self.doorbell
        if doorbell.take_pending():
            self.pending_taken += 1
            return
        doorbell.park()
        try:
            if doorbell.ready():
                return
            interruptions = doorbell.interruptions
            if doorbell.wait(self.timeout_ms):
                self.wakes += 1
            else:
                self.timeouts += 1
                if doorbell.interruptions == interruptions and doorbell.ready():
                    self.timeouts_with_work += 1
        finally:
            doorbell.unpark()


_BY_NAME: dict[str, type[IdleStrategy]] = {
    "spin": SpinIdleStrategy,
    "yield": YieldIdleStrategy,
    "backoff": BackoffIdleStrategy,
}


def idle_strategy(name: str, doorbell: Doorbell | None = None) -> IdleStrategy:
    """Build the strategy a configuration names: "spin", "yield", "backoff" or "blocking".

    Raises:
        ValueError: unknown name, or "blocking" without a doorbell.
    """
    if name == "blocking":
        if doorbell is None:
            raise ValueError("the blocking idle strategy needs a doorbell (e.g. reader.doorbell)")
        return BlockingIdleStrategy(doorbell)
    try:
        return _BY_NAME[name]()
    except KeyError:
        raise ValueError(
            f"unknown idle strategy {name!r}; choose one of spin, yield, backoff, blocking"
        ) from None
