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

A node started by a program (the test harness, `seqd demo`, a benchmark: daemon/harness.py) has
the same need one level up: a test runner killed with SIGKILL must not leave its nodes serving
and their shared memory in /dev/shm. The parent-death signal does not fit there: it fires when
the *thread* that forked the child exits, and a harness starts nodes from whatever thread it
runs on (a nemesis heal, a fixture), so a node would die with a helper thread; and SIGKILL
would leave the node's segments behind. So the harness hands the node the read end of a pipe
whose write end only it holds (`ParentWatch`, `SEQD_PARENT_WATCH_FD`); the kernel closes the
write end when the harness's process ends, however it ends, and the node's watcher thread
(`stop_when_parent_exits`) then reads end-of-file and sends its own process SIGTERM: the
supervisor drains as for any stop and removes its segments.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import stat
import threading
from collections.abc import MutableMapping

__all__ = ["EXIT_ORPHANED", "PARENT_WATCH_FD_ENV", "ParentWatch", "die_with_parent", "stop_when_parent_exits"]

log = logging.getLogger("seqd.supervisor")

# The read end of the starting program's watch pipe, in `seqd run`'s environment (unset: no watch,
# as under systemd, where the node outlives whoever started it).
PARENT_WATCH_FD_ENV = "SEQD_PARENT_WATCH_FD"

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


class ParentWatch:
    """The starting program's side: a pipe per node started, the read end passed to the node
    (`environment`, `pass_fds`), the write end kept, never written, until the node is gone
    (`close`). Non-inheritable, as `os.pipe` makes it: no other child it execs holds the write end
    open (one forked without exec does, until it ends)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()

    @property
    def environment(self) -> dict[str, str]:
        return {PARENT_WATCH_FD_ENV: str(self.read_fd)}

    @property
    def pass_fds(self) -> tuple[int]:
        return (self.read_fd,)

    def started(self) -> None:
        """The node has its copy of the read end: close this process's."""
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def close(self) -> None:
        """The node is gone (or to be stopped anyway): a running one reads end-of-file and stops."""
        self.started()
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1


def stop_when_parent_exits(environment: MutableMapping[str, str]) -> threading.Thread | None:
    """In `seqd run`: with PARENT_WATCH_FD_ENV set (and removed from `environment`, so the roles
    do not see it), a daemon thread that waits for end-of-file on that pipe, then sends this
    process SIGTERM (its handler, once installed, drains the node; before that the default
    action ends it, before it has created anything). Returns the thread, or None when unset."""
    setting = environment.pop(PARENT_WATCH_FD_ENV, None)
    if not setting:
        return None
    try:
        fd = int(setting)
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (ValueError, OSError) as error:
        is_pipe, fd = False, -1
        log.warning("%s=%r is not an open file descriptor (%s): this node is not watching the "
                    "program that started it", PARENT_WATCH_FD_ENV, setting, error)  # fmt: skip
    if not is_pipe:
        if fd >= 0:
            log.warning("%s=%d is not a pipe: this node is not watching the program that started "
                        "it (a reused descriptor would stop it for nothing)", PARENT_WATCH_FD_ENV, fd)  # fmt: skip
        return None

    def watch() -> None:
        try:
            while os.read(fd, 64):
                pass  # nothing is written: only end-of-file (or an error) ends the wait
        except OSError:
            pass
        finally:
            os.close(fd)
        log.warning("the program that started this node has exited (its watch pipe closed): stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
