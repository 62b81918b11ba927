"""sd_notify over a fake NOTIFY_SOCKET, and the watchdog gate that pings only while roles progress.

The fake socket is what systemd holds: a SOCK_DGRAM AF_UNIX socket, bound either to a path or to
an abstract name. The end-to-end test runs a real child process that bumps a heartbeat counter in
shared memory and stops it with SIGSTOP: the pings must stop, and resume after SIGCONT.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.notify import (
    STATUS_BYTES_MAX,
    Notifier,
    WatchdogGate,
    watchdog_interval_s,
    watchdog_timeout_s,
)

# A fake systemd answers nothing; a test waits at most this long for a datagram that must come.
RECEIVE_TIMEOUT_S = 5.0
# The child bumps its heartbeat this often (sleeping between bumps, never spinning).
HEARTBEAT_PERIOD_S = 0.005
# The gate ticks this often in the end-to-end test: many heartbeat periods, so a running child
# always advances between two ticks even on 2 busy cores... unless it is descheduled for longer,
# which is why the end-to-end test asserts on state transitions, never on a count within a time.
TICK_PERIOD_S = 0.1
# Bound on how long the end-to-end test waits for a ping to arrive or to stop arriving.
WAIT_TIMEOUT_S = 20.0


class FakeSystemd:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str | bytes) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.settimeout(RECEIVE_TIMEOUT_S)

    def receive(self) -> list[str]:
        data = self.socket.recv(4096)
        return data.decode().split("\n")

    def receive_nowait(self) -> list[list[str]]:
        received = []
        self.socket.setblocking(False)
        try:
            while True:
                received.append(self.socket.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.socket.settimeout(RECEIVE_TIMEOUT_S)
        return received

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def path_systemd(tmp_dir: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_dir / "notify")
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(
    request: pytest.FixtureRequest, tmp_dir: Path, unique: str
) -> Iterator[tuple[FakeSystemd, str]]:
    if request.param == "path":
        address: str | bytes = str(tmp_dir / "notify")
        env_value = str(address)
    else:
        name = f"seqd-test-notify-{unique}"
        address = b"\0" + name.encode()
        env_value = "@" + name
    fake = FakeSystemd(address)
    yield fake, env_value
    fake.close()


@pytest.fixture
def notifier(fake_systemd: tuple[FakeSystemd, str]) -> Iterator[Notifier]:
    _, env_value = fake_systemd
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": env_value})
    yield notifier
    notifier.close()


def test_ready_status_and_watchdog_reach_the_socket(
    fake_systemd: tuple[FakeSystemd, str], notifier: Notifier
) -> None:
    fake, _ = fake_systemd
    assert notifier.enabled
    assert notifier.status("recovering 1200 records")
    assert fake.receive() == ["STATUS=recovering 1200 records"]
    assert notifier.ready("serving")
    assert fake.receive() == ["READY=1", "STATUS=serving"]
    assert notifier.watchdog()
    assert fake.receive() == ["WATCHDOG=1"]
    assert notifier.stopping("draining")
    assert fake.receive() == ["STOPPING=1", "STATUS=draining"]
    assert notifier.extend_timeout(30_000_000)
    assert fake.receive() == ["EXTEND_TIMEOUT_USEC=30000000"]
    assert notifier.reloading()
    reloading = fake.receive()
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert notifier.sent == 6
    assert notifier.send_failures == 0


def test_status_text_stays_on_one_line_and_within_bound(
    fake_systemd: tuple[FakeSystemd, str], notifier: Notifier
) -> None:
    fake, _ = fake_systemd
    notifier.status("serving\nREADY=1")
    assert fake.receive() == ["STATUS=serving READY=1"]
    notifier.status("x" * (STATUS_BYTES_MAX * 2))
    (line,) = fake.receive()
    assert line == "STATUS=" + "x" * STATUS_BYTES_MAX


def test_notifier_without_notify_socket_sends_nothing_and_returns_false() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.sent == 0
    assert notifier.send_failures == 0


def test_send_failure_is_counted_and_logged_once_not_raised(
    tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_dir / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    notifier.close()
    assert notifier.send_failures == 3
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


def test_send_failures_are_logged_again_after_a_success(
    tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_dir / "flaky"
    notifier = Notifier(str(path))
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        assert not notifier.watchdog()
        fake = FakeSystemd(str(path))
        assert notifier.watchdog()
        fake.close()
        path.unlink()
        assert not notifier.watchdog()
    notifier.close()
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 2


def test_unknown_socket_scheme_disables_notifications() -> None:
    notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert not notifier.ready()


def test_unset_environment_hides_notify_variables_from_children(
    monkeypatch: pytest.MonkeyPatch, path_systemd: tuple[FakeSystemd, str]
) -> None:
    fake, path = path_systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ
    assert "WATCHDOG_PID" not in os.environ
    assert notifier.ready()
    assert fake.receive() == ["READY=1"]
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4242"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_the_watched_pid(
    environ: dict[str, str], expected_s: float | None
) -> None:
    assert watchdog_interval_s(environ, pid=4242) == expected_s


def test_watchdog_timeout_is_the_full_interval() -> None:
    assert watchdog_timeout_s({"WATCHDOG_USEC": "2500000"}, pid=1) == 2.5


# --- WatchdogGate -----------------------------------------------------------------------------


class Heartbeats:
    def __init__(self, **values: int) -> None:
        self.values = dict(values)

    def __call__(self) -> Mapping[str, int]:
        return dict(self.values)

    def bump(self, *roles: str) -> None:
        for role in roles or tuple(self.values):
            self.values[role] += 1


def test_gate_pings_only_when_every_heartbeat_advanced(caplog: pytest.LogCaptureFixture) -> None:
    heartbeats = Heartbeats(sequencer=0, journaller=0, blp=0)
    pings: list[int] = []
    gate = WatchdogGate(heartbeats, lambda: pings.append(1))
    assert not gate.tick()  # nothing advanced since reset
    heartbeats.bump()
    assert gate.tick()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="daemon.notify"):
        heartbeats.bump("sequencer", "journaller")
        assert not gate.tick()
        heartbeats.bump("sequencer", "journaller")
        assert not gate.tick()
    assert gate.stuck == {"blp"}
    stuck_logs = [r.getMessage() for r in caplog.records if "withheld" in r.getMessage()]
    assert len(stuck_logs) == 1, stuck_logs  # logged when it got stuck, not at every tick
    assert "blp" in stuck_logs[0]
    assert "sequencer" not in stuck_logs[0]
    heartbeats.bump("blp")
    assert gate.tick()
    assert gate.stuck == frozenset()
    assert len(pings) == 2
    assert gate.pings == 2
    assert gate.withheld == 3


def test_gate_compares_with_the_last_ping_not_the_last_tick() -> None:
    """A role that moved once between two withheld ticks has still advanced since the last ping."""
    heartbeats = Heartbeats(sequencer=0, blp=0)
    gate = WatchdogGate(heartbeats, lambda: None)
    heartbeats.bump("blp")
    assert not gate.tick()
    heartbeats.bump("sequencer")
    assert gate.tick()


def test_gate_treats_a_vanished_role_as_stuck() -> None:
    heartbeats = Heartbeats(sequencer=0, blp=0)
    gate = WatchdogGate(heartbeats, lambda: None)
    del heartbeats.values["blp"]
    heartbeats.bump("sequencer")
    assert not gate.tick()
    assert gate.stuck == {"blp"}


def test_gate_reset_takes_a_new_baseline() -> None:
    heartbeats = Heartbeats(blp=7)
    gate = WatchdogGate(heartbeats, lambda: None)
    heartbeats.bump()
    gate.reset()
    assert not gate.tick()


def test_gate_drives_notifier_pings(path_systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = path_systemd
    notifier = Notifier(path)
    heartbeats = Heartbeats(blp=0)
    gate = WatchdogGate(heartbeats, notifier.watchdog)
    heartbeats.bump()
    assert gate.tick()
    assert fake.receive() == ["WATCHDOG=1"]
    assert not gate.tick()
    assert fake.receive_nowait() == []
    notifier.close()


# --- end to end: a real child process, SIGSTOP and SIGCONT ----------------------------------------


def bump_forever(add: Callable[[], object]) -> None:
    while True:
        add()
        time.sleep(HEARTBEAT_PERIOD_S)


def _bump_multiprocessing_value(value: Any) -> None:
    def add() -> None:
        value.value += 1  # the only writer: no lock needed

    bump_forever(add)


def _bump_ipc_counter(segment_name: str) -> None:
    from ipc.counters import Counters  # type: ignore[import-not-found,unused-ignore]

    counters = Counters.attach(segment_name)
    counter = counters["blp.heartbeat"]
    bump_forever(lambda: counter.add(1))


class HeartbeatChild:
    """A child process that bumps one heartbeat counter; `read()` reads it from the parent."""

    def __init__(self, backend: str, unique: str) -> None:
        # fork, not spawn: spawn would start multiprocessing's resource tracker, a process that
        # outlives the test. The child only sleeps and bumps a counter, so forking pytest is safe.
        context = multiprocessing.get_context("fork")
        self._cleanup: list[Callable[[], None]] = []
        if backend == "ipc.counters":
            counters_module = pytest.importorskip("ipc.counters")
            name = f"/seqd.{unique}.counters"
            counters = counters_module.Counters.create(name, ["blp.heartbeat"])
            self._cleanup.append(counters.unlink)
            self._cleanup.append(counters.close)
            counter = counters["blp.heartbeat"]
            self.read: Callable[[], int] = counter.get
            self.process = context.Process(target=_bump_ipc_counter, args=(name,), daemon=True)
        else:
            value = context.RawValue("q", 0)
            self.read = lambda: int(value.value)
            self.process = context.Process(
                target=_bump_multiprocessing_value, args=(value,), daemon=True
            )
        self.process.start()

    def close(self) -> None:
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.join(timeout=WAIT_TIMEOUT_S)
        for cleanup in reversed(self._cleanup):
            cleanup()


@pytest.fixture(params=["multiprocessing.Value", "ipc.counters"])
def heartbeat_child(request: pytest.FixtureRequest, unique: str) -> Iterator[HeartbeatChild]:
    child = HeartbeatChild(request.param, unique)
    request.addfinalizer(child.close)
    yield child


def tick_until(gate: WatchdogGate, fake: FakeSystemd, pinged: bool) -> list[list[str]]:
    """Tick the gate every TICK_PERIOD_S until a tick pings (pinged=True) or withholds
    (pinged=False), bounded by WAIT_TIMEOUT_S; returns the datagrams received meanwhile."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(TICK_PERIOD_S)
        if gate.tick() == pinged:
            return fake.receive_nowait()
    raise AssertionError(f"gate never {'pinged' if pinged else 'withheld'} in {WAIT_TIMEOUT_S} s")


