"""A real nats-server with JetStream in a temporary directory: for the tests (tests/nats_server.py)
and benches/export.py.

The Debian `nats-server` package's binary (on PATH or /usr/sbin); `.ci/run` installs the package
when it is missing. The server listens on 127.0.0.1 on a free port and keeps JetStream's files in
its directory, so `kill()` (SIGKILL) then `start()` is a crash and a restart of the same server.

    server = NatsServer.create()      # started
    server.url                        # nats://127.0.0.1:<port>
    server.kill(); server.start()     # kill -9, then the same server again
    server.stop()                     # stopped, directory removed
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
NO_BINARY = "no nats-server binary found: install the Debian package nats-server (.ci/run does)"


def find_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class NatsServer:
    directory: Path
    binary: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def create(cls) -> NatsServer:
        """A running server in a new temporary directory.

        Raises:
            RuntimeError: no binary (install the Debian package nats-server), or it did not start.
        """
        binary = find_binary()
        if binary is None:
            raise RuntimeError(NO_BINARY)
        server = cls(Path(tempfile.mkdtemp(prefix="seqd-nats-", dir="/tmp")), binary, free_port())
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def start(self) -> None:
        """Start it (again: the same port and JetStream directory) and wait until it accepts
        connections."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--jetstream", "--store_dir", str(self.directory / "jetstream"),
                 "--addr", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return  # JetStream may still be recovering its streams: clients retry
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not accept connections in {SERVER_START_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.02)

    def version(self) -> str:
        result = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
        return result.stdout.strip().removeprefix("nats-server: ")

    def kill(self) -> None:
        """SIGKILL: whatever it had not written to its files is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
