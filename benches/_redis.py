"""A redis-server for a benchmark's Redis peer: started for the run, gone with it.

The server is the Debian `redis-server` on a Unix socket in the run's directory (benches only;
never needed by seqd or its tests). It is killed by the kernel when the benchmark dies
(`PR_SET_PDEATHSIG`, `daemon.parent_death`), so a benchmark killed by a timeout leaves no server
behind on a shared machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.parent_death import EXIT_ORPHANED, die_with_parent

START_TIMEOUT_S = 10.0  # a local server is up in well under a second
STOP_TIMEOUT_S = 10.0


def available() -> bool:
    return shutil.which("redis-server") is not None


@contextmanager
def redis_server(directory: Path, *, fsync_always: bool) -> Iterator[str]:
    """Run redis-server in `directory` and yield its socket path.

    Args:
        fsync_always: `appendonly yes` with `appendfsync always` (every write durable before its
            reply, the comparison with a seqd node); otherwise no persistence at all (a client's
            own cost is what is measured).
    """
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (Debian: apt-get install redis-server)"
    path = str(directory / "redis.sock")
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if fsync_always else ["--appendonly", "no"]
    parent = os.getpid()

    def tie_to_parent() -> None:
        if not die_with_parent(parent):
            os._exit(EXIT_ORPHANED)

    server = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", path, "--dir", str(directory), *persistence, "--save", ""],
        stdout=subprocess.DEVNULL,
        preexec_fn=tie_to_parent,  # runs in the child before exec; the benches start no threads
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(path):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit code {server.poll()}) in {directory}")
            time.sleep(0.05)
        yield path
    finally:
        server.terminate()
        server.wait(timeout=STOP_TIMEOUT_S)
