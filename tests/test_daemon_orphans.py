"""A role never outlives its supervisor nor joins the next node (issue 17, part 1).

The race: the supervisor is killed while a role it just started is still in Python start-up, so
the role's `PR_SET_PDEATHSIG` comes too late to take it down. It is made deterministic here by a
start-up hook (tests/fixtures/stop_at_start/sitecustomize.py) that makes the chosen role stop
itself (SIGSTOP) before any of seqd's code runs, the moment the supervisor starts it; the test
then kills the supervisor with SIGKILL, starts a new one on the same node, and resumes the orphan
(SIGCONT). Each role is run through the race twice:

- the new supervisor finds the orphan in its dead predecessor's counters and kills it before it
  creates anything;
- the orphan's record is gone (the operator removed the node's shared memory by hand) and the new
  node's own role of the same kind is held at start too, so the orphan gets the first chance at
  the ring slot and the socket: it must exit by itself without touching anything.

The test process is made a child subreaper for these tests, so orphans are reparented to it (not
to init) and their exit status can be read. For the role's own check that changes nothing: its
parent is no longer the supervisor that started it either way.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from daemon import supervisor
from daemon.harness import NodeProcess
from daemon.layout import COUNTER_NAMES, counters_name, egress_name, log_name
from daemon.roles.common import EPOCH_ENV, ROLE_EXIT_ORPHANED, SUPERVISOR_PID_ENV
from daemon.supervisor import LeftoverProcessError, kill_leftover_roles
from sequencer.apps.ledger import Ledger, Transfer
from sequencer.client import Client
from tests.node_fixtures import DEPOSIT, balances, node_factory, open_accounts  # noqa: F401

ROLES = ("sequencer", "journaller", "blp")
ACCOUNTS = ["alice", "bob"]
HOOK_DIRECTORY = Path(__file__).parent / "fixtures" / "stop_at_start"
# Bounds every wait on a condition, so a broken run fails instead of hanging; a healthy run
# meets each condition within a second or two.
WAIT_S = 60.0
POLL_S = 0.005
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans of this test are reparented to the test process, which can reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, ctypes.get_errno()
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _stop_at_start(role: str, flag: Path) -> dict[str, str]:
    """The environment that makes the next `role` process started once `flag` exists stop itself."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{HOOK_DIRECTORY}{os.pathsep}{path}" if path else str(HOOK_DIRECTORY),
        "SEQD_TEST_STOP_ROLE": f"{role}:{flag}",
    }


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {WAIT_S} s waiting for {what}"
        time.sleep(POLL_S)


def _stopped_role(supervisor_pid: int, role: str) -> psutil.Process:
    """The `role` process that supervisor `supervisor_pid` started, once it has stopped itself."""
    found: list[psutil.Process] = []

    def stopped() -> bool:
        for child in psutil.Process(supervisor_pid).children():
            try:
                if child.cmdline()[-1:] == [f"daemon.roles.{role}"] and child.status() == psutil.STATUS_STOPPED:
                    found.append(child)
                    return True
            except psutil.NoSuchProcess:
                continue
        return False

    _wait_for(stopped, f"a {role} of supervisor {supervisor_pid} to stop at start")
    return found[0]


def _orphan_a_starting_role(node: NodeProcess, role: str, flag: Path) -> tuple[psutil.Process, list[psutil.Process]]:
    """Kill `role` so the supervisor restarts the pipeline, stop the new `role` in its start-up,
    kill -9 the supervisor. Returns the orphan (stopped) and every process of the old node."""
    assert node.process is not None
    supervisor = psutil.Process(node.process.pid)
    flag.touch()
    os.kill(node.role_pid(role), signal.SIGKILL)
    orphan = _stopped_role(supervisor.pid, role)
    # The supervisor records the pid right after starting the process; the hook may stop it first.
    _wait_for(lambda: node.read_counters()[f"{role}.pid"] == orphan.pid, f"the supervisor to record {role} pid")
    old = [supervisor, *supervisor.children()]
    os.kill(supervisor.pid, signal.SIGKILL)
    node.process.wait(timeout=WAIT_S)
    for process in old[1:]:
        if process.pid != orphan.pid:
            process.wait(timeout=WAIT_S)  # past prctl: the parent-death signal takes it
    assert orphan.status() == psutil.STATUS_STOPPED
    assert orphan.ppid() == os.getpid()  # reparented: its supervisor is gone
    return orphan, old


def _serving(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    finally:
        probe.close()
    return True


def _successor(node: NodeProcess) -> NodeProcess:
    """A new `seqd run` for the same node name, config, data directory and socket."""
    return NodeProcess(node.directory, node.node, log_path=node.directory / "successor.log")


def _assert_serves_and_is_healthy(node: NodeProcess, old: list[psutil.Process]) -> None:
    assert node.process is not None
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=30) as client:
        client.call(Transfer("alice", "bob", 5))
    assert balances(node.socket_path, ACCOUNTS) == {"alice": DEPOSIT - 5, "bob": DEPOSIT + 5}
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "status", "--node", node.node, "--json"],
        capture_output=True, text=True, timeout=WAIT_S, check=False,
    )
    status = json.loads(result.stdout)
    assert result.returncode == 0, (status["liveness"], status["reason"])
    assert status["liveness"] == "live", status["reason"]
    children = {child.pid for child in psutil.Process(node.process.pid).children()}
    assert {role: status["roles"][role]["pid"] in children for role in ROLES} == dict.fromkeys(ROLES, True)
    assert [process for process in old if process.is_running()] == []


