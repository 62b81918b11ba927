"""How `seqd run` ends: one line that says what is wrong and what to do, and a named exit code.

An operating error (a corrupt journal, a full disk, a bad configuration, shared memory or a socket
that another process holds, a directory the node may not write) is not a bug: the operator gets
one log line naming the file, path or setting and the fix, and an exit code from `ExitCode` that
a script or systemd can act on. The traceback goes to the debug log level only
(`SEQD_LOG_LEVEL=DEBUG`). An exception that is none of these is a bug and keeps its traceback.

The codes are the ISO C pair, argparse's usage code, and BSD sysexits (`sysexits.h`) for the
operating errors: systemd knows 64..78 by name (`status=78/CONFIG` in `systemctl status`, and
`RestartPreventExitStatus=` accepts them), and they do not collide with Python's own 1 (an
uncaught exception) and 2 (a bad command line), nor with a role's fail-stop exit.

A role that meets an operating error before it runs (the sequencer cannot create its socket, the
blp cannot import the app) does not log it: it writes the one line to a pipe the supervisor gave
it (`SEQD_FATAL_FD`) and exits with the code itself. The supervisor reads the line, does not
restart the pipeline (the next start would fail the same way), and ends `seqd run` with that
line and that code. Everything else a role dies of is restarted from snapshot + journal.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
from enum import IntEnum
from typing import NoReturn

import posix_ipc

from daemon.config import ConfigError
from ipc.platform import PlatformError
from ipc.segment import SegmentError
from sequencer.app_versions import AppVersionError
from sequencer.journal import (
    JournalCorruptError,
    JournalError,
    JournalFullError,
    JournalLockedError,
)
from sequencer.rules_versions import RulesVersionError
from sequencer.state_machine import AppLoadError

__all__ = [
    "FATAL_FD_ENV",
    "FATAL_MESSAGE_BYTES_MAX",
    "ROLE_FATAL_CODES",
    "ExitCode",
    "FatalError",
    "classify",
    "exit_fatal",
    "os_error_advice",
    "read_fatal",
    "report",
]


class ExitCode(IntEnum):
    """The exit codes of `seqd run`, documented in docs/operations.md ("Exit codes")."""

    OK = 0  # stopped on request (SIGTERM, SIGINT) after a clean drain
    FAILED = 1  # roles kept dying (restarts_max within restart_window_s), an unclean drain, an unsupported machine
    USAGE = 2  # a bad command line (argparse's own code)
    DATAERR = 65  # EX_DATAERR: the journal is corrupt or unreadable by this version: restore it
    SOFTWARE = 70  # EX_SOFTWARE: an unexpected error, a bug in seqd or the app (logged with its traceback)
    CANTCREAT = 73  # EX_CANTCREAT: something else holds what the node must own: its shared memory, socket or journal
    IOERR = 74  # EX_IOERR: the disk: full (ENOSPC), over a size limit, or an I/O error
    NOPERM = 77  # EX_NOPERM: permission denied on the data directory, the socket (directory) or shared memory
    CONFIG = 78  # EX_CONFIG: the configuration is invalid, or names an app that cannot be loaded
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C before the supervisor took over its signals


# A role exits with one of these, after writing its line to the fatal pipe, to end `seqd run`.
ROLE_FATAL_CODES = frozenset(
    {ExitCode.DATAERR, ExitCode.CANTCREAT, ExitCode.IOERR, ExitCode.NOPERM, ExitCode.CONFIG}
)
FATAL_FD_ENV = "SEQD_FATAL_FD"
# One line, at most this long: a pipe takes it in one write without blocking (PIPE_BUF = 4096).
FATAL_MESSAGE_BYTES_MAX = 4096

_PERMISSION = frozenset({errno.EACCES, errno.EPERM})
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class FatalError(Exception):
    """An operating error that ends `seqd run`: a one-line message (what is wrong, what to do)
    and the exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = " ".join(message.split())  # one line, whatever the source wrote

    @classmethod
    def from_os_error(
        cls, error: OSError, doing: str, setting: str | None = None, space_hint: str = ""
    ) -> FatalError:
        """The fatal error for an OSError met while `doing` something (e.g. "create the socket
        directory /run/seqd").

        Args:
            error: the OSError; its errno chooses the code and the advice.
            doing: what the node was doing, as a verb phrase.
            setting: the configuration key that chooses the path or address, if any.
            space_hint: extra advice for a full disk (e.g. about preallocated segments).
        """
        path = error.filename if error.filename is not None else ""
        where = f" ({path})" if path else ""
        code, advice = os_error_advice(error, setting, space_hint)
        return cls(code, f"cannot {doing}: {error.strerror or error}{where}. {advice}")


def os_error_advice(error: OSError, setting: str | None = None, space_hint: str = "") -> tuple[ExitCode, str]:
    """The exit code for an OSError and what the operator should do about it, by its errno."""
    path = error.filename if error.filename is not None else "it"
    elsewhere = f", or set {setting} to another place" if setting else ""
    number = error.errno
    if number in _PERMISSION:
        return ExitCode.NOPERM, (
            f"Let user {_user_name()} (uid {os.geteuid()}) write there (check the owner and mode of "
            f"{path} and of its parent directory){elsewhere}, then start again."
        )
    if number == errno.EROFS:
        return ExitCode.NOPERM, f"The file system is read-only: mount it read-write{elsewhere}, then start again."
    if number in _NO_SPACE:
        hint = f" {space_hint}" if space_hint else ""
        return ExitCode.IOERR, f"Free space on that file system or grow it{elsewhere}, then start again.{hint}"
    if number == errno.EFBIG:
        return ExitCode.IOERR, (
            "A file size limit: lift it (ulimit -f, systemd's LimitFSIZE=) or lower "
            "journal.segment_bytes, then start again."
        )
    if number == errno.EADDRINUSE:
        return ExitCode.CANTCREAT, f"Another process uses it: stop that process{elsewhere}."
    return ExitCode.IOERR, "Check the path and the disk (dmesg), then start again."


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError that caused `error` (itself, or down its cause chain), if any."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:  # a chain is short; bound it against cycles
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__
        seen += 1
    return None


