"""`seqd log migrate`: the files, locks and checks around the copy-and-transform core.

The core (`sequencer.migrate.Migration`) turns old records into new ones; this module reads the
old journal, writes the new one, and refuses whatever could lose or overwrite data:

1. Refuse before writing anything: a target that exists and is not an empty directory, a target
   inside the source or the source inside it, a source that is not a whole journal (it must
   start at index 1), and a source a running node holds (its journaller keeps an exclusive flock
   on `journal.lock`). A copy of a live node's journal holds no lock and can be migrated. The
   source is only read; a shared flock on its lock file, held throughout, keeps a node from
   starting on it meanwhile.
2. Write the new journal into a temporary directory beside the target (same file system), with
   the journal writer in a child process (`daemon.journal_pipe`), one fdatasync at the end; then
   the index map and `migration.json`.
3. Verify the temporary journal: `seqd log check`'s walk of every CRC and index; a replay under
   the target app through the blp's recovery path (`read_runs` + `Processor.replay_run`) for the
   state hash; and a replay of the old journal under the source app, so that the number of timer
   fires each app ignores can be compared (a fire whose timer the new app did not schedule with
   that deadline is ignored: a transform that changed the timers shows here).
4. Only then rename the temporary directory to the target and fsync the parent. On any failure
   (a refusal, the transform raising, a failed check, Ctrl-C) the temporary directory is removed:
   no partial output is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.exits import ExitCode
from daemon.journal_pipe import JournalWriterProcess
from sequencer import logtools
from sequencer.journal import (
    SEGMENT_BYTES_DEFAULT,
    JournalCorruptError,
    JournalError,
    JournalReader,
    list_segments,
    read_runs,
)
from sequencer.journal.format import LOCK_NAME
from sequencer.migrate import (
    INDEX_MAP_FILE,
    IndexMap,
    Migration,
    MigrationError,
    Transform,
    TransformError,
    transform_name,
)
from sequencer.processor import CLIENT_EXPIRY_NS_DEFAULT, Processor
from sequencer.state_machine import StateMachine

__all__ = [
    "REPORT_FILE",
    "MigrationFailed",
    "MigrationReport",
    "migrate",
    "read_index_map",
    "replay_journal",
]

REPORT_FILE = "migration.json"  # beside the new journal: what was migrated, how, and the hashes


class MigrationFailed(Exception):
    """The migration was refused or did not complete; nothing was left at the target.

    Attributes:
        exit_code: what `seqd log migrate` exits with (daemon.exits.ExitCode).
    """

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class MigrationReport:
    """What a migration did, as printed and written to `migration.json`."""

    source: str
    target: str
    transform: str
    source_app: str
    target_app: str
    source_last_index: int = 0
    target_last_index: int = 0
    counts_in: dict[str, int] = field(default_factory=dict)
    counts_out: dict[str, int] = field(default_factory=dict)
    index_map_runs: int = 0
    torn_tail: str | None = None  # the source's torn tail, left out as a node's start would cut it
    state_hash: str = ""  # of the target app's state after replaying the new journal
    rolling_hash: int = 0
    timer_fires: int = 0
    timer_fires_ignored: int = 0  # under the target app (the source app's figure must be equal)
    command_parts_skipped: int = 0  # parts after a rejected part of their request
    migrate_s: float = 0.0  # wall clock: read, transform, write, fdatasync, index map
    migrate_cpu_s: float = 0.0  # of that, the CPU time of this process (the transform's side)
    writer_cpu_s: float = 0.0  # and of the journal writer's child process
    verify_s: float = 0.0

    def lines(self) -> list[str]:
        width = max(len(name) for name in [*self.counts_in, *self.counts_out, "record"])
        lines = [f"records read from {self.source} (1..{self.source_last_index}, {self.source_app}):"]
        lines += [f"  {name:<{width}} {count:>12}" for name, count in self.counts_in.items()]
        lines.append(f"records written to {self.target} (1..{self.target_last_index}, {self.target_app}):")
        lines += [f"  {name:<{width}} {count:>12}" for name, count in self.counts_out.items()]
        if self.torn_tail:
            lines.append(f"left out: {self.torn_tail}")
        lines.append(
            f"verified: journal check ok; replay under {self.target_app}: state hash {self.state_hash}, "
            f"{self.timer_fires} timer fire(s) of which {self.timer_fires_ignored} ignored (as under "
            f"{self.source_app}), {self.command_parts_skipped} command part(s) skipped after a rejection"
        )
        lines.append(f"index map: {self.target}/{INDEX_MAP_FILE} ({self.index_map_runs} run(s)); "
                     f"migrated in {self.migrate_s:.2f} s, verified in {self.verify_s:.2f} s")
        return lines


def read_index_map(journal_dir: Path | str) -> IndexMap:
    """The index map a migration wrote beside the new journal in `journal_dir`.

    Raises:
        MigrationError: no index map there, or a damaged one.
    """
    path = Path(journal_dir) / INDEX_MAP_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MigrationError(f"no index map at {path}: {journal_dir} is not a migrated journal") from None
    return IndexMap.from_bytes(data, str(path))


def replay_journal(directory: Path | str, app_class: type[StateMachine],
                   client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
                   to_index: int | None = None) -> Processor[Any]:  # fmt: skip
    """A processor after replaying the journal in `directory` from index 1 (to `to_index`), as
    the blp's recovery does (`read_runs` + `Processor.replay_run`), outputs discarded."""
    processor = Processor(app_class, client_expiry_ns=client_expiry_ns)
    for run in read_runs(directory, 1, to_index):
        processor.replay_run(run)
    return processor


