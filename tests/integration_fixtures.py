"""Real processes for the integration gateway's tests: the payment service and `seqd integration`.

Both run in their own process group and are killed with SIGKILL (a crash, never a drain) by
`kill()`; `stop()` at the end of a test leaves nothing running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from daemon.harness import write_config

WITHDRAWAL_APP = "sequencer.apps.withdrawals:WithdrawalLedger"
START_TIMEOUT_S = 30.0


class _Child:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_offset = 0  # where the latest start's lines begin

    def _spawn(self, argv: list[str]) -> None:
        assert self.process is None, "already running"
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash at whatever point it was)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class PaymentServiceProcess(_Child):
    """`python -m sequencer.apps.payment_service` on 127.0.0.1; keeps its port across restarts."""

    def __init__(self, directory: Path, faults: dict[str, float] | None = None, seed: int = 0) -> None:
        super().__init__(directory / "payments.log")
        self.directory = directory
        self.db_path = directory / "payments.db"
        self.faults = faults or {}
        self.seed = seed
        self.port = 0

    def start(self) -> PaymentServiceProcess:
        port_file = self.directory / f"payments.port.{self.starts}"
        argv = [sys.executable, "-m", "sequencer.apps.payment_service", "--db", str(self.db_path),
                "--port", str(self.port), "--port-file", str(port_file), "--seed", str(self.seed + self.starts)]
        for name, value in self.faults.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        self._spawn(argv)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            assert self.running, f"the payment service exited; log:\n{self.log_text()[-2000:]}"
            assert time.monotonic() < deadline, "the payment service did not listen in time"
            time.sleep(0.01)
        self.port = int(port_file.read_text())
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        """GET without the faults (they apply to POST only)."""
        with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


class GatewayProcess(_Child):
    """`seqd integration --config ...` for the withdrawals example."""

    def __init__(self, directory: Path, node_config: Path, service: PaymentServiceProcess) -> None:
        super().__init__(directory / "integration.log")
        self.config_path = directory / "integration.toml"
        self.node_config = node_config
        self.service = service

    def start(self) -> GatewayProcess:
        write_config(self.config_path, {
            "": {"system": "sequencer.apps.payout_gateway:PaymentService",
                 "node_config": str(self.node_config), "reconnect_timeout_s": 120.0},
            "options": {"base_url": self.service.base_url, "timeout_s": 1.0},
        })  # fmt: skip
        self._spawn([sys.executable, "-m", "daemon.cli", "integration", "--config", str(self.config_path)])
        return self

    def wait_following(self, timeout_s: float = 60.0) -> None:
        """Until the latest start has agreed on the pending requests and follows the stream."""
        deadline = time.monotonic() + timeout_s
        while b"; following from " not in self.log_path.read_bytes()[self.log_offset :]:
            assert self.running, f"the gateway exited; log:\n{self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the gateway did not start; log:\n{self.log_text()[-3000:]}"
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not return in time; the exit code (None: killed)."""
        process = self.process
        if process is None:
            return None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self.process = None