@pytest.mark.parametrize("role", ROLES)
def test_new_supervisor_kills_the_role_its_killed_predecessor_left_starting(
    node_factory, subreaper, tmp_dir: Path, role: str  # noqa: F811
) -> None:
    flag = tmp_dir / "stop-old"
    node = node_factory(environment=_stop_at_start(role, flag))
    open_accounts(node.socket_path, ACCOUNTS)
    orphan, old = _orphan_a_starting_role(node, role, flag)

    successor = _successor(node)
    try:
        successor.start()
        try:
            orphan.resume()
        except psutil.NoSuchProcess:
            pass
        # Killed by the new supervisor at start, before it created the node's shared memory.
        assert orphan.wait(timeout=WAIT_S) == -signal.SIGKILL
        assert f"left {role} pid {orphan.pid} running" in successor.log_text()
        _assert_serves_and_is_healthy(successor, old)
    finally:
        successor.stop()
        successor.remove_shared_memory()


@pytest.mark.parametrize("role", ROLES)
def test_role_whose_supervisor_died_in_its_start_up_exits_by_itself_and_leaves_the_next_node_alone(
    node_factory, subreaper, tmp_dir: Path, role: str  # noqa: F811
) -> None:
    flag = tmp_dir / "stop-old"
    node = node_factory(environment=_stop_at_start(role, flag))
    open_accounts(node.socket_path, ACCOUNTS)
    orphan, old = _orphan_a_starting_role(node, role, flag)
    # The operator's manual clean-up: the new supervisor has no record of the orphan.
    node.remove_shared_memory()

    successor = _successor(node)
    successor_flag = tmp_dir / "stop-new"
    successor_flag.touch()
    try:
        successor.start(wait=False, environment=_stop_at_start(role, successor_flag))
        assert successor.process is not None
        # The new node's own role is held at start: its ring slot (and for the sequencer, the
        # socket) is free when the orphan resumes, the worst moment.
        held = _stopped_role(successor.process.pid, role)
        orphan.resume()
        assert orphan.wait(timeout=WAIT_S) == ROLE_EXIT_ORPHANED
        values = successor.read_counters()
        assert values[f"{role}.pid"] == held.pid  # the orphan wrote nothing
        assert not _serving(successor.socket_path)
        held.resume()
        successor.wait_serving()
        assert successor.read_counters()["supervisor.restarts"] == 0
        _assert_serves_and_is_healthy(successor, old)
    finally:
        successor.stop()
        successor.remove_shared_memory()


def test_role_refuses_shared_memory_of_another_incarnation_before_writing(node_factory) -> None:  # noqa: F811
    node = node_factory()
    before = node.read_counters()
    assert node.process is not None
    environment = dict(os.environ)
    environment["SEQD_CONFIG_JSON"] = node.config.to_json().decode()
    environment[SUPERVISOR_PID_ENV] = str(os.getpid())  # its parent: past the orphan check
    environment[EPOCH_ENV] = "12345"  # not the epoch of the running node's segments
    result = subprocess.run(
        [sys.executable, "-m", "daemon.roles.journaller"],
        env=environment, capture_output=True, text=True, timeout=WAIT_S, check=False,
    )
    assert result.returncode == ROLE_EXIT_ORPHANED, result.stderr
    assert "this process expects 0x0000000000003039" in result.stderr
    after = node.read_counters()
    written_at_start = ("journaller.pid", "journaller.cpu", "journaller.idle", "journaller.state")
    assert [after[name] for name in written_at_start] == [before[name] for name in written_at_start]
    open_accounts(node.socket_path, ACCOUNTS)


def test_role_started_by_hand_is_refused_with_what_to_do(node_factory) -> None:  # noqa: F811
    node = node_factory(start=False)
    environment = {key: value for key, value in os.environ.items() if key not in (SUPERVISOR_PID_ENV, EPOCH_ENV)}
    environment["SEQD_CONFIG_JSON"] = node.config.to_json().decode()
    result = subprocess.run(
        [sys.executable, "-m", "daemon.roles.blp"],
        env=environment, capture_output=True, text=True, timeout=WAIT_S, check=False,
    )
    assert result.returncode == 1
    assert "is started by `seqd run`" in result.stderr


def _start_time_ms(pid: int) -> int:
    return round(psutil.Process(pid).create_time() * 1000)


