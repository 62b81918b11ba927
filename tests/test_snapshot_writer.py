"""The forked snapshot writer (daemon.snapshot_writer) never outlives the process that forked it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil

WAIT_S = 30.0  # the writer dies within milliseconds of its parent; this only stops a hang

# A stand-in for the blp: forks a writer whose encode() never returns, prints the writer's pid,
# then waits to be killed.
PARENT = textwrap.dedent(
    """
    import signal, sys
    from daemon.snapshot_writer import fork_and_write_snapshot

    def encode():
        signal.pause()  # a long encode: the writer is still running when its parent dies
        raise AssertionError("not reached")

    print(fork_and_write_snapshot(sys.argv[1], encode), flush=True)
    signal.pause()
    """
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_snapshot_writer_dies_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    writer_pid = 0
    try:
        assert parent.stdout is not None
        writer_pid = int(parent.stdout.readline())
        assert not _gone(writer_pid)
        parent.kill()  # SIGKILL: no handler, no cleanup, as when the blp crashes
        parent.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not _gone(writer_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(writer_pid), f"snapshot writer {writer_pid} outlived its killed parent"
        assert list(tmp_path.iterdir()) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(WAIT_S)
        if writer_pid and not _gone(writer_pid):
            psutil.Process(writer_pid).kill()
        if parent.stdout is not None:
            parent.stdout.close()


def test_snapshot_writer_whose_parent_died_before_it_started_exits_orphaned_and_writes_nothing(
    tmp_path, monkeypatch
):
    """The parent-death signal covers only a death after the writer asks for it; a blp that died
    between the fork and that request leaves the writer with another parent. Simulated by making
    the parent's pid, as noted before the fork, not the writer's parent."""
    import os

    from daemon.snapshot_writer import WRITER_EXIT_ORPHANED, fork_and_write_snapshot

    real_getpid = os.getpid
    monkeypatch.setattr(os, "getpid", lambda: real_getpid() + 1)  # never our own pid
    called = tmp_path / "encode-called"

    def encode():  # type: ignore[no-untyped-def]
        called.touch()
        raise AssertionError("an orphaned writer must not encode")

    pid = fork_and_write_snapshot(tmp_path / "snapshots", encode)
    monkeypatch.undo()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == WRITER_EXIT_ORPHANED
    assert not called.exists()
    assert not (tmp_path / "snapshots").exists()
