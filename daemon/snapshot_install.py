"""Catch-up through a snapshot: the leader streams its newest snapshot file to a follower that
needs entries its journal no longer holds; the follower installs it crash-safely and restarts its
pipeline on it (docs/cluster.md, "Catch-up").

Theory of operation
-------------------
The Raft core decides *when* (its InstallSnapshot, sent once the entry a follower needs next has
gone with retention); this module moves the file. The core's message names a snapshot but carries
no bytes (`Snapshot.data` is empty in the daemon): a snapshot can be far larger than a peer frame,
and a message is sent whole.

Leader (`SnapshotSender`, one stream per follower at most): the replicator hands it each
InstallSnapshot the core sends instead of sending it. A stream opens the newest snapshot file and
sends it in `SnapshotChunk`s of SNAPSHOT_CHUNK_BYTES, at most SNAPSHOT_CHUNKS_IN_FLIGHT_MAX
unacknowledged: the bytes in flight per follower are bounded, and a chunk is read from the file
only when the window has room, so a slow or dead follower neither grows the leader's memory nor
holds its loop (the transport drops what a full socket cannot take, like any message). The
follower acknowledges the bytes it holds (`SnapshotChunkAck`); an acknowledgement that repeats
the last one, or none for SNAPSHOT_ACK_TIMEOUT_S, sends again from the acknowledged byte
(go-back-N); none for SNAPSHOT_STREAM_ABANDON_S ends the stream (the core asks again if it must).
An InstallSnapshot for a follower that has a stream of the same term running continues it (the
core repeats itself after its own snapshot timeout). A leader that steps down ends every stream.

Follower (`SnapshotReceiver`): chunks are written in order to one temp file in the snapshot
directory; one out of order is not written, and the acknowledgement tells the leader where to
resume. Complete, the file is fsynced and validated (the snapshot format's own CRC-32C over the
whole file, and the index and term the leader named); the replicator then steps the core's
InstallSnapshot (which applies the term rules and declines a snapshot the log already covers). If
the core takes it, the replicator writes the install request (`raft.install`: the index and term,
atomically, after the file is durable) and exits with ROLE_EXIT_RAFT_TRUNCATE; the supervisor,
before the next recovery (`finish_install_request`), renames the file into place as the node's
newest snapshot, restarts the journal after its index (`Journal.restart_after`) and only then
removes the request. Each step is idempotent and the request is removed last, so a crash anywhere
is finished by the next start. The blp then loads the snapshot and the replicator catches up from
the leader's journal after it.

Every chunk and acknowledgement travels in the peer transport's MESSAGES frames, authenticated
like every other message (docs/peer-transport.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.raft_truncate import write_request_file
from sequencer import snapshot as snapshots
from sequencer.journal import Journal
from sequencer.journal.repair import fsync_directory
from sequencer.raft.messages import Message, SnapshotChunk, SnapshotChunkAck
from sequencer.raft.peer_wire import PEER_FRAME_BYTES_MAX
from sequencer.snapshot_format import (
    MAGIC,
    SNAPSHOT_HEADER,
    SNAPSHOT_HEADER_BYTES,
    SnapshotError,
    decode_snapshot,
)

__all__ = [
    "INSTALL_NAME",
    "SNAPSHOT_ACK_TIMEOUT_S",
    "SNAPSHOT_CATCH_UP_HOLD_S",
    "SNAPSHOT_CHUNKS_IN_FLIGHT_MAX",
    "SNAPSHOT_CHUNK_BYTES",
    "SNAPSHOT_STREAM_ABANDON_S",
    "SNAPSHOT_TEMP_NAME",
    "SnapshotReceiver",
    "SnapshotSender",
    "finish_install_request",
    "read_install_request",
    "write_install_request",
]

log = logging.getLogger("seqd.snapshot_install")

# A chunk: large enough that a 1 GB snapshot is 2k messages, small enough that its MAC (~0.4 ms
# at 1.4 GB/s) and its write never hold a loop pass long, and far under a peer frame.
SNAPSHOT_CHUNK_BYTES = 512 << 10
# Unacknowledged chunks per follower: 2 MiB in flight covers a LAN's bandwidth-delay product
# (1 Gb/s x 10 ms = 1.25 MB) and is what a slow follower can cost the leader's memory.
SNAPSHOT_CHUNKS_IN_FLIGHT_MAX = 4
assert SNAPSHOT_CHUNK_BYTES + 4096 <= PEER_FRAME_BYTES_MAX  # a chunk and its framing fit a frame
# The window fits the transport's send buffer (2 x PEER_FRAME_BYTES_MAX), so a healthy link takes
# a whole window beside the AppendEntries.
assert SNAPSHOT_CHUNK_BYTES * SNAPSHOT_CHUNKS_IN_FLIGHT_MAX <= PEER_FRAME_BYTES_MAX
# No acknowledgement for this long: send again from the acknowledged byte (a chunk was dropped).
SNAPSHOT_ACK_TIMEOUT_S = 1.0
# No progress for this long: the follower is gone; end the stream.
SNAPSHOT_STREAM_ABANDON_S = 10.0
assert SNAPSHOT_STREAM_ABANDON_S > 2 * SNAPSHOT_ACK_TIMEOUT_S
# A follower sent a snapshot must restart on it (a pipeline restart: seconds on a loaded machine)
# and catch up from the journal after it; the leader's retention deletes nothing it still needs
# for this long after the stream starts, or the follower would need a newer snapshot each time
# it comes back (a loop on a busy leader with tight retention). Bounded, so a follower that dies
# meanwhile cannot hold the leader's disk.
SNAPSHOT_CATCH_UP_HOLD_S = 60.0

INSTALL_NAME = "raft.install"
_INSTALL_TEMP_NAME = "raft.install.tmp"
# In the snapshot directory (a rename into place never crosses file systems); not a name the
# snapshot listing or `snapshot.remove_partial` matches.
SNAPSHOT_TEMP_NAME = "raft-install.seqsnap.part"


@dataclass
class _Stream:
    target: int
    term: int
    index: int
    snapshot_term: int
    file_bytes: int
    fd: int
    acked: int = 0
    sent: int = 0
    progress_s: float = 0.0
    rewound_at: int = -1  # the acknowledged byte the last go-back resent from


def _open_newest(directory: Path) -> tuple[int, int, int, int] | None:
    """(fd, index, term, file bytes) of the newest snapshot file, or None when there is none or
    its header is not a snapshot's (the follower checks the whole file's CRC)."""
    for _attempt in range(2):  # retention may delete the newest between the listing and the open
        index = snapshots.newest_snapshot_index(directory)
        if not index:
            return None
        path = snapshots.snapshot_path(directory, index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        head = os.pread(fd, SNAPSHOT_HEADER_BYTES, 0)
        file_bytes = os.fstat(fd).st_size
        if len(head) == SNAPSHOT_HEADER_BYTES:
            magic, _version, _app_version, header_index, term, _ts, _hash, body_bytes, _name = (
                SNAPSHOT_HEADER.unpack_from(head)
            )
            if (magic == MAGIC and header_index == index
                    and SNAPSHOT_HEADER_BYTES + body_bytes == file_bytes):
                return fd, index, term, file_bytes
        os.close(fd)
        log.error("snapshot %s is damaged (its header does not match the file); a follower that "
                  "needs it cannot catch up until a newer snapshot is taken", path)
        return None
    return None


class SnapshotSender:
    """The leader's snapshot streams, one per follower at most.

    Args:
        send: queues messages for the transport (they leave at the end of the loop pass).
    """

    def __init__(self, cluster_id: int, node_id: int, snapshot_dir: Path,
                 send: Callable[[list[Message]], None]) -> None:
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.snapshot_dir = snapshot_dir
        self._send = send
        self.streams: dict[int, _Stream] = {}
        self.completed = 0  # streams acknowledged whole (for tests and logs)
        # Follower -> (first index it needs from the journal, until when that is held).
        self.holds: dict[int, tuple[int, float]] = {}

    def start(self, target: int, term: int, now_s: float) -> None:
        """The core sent `target` an InstallSnapshot in `term`: stream the newest snapshot, unless
        a stream of this term runs already (then it goes on)."""
        stream = self.streams.get(target)
        if stream is not None:
            if stream.term == term:
                return
            self._end(stream)
        opened = _open_newest(self.snapshot_dir)
        if opened is None:
            return  # the core asks again after its snapshot timeout
        fd, index, snapshot_term, file_bytes = opened
        stream = _Stream(target, term, index, snapshot_term, file_bytes, fd, progress_s=now_s)
        self.streams[target] = stream
        self.holds[target] = (index + 1, now_s + SNAPSHOT_CATCH_UP_HOLD_S)
        log.info("node %d needs entries this journal no longer holds: sending it snapshot %d "
                 "(%d bytes)", target, index, file_bytes)
        self._fill(stream)

    def acknowledged(self, ack: SnapshotChunkAck, now_s: float) -> None:
        stream = self.streams.get(ack.source)
        if stream is None or ack.index != stream.index:
            return
        received = ack.received_bytes
        if received >= stream.file_bytes:
            self.completed += 1
            log.info("node %d holds snapshot %d whole", stream.target, stream.index)
            self._end(stream)
            return
        if received > stream.acked:
            stream.acked = received
            stream.progress_s = now_s
        elif received == stream.acked and stream.sent > received and stream.rewound_at != received:
            # A repeated acknowledgement: a chunk after it was lost (or the follower started
            # over). Go back once per acknowledged byte, not once per repeat.
            stream.rewound_at = received
            stream.acked = stream.sent = received
        elif received < stream.acked:
            stream.acked = stream.sent = received  # the follower started over
        self._fill(stream)

    def tick(self, now_s: float) -> None:
        for stream in list(self.streams.values()):
            idle_s = now_s - stream.progress_s
            if idle_s >= SNAPSHOT_STREAM_ABANDON_S:
                log.warning("node %d acknowledged none of snapshot %d for %.0f s: stream ended",
                            stream.target, stream.index, idle_s)
                self._end(stream)
            elif idle_s >= SNAPSHOT_ACK_TIMEOUT_S and stream.sent > stream.acked:
                stream.sent = stream.acked
                stream.progress_s = now_s  # one resend per timeout
                self._fill(stream)

    def retain_index(self, match_index: Callable[[int], int], commit_index: int,
                     now_s: float) -> int:
        """The first index the journal must keep for the followers catching up after a snapshot
        (0: none). A hold follows the follower's match and ends once it has caught up to
        `commit_index`, or SNAPSHOT_CATCH_UP_HOLD_S after its stream started."""
        holds = self.holds
        if not holds:
            return 0
        lowest = 0
        for target, (index, until_s) in list(holds.items()):
            match = match_index(target)
            if now_s >= until_s or (match >= index and match >= commit_index):
                del holds[target]
                continue
            if match >= index:
                index = match + 1
                holds[target] = (index, until_s)
            lowest = index if not lowest else min(lowest, index)
        return lowest

    def stop_all(self) -> None:
        """No longer the leader: end every stream and hold."""
        for stream in list(self.streams.values()):
            self._end(stream)
        self.holds.clear()

    def _fill(self, stream: _Stream) -> None:
        window_bytes = SNAPSHOT_CHUNK_BYTES * SNAPSHOT_CHUNKS_IN_FLIGHT_MAX
        chunks: list[Message] = []
        while stream.sent < stream.file_bytes and stream.sent - stream.acked < window_bytes:
            data = os.pread(stream.fd, min(SNAPSHOT_CHUNK_BYTES, stream.file_bytes - stream.sent),
                            stream.sent)
            if not data:
                log.error("snapshot %d ended at byte %d of %d while sending it",
                          stream.index, stream.sent, stream.file_bytes)
                self._end(stream)
                return
            chunks.append(SnapshotChunk(self.cluster_id, self.node_id, stream.target, stream.term,
                                        stream.index, stream.snapshot_term, stream.file_bytes,
                                        stream.sent, data))
            stream.sent += len(data)
        if chunks:
            self._send(chunks)

    def _end(self, stream: _Stream) -> None:
        os.close(stream.fd)
        del self.streams[stream.target]


class SnapshotReceiver:
    """A follower's snapshot transfer in progress: one temp file in the snapshot directory."""

    def __init__(self, snapshot_dir: Path) -> None:
        self.path = snapshot_dir / SNAPSHOT_TEMP_NAME
        # Left by an earlier start: the supervisor has renamed a complete one into place already.
        self.path.unlink(missing_ok=True)
        self._key: tuple[int, int, int, int] | None = None  # (source, term, index, file bytes)
        self._fd = -1
        self.received = 0
        self.complete_index = 0  # the index of a complete, validated file (0: none)

    def chunk(self, chunk: SnapshotChunk) -> int:
        """Write `chunk` if it continues the transfer; returns the bytes held (to acknowledge).
        Once the file is whole it is fsynced and validated: `complete_index` is then set.

        Raises:
            OSError: the write or fsync failed (fail-stop: the role exits, the node restarts).
        """
        key = (chunk.source, chunk.term, chunk.index, chunk.file_bytes)
        if key != self._key:
            if chunk.offset != 0:
                return 0  # another transfer: the leader starts this one over from byte 0
            self._open(key)
        if chunk.offset != self.received or self.complete_index:
            return self.received  # out of order or repeated: not written; resume from here
        data = chunk.data
        if not data or self.received + len(data) > chunk.file_bytes:
            return self.received
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self.received)
            self.received += written
            view = view[written:]
        if self.received == chunk.file_bytes:
            os.fsync(self._fd)
            self._validate(chunk)
        return self.received

    def _open(self, key: tuple[int, int, int, int]) -> None:
        self.close()
        self._key = key
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.received = 0
        self.complete_index = 0

    def _validate(self, chunk: SnapshotChunk) -> None:
        try:
            header, _body = decode_snapshot(self.path.read_bytes(), str(self.path))
        except (OSError, SnapshotError) as error:
            log.error("the snapshot node %d sent is unusable (%s); asking for it again",
                      chunk.source, error)
            self._key = None
            self.received = 0
            return
        if header.index != chunk.index or header.term != chunk.snapshot_term:
            log.error("node %d sent snapshot %d of term %d, but the file holds index %d term %d; "
                      "asking for it again", chunk.source, chunk.index, chunk.snapshot_term,
                      header.index, header.term)
            self._key = None
            self.received = 0
            return
        self.complete_index = header.index

    def discard(self) -> None:
        """Forget the transfer and its file (the core declined it, or a newer one starts)."""
        self.close()
        self._key = None
        self.received = 0
        self.complete_index = 0
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---- the install request, finished by the supervisor -------------------------------------------


