"""`<data_dir>/raft.truncate`: a follower's request, to the next incarnation, to cut its journal.

A follower whose log conflicts with its leader's must drop entries it has already written to its
log ring (and maybe journaled). The ring cannot be cut under its readers, so the replicator
writes this file (the index to keep up to), makes it durable and exits with
`ROLE_EXIT_RAFT_TRUNCATE`; the supervisor restarts the pipeline, and the next journal recovery
cuts the journal after that index (`Journal.truncate_after`, crash-safe) before anything reads it,
then removes the file. Recovery is always from the journal, so the new ring holds only what the
journal kept. Committed entries never conflict (Raft's Log Matching and Leader Completeness), so
nothing the blp applied is undone; the cost is a pipeline restart: the node's clients reconnect
and resend (docs/cluster.md).

The file is replaced atomically (temp file, fsync, rename, fsync the directory): a crash leaves
no request or a whole one. A request for an index past the journal's end does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from sequencer.journal.repair import fsync_directory

__all__ = ["TRUNCATE_NAME", "read_truncate_request", "remove_truncate_request", "write_truncate_request"]

TRUNCATE_NAME = "raft.truncate"
_TEMP_NAME = "raft.truncate.tmp"


def write_request_file(directory: Path, name: str, temp_name: str, text: str) -> Path:
    """Write `text` to `directory/name` atomically and durably (a temp file fsynced, renamed, the
    directory fsynced): a request to the next start that a crash leaves whole or absent."""
    temp = directory / temp_name
    path = directory / name
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    fsync_directory(directory)
    return path


def write_truncate_request(data_dir: Path | str, index: int) -> Path:
    """Ask the next incarnation to cut the journal after `index`; durable before returning."""
    return write_request_file(Path(data_dir), TRUNCATE_NAME, _TEMP_NAME, f"{index}\n")


def read_truncate_request(data_dir: Path | str) -> int | None:
    """The index a pending request keeps up to, or None when there is none.

    Raises:
        ValueError: the file does not hold an index (damage: the message names the file).
    """
    path = Path(data_dir) / TRUNCATE_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        index = int(text.strip())
    except ValueError:
        raise ValueError(
            f"{path} should hold one index (written by the replicator before a journal cut) but "
            f"holds {text[:40]!r}: the file is written atomically, so this is damage. Remove the "
            "node's data directory and let it catch up from the leader"
        ) from None
    if index < 0:
        raise ValueError(f"{path} holds a negative index {index}")
    return index


def remove_truncate_request(data_dir: Path | str) -> None:
    directory = Path(data_dir)
    (directory / TRUNCATE_NAME).unlink(missing_ok=True)
    (directory / _TEMP_NAME).unlink(missing_ok=True)
    fsync_directory(directory)