def test_pings_stop_while_a_role_is_sigstopped_and_resume_after_sigcont(
    heartbeat_child: HeartbeatChild, path_systemd: tuple[FakeSystemd, str]
) -> None:
    fake, path = path_systemd
    notifier = Notifier(path)
    pid = heartbeat_child.process.pid
    assert pid is not None
    # The supervisor's own heartbeat stands beside the child's: the gate needs every one.
    supervisor = {"beats": 0}

    def heartbeats() -> Mapping[str, int]:
        supervisor["beats"] += 1
        return {"supervisor": supervisor["beats"], "blp": heartbeat_child.read()}

    gate = WatchdogGate(heartbeats, notifier.watchdog)
    try:
        received = tick_until(gate, fake, pinged=True)
        assert ["WATCHDOG=1"] in received

        os.kill(pid, signal.SIGSTOP)
        # The first tick after the stop may still see a bump made just before it; the next
        # withheld tick proves the child is frozen.
        tick_until(gate, fake, pinged=False)
        frozen_at = heartbeat_child.read()
        fake.receive_nowait()  # drop pings sent before the freeze took hold
        for _ in range(5):
            time.sleep(TICK_PERIOD_S)
            assert not gate.tick()
        assert fake.receive_nowait() == []
        assert heartbeat_child.read() == frozen_at
        assert gate.stuck == {"blp"}

        os.kill(pid, signal.SIGCONT)
        received = tick_until(gate, fake, pinged=True)
        assert ["WATCHDOG=1"] in received
        assert gate.stuck == frozenset()
    finally:
        notifier.close()
