"""`seqd run` meets an operator's failure: one line saying what is wrong and what to do, and a
named exit code (daemon/exits.py, docs/operations.md "Exit codes"), never a traceback.

Each case runs a real `seqd run` subprocess against a fault made for real: a corrupt journal
segment, a full file system (a small tmpfs as root; a file size limit otherwise), a bad
configuration, foreign or busy or another user's shared memory, a data directory and a socket
directory the node may not write (as root the node runs as `nobody`, so mode bits bind), a file
where the socket should be. The faults met by a role at its start (the app, the socket) must come
back through the supervisor as that one line, without a restart loop.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.exits import ExitCode
from daemon.harness import NodeProcess
from daemon.layout import COUNTER_NAMES, counters_name, log_name
from ipc.counters import Counters
from sequencer.apps.ledger import Ledger, OpenAccount
from sequencer.client import Client
from tests.node_fixtures import node_factory  # noqa: F401

RUN_TIMEOUT_S = 120.0  # a failing start takes seconds; this only bounds a hang
NOBODY = 65534  # the unprivileged uid and gid the node runs as when the tests run as root
SMALL_FILE_SYSTEM_BYTES = 4 << 20  # holds the config and logs, not one 8 MiB preallocated segment


@dataclass
class Ended:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if " ERROR " in line or " CRITICAL " in line]


def seqd_run(
    config_path: Path, log_level: str | None = None, extra_environment: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (), **popen: Any,
) -> Ended:
    """`seqd run --config` in a subprocess (run through `wrapper`, if any, which must exec it),
    at the default log level unless told."""
    environment = {key: value for key, value in os.environ.items() if key not in ("SEQD_LOG_LEVEL", "NOTIFY_SOCKET")}
    environment.update(extra_environment or {})
    if log_level is not None:
        environment["SEQD_LOG_LEVEL"] = log_level
    result = subprocess.run(
        [*wrapper, sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False, env=environment,
        cwd=Path(__file__).resolve().parent.parent, **popen,
    )
    return Ended(result.returncode, result.stdout, result.stderr)


def assert_one_line(ended: Ended, code: ExitCode, *names: str) -> str:
    """The run ended with `code`, no traceback, and exactly one error line, the last one, which
    names every one of `names` (the path, file or key at fault, and what to do)."""
    shown = f"exit {ended.code}\nstderr:\n{ended.stderr[-4000:]}\nstdout:\n{ended.stdout[-1000:]}"
    assert ended.code == code, shown
    assert "Traceback" not in ended.stderr + ended.stdout, shown
    assert len(ended.error_lines) == 1, shown
    line = ended.error_lines[0]
    assert ended.stderr.rstrip().splitlines()[-1] == line, shown
    assert f"(exit {int(code)} {code.name})" in line, line
    for name in names:
        assert name in line, (name, line)
    return line


def assert_not_restarted(ended: Ended) -> None:
    """A fault a restart cannot cure ends the run at once: no pipeline restart, one start of each role."""
    assert "restarting" not in ended.stderr, ended.stderr[-4000:]
    assert ended.stderr.count("started blp as pid") == 1, ended.stderr[-4000:]


def unprivileged(directory: Path) -> dict[str, Any]:
    """subprocess arguments that make mode bits bind: as root, run as nobody (who then owns the
    test's directory); as anyone else, as themselves."""
    if os.geteuid() != 0:
        return {}
    for root, directories, files in os.walk(directory):
        for name in [root, *(os.path.join(root, entry) for entry in directories + files)]:
            os.chown(name, NOBODY, NOBODY)
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def read_only_directory(path: Path) -> Path:
    path.mkdir(mode=0o555)
    os.chmod(path, 0o555)
    return path


@pytest.fixture
def node_config(tmp_dir: Path, unique: str) -> Callable[..., NodeProcess]:
    """A node's config in the test's directory (not started): NodeProcess writes it."""

    def make(settings: dict[str, dict[str, Any]] | None = None) -> NodeProcess:
        return NodeProcess(tmp_dir, f"{unique}n", settings)

    return make


@pytest.fixture
def small_file_system(tmp_dir: Path) -> Iterator[tuple[Path, Callable[[], None] | None]]:
    """A directory on a file system too small for one journal segment: a tmpfs when the tests
    run as root (ENOSPC), otherwise a plain directory plus a file size limit for the node (EFBIG)."""
    mount_point = tmp_dir / "small"
    mount_point.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FILE_SYSTEM_BYTES},mode=0777", "tmpfs", str(mount_point)],
            capture_output=True, check=False, timeout=30,
        ).returncode == 0

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_FILE_SYSTEM_BYTES, SMALL_FILE_SYSTEM_BYTES))

    try:
        yield mount_point, None if mounted else limit_file_size
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], capture_output=True, check=False, timeout=30)


