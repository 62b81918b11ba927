"""sd_notify spoken directly, and a watchdog that pings only while every role makes progress.

Theory of operation. systemd passes a Type=notify service the address of a datagram socket in
$NOTIFY_SOCKET: a file system path, or an abstract name written with a leading '@' (the kernel
sees a NUL there). A notification is one datagram of newline-separated KEY=VALUE assignments:
READY=1 when start-up is complete, STATUS=<text> for `systemctl status`, WATCHDOG=1 to reset the
watchdog, STOPPING=1, RELOADING=1, EXTEND_TIMEOUT_USEC=<us>. That is the whole protocol
(systemd `sd_notify(3)`, `src/libsystemd/sd-daemon/sd-daemon.c`), so seqd speaks it with the
stdlib instead of linking libsystemd.

A notification is advice to the service manager, never a reason for the node to fail: a send
that fails (systemd restarting, a full queue) is counted and logged once, and the node goes on.
The socket is non-blocking, so a stalled receiver can never stall the supervisor's loop; a ping
lost that way is followed by the next one.

Outside systemd $NOTIFY_SOCKET is unset and every call is a no-op returning False.

The watchdog. With WatchdogSec= set, systemd passes $WATCHDOG_USEC (and $WATCHDOG_PID, the pid
meant to ping) and kills the service if WATCHDOG=1 does not arrive within that time.
`sd_watchdog_enabled(3)` advises pinging at half the interval. A supervisor that pinged from a
timer alone would prove only that the supervisor runs; `WatchdogGate` pings only when the
heartbeat counter of every role has advanced since the last ping, so a hung role (a blp stuck in
the app, a journaller stuck in a dead disk, a process SIGSTOPped) lets the watchdog expire and
systemd restarts the node, which recovers from snapshot + journal.

The watchdog arms when READY=1 arrives (systemd.service(5), WatchdogSec=). Before that, during
recovery, TimeoutStartSec= applies; `Notifier.extend_timeout` moves it while replay progresses.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = [
    "NOTIFY_SOCKET_ENV",
    "STATUS_BYTES_MAX",
    "WATCHDOG_PID_ENV",
    "WATCHDOG_USEC_ENV",
    "Notifier",
    "WatchdogGate",
    "watchdog_interval_s",
    "watchdog_timeout_s",
]

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# systemd reads a notification with a buffer of NOTIFY_BUFFER_MAX (PIPE_BUF = 4096 bytes) and
# drops what does not fit; a status line is for a human in `systemctl status`, so cut it well
# below that rather than lose the whole datagram.
STATUS_BYTES_MAX = 1024
NOTIFY_DATAGRAM_BYTES_MAX = 4096
assert STATUS_BYTES_MAX + 64 < NOTIFY_DATAGRAM_BYTES_MAX

_logger = logging.getLogger(__name__)


def watchdog_timeout_s(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog timeout systemd enforces on this process, or None when there is none.

    Follows sd_watchdog_enabled(3): $WATCHDOG_USEC must be a positive integer, and when
    $WATCHDOG_PID is set it must name this process (a child that inherited the variables is not
    the one being watched).

    Args:
        environ: the environment to read; os.environ by default.
        pid: the pid to compare with $WATCHDOG_PID; os.getpid() by default.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    text = environ.get(WATCHDOG_USEC_ENV)
    if not text:
        return None
    try:
        timeout_us = int(text)
    except ValueError:
        _logger.warning(
            "ignoring %s=%r: not an integer number of microseconds", WATCHDOG_USEC_ENV, text
        )
        return None
    if timeout_us <= 0:
        return None
    watchdog_pid = environ.get(WATCHDOG_PID_ENV)
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            _logger.warning(
                "ignoring the watchdog: %s=%r is not a pid", WATCHDOG_PID_ENV, watchdog_pid
            )
            return None
    return timeout_us / 1_000_000


def watchdog_interval_s(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """How often to ping the watchdog: half its timeout (sd_watchdog_enabled(3)), or None.

    Half leaves a whole ping's worth of slack for a late wake-up before systemd acts.
    """
    timeout_s = watchdog_timeout_s(environ, pid)
    return None if timeout_s is None else timeout_s / 2


def _socket_address(text: str) -> str | bytes | None:
    """The address to send to: a path, or an abstract name as bytes with a leading NUL."""
    if text.startswith("@"):
        # Linux abstract namespace: the name is the bytes after a leading NUL, not a file.
        return b"\0" + text[1:].encode()
    if text.startswith("/"):
        return text
    # vsock: and other transports of newer systemd are not spoken here.
    return None


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET; every method is a no-op without it.

    Methods return True when the datagram was sent, False when notifications are off or the
    send failed; they never raise on a failed send. `send_failures` counts failures.
    """

    def __init__(self, socket_address: str | None) -> None:
        """Args:
        socket_address: the $NOTIFY_SOCKET value ('/path' or '@abstract'), or None for a
            notifier that sends nothing.
        """
        self.socket_text = socket_address or None
        self._address = _socket_address(socket_address) if socket_address else None
        if socket_address and self._address is None:
            _logger.warning(
                "%s=%r is neither a path nor an @abstract name; systemd notifications are off",
                NOTIFY_SOCKET_ENV,
                socket_address,
            )
        self._socket: socket.socket | None = None
        self.sent = 0
        self.send_failures = 0
        self._failing = False  # True from a failed send to the next good one: logs once per run.

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """A notifier for $NOTIFY_SOCKET.

        Args:
            environ: the environment to read; os.environ by default.
            unset_environment: remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from
                os.environ afterwards, so the roles the supervisor spawns do not inherit them
                (NotifyAccess=main would ignore them anyway; this keeps them from trying).
                Read `watchdog_interval_s()` before unsetting.
        """
        environ = os.environ if environ is None else environ
        notifier = cls(environ.get(NOTIFY_SOCKET_ENV))
        if unset_environment:
            for name in (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV):
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments in one datagram (systemd applies them together)."""
        if self._address is None:
            return False
        for assignment in assignments:
            assert "=" in assignment, assignment
            assert "\n" not in assignment, assignment
        data = "\n".join(assignments).encode()
        assert len(data) <= NOTIFY_DATAGRAM_BYTES_MAX, len(data)
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(data, self._address)
        except OSError as error:
            self.send_failures += 1
            if not self._failing:
                _logger.warning(
                    "sd_notify to %s failed (%s); the node carries on, failures are counted "
                    "and logged again only after a send succeeds",
                    self.socket_text,
                    error,
                )
            self._failing = True
            return False
        self._failing = False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (recovery) is complete; optionally with a status line."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", _status_assignment(status))

    def status(self, text: str) -> bool:
        """STATUS=<text>, shown by `systemctl status`: say what the node is doing."""
        return self.send(_status_assignment(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: reset the watchdog timer."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: a drain has begun."""
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1", _status_assignment(status))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, which systemd 253+ wants for Type=notify-reload."""
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_us}")

    def extend_timeout(self, timeout_us: int) -> bool:
        """EXTEND_TIMEOUT_USEC: the start (or stop) timeout now ends `timeout_us` from now."""
        assert timeout_us > 0, timeout_us
        return self.send(f"EXTEND_TIMEOUT_USEC={int(timeout_us)}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status_assignment(text: str) -> str:
    # One line: a newline would start another assignment, which a status text must not do.
    line = " ".join(text.split())
    encoded = line.encode()
    if len(encoded) > STATUS_BYTES_MAX:
        line = encoded[:STATUS_BYTES_MAX].decode(errors="ignore")
    return f"STATUS={line}"


class WatchdogGate:
    """Pings the watchdog only while every role's heartbeat advances.

    Call `tick()` every `watchdog_interval_s()`. It reads every heartbeat; if each one has
    changed since the last ping (or since `reset()`), it pings and takes the values as the new
    baseline. Otherwise it does not ping and logs which roles are stuck (once when a role gets
    stuck, once when it moves again), so a node whose role hangs is killed by systemd within one
    watchdog timeout.

    The interval between ticks must be longer than the longest pause between two heartbeats of
    a healthy role, including a role parked in a blocking idle strategy: such a role must wake on
    a timeout well below the tick interval and bump its heartbeat.
    """

    def __init__(
        self,
        heartbeats: Callable[[], Mapping[str, int]],
        ping: Callable[[], object],
        logger: logging.Logger | None = None,
    ) -> None:
        """Args:
        heartbeats: returns {role: heartbeat counter value} for every role that must be alive.
        ping: sends the ping, normally `notifier.watchdog`; during recovery, a call of
            `notifier.extend_timeout` with a gate over the replay counter works the same way.
        logger: where stuck roles are reported.
        """
        self._heartbeats = heartbeats
        self._ping = ping
        self._logger = logger or _logger
        self._baseline: dict[str, int] = {}
        self.stuck: frozenset[str] = frozenset()
        self.pings = 0
        self.withheld = 0
        self.reset()

    def reset(self) -> None:
        """Take the current heartbeats as the baseline (call when the roles (re)start)."""
        self._baseline = dict(self._heartbeats())
        self.stuck = frozenset()

    def tick(self) -> bool:
        """Ping if every heartbeat advanced since the last ping; returns whether it pinged."""
        current = dict(self._heartbeats())
        stuck = frozenset(
            role
            for role, value in current.items()
            if role not in self._baseline or value == self._baseline[role]
        )
        # A role that vanished from the map is stuck too: the gate must not be fooled into
        # pinging by a role that is no longer reported.
        stuck |= frozenset(role for role in self._baseline if role not in current)
        newly_stuck = stuck - self.stuck
        recovered = self.stuck - stuck
        if newly_stuck:
            self._logger.error(
                "watchdog withheld: heartbeat of %s has not advanced (values %s); if it stays "
                "stuck systemd kills and restarts the node at WatchdogSec",
                ", ".join(sorted(newly_stuck)),
                {role: current.get(role) for role in sorted(newly_stuck)},
            )
        if recovered:
            self._logger.warning("heartbeat of %s advances again", ", ".join(sorted(recovered)))
        self.stuck = stuck
        if stuck or not current:
            self.withheld += 1
            return False
        self._ping()
        self.pings += 1
        self._baseline = current
        return True
