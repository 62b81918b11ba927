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

from daemon.parent_death import EXIT_ORPHANED, die_with_parent
from sequencer.snapshot import SnapshotHeader, write_snapshot

__all__ = [
    "WRITER_EXIT_FAILED",
    "WRITER_EXIT_OK",
    "WRITER_EXIT_ORPHANED",
    "fork_and_write_snapshot",
    "reap_snapshot_writer",
]

WRITER_EXIT_OK = 0  # the snapshot is written (and `after_write` ran)
WRITER_EXIT_FAILED = 1  # the error is on stderr; the next SNAPSHOT record tries again
# The blp died between the fork and the writer's first line: the writer exits at once, writing
# nothing, rather than run into the next incarnation.
WRITER_EXIT_ORPHANED = EXIT_ORPHANED


def fork_and_write_snapshot(
    directory: str | os.PathLike[str],
    encode: Callable[[], tuple[SnapshotHeader, bytes]],
    after_write: Callable[[], object] | None = None,
) -> int:
    """Forks a child that calls `encode()` and writes the file; returns the child's pid.

    The child exits with WRITER_EXIT_OK, or WRITER_EXIT_FAILED after printing the error to stderr;
    it never returns into the caller's code (`os._exit`: no atexit handlers, no buffers of
    the parent flushed twice). Reap it with `reap_snapshot_writer`.
    """
    parent_pid = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    status = WRITER_EXIT_FAILED
    try:
        # Linux clears the parent-death signal on fork: a killed blp would otherwise leave its
        # writer running into the next incarnation.
        if not die_with_parent(parent_pid):
            os._exit(WRITER_EXIT_ORPHANED)
        header, body = encode()
        write_snapshot(directory, header, body)
        if after_write is not None:
            after_write()  # e.g. retention: file I/O that must not stall the parent
        status = WRITER_EXIT_OK
    except BaseException as error:  # the child must reach os._exit whatever happens
        try:
            os.write(2, f"seqd snapshot writer (pid {os.getpid()}) failed: {error!r}\n".encode())
        except BaseException:
            pass
    finally:
        os._exit(status)


def reap_snapshot_writer(pid: int) -> int | None:
    """Non-blocking: None while the child runs, else its exit code (WRITER_EXIT_OK: written)."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    if reaped == 0:
        return None
    return os.waitstatus_to_exitcode(status)
