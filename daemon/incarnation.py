"""A node's start ids that never repeat nor go back across restarts, whatever the wall clock does
(the session incarnation id in every session id, and the Raft incarnation in every answer to a
leader), kept in the data directory.

Why not the wall clock alone. The session incarnation is 24 bits (`daemon.layout.INCARNATION_BITS`,
what a session id gives it): the start time in ms, cut to 24 bits, wraps every 4.7 hours, so any
two starts of a node share an id with a chance of 1 in 2^24, and a clock stepped back (NTP, a VM
restored) by the time between two starts makes the same id again. The blp remembers a node's last
`NODE_STARTS_REMEMBERED` starts, however old (sequencer/dedup.py), and takes a node_start naming
one of them for a second copy: the sessions of the start before would stay open for good, and the
new start's opens would be taken for copies or for an ended start's, refused, every command of its
clients then dropped (`commands_without_session`): the node's clients stall. The Raft incarnation
(the wall clock in ns) going back makes a leader drop every answer of the new start as an older
start's, until the leader changes (sequencer/raft/tracker.py, "Incarnations").

So each start takes the one before + 1 (the session id's, cut to 24 bits: a repeat needs 2^24
starts), and the Raft one the larger of the clock and the one before + 1, each written durably
(temp, fsync, rename, fsync the directory) before the start uses it: before the sequencer writes
its node_start, before the replicator answers anyone. Without the file (a new node, a data
directory wiped or restored without it, an older seqd's) the clock's id is taken, as before: a
wiped follower must still look newer to its leader, which the clock gives and no counter that was
wiped with it could. A data directory restored from an older copy of itself, file included, would
repeat the ids since that copy: restore the journal and snapshots into a new data directory
(`seqd backup` copies only those) instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.exits import ExitCode, FatalError
from daemon.layout import INCARNATION_BITS, incarnation_id
from sequencer.journal.repair import fsync_directory

__all__ = [
    "INCARNATION_NAME", "RAFT_INCARNATION_NAME", "next_incarnation_id", "next_raft_incarnation", "previous_incarnation",
    "write_durably",
]  # fmt: skip

# <data_dir>/incarnation: the session incarnation id of the last start, then the one's before it.
INCARNATION_NAME = "incarnation"
RAFT_INCARNATION_NAME = "raft.incarnation"  # <data_dir>/raft.incarnation: the replicator's last
_INCARNATION_MASK = (1 << INCARNATION_BITS) - 1


def _read(path: Path) -> list[int]:
    """The numbers `path` holds, none when it is absent (it is replaced whole, never torn)."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    except OSError as error:
        raise FatalError.from_os_error(error, f"read this node's start ids from {path}", "node.data_dir") from error
    except UnicodeDecodeError as error:
        raise FatalError(ExitCode.DATAERR, f"{path} cannot be read as this node's start ids ({error}): if the file is "
                         "damaged, remove it; the next start takes its id from the clock") from error
    words = text.split()
    if not words or not all(word.isdigit() for word in words):
        raise FatalError(ExitCode.DATAERR, f"{path} holds {text[:40]!r}, not this node's start ids (decimal numbers): "
                         "if the file is damaged, remove it; the next start takes its id from the clock")
    return [int(word) for word in words]


def _write(path: Path, *values: int) -> None:
    """`values` in `path`, durably and whole, before returning.

    Raises:
        FatalError: it could not be written (the start stops: an id it could not record might
            repeat).
    """
    try:
        write_durably(path, (" ".join(map(str, values)) + "\n").encode("ascii"))
    except OSError as error:
        raise FatalError.from_os_error(error, f"record this start's id in {path}", "node.data_dir") from error


def write_durably(path: Path, data: bytes) -> None:
    """`data` as the whole of `path`, durable before returning: a temp file written and fsynced,
    renamed over `path`, the directory fsynced (raises OSError)."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.rename(temp, path)
    fsync_directory(path.parent)


def next_incarnation_id(data_dir: Path, now_s: float, incarnation: int) -> int:
    """The session incarnation id of this start of the pipeline (`incarnation`: its count since
    `seqd run`), durable in `data_dir` before it returns, with the id of the start before: the
    last start's + 1, within `INCARNATION_BITS`; the clock's (`incarnation_id`) when no start
    before is recorded."""
    path = data_dir / INCARNATION_NAME
    last = _read(path)[:1]
    chosen = (last[0] + 1) & _INCARNATION_MASK if last else incarnation_id(now_s, incarnation)
    _write(path, chosen, *last)
    return chosen


def previous_incarnation(data_dir: Path, incarnation: int) -> int | None:
    """The id of the start before `incarnation`, this start's (what its node_start names:
    sequencer/dedup.py); None when not known (a data directory's first start)."""
    ids = _read(data_dir / INCARNATION_NAME)
    return ids[1] if len(ids) == 2 and ids[0] == incarnation else None


def next_raft_incarnation(data_dir: Path, now_ns: int) -> int:
    """The Raft incarnation of this start of the replicator, durable in `data_dir` before it
    returns: the wall clock in ns, or the last start's + 1 when the clock is not past it."""
    path = data_dir / RAFT_INCARNATION_NAME
    last = _read(path)[:1]
    chosen = max(now_ns, last[0] + 1) if last else now_ns
    _write(path, chosen)
    return chosen
