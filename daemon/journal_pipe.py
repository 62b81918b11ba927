"""A journal writer in a child process, fed whole records through a pipe.

`seqd log migrate` produces records in Python at a few microseconds each, and the journal
writer's `append` checks each record's header in Python too (~0.3 us a record, a fifth of a
migration's time). Run in a child process, the writer's share goes to the other core while the
transform runs. The child imports only the journal (it starts in a fraction of a second) and
speaks a trivial protocol on stdin: `<Q length>` then that many bytes of whole records, per
batch; at end of input it fdatasyncs, prints the last index and exits 0; on an error it prints it
to stderr and exits 1. `python -m daemon.journal_pipe DIR SEGMENT_BYTES 0|1` runs the child.
"""

from __future__ import annotations

import contextlib
import fcntl
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from sequencer.journal import Journal, JournalError

__all__ = ["CLOSE_TIMEOUT_S", "PIPE_BYTES", "JournalWriterProcess"]

_FRAME = struct.Struct("<Q")  # a batch's length
# The child's last step is one fdatasync of the whole journal; minutes would mean a stuck disk.
CLOSE_TIMEOUT_S = 600.0
# A journal batch (~1 MiB) in flight between the producer and the writer, so that on a busy
# machine neither waits for the other's next time slice (the most Linux allows unprivileged).
PIPE_BYTES = 1 << 20


class JournalWriterProcess:
    """`Journal.open(directory, ...)` in a child; `append` sends a batch, `close` syncs.

    Use it as a context manager: leaving the block without `close` (an error in the producer)
    kills the child, so nothing more is written.
    """

    def __init__(self, directory: Path, segment_bytes: int, preallocate: bool) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.journal_pipe", str(directory), str(segment_bytes),
             "1" if preallocate else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdin is not None
        self._stdin = self.process.stdin
        with contextlib.suppress(OSError):  # the default pipe (64 KiB) is the fallback
            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def append(self, records: bytes) -> None:
        """Sends one batch of whole records (the child appends it as one journal batch).

        Raises:
            JournalError: the child failed (its message).
        """
        try:
            self._stdin.write(_FRAME.pack(len(records)))
            self._stdin.write(records)
        except BrokenPipeError:
            self.close()  # raises the child's error
            raise AssertionError("the journal writer closed its input but exited 0") from None

    def close(self) -> int:
        """Ends the input and waits for the fdatasync; returns the journal's last index.

        Raises:
            JournalError: the child failed (its message), or did not finish in CLOSE_TIMEOUT_S.
        """
        try:
            output, errors = self.process.communicate(timeout=CLOSE_TIMEOUT_S)  # closes stdin
        except subprocess.TimeoutExpired:
            self._kill()
            raise JournalError(
                f"the journal writer did not finish within {CLOSE_TIMEOUT_S} s (a stuck disk?)"
            ) from None
        if self.process.returncode != 0:
            message = errors.decode(errors="replace").strip()
            raise JournalError(message or f"the journal writer exited {self.process.returncode}")
        return int(output)

    def __enter__(self) -> JournalWriterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.returncode is None:
            self._kill()

    def _kill(self) -> None:
        self.process.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.process.wait(timeout=CLOSE_TIMEOUT_S)


def write_from(stream: BinaryIO, directory: Path, segment_bytes: int, preallocate: bool) -> int:
    """The child's side: append every batch from `stream`, sync; returns the last index."""
    with Journal.open(directory, segment_bytes=segment_bytes, preallocate=preallocate) as journal:
        while True:
            frame = stream.read(_FRAME.size)
            if not frame:
                break
            (length,) = _FRAME.unpack(frame)
            records = stream.read(length)
            if len(records) != length:
                raise JournalError(f"the input stopped mid-batch ({len(records)} of {length} bytes)")
            journal.append(records)
        journal.sync()
        return journal.last_index


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m daemon.journal_pipe DIR SEGMENT_BYTES 0|1 (run by seqd log migrate)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        last_index = write_from(sys.stdin.buffer, Path(args[0]), int(args[1]), args[2] == "1")
    except (JournalError, OSError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(last_index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
