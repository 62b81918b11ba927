"""A small file system for disk-full tests: a tmpfs mounted by the test, or the journal's hook.

As root (here and in CI) the test mounts a real tmpfs of `SMALL_FS_BYTES` in a temporary
directory, so every ENOSPC is the kernel's. Without root it sets `SEQD_FAULT_DISK_BYTES` instead
(`sequencer.journal.LimitedDiskSpace`): the journal directory then behaves as a file system of
that size. Either way the test fills it with a ballast file in the journal directory and frees
space by removing the ballast. The mount is removed by a finaliser, whatever the test does.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sequencer.journal import FAULT_DISK_BYTES_ENV, LimitedDiskSpace

SMALL_FS_BYTES = 48 << 20  # the size the issue was found on
BALLAST_NAME = "ballast"  # not a segment name: the journal ignores it
MOUNT_TIMEOUT_S = 30.0


@dataclass
class SmallFilesystem:
    """Where a node's data directory goes, on a file system of SMALL_FS_BYTES."""

    root: Path  # the mount point (tmpfs) or a plain directory (limit)
    kind: str  # "tmpfs" or "limit"
    environment: dict[str, str] = field(default_factory=dict)  # for the node's processes

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    def free_bytes(self) -> int:
        if self.kind == "limit":
            return LimitedDiskSpace(self._capacity_path).free_bytes(self.journal_dir)
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def disk_space(self) -> LimitedDiskSpace | None:
        """What to pass as `Journal.open(disk=...)` in this process (the node's processes get
        `environment` instead): None for the real file system."""
        return LimitedDiskSpace(self._capacity_path) if self.kind == "limit" else None

    @property
    def _capacity_path(self) -> Path:
        return Path(self.environment[FAULT_DISK_BYTES_ENV])

    def fill(self, leave_bytes: int) -> None:
        """Add ballast until only `leave_bytes` are free (the journal directory must exist)."""
        ballast = self.journal_dir / BALLAST_NAME
        size = (ballast.stat().st_size if ballast.exists() else 0) + self.free_bytes() - leave_bytes
        assert size >= 0, (self.free_bytes(), leave_bytes)
        fd = os.open(ballast, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if self.kind == "limit":
                os.ftruncate(fd, size)  # the hook counts apparent sizes
            else:
                os.ftruncate(fd, 0)
                if size:
                    os.posix_fallocate(fd, 0, size)  # tmpfs counts pages: allocate them
        finally:
            os.close(fd)

    def free_space(self) -> None:
        (self.journal_dir / BALLAST_NAME).unlink(missing_ok=True)


def _mount_tmpfs(root: Path) -> bool:
    """Mount a tmpfs of SMALL_FS_BYTES on `root`; False where that is not allowed (not root, or a
    container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES},mode=0750", "tmpfs", str(root)],
        timeout=MOUNT_TIMEOUT_S, capture_output=True,
    )  # fmt: skip
    return done.returncode == 0


def _unmount(root: Path) -> None:
    done = subprocess.run(["umount", str(root)], timeout=MOUNT_TIMEOUT_S, capture_output=True)
    if done.returncode != 0:  # still busy (a process that is being killed): detach it
        subprocess.run(["umount", "-l", str(root)], timeout=MOUNT_TIMEOUT_S, capture_output=True)


@pytest.fixture
def small_filesystem(tmp_dir: Path, request: pytest.FixtureRequest) -> Iterator[SmallFilesystem]:
    """A SMALL_FS_BYTES file system: a tmpfs as root, the journal's hook otherwise. A test that
    wants the hook even as root is parametrised indirectly with "limit"."""
    kind = getattr(request, "param", "tmpfs")
    root = tmp_dir / f"fs-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    if kind == "tmpfs" and not _mount_tmpfs(root):
        kind = "limit"
    if kind == "tmpfs":
        request.addfinalizer(lambda: _unmount(root))
        filesystem = SmallFilesystem(root, kind)
    else:
        capacity = tmp_dir / f"capacity-{uuid.uuid4().hex[:6]}"
        capacity.write_text(str(SMALL_FS_BYTES))
        filesystem = SmallFilesystem(root, kind, {FAULT_DISK_BYTES_ENV: str(capacity)})
    filesystem.journal_dir.mkdir(parents=True)
    yield filesystem
