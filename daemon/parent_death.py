"""No seqd process outlives the process that is responsible for it.

Two kinds of child need this: a role (its parent is the supervisor) and a snapshot writer (its
parent is the blp that forked it). Each asks the kernel to SIGKILL it when its parent dies
(`PR_SET_PDEATHSIG`), but the request guards only against a death *after* it: a parent that died
first (while a role was still in Python start-up; between a blp's fork and its writer's first
line) has left the child reparented to init, or to a subreaper, and the request then watches the
wrong process. So the child also compares its parent with the pid it was told to expect (the
supervisor passes its pid in the environment; a writer notes its parent's pid before the fork),
never with the parent seen a moment earlier, which may already be init. Any death after the
check kills the child through the signal.
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["EXIT_ORPHANED", "die_with_parent"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The exit code of a child that found its parent gone: it wrote nothing. For an orphan no one acts
# on the code; it tells the exit apart from a crash in logs, traces and tests.
EXIT_ORPHANED = 4


def die_with_parent(expected_parent_pid: int) -> bool:
    """Arm the parent-death signal (SIGKILL), then check the parent is `expected_parent_pid`.

    Returns:
        True if the expected parent is still this process's parent (from here on its death
        kills this process); False if it had died before the request: the caller must exit
        at once, having touched nothing.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent check below still stops an orphan from going on
    return os.getppid() == expected_parent_pid