# ---- the configuration ----------------------------------------------------------------------------


def test_invalid_configuration_is_one_line_naming_every_bad_key_with_exit_config(tmp_dir: Path) -> None:
    path = tmp_dir / "bad.toml"
    path.write_text("[ring]\nlog_capacity_bytes = 12345\n[node]\nnumber = 0\n")
    ended = seqd_run(path)
    assert_one_line(ended, ExitCode.CONFIG, "ring.log_capacity_bytes=12345", "node.number=0", "must be")
    assert not list(Path("/dev/shm").glob("seqd.n1.*"))


def test_missing_configuration_file_says_to_create_it_with_exit_config(tmp_dir: Path) -> None:
    ended = seqd_run(tmp_dir / "absent.toml")
    assert_one_line(ended, ExitCode.CONFIG, str(tmp_dir / "absent.toml"), "create it")


def test_an_app_that_does_not_import_ends_the_run_from_the_blp_without_restarts(
    node_config: Callable[..., NodeProcess],
) -> None:
    node = node_config({"node": {"app": "tests.no_such_module:App"}})
    ended = seqd_run(node.config_path)
    assert_one_line(ended, ExitCode.CONFIG, "node.app", "tests.no_such_module")
    assert_not_restarted(ended)


# ---- the journal ----------------------------------------------------------------------------------


