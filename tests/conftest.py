"""Fixtures every test shares: unique names, and a check that nothing is leaked.

Each test that creates shared memory, sockets or files takes `unique` (a short token) and puts it in
every name it creates. After the test, anything in /dev/shm that still carries the token is removed
and the test fails: a leaked segment is a defect. Child processes still alive after a test are
killed and the test fails for the same reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SHM_DIRECTORY = Path("/dev/shm")


@pytest.fixture
def unique() -> Iterator[str]:
    token = f"t{uuid.uuid4().hex[:10]}"
    yield token
    leaked = sorted(p.name for p in SHM_DIRECTORY.glob(f"*{token}*"))
    for name in leaked:
        try:
            (SHM_DIRECTORY / name).unlink()
        except FileNotFoundError:
            pass
    assert not leaked, f"shared-memory segments leaked by the test: {leaked}"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    yield
    me = psutil.Process()
    children = [c for c in me.children(recursive=True) if c.is_running()]
    survivors = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                child.wait(timeout=1)
                continue
            survivors.append(f"{child.pid} {' '.join(child.cmdline())[:120]}")
            child.kill()
            child.wait(timeout=5)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
    assert not survivors, f"processes leaked by the test: {survivors}"


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """A short temporary directory: Unix socket paths are limited to 107 bytes."""
    short = Path("/tmp") / f"seqd-{uuid.uuid4().hex[:8]}"
    short.mkdir(mode=0o750)
    yield short  # type: ignore[misc]
    import shutil

    shutil.rmtree(short, ignore_errors=True)


if os.environ.get("PYTHONOPTIMIZE"):
    raise SystemExit("seqd's tests rely on assert statements: do not run them with -O")
