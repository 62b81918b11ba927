"""What every role process shares: start-up from the supervisor's hand-off, signals, pinning.

The supervisor starts each role as `python -m daemon.roles.<role>` with the validated config in
the `SEQD_CONFIG_JSON` environment variable, its own pid in `SEQD_SUPERVISOR_PID` and the epoch of
the shared memory it created for this incarnation in `SEQD_EPOCH`. A role attaches to the node's
segments (it never creates them) and runs one loop until the supervisor sets its `<role>.stop`
counter. It attaches the counters through a view bound to its role (daemon/layout.py): its own
counters are writable, every other one read-only, so a write to a counter of another process
raises instead of racing with that process. Its pid, CPU and idle strategy are the supervisor's
to record, before the role runs. Roles ignore SIGINT and SIGTERM: a
Ctrl-C in a terminal or a signal to the process group reaches every role at once, and only the
supervisor (whose signal handler only sets a flag, STYLE.md) may order the drain.

A role never runs without the supervisor that started it. It asks the kernel to kill it when its
parent dies (`PR_SET_PDEATHSIG`), but that covers only a death after the request: a supervisor
killed while the role was still in Python start-up leaves it reparented to init. So the role
then checks that its parent is still the supervisor named in `SEQD_SUPERVISOR_PID`, and exits
if not, before it opens anything. The epoch check on every attach is the second wall: a role
never writes into (or claims a ring slot, or binds the socket for) shared memory that another
incarnation of the node created.

An operating error before the role runs (a socket it may not create, an app that does not import,
a corrupt journal met in replay) is not restarted: `report_start_failure` hands the supervisor one
line and a fatal exit code (daemon/exits.py), and `seqd run` ends with them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from daemon.agent import Agent, AgentRunner
from daemon.config import Config, RoleConfig
from daemon.exits import ROLE_FATAL_CODES, classify, exit_fatal
from daemon.layout import ROLE_COUNTERS, CounterView, Role, RoleState, attach_counters
from daemon.parent_death import EXIT_ORPHANED, die_with_parent
from ipc.counters import Counter
from ipc.doorbell import Doorbell
from ipc.doorbell_fifo import LOOP_TIMEOUT_MS_DEFAULT, LoopWaiter
from ipc.idle import idle_strategy
from ipc.segment import SegmentError

__all__ = [
    "EPOCH_ENV",
    "ROLE_EXIT_FAIL_STOP",
    "ROLE_EXIT_ORPHANED",
    "ROLE_EXIT_RAFT_TRUNCATE",
    "SUPERVISOR_PID_ENV",
    "RoleContext",
    "loop_waiter",
    "report_start_failure",
    "run_agent",
    "run_role",
    "start_role",
]

# A role that hits an operating error it must not retry (a failed fsync) exits with this code;
# the supervisor then restarts the pipeline from the journal.
ROLE_EXIT_FAIL_STOP = 3
# Cluster mode: the replicator met a log conflict that cuts entries it already wrote to the log
# ring; it wrote `<data_dir>/raft.truncate` and exits with this code, and the supervisor restarts
# the pipeline, cutting the journal first (daemon/raft_truncate.py). Also after it received a
# snapshot the core took (`<data_dir>/raft.install`): the supervisor installs it and restarts the
# journal after it first (daemon/snapshot_install.py).
ROLE_EXIT_RAFT_TRUNCATE = 5
# A role whose supervisor has died, or that cannot attach its own incarnation's counters (they
# belong to another incarnation), exits with this code at start, having written nothing.
ROLE_EXIT_ORPHANED = EXIT_ORPHANED

SUPERVISOR_PID_ENV = "SEQD_SUPERVISOR_PID"
EPOCH_ENV = "SEQD_EPOCH"  # the epoch of every segment of the incarnation the role was started for


@dataclass
class RoleContext:
    role: Role
    config: Config
    counters: CounterView  # bound to `role`: a write to another process's counter raises
    epoch: int  # attach every segment with it (`Ring.attach(name, epoch=context.epoch)`)
    heartbeat: Counter = field(init=False)
    state: Counter = field(init=False)
    stop: Counter = field(init=False)  # the supervisor's, read-only here
    errors: Counter = field(init=False)  # every error the role counts, of any kind

    def __post_init__(self) -> None:
        assert self.counters.owner is self.role, (self.counters.owner, self.role)
        block = ROLE_COUNTERS[self.role]
        self.heartbeat = self.counters[block.heartbeat]
        self.state = self.counters[block.state]
        self.stop = self.counters[block.stop]
        self.errors = self.counters[block.errors]

    @property
    def role_config(self) -> RoleConfig:
        return self.config.role(self.role)

    @property
    def stop_requested(self) -> bool:
        """The supervisor asks a role to stop through its `<role>.stop` counter, never a signal:
        a Ctrl-C or a SIGTERM to the whole process group reaches every role at once, and the
        drain must go in order (sequencer, then journaller, then blp)."""
        return self.stop.get() != 0

    def set_state(self, state: RoleState) -> None:
        self.state.set(int(state))

    def close(self) -> None:
        self.counters.close()


log = logging.getLogger("seqd.role")


def _handoff(role: str) -> tuple[int, int]:
    """The supervisor's pid and the incarnation's epoch, from the environment it set."""
    try:
        return int(os.environ[SUPERVISOR_PID_ENV]), int(os.environ[EPOCH_ENV])
    except (KeyError, ValueError):
        raise SystemExit(
            f"daemon.roles.{role} is started by `seqd run`, which sets {SUPERVISOR_PID_ENV} and "
            f"{EPOCH_ENV} (found {os.environ.get(SUPERVISOR_PID_ENV)!r} and "
            f"{os.environ.get(EPOCH_ENV)!r}); run `seqd run` instead of starting a role by hand"
        ) from None


def _check_parent(role: str, supervisor_pid: int) -> None:
    """Die with the supervisor from here on, and exit now if it has died already (see
    daemon/parent_death.py: the parent is compared with the pid the supervisor passed)."""
    if not die_with_parent(supervisor_pid):
        log.warning(
            "the supervisor that started this %s (pid %d) has died (the parent is now pid %d): "
            "exiting without touching the node; the next supervisor starts its own roles",
            role, supervisor_pid, os.getppid(),
        )
        raise SystemExit(ROLE_EXIT_ORPHANED)


def _attach_counters(role: Role, config: Config, epoch: int) -> CounterView:
    try:
        return CounterView(attach_counters(config.node.name, epoch=epoch), role, clustered=config.cluster is not None)
    except SegmentError as error:
        log.error("not starting the %s: %s", role, error)
        raise SystemExit(ROLE_EXIT_ORPHANED) from None


def start_role(role: Role) -> RoleContext:
    """Attach to the node, install signal handlers, pin, and return the role's context."""
    logging.basicConfig(
        level=os.environ.get("SEQD_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s seqd[{role}:%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not __debug__:
        raise SystemExit("seqd roles rely on assertions for their invariants: do not run with -O")
    supervisor_pid, epoch = _handoff(role)
    _check_parent(role, supervisor_pid)
    config = Config.from_json(os.environ["SEQD_CONFIG_JSON"])
    counters = _attach_counters(role, config, epoch)  # refuses another incarnation's before any write
    context = RoleContext(role=role, config=config, counters=counters, epoch=epoch)
    # Only the supervisor decides when a role stops (see RoleContext.stop_requested); if the
    # supervisor dies, the parent-death signal takes the role with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    if context.role_config.cpu >= 0:
        from ipc.affinity import pin

        pin(context.role_config.cpu)
    context.set_state(RoleState.STARTING)
    return context


@contextmanager
def report_start_failure(context: RoleContext) -> Iterator[None]:
    """Hand an operating error met before the role runs to the supervisor, as one line and a
    fatal exit code, instead of crashing into a restart that would meet it again.

    Once the role runs (or for errors that are not operating errors, or a segment of the
    supervisor's that cannot be attached), an exception propagates as before: the role dies and
    the supervisor restarts the pipeline from snapshot + journal.
    """
    try:
        yield
    except Exception as error:
        if context.state.get() not in (RoleState.STARTING, RoleState.RECOVERING):
            raise
        if isinstance(error, SegmentError):  # between the supervisor and its roles, not the operator's
            raise
        fatal = classify(error)
        if fatal is None or fatal.code not in ROLE_FATAL_CODES:
            raise
        log = logging.getLogger(f"seqd.{context.role}")
        log.debug("%s cannot start", context.role, exc_info=error)
        exit_fatal(fatal, log)


def loop_waiter(
    loop: asyncio.AbstractEventLoop, doorbell: Doorbell, on_ready: Callable[[], None], *,
    ring_name: str, whose: str, setting: str, timeout_ms: float = LOOP_TIMEOUT_MS_DEFAULT,
) -> LoopWaiter:  # fmt: skip
    """A `LoopWaiter` on `doorbell`, a ring reader's in a role's event loop (the sequencer's
    egress, the replicator's proposals). The ring must have been created with that reader's
    doorbell a FIFO (`setting`, a name in daemon.layout): a semaphore no loop can watch.
    `timeout_ms`: its safety-net look (0: none, for a role whose own timer looks as often).

    Raises:
        RuntimeError: the doorbell is a semaphore (the ring was created by another seqd).
    """
    if not doorbell.pollable:
        raise RuntimeError(
            f"{ring_name}: the {whose} doorbell is a semaphore, which the event loop cannot "
            f"watch; the ring must be created with pollable={setting} (daemon.layout). Restart "
            "the node with this seqd."
        )
    return LoopWaiter(loop, doorbell, on_ready, timeout_ms)


def run_agent(context: RoleContext, agent: Agent) -> None:
    """Drive a polling role's agent with the role's idle strategy (`roles.<role>.idle`, parked on
    `agent.doorbell` when blocking) until the supervisor stops the role and the agent is drained."""
    idle = idle_strategy(context.role_config.idle, agent.doorbell)
    AgentRunner(agent, idle, context.heartbeat, context.stop, context.state).run()


def run_role(role: Role, run: Callable[[RoleContext], int]) -> int:
    """A polling role's process: start, run its loop, detach; returns the exit code."""
    context = start_role(role)
    try:
        with report_start_failure(context):
            return run(context)
    finally:
        context.close()
