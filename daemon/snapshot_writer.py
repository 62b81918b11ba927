"""The snapshot writer: a child forked by the blp, so the parent pauses only for the fork.

The child inherits the processor's state copy-on-write at the SNAPSHOT record's index, encodes it
(`Processor.snapshot_file_contents`), writes the file with `sequencer.snapshot.write_snapshot`
(tmp, fsync, rename, directory fsync), runs an optional follow-up (retention) and exits, while the
parent goes on applying records. The process control lives here, in `daemon`; the file format and
the file operations live in `sequencer` (which knows no processes).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from daemon.roles.common import _die_with_parent
from sequencer.snapshot import SnapshotHeader, write_snapshot

__all__ = ["fork_and_write_snapshot", "reap_snapshot_writer"]


def fork_and_write_snapshot(
    directory: str | os.PathLike[str],
    encode: Callable[[], tuple[SnapshotHeader, bytes]],
    after_write: Callable[[], object] | None = None,
) -> int:
    """Forks a child that calls `encode()` and writes the file; returns the child's pid.

    The child exits with 0 on success and 1 on failure (after printing the error to stderr);
    it never returns into the caller's code (`os._exit`: no atexit handlers, no buffers of
    the parent flushed twice). Reap it with `reap_snapshot_writer`.
    """
    pid = os.fork()
    if pid != 0:
        return pid
    status = 1
    try:
        # Linux clears the parent-death signal on fork: without this, a killed blp would leave
        # its writer running into the next incarnation.
        _die_with_parent()
        header, body = encode()
        write_snapshot(directory, header, body)
        if after_write is not None:
            after_write()  # e.g. retention: file I/O that must not stall the parent
        status = 0
    except BaseException as error:  # the child must reach os._exit whatever happens
        try:
            os.write(2, f"seqd snapshot writer (pid {os.getpid()}) failed: {error!r}\n".encode())
        except BaseException:
            pass
    finally:
        os._exit(status)


def reap_snapshot_writer(pid: int) -> int | None:
    """Non-blocking: None while the child runs, else its exit code (0 = snapshot written)."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    if reaped == 0:
        return None
    return os.waitstatus_to_exitcode(status)