def test_corrupt_journal_names_the_segment_and_says_restore_with_exit_dataerr(
    node_factory: Callable[..., NodeProcess],  # noqa: F811
) -> None:
    node = node_factory()
    with Client(node.socket_path, schema=Ledger.schema, timeout_s=30) as client:
        client.call(OpenAccount("alice"))  # one batch; the next call waits for it, so another
        client.call(OpenAccount("bob"))
    assert node.stop() == 0
    segment = sorted(node.config.journal_dir.glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    data[data.index(b"alice")] ^= 0x01  # a bad CRC with a valid batch after it: not a torn tail
    segment.write_bytes(bytes(data))
    ended = seqd_run(node.config_path)
    assert_one_line(ended, ExitCode.DATAERR, str(segment), "restore")
    # The traceback is there for who asks for it.
    debug = seqd_run(node.config_path, log_level="DEBUG")
    assert debug.code == ExitCode.DATAERR
    assert "Traceback" in debug.stderr and "JournalCorruptError" in debug.stderr


def test_full_file_system_at_journal_open_is_one_line_with_exit_ioerr(
    node_config: Callable[..., NodeProcess],
    small_file_system: tuple[Path, Callable[[], None] | None],
) -> None:
    directory, limit = small_file_system
    node = node_config({"node": {"data_dir": str(directory / "data")}, "journal": {"segment_bytes": 8 << 20}})
    ended = seqd_run(node.config_path, preexec_fn=limit)
    assert_one_line(ended, ExitCode.IOERR, str(directory / "data"), "journal.segment_bytes")
    # On a real small file system the journal sees the shortage before writing (free bytes vs the
    # segment) and says which size fits; under a file size limit the write itself fails (EFBIG).
    expected = "cannot create its first segment" if limit is None else "File too large"
    assert expected in ended.error_lines[0], ended.error_lines[0]


# ---- permissions ----------------------------------------------------------------------------------


def test_data_directory_the_node_may_not_create_is_one_line_with_exit_noperm(
    node_config: Callable[..., NodeProcess], tmp_dir: Path,
) -> None:
    locked = read_only_directory(tmp_dir / "locked")
    node = node_config({"node": {"data_dir": str(locked / "data")}})
    ended = seqd_run(node.config_path, **unprivileged(tmp_dir))
    assert_one_line(ended, ExitCode.NOPERM, str(locked / "data"), "Permission denied", "node.data_dir", "write")


def test_journal_in_a_read_only_data_directory_is_one_line_with_exit_noperm(
    node_config: Callable[..., NodeProcess], tmp_dir: Path,
) -> None:
    node = node_config()
    for directory in (node.config.journal_dir, node.config.snapshot_dir):
        directory.mkdir(parents=True)
    os.chmod(node.config.journal_dir, 0o555)  # the journal cannot take its lock file or a segment
    ended = seqd_run(node.config_path, **unprivileged(tmp_dir))
    assert_one_line(ended, ExitCode.NOPERM, str(node.config.journal_dir), "Permission denied", "write")


def test_socket_directory_the_sequencer_may_not_create_ends_the_run_without_restarts(
    node_config: Callable[..., NodeProcess], tmp_dir: Path,
) -> None:
    locked = read_only_directory(tmp_dir / "locked")
    node = node_config({"socket": {"path": str(locked / "run" / "seqd.sock")}})
    ended = seqd_run(node.config_path, **unprivileged(tmp_dir))
    assert_one_line(ended, ExitCode.NOPERM, str(locked / "run"), "socket.path", "Permission denied")
    assert_not_restarted(ended)


def test_a_file_where_the_socket_belongs_ends_the_run_with_exit_cantcreat(
    node_config: Callable[..., NodeProcess],
) -> None:
    node = node_config()
    Path(node.socket_path).write_text("not a socket")
    ended = seqd_run(node.config_path)
    assert_one_line(ended, ExitCode.CANTCREAT, node.socket_path, "not a socket", "socket.path")
    assert_not_restarted(ended)
    assert Path(node.socket_path).read_text() == "not a socket"  # never removed: it is not ours


# ---- shared memory ----------------------------------------------------------------------------------


def test_foreign_shared_memory_with_the_node_s_name_is_one_line_with_exit_cantcreat(
    node_config: Callable[..., NodeProcess],
) -> None:
    node = node_config()
    foreign = Path("/dev/shm") / log_name(node.node)[1:]
    foreign.write_bytes(b"not seqd" * 1024)
    try:
        ended = seqd_run(node.config_path)
        assert_one_line(ended, ExitCode.CANTCREAT, log_name(node.node), "not a seqd segment", str(foreign))
        assert foreign.read_bytes() == b"not seqd" * 1024  # never removed: it is not ours
    finally:
        foreign.unlink()


def test_shared_memory_of_a_running_seqd_is_one_line_naming_its_pid_with_exit_cantcreat(
    node_config: Callable[..., NodeProcess],
) -> None:
    node = node_config()
    held = Counters.create(counters_name(node.node), COUNTER_NAMES)  # this process: alive
    try:
        ended = seqd_run(node.config_path)
        assert_one_line(ended, ExitCode.CANTCREAT, counters_name(node.node), "in use", str(os.getpid()))
    finally:
        held.close()
        held.unlink()


def test_stale_shared_memory_of_another_user_is_one_line_with_exit_noperm(
    node_config: Callable[..., NodeProcess], tmp_dir: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to leave a segment owned by another user")
    node = node_config()
    name = counters_name(node.node)
    # A seqd of another user (root here) that died: its creator is gone, so the segment is stale.
    subprocess.run(
        [sys.executable, "-c", f"from ipc.counters import Counters; Counters.create({name!r}, ['x'])"],
        check=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        ended = seqd_run(node.config_path, **unprivileged(tmp_dir))
        assert_one_line(ended, ExitCode.NOPERM, name, "owns it")
    finally:
        (Path("/dev/shm") / name[1:]).unlink()


RING_BYTES = 16 << 20  # the default size of each ring
SMALL_SHM_BYTES = RING_BYTES // 2  # holds the counters, not one ring


def test_dev_shm_too_small_for_the_rings_is_one_line_with_exit_ioerr(
    node_config: Callable[..., NodeProcess],
) -> None:
    """A /dev/shm smaller than the rings (docker's default is 64 MiB) ends the start with one line;
    it used to start and then crash-loop under load, each role dying of SIGBUS (exit -7) at the
    first write past the room /dev/shm had."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the node a /dev/shm of its own")
    node = node_config({"ring": {"log_capacity_bytes": RING_BYTES, "egress_capacity_bytes": RING_BYTES}})
    # A private mount namespace with a small tmpfs on /dev/shm: the host's is untouched, and the
    # node's segments vanish with the namespace.
    small_shm = (
        "unshare", "--mount", "sh", "-c",
        f"mount --make-rprivate / && mount -t tmpfs -o size={SMALL_SHM_BYTES} tmpfs /dev/shm && exec \"$@\"",
        "sh",
    )
    ended = seqd_run(node.config_path, wrapper=small_shm)
    assert_one_line(
        ended, ExitCode.IOERR, log_name(node.node), "/dev/shm has no room", "ring.log_capacity_bytes", "--shm-size",
    )
    assert "started blp" not in ended.stderr


# ---- what is not an operating error ----------------------------------------------------------------

BROKEN_APP = '''
from sequencer.apps.ledger import Ledger


class Broken(Ledger):
    def __init__(self) -> None:
        raise RuntimeError("a bug in the app's constructor")
'''


def test_a_role_that_keeps_crashing_is_restarted_then_the_run_ends_with_exit_failed_naming_the_cause(
    node_config: Callable[..., NodeProcess], tmp_dir: Path,
) -> None:
    """A bug is not an operating error: the pipeline restarts (it could be transient), keeps the
    traceback, and gives up after restarts_max with a line that names the last cause."""
    apps = tmp_dir / "apps"
    apps.mkdir()
    (apps / "broken_app.py").write_text(BROKEN_APP)
    node = node_config({"node": {"app": "broken_app:Broken"}, "": {"restarts_max": 1}})
    ended = seqd_run(node.config_path, extra_environment={"PYTHONPATH": str(apps)})
    assert ended.code == ExitCode.FAILED, ended.stderr[-4000:]
    last = ended.stderr.rstrip().splitlines()[-1]
    assert " CRITICAL " in last and "giving up" in last and "role blp exited with 1" in last, last
    assert "restarts_max" in last and f"(exit {int(ExitCode.FAILED)} FAILED)" in last, last
    assert "a bug in the app's constructor" in ended.stderr  # the role's traceback, kept: it is a bug


def test_an_unexpected_error_is_logged_with_its_traceback_and_exit_software(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from daemon.exits import report

    try:
        raise KeyError("no such thing")
    except KeyError as error:
        code = report(logging.getLogger("seqd.test"), error)
    assert code == ExitCode.SOFTWARE
    [record] = [record for record in caplog.records if record.levelno == logging.CRITICAL]
    assert record.exc_info is not None and "a bug" in record.getMessage()


@pytest.mark.parametrize(
    ("number", "code", "advice"),
    [
        (errno.EACCES, ExitCode.NOPERM, "write there"),
        (errno.EROFS, ExitCode.NOPERM, "read-write"),
        (errno.ENOSPC, ExitCode.IOERR, "Free space"),
        (errno.EDQUOT, ExitCode.IOERR, "Free space"),
        (errno.EFBIG, ExitCode.IOERR, "size limit"),
        (errno.EADDRINUSE, ExitCode.CANTCREAT, "another process"),
        (errno.EIO, ExitCode.IOERR, "disk"),
    ],
)
def test_an_os_error_maps_to_a_code_and_advice_by_its_errno(number: int, code: ExitCode, advice: str) -> None:
    from daemon.exits import FatalError

    fatal = FatalError.from_os_error(OSError(number, os.strerror(number), "/srv/seqd"), "open it", "node.data_dir")
    assert fatal.code == code
    assert "/srv/seqd" in fatal.message and advice.lower() in fatal.message.lower()
    assert "\n" not in fatal.message