def classify(error: BaseException) -> FatalError | None:
    """The fatal error an exception amounts to, or None if it is not an operating error (a bug).

    Args:
        error: what was raised while the node started or ran.

    Returns:
        A FatalError with the code and the one-line message, or None.
    """
    if isinstance(error, FatalError):
        return error
    if isinstance(error, ConfigError):
        return FatalError(ExitCode.CONFIG, str(error))
    if isinstance(error, AppLoadError):
        return FatalError(ExitCode.CONFIG, f"node.app: {error}")
    if isinstance(error, PlatformError):
        return FatalError(ExitCode.FAILED, str(error))
    if isinstance(error, JournalCorruptError | AppVersionError | RulesVersionError):
        return FatalError(ExitCode.DATAERR, str(error))
    if isinstance(error, JournalLockedError):
        return FatalError(ExitCode.CANTCREAT, str(error))
    if isinstance(error, JournalFullError):  # its message names the sizes and the key to change
        return FatalError(ExitCode.IOERR, str(error))
    if isinstance(error, JournalError):
        os_error = _os_error_in(error)
        if os_error is not None:
            code, advice = os_error_advice(
                os_error, "node.data_dir",
                space_hint="Each journal segment is preallocated: journal.segment_bytes must fit.",
            )
            return FatalError(code, f"{error} {advice}")
        return FatalError(ExitCode.DATAERR, str(error))
    if isinstance(error, SegmentError):
        cause = error.__cause__
        if isinstance(cause, posix_ipc.PermissionsError):
            return FatalError(
                ExitCode.NOPERM,
                f"{error}. Run seqd as the user that owns the node's shared memory "
                "(ls -l /dev/shm/seqd.*), or remove it if no seqd runs for the node.",
            )
        if isinstance(cause, OSError) and cause.errno is not None:
            return FatalError.from_os_error(
                cause, f"create shared memory ({error})",
                space_hint="The rings live in /dev/shm: grow it (its size= mount option; docker run "
                "--shm-size) or lower ring.log_capacity_bytes and ring.egress_capacity_bytes.",
            )
        return FatalError(ExitCode.CANTCREAT, str(error))
    if isinstance(error, posix_ipc.PermissionsError):
        return FatalError(
            ExitCode.NOPERM,
            f"shared memory: {error}. Run seqd as the user that owns /dev/shm/seqd.<node>.*, or "
            "remove those files if no seqd runs for the node.",
        )
    if isinstance(error, OSError) and error.errno is not None:
        what = f"use {error.filename}" if error.filename is not None else "start the node"
        return FatalError.from_os_error(error, what)
    return None


def report(logger: logging.Logger, error: BaseException) -> ExitCode:
    """Log how `seqd run` ends, once, and return its exit code.

    An operating error is one line at CRITICAL, its traceback at DEBUG; anything else is a bug:
    one line and the traceback, and ExitCode.SOFTWARE.
    """
    fatal = classify(error)
    if fatal is None:
        logger.critical(
            "unexpected %s: %s. This is a bug in seqd or in the app: report it with the traceback "
            "below (exit %d %s)", type(error).__name__, error, ExitCode.SOFTWARE, ExitCode.SOFTWARE.name,
            exc_info=error,
        )
        return ExitCode.SOFTWARE
    logger.debug("traceback of the error below", exc_info=error)
    logger.critical("%s (exit %d %s)", fatal.message, fatal.code, fatal.code.name)
    return fatal.code


# ---- roles: hand a fatal start-up error to the supervisor ----------------------------------------


def exit_fatal(fatal: FatalError, logger: logging.Logger) -> NoReturn:
    """In a role: give the supervisor the one line through the fatal pipe, and exit with the code.

    Without a pipe (a role run by hand) the line is logged instead.
    """
    assert fatal.code in ROLE_FATAL_CODES, fatal.code
    descriptor = os.environ.get(FATAL_FD_ENV)
    data = fatal.message.encode(errors="replace")[:FATAL_MESSAGE_BYTES_MAX]
    written = False
    if descriptor:
        try:
            os.write(int(descriptor), data)
            written = True
        except (OSError, ValueError):
            pass
    if not written:
        logger.critical("%s (exit %d %s)", fatal.message, fatal.code, fatal.code.name)
    raise SystemExit(int(fatal.code))


def read_fatal(descriptor: int) -> str:
    """In the supervisor: the line a role wrote before it exited ("" if none). Non-blocking: a
    child the role forked could still hold the pipe's other end open."""
    os.set_blocking(descriptor, False)
    chunks: list[bytes] = []
    size = 0
    while size < FATAL_MESSAGE_BYTES_MAX:
        try:
            chunk = os.read(descriptor, FATAL_MESSAGE_BYTES_MAX - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode(errors="replace").strip()
