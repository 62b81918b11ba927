"""Snapshot files: format, atomic write, validation, listing, retention, and the forked writer.

A snapshot file is one header and one body:

    offset  0  8s   magic b"SEQDSNAP"
    offset  8  u16  format_version (this file layout; SNAPSHOT_FORMAT_VERSION)
    offset 10  u16  app_version    (the app's schema version that encoded the app state)
    offset 12  4x
    offset 16  u64  index          (the SNAPSHOT record's index: the state after applying it)
    offset 24  u64  term
    offset 32  i64  timestamp_ns   (the SNAPSHOT record's timestamp)
    offset 40  16s  state_hash     (BLAKE2b-128 of the body)
    offset 56  u64  body_bytes
    offset 64  32s  app_name       (UTF-8, zero padded)
    offset 96  u32  crc            (CRC-32C of header bytes 0..96 and of the body)
    offset 100 4x
    offset 104      body           (the processor's msgspec state, see sequencer.processor)

Files are named `snapshot-<index, 20 digits>.seqsnap`, so a name sorts by index. A file is
written under a temporary name, fsynced, renamed and the directory fsynced (a renamed file is
durable only after its directory is: ALICE, OSDI'14), so a crash leaves either the whole file or a
`*.tmp` leftover that `remove_partial` deletes. A file that fails validation is reported and the
previous one used (Aeron's recording log keeps an "invalid" flag for the same reason).

The writer forks: the child inherits the state copy-on-write, encodes and writes it, and exits;
the parent pauses only for the fork itself and keeps applying records.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import crc32c

from sequencer.determinism import STATE_HASH_BYTES

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "SNAPSHOT_HEADER",
    "LoadedSnapshot",
    "SnapshotError",
    "SnapshotHeader",
    "SnapshotInfo",
    "fork_and_write_snapshot",
    "list_snapshots",
    "newest_valid_snapshot",
    "read_snapshot",
    "reap_snapshot_writer",
    "remove_partial",
    "retain",
    "snapshot_path",
    "write_snapshot",
]

MAGIC = b"SEQDSNAP"
SNAPSHOT_FORMAT_VERSION = 1
_HEADER_BEFORE_CRC = struct.Struct("<8sHH4xQQq16sQ32s")
_CRC = struct.Struct("<I4x")
SNAPSHOT_HEADER_BYTES = _HEADER_BEFORE_CRC.size + _CRC.size
SNAPSHOT_HEADER = _HEADER_BEFORE_CRC  # exported for tools that read headers
APP_NAME_BYTES_MAX = 32  # the header's fixed app_name field
SUFFIX = ".seqsnap"
PREFIX = "snapshot-"
TMP_SUFFIX = ".tmp"
# The written body is read back in one piece; 16 GiB is far beyond any state that fits the blp's
# memory on the machines seqd targets, so a larger length means a corrupt header.
BODY_BYTES_MAX = 16 << 30
# Writes go out in chunks so a huge body is not copied again into one buffer.
WRITE_CHUNK_BYTES = 8 << 20

assert _HEADER_BEFORE_CRC.size == 96
assert SNAPSHOT_HEADER_BYTES == 104


class SnapshotError(Exception):
    """A snapshot file is missing, truncated, corrupt or of an unknown format."""


class SnapshotHeader(NamedTuple):
    app_name: str
    app_version: int
    index: int  # type: ignore[assignment]  # shadows tuple.index
    term: int
    timestamp_ns: int
    state_hash: bytes
    format_version: int = SNAPSHOT_FORMAT_VERSION


class SnapshotInfo(NamedTuple):
    path: Path
    index: int  # type: ignore[assignment]  # shadows tuple.index
    header: SnapshotHeader | None  # None when invalid
    error: str | None  # why it is invalid; None when valid

    @property
    def valid(self) -> bool:
        return self.error is None


class LoadedSnapshot(NamedTuple):
    path: Path
    header: SnapshotHeader
    body: bytes
    skipped: list[SnapshotInfo]  # newer snapshots that failed validation, newest first


def snapshot_path(directory: str | os.PathLike[str], index: int) -> Path:
    return Path(directory) / f"{PREFIX}{index:020d}{SUFFIX}"


def _encode_header(header: SnapshotHeader, body: bytes) -> bytes:
    name = header.app_name.encode()
    if len(name) > APP_NAME_BYTES_MAX:
        raise ValueError(
            f"app name {header.app_name!r} is {len(name)} bytes > {APP_NAME_BYTES_MAX}"
        )
    assert len(header.state_hash) == STATE_HASH_BYTES, len(header.state_hash)
    before = _HEADER_BEFORE_CRC.pack(
        MAGIC, header.format_version, header.app_version, header.index, header.term,
        header.timestamp_ns, header.state_hash, len(body), name,
    )  # fmt: skip
    crc = crc32c.crc32c(body, crc32c.crc32c(before))
    return before + _CRC.pack(crc)


def write_snapshot(
    directory: str | os.PathLike[str], header: SnapshotHeader, body: bytes
) -> Path:
    """Writes a snapshot atomically and durably; returns its path.

    Raises:
        OSError: the write or an fsync failed. Never retry an fsync (fsyncgate): the caller
            reports the failure and the next SNAPSHOT record tries again with a new file.
    """
    directory = Path(directory)
    final = snapshot_path(directory, header.index)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    head = _encode_header(header, body)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, head)
        view = memoryview(body)
        for start in range(0, len(view), WRITE_CHUNK_BYTES):
            chunk = view[start : start + WRITE_CHUNK_BYTES]
            while chunk:
                written = os.write(fd, chunk)
                chunk = chunk[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return final


def read_snapshot(path: str | os.PathLike[str]) -> tuple[SnapshotHeader, bytes]:
    """Reads and validates a snapshot file (magic, format, lengths, CRC-32C over header and body,
    index in name). The state hash in the header is not recomputed here: `seqd snapshot verify`
    does that, by rebuilding the state.

    Raises:
        SnapshotError: with what is wrong with the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"snapshot {path} cannot be read: {error}") from error
    if len(data) < SNAPSHOT_HEADER_BYTES:
        raise SnapshotError(
            f"snapshot {path} is {len(data)} bytes, shorter than its header "
            f"({SNAPSHOT_HEADER_BYTES}): truncated"
        )
    (magic, format_version, app_version, index, term, timestamp_ns, hash_, body_bytes,
     name) = _HEADER_BEFORE_CRC.unpack_from(data, 0)  # fmt: skip
    if magic != MAGIC:
        raise SnapshotError(f"{path} is not a seqd snapshot (magic {magic!r} != {MAGIC!r})")
    if format_version > SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot {path} has format version {format_version} but this seqd reads up to "
            f"{SNAPSHOT_FORMAT_VERSION}: upgrade seqd to read it"
        )
    if format_version != SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(f"snapshot {path} has unknown format version {format_version}")
    if body_bytes > BODY_BYTES_MAX or SNAPSHOT_HEADER_BYTES + body_bytes != len(data):
        raise SnapshotError(
            f"snapshot {path} is {len(data)} bytes but its header says "
            f"{SNAPSHOT_HEADER_BYTES} + {body_bytes}: truncated or corrupt"
        )
    (crc_stored,) = _CRC.unpack_from(data, _HEADER_BEFORE_CRC.size)
    view = memoryview(data)
    body = view[SNAPSHOT_HEADER_BYTES:]
    crc = crc32c.crc32c(body, crc32c.crc32c(view[: _HEADER_BEFORE_CRC.size]))
    if crc != crc_stored:
        raise SnapshotError(
            f"snapshot {path} fails its CRC-32C check (stored {crc_stored:#010x}, computed "
            f"{crc:#010x}): the file is corrupt"
        )
    expected = snapshot_path(path.parent, index).name
    if path.name != expected:
        raise SnapshotError(f"snapshot {path} holds index {index}; its name should be {expected}")
    header = SnapshotHeader(
        app_name=name.rstrip(b"\0").decode(errors="replace"),
        app_version=app_version,
        index=index,
        term=term,
        timestamp_ns=timestamp_ns,
        state_hash=hash_,
        format_version=format_version,
    )
    return header, bytes(body)


