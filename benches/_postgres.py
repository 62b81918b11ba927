"""A real PostgreSQL server in a temporary directory: for the tests (tests/pg_server.py) and
benches/projection.py.

The Debian `postgresql` package's binaries (`/usr/lib/postgresql/<version>/bin`, or on PATH);
`.ci/run` installs the package when none is found. PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the `postgres` user (the package creates it) or `nobody`.
It listens on a Unix socket in its directory only (no TCP port to collide on), trusts local
connections, and checks for vanished clients every 100 ms, so a projector killed with SIGKILL
mid-statement has its transaction aborted at once instead of when the statement ends.

    server = start_server(fsync=False)   # or use it as a context manager
    dsn = server.create_database()
    server.stop()                        # stopped, directory removed
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

SERVER_START_TIMEOUT_S = 60
SERVER_STOP_TIMEOUT_S = 30.0
PORT = 5432  # only names the socket file: the server listens on no TCP port
NO_BINARY = "no PostgreSQL binary (initdb) found: install the Debian package postgresql (.ci/run does)"


def find_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(found)
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        if bindir:
            candidates.append(str(Path(bindir) / "initdb"))
    except (OSError, subprocess.SubprocessError):
        pass
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return Path(candidate).parent
    return None


def _server_user() -> str | None:
    """The user the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError(
        "the tests run as root and PostgreSQL refuses to: no 'postgres' or 'nobody' user exists to "
        "run it as. Create one (useradd --system postgres) or run the tests as another user"
    )


@dataclass
class PostgresServer:
    directory: Path
    bindir: Path
    user: str | None
    fsync: bool = False  # off for the tests (speed); on for the benchmark (what a commit costs)
    started: bool = False

    @property
    def socket_dir(self) -> Path:
        return self.directory

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={PORT} user=seqd dbname={dbname}"

    def _run(self, *argv: str, timeout_s: float = 120.0) -> None:
        # Output to a file, not a pipe: the server pg_ctl starts would hold a pipe open.
        output = self.directory / "ctl.log"
        with open(output, "wb") as file:
            result = subprocess.run(list(argv), user=self.user, stdout=file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout_s)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}:\n"
                               f"{output.read_text(errors='replace')}\n{self.log()}")  # fmt: skip

    def start(self) -> None:
        data = self.directory / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "seqd", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        options = (f"-k {self.socket_dir} -p {PORT} -c listen_addresses='' -c fsync={'on' if self.fsync else 'off'} "
                   "-c client_connection_check_interval=100ms -c max_connections=50")  # fmt: skip
        # pg_ctl detaches the server (it is not our child, so the per-test check for leaked
        # child processes leaves it alone) and -w waits until it accepts connections.
        self.started = True  # before: a start that times out may still have left a server running
        self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-t", str(int(SERVER_START_TIMEOUT_S)),
                  "-D", str(data), "-l", str(self.directory / "server.log"), "-o", options)  # fmt: skip

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        try:
            if self.started and (self.directory / "data" / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-m", "immediate",
                          "-D", str(self.directory / "data"), timeout_s=SERVER_STOP_TIMEOUT_S)  # fmt: skip
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self) -> str:
        """A new database; its DSN."""
        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


def start_server(fsync: bool = False) -> PostgresServer:
    """A running server in a new temporary directory.

    Raises:
        RuntimeError: no binary (install the Debian package postgresql), or it did not start.
    """
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(NO_BINARY)
    user = _server_user()
    directory = Path(tempfile.mkdtemp(prefix="seqd-pg-", dir="/tmp"))
    server = PostgresServer(directory, bindir, user, fsync)
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        server.start()
    except BaseException:
        server.stop()  # removes the directory, and stops the server if pg_ctl started it
        raise
    return server