def write_install_request(data_dir: Path | str, index: int, term: int) -> Path:
    """Ask the next start to install the received snapshot at `index` (whose entry is of `term`)
    and restart the journal after it; durable before returning. The snapshot file must be durable
    first (`SnapshotReceiver` fsyncs it when it completes)."""
    return write_request_file(Path(data_dir), INSTALL_NAME, _INSTALL_TEMP_NAME, f"{index} {term}\n")


def read_install_request(data_dir: Path | str) -> tuple[int, int] | None:
    """(index, term) of a pending request, or None when there is none.

    Raises:
        ValueError: the file does not hold them (damage: the message names the file).
    """
    path = Path(data_dir) / INSTALL_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    fields = text.split()
    if len(fields) != 2 or not all(field.isdigit() for field in fields):
        raise ValueError(
            f"{path} should hold an index and a term (written by the replicator after it received "
            f"a snapshot) but holds {text[:40]!r}: the file is written atomically, so this is "
            "damage. Remove the node's data directory and let it catch up from the leader"
        )
    return int(fields[0]), int(fields[1])


def finish_install_request(data_dir: Path | str, snapshot_dir: Path, journal: Journal) -> int | None:
    """Before recovery: install a received snapshot if the replicator asked (`raft.install`): the
    file into place, the journal restarted after its index, then the request removed. Returns
    the index installed, or None when nothing was asked. Safe to run again after a crash at any
    point (each step is idempotent; the request goes last).

    Raises:
        ValueError: the request is damaged, or its snapshot file is missing from both places.
    """
    request = read_install_request(data_dir)
    if request is None:
        return None
    index, term = request
    temp = snapshot_dir / SNAPSHOT_TEMP_NAME
    final = snapshots.snapshot_path(snapshot_dir, index)
    if temp.exists():
        os.rename(temp, final)
        fsync_directory(snapshot_dir)
    elif not final.exists():
        raise ValueError(
            f"{Path(data_dir) / INSTALL_NAME} asks to install the snapshot at index {index}, but "
            f"neither {temp} nor {final} exists. Remove the node's data directory and let it catch "
            "up from the leader"
        )
    journal.restart_after(index, term)
    (Path(data_dir) / INSTALL_NAME).unlink(missing_ok=True)
    (Path(data_dir) / _INSTALL_TEMP_NAME).unlink(missing_ok=True)
    fsync_directory(Path(data_dir))
    return index