def _snapshot_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{PREFIX}*{SUFFIX}"):
        digits = path.name[len(PREFIX) : -len(SUFFIX)]
        if digits.isdigit():
            found.append((int(digits), path))
    found.sort(reverse=True)
    return found


def list_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot file in `directory`, newest first, each fully validated."""
    infos = []
    for index, path in _snapshot_files(Path(directory)):
        try:
            header, _ = read_snapshot(path)
        except SnapshotError as error:
            infos.append(SnapshotInfo(path, index, None, str(error)))
        else:
            infos.append(SnapshotInfo(path, index, header, None))
    return infos


def newest_valid_snapshot(
    directory: str | os.PathLike[str],
    report: Callable[[SnapshotInfo], None] | None = None,
) -> LoadedSnapshot | None:
    """The newest snapshot that validates, or None if there is none.

    Each newer invalid one is passed to `report` (log it: an operator should know) and listed
    in the result's `skipped`.
    """
    skipped = []
    for index, path in _snapshot_files(Path(directory)):
        try:
            header, body = read_snapshot(path)
        except SnapshotError as error:
            info = SnapshotInfo(path, index, None, str(error))
            skipped.append(info)
            if report is not None:
                report(info)
            continue
        return LoadedSnapshot(path, header, body, skipped)
    return None


def remove_partial(directory: str | os.PathLike[str]) -> list[Path]:
    """Removes `*.tmp` leftovers of writes interrupted by a crash; returns what it removed.

    Call it only when no snapshot writer of this node is running.
    """
    removed = []
    for path in sorted(Path(directory).glob(f"{PREFIX}*{TMP_SUFFIX}")):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def retain(directory: str | os.PathLike[str], keep: int) -> list[Path]:
    """Keeps the newest `keep` valid snapshots (and any newer invalid one, for inspection);
    removes every older file. Returns the removed paths.

    Nothing is removed unless at least one valid snapshot remains.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: retention must keep at least one snapshot")
    removed: list[Path] = []
    kept_valid = 0
    for info in list_snapshots(directory):
        if kept_valid >= keep:
            info.path.unlink(missing_ok=True)
            removed.append(info.path)
        elif info.valid:
            kept_valid += 1
    return removed