def migrate(
    source: Path | str,
    target: Path | str,
    transform: Transform,
    *,
    client_expiry_ns: int = CLIENT_EXPIRY_NS_DEFAULT,
    segment_bytes: int = SEGMENT_BYTES_DEFAULT,
    preallocate: bool = True,
    say: Callable[[str], object] = print,
) -> MigrationReport:
    """Copy-and-transform the journal in `source` into a new journal in `target` (see the module
    docstring); `say` gets the progress and the report, line by line.

    Args:
        client_expiry_ns: the old node's `node.client_expiry_s` in ns (it decided which requests
            were resends); the replays use it too.
        segment_bytes, preallocate: the new journal's segments (the new node's `journal.*`).

    Raises:
        MigrationFailed: refused, or failed; the message says why and what to do, and nothing
            was left at `target`.
    """
    source = Path(source).absolute()
    target = Path(target).absolute()
    _check_paths(source, target)
    report = MigrationReport(
        str(source), str(target), transform_name(transform),
        _app_name(transform.source), _app_name(transform.target),
    )  # fmt: skip
    with _shared_lock(source):
        segments = list_segments(source)
        if not segments:
            raise MigrationFailed(f"no journal segments in {source}: nothing to migrate", ExitCode.DATAERR)
        if segments[0][0] != 1:
            raise MigrationFailed(
                f"the journal in {source} starts at index {segments[0][0]}: the segments before it "
                "were deleted after snapshots (retention). A copy-and-transform needs the whole "
                "history from index 1: migrate a backup that has it, or keep all segments "
                "(snapshot.delete_journal = false) until the migration",
                ExitCode.DATAERR,
            )
        try:
            created = _make_parents(target.parent)
            temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.migrating-", dir=target.parent))
        except OSError as error:
            raise MigrationFailed(
                f"cannot create the new journal beside {target}: {error}", ExitCode.CANTCREAT
            ) from error
        try:
            os.chmod(temporary, 0o750)  # what the journal writer gives a new journal directory
            say(f"migrating {source} -> {target} with {report.transform} "
                f"({report.source_app} -> {report.target_app})")  # fmt: skip
            index_map = _write(source, temporary, transform, client_expiry_ns, segment_bytes,
                               preallocate, report)  # fmt: skip
            _verify(source, temporary, transform, client_expiry_ns, index_map, report)
            (temporary / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
            _fsync_path(temporary / REPORT_FILE)
            _fsync_path(temporary)
            # An empty target directory is replaced; a target that appeared meanwhile is not.
            try:
                os.rename(temporary, target)
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise MigrationFailed(
                        f"{target} was created or filled while migrating: nothing was overwritten; "
                        "choose another target", ExitCode.CANTCREAT,
                    ) from error  # fmt: skip
                raise
            _fsync_path(target.parent)
        except BaseException as error:
            shutil.rmtree(temporary, ignore_errors=True)
            for directory in reversed(created):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if isinstance(error, JournalError | OSError):
                raise MigrationFailed(
                    f"writing the new journal in {target.parent} failed: {error}. Nothing was "
                    "left at the target; check the disk (space, permissions) and run again",
                    ExitCode.IOERR,
                ) from error
            raise
    for line in report.lines():
        say(line)
    return report


def _app_name(app: type[StateMachine]) -> str:
    return f"{app.schema.name} v{app.schema.version}"


def _check_paths(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise MigrationFailed(f"no journal at {source}: not a directory", ExitCode.DATAERR)
    resolved_source, resolved_target = source.resolve(), target.resolve()
    if resolved_target == resolved_source or resolved_source in resolved_target.parents:
        raise MigrationFailed(
            f"the target {target} is inside the source journal {source}: choose a directory "
            "outside it", ExitCode.CANTCREAT,
        )  # fmt: skip
    if resolved_target in resolved_source.parents:
        raise MigrationFailed(
            f"the source {source} is inside the target {target}: choose a new, empty target",
            ExitCode.CANTCREAT,
        )
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise MigrationFailed(
            f"the target {target} exists and is not a directory: migrate refuses to overwrite "
            "anything; choose a new path", ExitCode.CANTCREAT,
        )  # fmt: skip
    if target.is_dir():
        entries = sorted(entry.name for entry in target.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise MigrationFailed(
                f"the target {target} is not empty ({len(entries)} entries: {shown}): migrate "
                "refuses to overwrite anything; choose a new directory, or empty this one yourself",
                ExitCode.CANTCREAT,
            )


@contextlib.contextmanager
def _shared_lock(source: Path) -> Iterator[None]:
    """Holds a shared flock on the source's writer lock file, if it has one; refuses when a
    running node holds it."""
    lock_path = source / LOCK_NAME  # the journal writer's lock file
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        yield  # never opened for writing (or a copy without the lock file): no node runs on it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MigrationFailed(
                f"the journal {source} belongs to a running node (its journaller holds "
                f"{lock_path}): stop the node first (`systemctl stop seqd`), or migrate a copy "
                f"(`cp -a {source} COPY`, then `--from COPY`; a copy holds no lock). Records the "
                "node writes after the copy are not in it.",
                ExitCode.CANTCREAT,
            ) from None
        yield
    finally:
        os.close(fd)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (removed again if the migration fails)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o750)
    return list(reversed(missing))


def _write(source: Path, temporary: Path, transform: Transform, client_expiry_ns: int,
           segment_bytes: int, preallocate: bool, report: MigrationReport) -> IndexMap:  # fmt: skip
    started = time.perf_counter()
    cpu_started = time.process_time()
    children_started = _children_cpu_s()
    migration = Migration(transform, client_expiry_ns)
    reader = JournalReader(source)
    try:
        with JournalWriterProcess(temporary, segment_bytes, preallocate) as journal:
            for run in reader.read_runs():
                records = migration.feed(run)
                if records:
                    journal.append(records)
            records = migration.finish()
            if records:
                journal.append(records)
            last_index = journal.close()
        assert last_index == migration.target_last_index, (last_index, migration.target_last_index)
    except TransformError as error:
        raise MigrationFailed(f"{error}. Nothing was written: fix the transform and run again",
                              ExitCode.SOFTWARE) from error  # fmt: skip
    except JournalCorruptError as error:
        raise MigrationFailed(f"the source journal is damaged: {error}", ExitCode.DATAERR) from error
    except MigrationError as error:
        raise MigrationFailed(str(error), ExitCode.DATAERR) from error
    finally:
        reader.close()
    if reader.stopped_at is not None:
        # Bad bytes at the end of the last segment: a torn tail (never acknowledged; a node's
        # next start cuts it) may be left out, damage with valid records after it may not.
        check = logtools.check(source)
        if not check.torn_tail:
            raise MigrationFailed(f"the source journal is damaged: {check}", ExitCode.DATAERR)
        report.torn_tail = (f"a torn tail at {reader.stopped_at.describe()} (never acknowledged; "
                            "a start of the old node would cut it too)")  # fmt: skip
    index_map = migration.index_map()
    (temporary / INDEX_MAP_FILE).write_bytes(index_map.to_bytes())
    _fsync_path(temporary / INDEX_MAP_FILE)
    report.source_last_index = migration.source_last_index
    report.target_last_index = migration.target_last_index
    report.counts_in, report.counts_out = migration.counts()
    report.index_map_runs = len(index_map.runs)
    report.migrate_s = time.perf_counter() - started
    report.migrate_cpu_s = time.process_time() - cpu_started
    report.writer_cpu_s = _children_cpu_s() - children_started
    return index_map


def _verify(source: Path, temporary: Path, transform: Transform, client_expiry_ns: int,
            index_map: IndexMap, report: MigrationReport) -> None:  # fmt: skip
    started = time.perf_counter()
    check = logtools.check(temporary)
    if not check.ok or check.records != report.target_last_index or (check.records and check.first_index != 1):
        raise MigrationFailed(f"the new journal does not check out (a bug in seqd): {check}", ExitCode.SOFTWARE)
    reread = read_index_map(temporary)
    if reread.runs != index_map.runs:
        raise MigrationFailed("the index map does not read back as written (a bug in seqd)", ExitCode.SOFTWARE)
    target = _replay(temporary, transform.target, client_expiry_ns, report.target_app, "new")
    old = _replay(source, transform.source, client_expiry_ns, report.source_app, "old",
                  report.source_last_index)  # fmt: skip
    if target.commands_without_session:
        raise MigrationFailed(
            f"{target.commands_without_session} command(s) of the new journal have no session "
            "(a bug in seqd: the migration writes none)", ExitCode.SOFTWARE,
        )  # fmt: skip
    if target.stale_timer_fires != old.stale_timer_fires:
        raise MigrationFailed(
            f"timer fires ignored: {target.stale_timer_fires} under {report.target_app}, "
            f"{old.stale_timer_fires} under {report.source_app}. A TIMER_FIRED record runs "
            "on_timer only if the app scheduled that timer id with that deadline; the new app "
            "schedules different ones. Keep the timers (ids and deadlines) as they were, or map "
            "them in Transform.timer_fired",
            ExitCode.DATAERR,
        )
    report.state_hash = target.state_hash().hex()
    report.rolling_hash = target.rolling_hash
    report.timer_fires = report.counts_out.get("TIMER_FIRED", 0)
    report.timer_fires_ignored = target.stale_timer_fires
    report.command_parts_skipped = target.command_parts_skipped
    report.verify_s = time.perf_counter() - started


def _replay(directory: Path, app_class: type[StateMachine], client_expiry_ns: int, app_name: str,
            which: str, to_index: int | None = None) -> Processor[Any]:  # fmt: skip
    try:
        return replay_journal(directory, app_class, client_expiry_ns, to_index)
    except JournalError as error:
        raise MigrationFailed(f"reading the {which} journal failed: {error}", ExitCode.DATAERR) from error
    except Exception as error:
        raise MigrationFailed(
            f"replaying the {which} journal under {app_name} failed: {type(error).__name__}: {error}. "
            "The app raised on a record (a bug in the app, or a transform that gives it commands "
            "it cannot apply): `seqd log dump --journal DIR --decode` shows the records",
            ExitCode.DATAERR,
        ) from error


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

