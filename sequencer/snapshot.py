"""Snapshot files: atomic write, validation, listing and retention.

The layout of a file is in `sequencer.snapshot_format` (a 104-byte header, then the body), which
this module re-exports. Files are named `snapshot-<index, 20 digits>.seqsnap`, so a name sorts by
index. A file is written under a temporary name, fsynced, renamed and the directory fsynced (a
renamed file is durable only after its directory is: ALICE, OSDI'14), so a crash leaves either
the whole file or a `*.tmp` leftover that `remove_partial` deletes. A file that fails validation
is reported and the previous one used (Aeron's recording log keeps an "invalid" flag for the same
reason).

The blp writes snapshots from a forked child (`daemon.snapshot_writer`), so the parent pauses only
for the fork; this module knows no processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from sequencer.snapshot_format import (
    SNAPSHOT_FORMAT_VERSION,
    SNAPSHOT_HEADER,
    SNAPSHOT_HEADER_BYTES,
    SnapshotError,
    SnapshotHeader,
    decode_snapshot,
    encode_header,
)

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "SNAPSHOT_HEADER",
    "SNAPSHOT_HEADER_BYTES",
    "LoadedSnapshot",
    "SnapshotError",
    "SnapshotHeader",
    "SnapshotInfo",
    "list_snapshots",
    "newest_snapshot_index",
    "newest_valid_snapshot",
    "oldest_valid_index",
    "read_snapshot",
    "remove_partial",
    "retain",
    "retain_oldest",
    "snapshot_path",
    "write_snapshot",
]

SUFFIX = ".seqsnap"
PREFIX = "snapshot-"
TMP_SUFFIX = ".tmp"
# Writes go out in chunks so a huge body is not copied again into one buffer.
WRITE_CHUNK_BYTES = 8 << 20


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


def write_snapshot(
    directory: str | os.PathLike[str],
    header: SnapshotHeader,
    body: bytes,
    before_rename: Callable[[int], object] | None = None,
) -> Path:
    """Writes a snapshot atomically and durably; returns its path. `before_rename(index)` is
    called with the temp file whole and synced (a fault hook: a kill there leaves only it).

    Raises:
        OSError: the write or an fsync failed. Never retry an fsync (fsyncgate): the caller
            reports the failure and the next SNAPSHOT record tries again with a new file.
    """
    directory = Path(directory)
    final = snapshot_path(directory, header.index)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    head = encode_header(header, body)
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
    if before_rename is not None:
        before_rename(header.index)
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
    header, body = decode_snapshot(data, str(path))
    expected = snapshot_path(path.parent, header.index).name
    if path.name != expected:
        raise SnapshotError(
            f"snapshot {path} holds index {header.index}; its name should be {expected}"
        )
    return header, body


def _snapshot_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{PREFIX}*{SUFFIX}"):
        digits = path.name[len(PREFIX) : -len(SUFFIX)]
        if digits.isdigit():
            found.append((int(digits), path))
    found.sort(reverse=True)
    return found


def newest_snapshot_index(directory: str | os.PathLike[str]) -> int:
    """The index in the name of the newest snapshot file in `directory` (0: none), unread: every
    snapshot is of applied records, so its index is a lower bound of the commit index."""
    path = Path(directory)
    if not path.is_dir():
        return 0
    found = _snapshot_files(path)
    return found[0][0] if found else 0


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


def oldest_valid_index(directory: str | os.PathLike[str]) -> int:
    """The index of the oldest valid snapshot kept in `directory`, 0 when there is none.

    The journal may go up to it (retention): recovery needs the newest valid snapshot and the
    records after it, and keeping everything after the *oldest* one means a corrupt newest
    snapshot can still fall back to an older one and replay from there.
    """
    valid = [info.index for info in list_snapshots(directory) if info.valid]
    return min(valid) if valid else 0


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
    return _retain(directory, keep)[0]


def retain_oldest(directory: str | os.PathLike[str], keep: int) -> int:
    """`retain`, then the index of the oldest valid snapshot kept (0: none), as
    `oldest_valid_index` would give it, reading and validating each file once, not twice."""
    return _retain(directory, keep)[1]


def _retain(directory: str | os.PathLike[str], keep: int) -> tuple[list[Path], int]:
    if keep < 1:
        raise ValueError(f"keep={keep}: retention must keep at least one snapshot")
    removed: list[Path] = []
    kept_valid = 0
    oldest_kept = 0
    for info in list_snapshots(directory):  # newest first
        if kept_valid >= keep:
            info.path.unlink(missing_ok=True)
            removed.append(info.path)
        elif info.valid:
            kept_valid += 1
            oldest_kept = info.index
    return removed, oldest_kept
