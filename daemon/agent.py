"""Agents: a polling role as one duty cycle, and the runner that drives it.

Theory of operation (Agrona `Agent.java`, `AgentRunner.java`). A polling role (the journaller, the
blp) is an `Agent`: `on_start()` once, then `do_work(now_ns) -> work_count` once per duty cycle,
and `on_close()` once at the end, whatever ended the loop. A duty cycle does a bounded amount of
work (each drain has a `_MAX`) and never waits: an agent that cannot go on (an egress ring with no
room, a disk with no space) returns 0 and keeps what it could not finish for its next cycle. All
the waiting is the runner's, through the role's idle strategy:

    agent.on_start();  state = RUNNING
    while True:
        work_count = agent.do_work(clock())     # the clock is read once per cycle, here
        heartbeat = cycles                      # the supervisor's liveness check
        if stop requested and agent.drained(): break
        idle.idle(work_count)                   # work_count > 0 resets the idle strategy
    agent.on_close();  state = DRAINED          # (on_close also when do_work raised)

So an agent holds no loop, no stop flag and no sleep of its own, and a test drives it one duty
cycle at a time over real rings in one process (tests/test_agents.py): nothing about a role's
behaviour needs a process to be seen. The supervisor asks a role to stop through its
`<role>.stop` counter; `drained()` lets an agent finish what it owes first (the journaller takes
the last records the sequencer published).

Cost: the runner adds a bound-method call and one `monotonic_ns()` per cycle (~0.1 us in
CPython 3.11), against tens of microseconds for a cycle that applies or journals anything
(benches/RESULTS.md, "Roles as agents").
"""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.layout import RoleState
from ipc.counters import Counter
from ipc.doorbell import Doorbell
from ipc.idle import IdleStrategy

__all__ = ["Agent", "AgentRunner"]


class Agent:
    """A role's work, one bounded duty cycle at a time; see the module docstring.

    Attributes:
        doorbell: what the role's blocking idle strategy parks on (the ring it reads wakes it),
            or None when nothing can wake it (it then sleeps in short timeouts).
    """

    doorbell: Doorbell | None = None

    def on_start(self) -> None:
        """Called once, before the first duty cycle and before the role reports RUNNING."""

    def do_work(self, now_ns: int) -> int:
        """One duty cycle: bounded work, never a wait. Returns how much was done (0: idle).

        Args:
            now_ns: `time.monotonic_ns()` read once by the runner for this cycle.
        """
        raise NotImplementedError

    def drained(self) -> bool:
        """Once the supervisor asked the role to stop: True when it may stop now (asked after
        every cycle until it says so). The default stops at once."""
        return True

    def on_close(self) -> None:
        """Called once after the last duty cycle, also when `do_work` raised."""


class AgentRunner:
    """Drives one agent until its role is asked to stop: the idle strategy, the heartbeat, the
    stop request and the role's RUNNING/DRAINED state are all here, none in the agent.

    Args:
        agent: the role's work.
        idle: what to do after a cycle with no work (per role: `roles.<role>.idle`).
        heartbeat: `<role>.heartbeat`, set to the number of cycles run after every cycle.
        stop: `<role>.stop`, set by the supervisor.
        state: `<role>.state` (a RoleState).
        clock: where `now_ns` comes from; a test may pass its own.
    """

    def __init__(
        self,
        agent: Agent,
        idle: IdleStrategy,
        heartbeat: Counter,
        stop: Counter,
        state: Counter,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.agent = agent
        self.idle = idle
        self.heartbeat = heartbeat
        self.stop = stop
        self.state = state
        self.clock = clock
        self.cycles = 0

    def run(self) -> None:
        """on_start, duty cycles until stopped and drained, on_close; an exception from the agent
        propagates (after on_close) and the state stays RUNNING: the role died, it did not drain."""
        agent = self.agent
        agent.on_start()
        self.state.set(int(RoleState.RUNNING))
        try:
            self._loop()
        finally:
            agent.on_close()
        self.state.set(int(RoleState.DRAINED))

    def _loop(self) -> None:
        # Everything the loop touches is a local: this is the blp's per-cycle overhead.
        do_work = self.agent.do_work
        drained = self.agent.drained
        idle = self.idle.idle
        clock = self.clock
        set_heartbeat = self.heartbeat.set
        stop_requested = self.stop.get
        cycles = self.cycles
        try:
            while True:
                work_count = do_work(clock())
                cycles += 1
                set_heartbeat(cycles)
                if stop_requested() and drained():
                    return
                idle(work_count)
        finally:
            self.cycles = cycles
