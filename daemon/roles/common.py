"""What every role process shares: start-up from the supervisor's hand-off, signals, pinning.

The supervisor starts each role as `python -m daemon.roles.<role>` with the validated config in
the `SEQD_CONFIG_JSON` environment variable. A role attaches to the node's segments (it never
creates them), records its pid, CPU and idle strategy in the counters, and runs one loop until
the supervisor sets its `<role>.stop` counter. Roles ignore SIGINT and SIGTERM: a Ctrl-C in a
terminal or a signal to the process group reaches every role at once, and only the supervisor
(whose signal handler only sets a flag, STYLE.md) may order the drain.

An operating error before the role runs (a socket it may not create, an app that does not import,
a corrupt journal met in replay) is not restarted: `report_start_failure` hands the supervisor one
line and a fatal exit code (daemon/exits.py), and `seqd run` ends with them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from daemon.config import Config
from daemon.exits import ROLE_FATAL_CODES, classify, exit_fatal
from daemon.layout import IDLE_CODES, RoleState, counters_name
from ipc.counters import Counter, Counters
from ipc.segment import SegmentError

__all__ = ["ROLE_EXIT_FAIL_STOP", "RoleContext", "report_start_failure", "run_role", "start_role"]

# A role that hits an operating error it must not retry (a failed fsync) exits with this code;
# the supervisor then restarts the pipeline from the journal.
ROLE_EXIT_FAIL_STOP = 3


@dataclass
class RoleContext:
    role: str
    config: Config
    counters: Counters
    heartbeat: Counter = field(init=False)
    state: Counter = field(init=False)
    stop: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.heartbeat = self.counters[f"{self.role}.heartbeat"]
        self.state = self.counters[f"{self.role}.state"]
        self.stop = self.counters[f"{self.role}.stop"]

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


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this role when the supervisor dies (kill -9 included).

    Without it a killed supervisor would leave roles running against shared memory that the
    next supervisor is about to remove and recreate.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def start_role(role: str) -> RoleContext:
    """Attach to the node, install signal handlers, pin, and return the role's context."""
    logging.basicConfig(
        level=os.environ.get("SEQD_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s seqd[{role}:%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not __debug__:
        raise SystemExit("seqd roles rely on assertions for their invariants: do not run with -O")
    _die_with_parent()
    config = Config.from_json(os.environ["SEQD_CONFIG_JSON"])
    counters = Counters.attach(counters_name(config.node.name))
    context = RoleContext(role=role, config=config, counters=counters)
    # Only the supervisor decides when a role stops (see RoleContext.stop_requested); if the
    # supervisor dies, the parent-death signal takes the role with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    role_config = config.roles.get(role)
    if role_config.cpu >= 0:
        from ipc.affinity import pin

        pin(role_config.cpu)
    counters[f"{role}.pid"].set(os.getpid())
    counters[f"{role}.cpu"].set(role_config.cpu)
    counters[f"{role}.idle"].set(IDLE_CODES[role_config.idle])
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


def run_role(role: str, run: Callable[[RoleContext], int]) -> int:
    """A polling role's process: start, run its loop, detach; returns the exit code."""
    context = start_role(role)
    try:
        with report_start_failure(context):
            return run(context)
    finally:
        context.close()
