"""When a client tries a lost connection again, and when it gives up: the reconnect policy.

The session core (`sequencer.client.session`) keeps the outage's state (when it began, the
current backoff, the redirects followed) and decides with these bounds and rules; its answers to
the shell are the actions defined here, `Retry(delay_s)` and `Fail(error)`. Sans-I/O, like the
session: the errnos are only numbers to compare.
"""

from __future__ import annotations

import errno
from typing import Final

__all__ = [
    "RECONNECT_BACKOFF_S_MAX",
    "RECONNECT_BACKOFF_S_MIN",
    "REDIRECTS_MAX",
    "RETRYABLE_ERRNOS",
    "RETRYABLE_ERROR_CODES",
    "SOCKET_PATH_BYTES_MAX",
    "Action",
    "ConnectionEnded",
    "Fail",
    "Retry",
    "socket_path_problem",
]

# First and largest pause between reconnect attempts. A restarting daemon is back within a second
# or so (snapshot + journal replay), so retrying every 10 ms at first catches a quick restart, and
# a probe per second of a dead socket costs nothing.
RECONNECT_BACKOFF_S_MIN: Final = 0.01
RECONNECT_BACKOFF_S_MAX: Final = 1.0
# Redirects followed within one outage: a cluster has at most 5 nodes, so a correct one never
# needs more than a couple of hops; more means the nodes disagree about the leader.
REDIRECTS_MAX: Final = 8
# ERROR codes that mean "not now": the node is draining or at sessions_max (`unavailable`), or its
# journal's disk is full (`disk_full`). The client backs off and reconnects instead of failing;
# its requests stay in flight and are resent once the node takes them again.
RETRYABLE_ERROR_CODES: Final = frozenset({"unavailable", "disk_full"})
# errnos that mean "the daemon is not there (yet)": retry, with backoff. Any other OSError while
# connecting (EACCES on the socket, a path that is not a socket) will not cure itself: fail at once.
RETRYABLE_ERRNOS: Final = frozenset(
    {
        errno.ENOENT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EPIPE,
        errno.EAGAIN,
        errno.ENOTCONN,
        errno.ECONNABORTED,
    }
)
# A Unix socket's path lives in sockaddr_un.sun_path: 108 bytes on Linux, with the terminating NUL.
# Checked here, because the transports disagree about a longer one (the blocking socket and asyncio
# raise "AF_UNIX path too long", uvloop reports ENOENT, which looks like a daemon not up yet).
SOCKET_PATH_BYTES_MAX: Final = 107

assert RECONNECT_BACKOFF_S_MIN > 0
assert RECONNECT_BACKOFF_S_MIN <= RECONNECT_BACKOFF_S_MAX
assert "unavailable" in RETRYABLE_ERROR_CODES
assert "disk_full" in RETRYABLE_ERROR_CODES


class ConnectionEnded(Exception):
    """Why a connection ended without an OSError (EOF, a redirect, "retry later"): a last error."""


class Retry:
    """Close the socket, wait `delay_s`, then `begin_attempt` again."""

    __slots__ = ("delay_s",)

    def __init__(self, delay_s: float) -> None:
        assert delay_s >= 0, delay_s
        self.delay_s = delay_s

    def __repr__(self) -> str:
        return f"Retry(delay_s={self.delay_s})"


class Fail:
    """Close the socket and raise (or report) `error`; the outage is over."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Fail({self.error!r})"


Action = Retry | Fail


def socket_path_problem(socket_path: str) -> str | None:
    """What is wrong with `socket_path` as a Unix socket's path, or None."""
    if "\0" in socket_path[1:]:  # a leading NUL names an abstract socket (Linux): allowed
        return f"socket_path={socket_path!r} contains a NUL byte"
    length = len(socket_path.encode("utf-8", "surrogateescape"))
    if length > SOCKET_PATH_BYTES_MAX:
        return (
            f"socket_path={socket_path!r} is {length} bytes > SOCKET_PATH_BYTES_MAX="
            f"{SOCKET_PATH_BYTES_MAX} (a Unix socket's path limit): use a shorter path"
        )
    return None
