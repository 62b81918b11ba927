"""Run a node as a child process: for `seqd demo`, the benchmarks and the end-to-end tests.

`NodeProcess` writes a config file, starts `python -m daemon.cli run` in its own process group,
waits until the counters say the node serves, and stops it (SIGTERM, then SIGKILL) and removes
what it created, even when the caller fails half-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon.config import Config, load_config
from daemon.layout import (
    NODE_STATE,
    ROLE_COUNTERS,
    SUPERVISOR_RESTARTS,
    NodeState,
    Role,
    attach_counters,
    counters_name,
    egress_name,
    log_name,
    proposal_name,
)
from daemon.parent_death import ParentWatch
from ipc.counters import Counters

__all__ = ["NodeError", "NodeProcess", "write_config"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class NodeError(Exception):
    pass


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table ([cluster] members = [{id = 1, ...}, ...])
        return "{" + ", ".join(f"{key} = {_toml_value(v)}" for key, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, settings: dict[str, dict[str, Any]]) -> Path:
    """Write a small TOML file from {section: {key: value}} (dotted sections allowed; the
    section "" holds top-level keys)."""
    lines: list[str] = [f"{key} = {_toml_value(value)}" for key, value in settings.get("", {}).items()]
    for section, values in settings.items():
        if not section:
            continue  # top-level keys, written above the first table
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class NodeProcess:
    """A seqd node in a child process.

    Args:
        directory: where the config, journal, snapshots and socket go (a short path: socket
            addresses are limited to 107 bytes).
        node: the node name (unique per test: it names the shared-memory segments).
        settings: extra config sections, merged over the defaults below.
    """

    def __init__(self, directory: Path, node: str, settings: dict[str, dict[str, Any]] | None = None, log_path: Path | None = None) -> None:
        self.directory = Path(directory)
        self.node = node
        merged: dict[str, dict[str, Any]] = {
            "node": {"name": node, "data_dir": str(self.directory / "data")},
            "socket": {"path": str(self.directory / "seqd.sock"), "command_bytes_max": 64 << 10},
            "ring": {"log_capacity_bytes": 1 << 20, "egress_capacity_bytes": 2 << 20},  # egress: the least allowed
            "journal": {"segment_bytes": 8 << 20, "batch_bytes_max": 1 << 20},
        }
        for section, values in (settings or {}).items():
            merged.setdefault(section, {}).update(values)
        self.config_path = write_config(self.directory / "seqd.toml", merged)
        self.config: Config = load_config(self.config_path)
        self.socket_path = self.config.socket.path
        self.log_path = log_path or self.directory / "seqd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._watch: ParentWatch | None = None  # held while the node may run

    def _close_watch(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def start(self, wait: bool = True, environment: dict[str, str] | None = None) -> NodeProcess:
        """Start the node. It stops by itself (a drain) when this process ends, however it ends
        (a test runner killed with SIGKILL): daemon/parent_death.py, `ParentWatch`."""
        self._close_watch()  # a start after a crash the caller did not reap
        self._log_file = open(self.log_path, "ab")
        env = dict(os.environ)
        env.update(environment or {})
        self._watch = watch = ParentWatch()
        env.update(watch.environment)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run", "--config", str(self.config_path)],
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                pass_fds=watch.pass_fds,
            )
        finally:
            watch.started()
        if wait:
            self.wait_serving()
        return self

    def counters(self) -> Counters:
        return attach_counters(self.node)

    def read_counters(self) -> dict[str, int]:
        counters = self.counters()
        try:
            return counters.snapshot()
        finally:
            counters.close()

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S, after_restarts: int | None = None) -> None:
        """Wait until the node serves (and, if given, has restarted at least that many times)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NodeError(f"seqd exited with {self.process.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                values = self.read_counters()
            except Exception:
                values = None
            if (
                values is not None
                and values.get(NODE_STATE.name) == NodeState.SERVING
                and (after_restarts is None or values.get(SUPERVISOR_RESTARTS.name, 0) >= after_restarts)
                and os.path.exists(self.socket_path)
            ):
                return
            time.sleep(0.02)
        raise NodeError(f"seqd did not serve within {timeout_s} s; log:\n{self.log_text()[-4000:]}")

    def role_pid(self, role: str) -> int:
        return self.read_counters()[ROLE_COUNTERS[Role(role)].pid.name]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (drain), then SIGKILL the whole group if it does not exit in time."""
        process = self.process
        code: int | None = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            self._kill_group()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.process = None
        return code

    def kill(self) -> None:
        """kill -9 the supervisor and every role (a power cut for the node's processes)."""
        self._kill_group()
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def _kill_group(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        # Roles die with the supervisor (PR_SET_PDEATHSIG); wait for them to be gone.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        self._close_watch()

    def remove_shared_memory(self) -> None:
        """Remove segments a killed node left behind (a stopped node removes its own)."""
        from ipc.segment import remove_stale

        for name in (counters_name(self.node), log_name(self.node), egress_name(self.node), proposal_name(self.node)):
            try:
                remove_stale(name)
            except Exception:
                pass

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self.remove_shared_memory()
