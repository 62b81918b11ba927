"""The Raft hard state on disk: term, vote and commit index in one small file of the data directory.

Raft's safety rests on two facts surviving any crash (Raft paper, Figure 2, "Persistent state on
all servers ... updated on stable storage before responding to RPCs"): the current term never goes
back, and a node votes at most once per term. So `save` returns only once the new state is
durable, and is atomic: a crash leaves the old state or the new one, never a mix.

    1. write `raft.state.tmp` (the whole 40-byte record, CRC included), fsync it
    2. rename it over `raft.state`                       <- the new state takes effect
    3. fsync the directory (a rename is durable only once its directory is: ALICE)

A crash before 2 leaves the old file (the temp file is removed at the next open); after 2 the new
one. The record carries a magic, a layout version and a CRC-32C, so a damaged or foreign file
refuses to start with a message naming it, rather than letting a node forget its vote.

A missing file is a new node (term 0, no vote, commit index 0). Deleting the file of a node that
has voted can make it vote twice in one term: to reset a node, remove its whole data directory
(journal included) and let it catch up from the leader.

It lives outside `sequencer/raft/` because that package is the I/O-free core (and the transport
shell). The core never sees this module: the replication role calls `save(ready.hard_state)`
before sending the ready's messages (persist before send), and builds the core's `DurableState`
from `HardStateFile.open`. One thread saves (not locked): the replicator's worker thread
(daemon/roles/hard_state_saver.py), which also takes its commit-index-only saves off the loop.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import crc32c

from sequencer.journal.repair import fsync_directory
from sequencer.raft.config import NO_NODE
from sequencer.raft.messages import HardState

__all__ = [
    "HARD_STATE_NAME",
    "HARD_STATE_STEPS",
    "HARD_STATE_TEMP_NAME",
    "HardStateError",
    "HardStateFile",
]

HARD_STATE_NAME = "raft.state"
HARD_STATE_TEMP_NAME = "raft.state.tmp"
HARD_STATE_MAGIC = b"SQDRAFTS"
HARD_STATE_LAYOUT_VERSION = 1
# magic, layout version, record bytes, crc32c of the record with the crc zeroed, term, vote,
# commit index.
HARD_STATE_RECORD = struct.Struct("<8sHHIQQQ")
HARD_STATE_BYTES = 40
HARD_STATE_CRC_OFFSET = 12
assert HARD_STATE_RECORD.size == HARD_STATE_BYTES

# Where a crash can land during `save`; the test hook is called after each.
HARD_STATE_STEPS = ("temp_written", "renamed", "directory_synced")

StepHook = Callable[[str], None]


class HardStateError(Exception):
    """The hard state file is damaged, foreign, or could not be written; the message names it
    and says what to do."""


def _no_hook(step: str) -> None:
    pass


def encode_hard_state(state: HardState) -> bytes:
    fields = (HARD_STATE_MAGIC, HARD_STATE_LAYOUT_VERSION, HARD_STATE_BYTES, 0,
              state.term, state.vote, state.commit_index)  # fmt: skip
    crc = crc32c.crc32c(HARD_STATE_RECORD.pack(*fields))
    return HARD_STATE_RECORD.pack(*fields[:3], crc, *fields[4:])


def decode_hard_state(data: bytes, where: str) -> HardState:
    """The hard state in `data`, checked.

    Raises:
        HardStateError: short, foreign, another layout version, or a CRC mismatch.
    """
    advice = (
        "The file is replaced atomically (temp file, fsync, rename), so this is damage, not a "
        "crash artefact. Do not delete or edit it: this node could vote twice in one term. "
        "Restore the node from a replica: stop it, remove its data directory (journal "
        "included) and let it catch up from the leader."
    )
    if len(data) != HARD_STATE_BYTES:
        raise HardStateError(
            f"Raft hard state {where} is {len(data)} bytes, expected {HARD_STATE_BYTES}. {advice}"
        )
    magic, version, record_bytes, crc, term, vote, commit_index = HARD_STATE_RECORD.unpack(data)
    if magic != HARD_STATE_MAGIC:
        raise HardStateError(
            f"Raft hard state {where}: magic {magic!r}, expected {HARD_STATE_MAGIC!r}: not a seqd "
            f"hard state file. {advice}"
        )
    if version != HARD_STATE_LAYOUT_VERSION or record_bytes != HARD_STATE_BYTES:
        raise HardStateError(
            f"Raft hard state {where} has layout version {version} ({record_bytes} bytes); this "
            f"seqd reads version {HARD_STATE_LAYOUT_VERSION}: run the seqd version that wrote it"
        )
    zeroed = data[:HARD_STATE_CRC_OFFSET] + bytes(4) + data[HARD_STATE_CRC_OFFSET + 4 :]
    computed = crc32c.crc32c(zeroed)
    if computed != crc:
        raise HardStateError(
            f"Raft hard state {where}: CRC-32C mismatch (stored 0x{crc:08x}, computed "
            f"0x{computed:08x}). {advice}"
        )
    return HardState(term=term, vote=vote, commit_index=commit_index)


class HardStateFile:
    """The hard state of one node, in `directory / HARD_STATE_NAME`.

    Invariant: `hard_state` is what is on disk; it never goes backwards (term never decreases,
    one vote per term, commit index never decreases). A failed write stops the object: the
    state on disk is unknown, so the node must restart and read it back (fail-stop, as the
    journal's fsync).
    """

    def __init__(self, directory: Path, hard_state: HardState) -> None:
        self.directory = directory
        self.path = directory / HARD_STATE_NAME
        self.hard_state = hard_state
        # Called after each step of HARD_STATE_STEPS: crash-injection tests exit there.
        self.step_hook: StepHook = _no_hook
        self._failure: HardStateError | None = None

    @classmethod
    def open(cls, directory: Path | str) -> HardStateFile:
        """Read the hard state in `directory` (created if missing): a new node's when there is
        no file. Removes a temp file left by a `save` that crashed before its rename, so only
        the node that saves may open it (an observer of a running node uses `read`).

        Raises:
            HardStateError: the file is damaged or foreign, or cannot be read.
        """
        directory = Path(directory)
        path = directory / HARD_STATE_NAME
        try:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            temp = directory / HARD_STATE_TEMP_NAME
            if temp.exists():  # a save that never took effect
                temp.unlink()
                fsync_directory(directory)
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(directory, HardState(term=0, vote=NO_NODE, commit_index=0))
        except OSError as error:
            raise HardStateError(
                f"reading Raft hard state {path} failed: {error}. Check the data directory's "
                "permissions and the disk."
            ) from error
        return cls(directory, decode_hard_state(data, str(path)))

    @staticmethod
    def read(directory: Path | str) -> HardState:
        """The hard state on disk, read only: for an observer (a test, a tool) while the node
        runs. Unlike `open` it leaves a temp file alone: that may be the running node's save in
        progress, whose rename would then fail and stop the node.

        Raises:
            HardStateError: the file is damaged or foreign, or cannot be read.
        """
        path = Path(directory) / HARD_STATE_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return HardState(term=0, vote=NO_NODE, commit_index=0)
        except OSError as error:
            raise HardStateError(
                f"reading Raft hard state {path} failed: {error}. Check the data directory's "
                "permissions."
            ) from error
        return decode_hard_state(data, str(path))

    def save(self, hard_state: HardState) -> None:
        """Make `hard_state` durable, atomically, before returning (persist before send).

        Raises:
            HardStateError: writing or an fsync failed. Never retried (fsyncgate): this object
                refuses every later call; restart the node.
        """
        if self._failure is not None:
            raise HardStateError(
                f"Raft hard state {self.path} stopped after an earlier failure ({self._failure}); "
                "restart the node"
            )
        old = self.hard_state
        assert hard_state.term >= old.term, (old, hard_state)
        assert hard_state.commit_index >= old.commit_index, (old, hard_state)
        if hard_state.term == old.term:
            # One vote per term: set once, never changed within the term.
            assert old.vote in (NO_NODE, hard_state.vote), (old, hard_state)
        if hard_state == old:
            return
        temp = self.directory / HARD_STATE_TEMP_NAME
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                data = encode_hard_state(hard_state)
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(f"short write of {written} of {len(data)} bytes")
                os.fsync(fd)
            finally:
                os.close(fd)
            self.step_hook("temp_written")
            os.rename(temp, self.path)
            self.step_hook("renamed")
            fsync_directory(self.directory)
            self.step_hook("directory_synced")
        except OSError as error:
            self._failure = HardStateError(
                f"saving Raft hard state {self.path} failed: {error}. Whether the new term and "
                "vote are on disk is unknown, so this node stops here; restart it (it reads the "
                "file back) and check the disk."
            )
            raise self._failure from error
        self.hard_state = hard_state