def _die_with_parent() -> None:
    """The writer must not outlive the process it was forked from (Linux clears the parent-death
    signal on fork): a killed blp would otherwise leave it writing into the next incarnation."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def fork_and_write_snapshot(
    directory: str | os.PathLike[str],
    encode: Callable[[], tuple[SnapshotHeader, bytes]],
    after_write: Callable[[], object] | None = None,
) -> int:
    """Forks a child that calls `encode()` and writes the file; returns the child's pid.

    The child exits with 0 on success and 1 on failure (after printing the error to stderr);
    it never returns into the caller's code (`os._exit`: no atexit handlers, no buffers of
    the parent flushed twice). Reap it with `reap_snapshot_writer`.
    """
    pid = os.fork()
    if pid != 0:
        return pid
    status = 1
    try:
        _die_with_parent()
        header, body = encode()
        write_snapshot(directory, header, body)
        if after_write is not None:
            after_write()  # e.g. retention: file I/O that must not stall the parent
        status = 0
    except BaseException as error:  # the child must reach os._exit whatever happens
        try:
            os.write(2, f"seqd snapshot writer (pid {os.getpid()}) failed: {error!r}\n".encode())
        except BaseException:
            pass
    finally:
        os._exit(status)


def reap_snapshot_writer(pid: int) -> int | None:
    """Non-blocking: None while the child runs, else its exit code (0 = snapshot written)."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    if reaped == 0:
        return None
    return os.waitstatus_to_exitcode(status)