def _dead_predecessor(node: str, values: dict[str, int]) -> None:
    """Leave node `node`'s counters as a killed supervisor would: its creator has exited."""
    script = (
        "import sys\n"
        "from daemon.layout import COUNTER_NAMES\n"
        "from ipc.counters import Counters\n"
        "counters = Counters.create(sys.argv[1], COUNTER_NAMES)\n"
        "for pair in sys.argv[2:]:\n"
        "    name, value = pair.split('=')\n"
        "    counters[name].set(int(value))\n"
    )
    assert set(values) <= set(COUNTER_NAMES), set(values) - set(COUNTER_NAMES)
    pairs = [f"{name}={value}" for name, value in values.items()]
    subprocess.run([sys.executable, "-c", script, counters_name(node), *pairs], check=True, timeout=WAIT_S)


def test_new_supervisor_kills_only_processes_that_are_still_its_predecessors_roles(
    node_factory, tmp_dir: Path  # noqa: F811
) -> None:
    node = node_factory(start=False)
    leftover = subprocess.Popen(["sleep", "600"])
    unrelated = subprocess.Popen(["sleep", "600"])
    try:
        # The predecessor's journaller is `leftover`; its blp had the pid that `unrelated` has
        # now (the recorded start time is another process's, ten seconds earlier).
        _dead_predecessor(node.node, {
            "journaller.pid": leftover.pid, "journaller.start_time_ms": _start_time_ms(leftover.pid),
            "blp.pid": unrelated.pid, "blp.start_time_ms": _start_time_ms(unrelated.pid) - 10_000,
        })
        node.start()
        assert leftover.wait(timeout=WAIT_S) == -signal.SIGKILL
        assert unrelated.poll() is None
        assert f"left journaller pid {leftover.pid} running" in node.log_text()
        open_accounts(node.socket_path, ACCOUNTS)
    finally:
        for process in (leftover, unrelated):
            process.kill()
            process.wait()


@pytest.mark.parametrize("failure", ["access_denied", "survives_sigkill"])
def test_leftover_that_cannot_be_killed_stops_the_start_with_its_pid_and_what_to_do(
    node_factory, monkeypatch: pytest.MonkeyPatch, failure: str  # noqa: F811
) -> None:
    node = node_factory(start=False)
    leftover = subprocess.Popen(["sleep", "600"])
    try:
        _dead_predecessor(node.node, {"sequencer.pid": leftover.pid, "sequencer.start_time_ms": _start_time_ms(leftover.pid)})

        def kill(process: psutil.Process) -> None:
            if failure == "access_denied":
                raise psutil.AccessDenied(process.pid)

        monkeypatch.setattr(psutil.Process, "kill", kill)
        monkeypatch.setattr(supervisor, "LEFTOVER_KILL_TIMEOUT_S", 0.2)
        expected = "owned by another user" if failure == "access_denied" else "after SIGKILL"
        with pytest.raises(LeftoverProcessError, match=rf"sequencer pid {leftover.pid} \(.*{expected}.*kill -9 {leftover.pid}"):
            kill_leftover_roles(node.node)
        assert leftover.poll() is None
    finally:
        leftover.kill()
        leftover.wait()
        node.remove_shared_memory()


# A test runner: starts a node through the harness from a helper thread that then ends (the
# parent-death signal would take the node down with that thread: daemon/parent_death.py), prints
# the node's processes, and waits to be killed.
_RUNNER = """
import sys, threading, time
from pathlib import Path
from daemon.harness import NodeProcess
node = NodeProcess(Path(sys.argv[1]), sys.argv[2])
starter = threading.Thread(target=node.start)
starter.start()
starter.join()
roles = [node.role_pid(role) for role in ("sequencer", "journaller", "blp")]
print(node.process.pid, *roles, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped yet
    except psutil.NoSuchProcess:
        return True


def test_nodes_of_a_test_runner_killed_with_sigkill_stop_and_remove_their_shared_memory(
    tmp_dir: Path, unique: str
) -> None:
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER, str(tmp_dir), unique], stdout=subprocess.PIPE, text=True)
    segments = [Path("/dev/shm" + name) for name in (counters_name(unique), log_name(unique), egress_name(unique))]
    pids: list[int] = []
    node: NodeProcess | None = None
    try:
        assert runner.stdout is not None
        pids = [int(word) for word in runner.stdout.readline().split()]
        log_path = tmp_dir / "seqd.log"
        assert len(pids) == 4, f"the runner did not start its node: {log_path.read_text()[-2000:] if log_path.exists() else ''}"
        node = NodeProcess(tmp_dir, unique)  # the runner's node, seen from here (the same config)
        assert all(segment.exists() for segment in segments)
        open_accounts(node.socket_path, ACCOUNTS)  # it serves, the thread that started it gone
        runner.kill()
        assert runner.wait(timeout=WAIT_S) == -signal.SIGKILL
        _wait_for(lambda: all(_gone(pid) for pid in pids), "the node's supervisor and roles to exit")
        assert not [segment for segment in segments if segment.exists()], "shared memory left behind"
        assert "watch pipe closed): stopping" in node.log_text()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(timeout=WAIT_S)
        if pids and not _gone(pids[0]):
            os.killpg(pids[0], signal.SIGKILL)  # the node's own process group (start_new_session)
        if node is not None:
            node.remove_shared_memory()
