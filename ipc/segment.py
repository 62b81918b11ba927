"""Named POSIX shared-memory segments with a validated header.

A segment is `HEADER_BYTES` of header followed by a payload area that a ring or a counters table
lays out. The header says what the segment is (magic, layout version, kind, and the version of
what its user lays out in the payload), how big it is (payload bytes, kind-specific capacity) and
who made it (creator pid and that process's start time, and a random epoch). Unrelated processes attach by name; attach validates every field and
refuses a foreign, half-initialised, wrongly sized or stale segment with a `SegmentError` that says
what was wrong and what to do.

Creation is exclusive (`O_CREX`, mode 0600): a name that already exists is never reused. If the
existing segment's creator has exited (or its pid was reused by another process, detected by the
process start time), it is a leftover of a killed owner: `create` and `attach` say so, and
`remove_stale(name)` removes it explicitly. The magic is written last, so a creator killed while
initialising leaves a segment that attach refuses as half-initialised.

A name can be removed and created again while an old process still means to attach to it (a
process started for one owner of the name, delayed, then resumed after a new owner re-created it).
The epoch tells the two apart: a creator that hands its epoch to the processes it starts lets each
attach with `epoch=...`, and attach refuses a segment with any other epoch before the caller can
write a byte into it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import struct
from pathlib import Path
from types import TracebackType

import posix_ipc
import psutil

__all__ = [
    "EPOCH_MAX",
    "HEADER_BYTES",
    "LAYOUT_VERSION",
    "LINE_BYTES",
    "MAGIC",
    "Segment",
    "SegmentError",
    "SegmentVersionError",
    "creator_status",
    "remove_stale",
    "segment_name",
]

MAGIC = b"seqd.shm"
# The header's own layout. 2: the content version field was added (and the daemon's counters
# table changed with it, so a reader of version 1 refuses the new counters instead of misreading).
LAYOUT_VERSION = 2
# One line per shared word: 128 bytes, not 64, because Intel's adjacent-line prefetcher pulls
# lines in pairs, so two writers 64 bytes apart still false-share (Disruptor pads to 128).
LINE_BYTES = 128
# The header fills one line so the payload (and every line in it) starts 128-byte aligned.
HEADER_BYTES = LINE_BYTES
KIND_BYTES_MAX = 16
# Segment names are `/seqd.<node>.<name>`; Linux allows 255 bytes in a /dev/shm file name, and the
# ring's doorbell semaphores append `.<reader>.bell` plus the `sem.` prefix, so keep room.
NAME_BYTES_MAX = 160
# A payload over 4 GiB is a configuration mistake on the machines seqd targets.
PAYLOAD_BYTES_MAX = 1 << 32
EPOCH_MAX = (1 << 64) - 1  # the header stores the epoch as an unsigned 64-bit word
CONTENT_VERSION_MAX = (1 << 32) - 1  # and the content version as an unsigned 32-bit word
# Creator start times are compared within this tolerance: psutil derives them from clock ticks
# (10 ms on Linux) and a boot time, both stable for one boot.
START_TIME_TOLERANCE_S = 0.05

SHM_DIRECTORY = Path("/dev/shm")
_NO_ROOM = frozenset({errno.ENOSPC, errno.ENOMEM})  # what a full tmpfs (or its memory limit) says

# magic, layout version, header bytes, payload bytes, capacity, creator pid, creator start time
# (seconds since the epoch, as psutil reports it), epoch, kind, content version (the layout of the
# payload as the kind's user defines it, e.g. the daemon's counter table; 0 when unversioned).
# Fields only ever go at the end: `remove_stale` reads the magic and creator of any version.
_HEADER = struct.Struct("<8sIIQQQdQ16sI")
assert _HEADER.size <= HEADER_BYTES
_MAGIC_OFFSET = 0
_PID_OFFSET = 32
assert struct.calcsize("<8sIIQQ") == _PID_OFFSET

_NAME_PART = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME = re.compile(r"^/[A-Za-z0-9_.-]+$")


class SegmentError(Exception):
    """A segment is missing, foreign, malformed, stale or in use; the message says what to do."""


class SegmentVersionError(SegmentError):
    """A segment of another layout (header or content version): made by another release."""


def segment_name(node: str, name: str) -> str:
    """The shared-memory name of segment `name` of node `node`: `/seqd.<node>.<name>`."""
    for part in (node, name):
        if not _NAME_PART.match(part):
            raise ValueError(
                f"segment name part {part!r} must be letters, digits, '_' or '-' (no dots, "
                "slashes or spaces)"
            )
    return f"/seqd.{node}.{name}"


def _check_name(name: str) -> None:
    if not _NAME.match(name) or len(name) > NAME_BYTES_MAX:
        raise ValueError(
            f"shared-memory name {name!r} must start with '/', then be at most "
            f"{NAME_BYTES_MAX - 1} letters, digits, '.', '_' or '-'; use "
            "ipc.segment.segment_name(node, name)"
        )


def _shm_path(name: str) -> Path:
    return SHM_DIRECTORY / name[1:]


def creator_status(pid: int, start_time_s: float) -> str | None:
    """Why a segment's creator no longer owns it, or None if it is still running.

    Returns:
        None if `pid` is alive and started at `start_time_s`; otherwise a phrase for an error
        message ("which has exited", "which is now another process (pid reused)").
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "which has exited"
        started_s = process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return "which has exited"
    except psutil.AccessDenied:
        return None  # Alive, owned by someone else: not stale as far as we can tell.
    if abs(started_s - start_time_s) > START_TIME_TOLERANCE_S:
        return "which has exited (the pid now belongs to another process)"
    return None


def _own_start_time_s() -> float:
    return psutil.Process(os.getpid()).create_time()


class Segment:
    """A mapped shared-memory segment: validated header, then `buffer` (the payload area).

    Attributes:
        name: the POSIX name, `/seqd.<node>.<name>`.
        kind: what lays out the payload ("ring", "counters", ...).
        capacity: kind-specific size (ring: data bytes; counters: number of counters).
        payload_bytes: size of `buffer`.
        creator_pid, creator_start_time_s: who made it (the start time tells the creator from a
            later process that reuses its pid; see `creator_status`).
        epoch: a number unique to this creation of the name (random unless the creator chose it).
        content_version: the version of the payload's layout its creator declared (0: none).
        buffer: a writable memoryview of the payload area, 128-byte aligned.
    """

    def __init__(
        self,
        name: str,
        memory: mmap.mmap,
        kind: str,
        capacity: int,
        payload_bytes: int,
        creator_pid: int,
        creator_start_time_s: float,
        epoch: int,
        content_version: int = 0,
    ) -> None:
        self.name = name
        self.kind = kind
        self.capacity = capacity
        self.payload_bytes = payload_bytes
        self.creator_pid = creator_pid
        self.creator_start_time_s = creator_start_time_s
        self.epoch = epoch
        self.content_version = content_version
        self._mmap: mmap.mmap | None = memory
        self._whole = memoryview(memory)
        self.buffer = self._whole[HEADER_BYTES : HEADER_BYTES + payload_bytes]

    @property
    def mmap(self) -> mmap.mmap:
        """The whole mapping (header included); slicing it copies to bytes in one C call."""
        assert self._mmap is not None, "segment is closed"
        return self._mmap

    @classmethod
    def create(
        cls,
        name: str,
        kind: str,
        payload_bytes: int,
        capacity: int | None = None,
        epoch: int | None = None,
        content_version: int = 0,
    ) -> Segment:
        """Create segment `name` exclusively (mode 0600) with a fresh header.

        Args:
            name: `/seqd.<node>.<name>` (see `segment_name`).
            kind: a short tag checked by `attach`, at most 16 ASCII bytes.
            payload_bytes: size of the payload area.
            capacity: kind-specific capacity for the header; defaults to `payload_bytes`.
            epoch: the header's epoch, 0..2**64-1; random by default. A creator that makes several
                segments for one purpose may give them one epoch and pass it to the processes
                that attach (see `attach`).
            content_version: the version of what the caller lays out in the payload, 0..2**32-1,
                checked by an `attach` that names the version it reads.

        Raises:
            SegmentError: the name exists (the message says whether it is stale and how to remove
                it) or the system refused to create it.
        """
        _check_name(name)
        kind_bytes = kind.encode("ascii")
        if not 0 < len(kind_bytes) <= KIND_BYTES_MAX:
            raise ValueError(f"segment kind {kind!r} must be 1..{KIND_BYTES_MAX} ASCII bytes")
        if not 0 < payload_bytes <= PAYLOAD_BYTES_MAX:
            raise ValueError(
                f"payload_bytes={payload_bytes} must be in 1..PAYLOAD_BYTES_MAX={PAYLOAD_BYTES_MAX}"
            )
        if epoch is not None and not 0 <= epoch <= EPOCH_MAX:
            raise ValueError(f"epoch={epoch} must be in 0..EPOCH_MAX={EPOCH_MAX}")
        if not 0 <= content_version <= CONTENT_VERSION_MAX:
            raise ValueError(f"content_version={content_version} must be in 0..{CONTENT_VERSION_MAX}")
        capacity = payload_bytes if capacity is None else capacity
        size = HEADER_BYTES + payload_bytes
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            raise SegmentError(_describe_existing(name)) from None
        except (OSError, posix_ipc.Error) as error:
            raise SegmentError(f"{name}: cannot create shared memory of {size} bytes: {error}") from error
        try:
            # Allocate every page now: on a /dev/shm too small for the segment a process would
            # otherwise get SIGBUS at the first write past the room left, long after the start.
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as error:
            # Any other errno: a file system without fallocate; its pages come as they are written.
            if error.errno in _NO_ROOM:
                shm.close_fd()
                posix_ipc.unlink_shared_memory(name)
                raise SegmentError(f"{name}: /dev/shm has no room for {size} bytes of shared memory") from error
        try:
            memory = mmap.mmap(shm.fd, size)
        except OSError as error:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise SegmentError(f"{name}: cannot map {size} bytes: {error}") from error
        shm.close_fd()
        pid = os.getpid()
        start_time_s = _own_start_time_s()
        epoch = secrets.randbits(64) if epoch is None else epoch
        header = _HEADER.pack(
            b"\0" * len(MAGIC),  # written last: until then attach sees a half-initialised segment
            LAYOUT_VERSION,
            HEADER_BYTES,
            payload_bytes,
            capacity,
            pid,
            start_time_s,
            epoch,
            kind_bytes,
            content_version,
        )
        memory[0 : len(header)] = header
        memory[_MAGIC_OFFSET : _MAGIC_OFFSET + len(MAGIC)] = MAGIC
        return cls(name, memory, kind, capacity, payload_bytes, pid, start_time_s, epoch, content_version)

    @classmethod
    def attach(
        cls,
        name: str,
        kind: str,
        epoch: int | None = None,
        stale_ok: bool = False,
        content_version: int | None = None,
    ) -> Segment:
        """Map existing segment `name` after validating its header.

        Args:
            epoch: if given, the epoch this process was told to expect (see `create`); a segment
                with another epoch was created since, for someone else, and is refused.
            stale_ok: map a segment whose creator has exited, to read what it last recorded (a
                post-mortem: do not write to it). Every other check still applies.
            content_version: if given, the payload layout this process reads; a segment created
                with another is refused (`SegmentVersionError`).

        Raises:
            SegmentVersionError: another header layout version, or another content version than
                `content_version`: the segment was made by another release.
            SegmentError: missing, too small, wrong magic (foreign or half-initialised), wrong
                kind, size not matching the header, stale (its creator has exited) or another
                epoch than `epoch`.
        """
        _check_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise SegmentError(
                f"{name} does not exist. Start the process that creates it first (for a seqd node, "
                "`seqd run`), or check the node name."
            ) from None
        except (OSError, posix_ipc.Error) as error:
            raise SegmentError(f"{name}: cannot open shared memory: {error}") from error
        try:
            size = shm.size
            if size < HEADER_BYTES:
                raise SegmentError(
                    f"{name} is {size} bytes, smaller than a seqd header ({HEADER_BYTES} bytes): "
                    f"not a seqd segment. If nothing uses it, remove {_shm_path(name)}."
                )
            memory = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        try:
            fields = _HEADER.unpack_from(memory, 0)
            problem = _validate(name, fields, kind, size, stale_ok) or _check_epoch(name, fields, epoch)
        except BaseException:
            memory.close()
            raise
        if problem is not None:
            memory.close()
            raise problem
        _, _, _, payload_bytes, capacity, pid, start_time_s, found_epoch, _, found_content = fields
        if content_version is not None and found_content != content_version:
            memory.close()
            raise SegmentVersionError(
                f"{name} holds {kind} of layout version {found_content}, this seqd reads version "
                f"{content_version}: it was made by a different seqd release. Use the seqd of the "
                "release that runs this node; if none runs, remove "
                f"{_shm_path(name)} and start one release."
            )
        return cls(name, memory, kind, capacity, payload_bytes, pid, start_time_s, found_epoch, found_content)

    def close(self) -> None:
        """Unmap the segment (the name stays; see `unlink`). Idempotent.

        Views handed out earlier (ring payload views) keep the mapping alive until they are
        dropped; closing never invalidates memory under them.
        """
        if self._mmap is None:
            return
        self.buffer.release()
        self._whole.release()
        memory, self._mmap = self._mmap, None
        try:
            memory.close()
        except BufferError:
            pass  # Someone still holds a view; the mapping goes when the last view does.

    def unlink(self) -> None:
        """Remove the name so no new process can attach; mappings stay valid. Idempotent."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self) -> Segment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _validate(name: str, fields: tuple, kind: str, size: int, stale_ok: bool) -> SegmentError | None:
    problem = _problem(name, fields, kind, size, stale_ok)
    if problem is None:
        return None
    if fields[0] == MAGIC and fields[1] != LAYOUT_VERSION:
        return SegmentVersionError(problem)
    return SegmentError(problem)


def _problem(name: str, fields: tuple, kind: str, size: int, stale_ok: bool) -> str | None:
    magic, version, header_bytes, payload_bytes, _capacity, pid, start_time_s, _epoch, kind_raw, _ = fields
    path = _shm_path(name)
    if magic != MAGIC:
        if magic == b"\0" * len(MAGIC) and pid != 0:
            status = creator_status(pid, start_time_s)
            if status is not None:
                return (
                    f"{name} is half-initialised: created by pid {pid}, {status}, before it wrote "
                    f"the header (stale segment). If no seqd runs for this node, remove {path} "
                    "(ipc.segment.remove_stale) and start again."
                )
            return (
                f"{name} is still being initialised by pid {pid}; attach again once it is ready."
            )
        return (
            f"{name} is not a seqd segment: magic is {magic!r}, expected {MAGIC!r}. Another program "
            f"uses this name; pick another node name or remove {path} if it is garbage."
        )
    if version != LAYOUT_VERSION:
        return (
            f"{name} has layout version {version}, this seqd reads version {LAYOUT_VERSION}: it was "
            "made by a different seqd release. Stop every seqd process of this node, remove "
            f"{path}, and start one release."
        )
    if header_bytes != HEADER_BYTES:
        return f"{name} has header_bytes={header_bytes}, expected HEADER_BYTES={HEADER_BYTES}: corrupt header."
    found_kind = kind_raw.rstrip(b"\0").decode("ascii", "replace")
    if found_kind != kind:
        return f"{name} is a {found_kind!r} segment, not a {kind!r} segment: check the name."
    if HEADER_BYTES + payload_bytes != size:
        return (
            f"{name} header says {HEADER_BYTES} + {payload_bytes} bytes but the segment is {size} "
            f"bytes: corrupt or truncated. If no seqd runs for this node, remove {path}."
        )
    status = None if stale_ok else creator_status(pid, start_time_s)
    if status is not None:
        return (
            f"{name} was created by pid {pid}, {status} (stale segment). If no seqd runs for this "
            f"node, remove {path} (or call ipc.segment.remove_stale({name!r})) and start again."
        )
    return None


def _check_epoch(name: str, fields: tuple, epoch: int | None) -> SegmentError | None:
    found, pid = fields[7], fields[5]
    if epoch is None or found == epoch:
        return None
    return SegmentError(
        f"{name} has epoch {found:#018x}, this process expects {epoch:#018x}: the name was removed "
        f"and created again (now by pid {pid}) since this process was started for it. Not "
        "attaching: the segment belongs to another owner. This process is left over from an "
        "earlier one and should exit."
    )


def _read_header(name: str) -> tuple | None:
    """The raw header fields of `name`, or None if it is missing or too small to have one."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return None
    try:
        if shm.size < HEADER_BYTES:
            return None
        with mmap.mmap(shm.fd, HEADER_BYTES, prot=mmap.PROT_READ) as memory:
            return _HEADER.unpack_from(memory, 0)
    finally:
        shm.close_fd()


def _describe_existing(name: str) -> str:
    path = _shm_path(name)
    fields = _read_header(name)
    if fields is None or fields[0] not in (MAGIC, b"\0" * len(MAGIC)):
        return (
            f"{name} already exists and is not a seqd segment. Remove {path} if it is garbage, or "
            "pick another node name."
        )
    pid, start_time_s = fields[5], fields[6]
    status = creator_status(pid, start_time_s) if pid else "which is unknown"
    if status is None:
        return (
            f"{name} already exists and is in use: created by pid {pid}, which is running. Another "
            "seqd runs for this node; stop it first or pick another node name."
        )
    return (
        f"{name} already exists: created by pid {pid}, {status} (stale segment). If no seqd runs "
        f"for this node, remove {path} (or call ipc.segment.remove_stale({name!r})) and start again."
    )


def _companion_paths(name: str) -> list[Path]:
    # A ring's doorbells are named semaphores `<name>.<reader>.bell`, stored by glibc as
    # /dev/shm/sem.<name without the slash>.<reader>.bell, or FIFOs /dev/shm/<name without the
    # slash>.<reader>.bell.fifo for readers in an event loop (`ipc.doorbell_fifo`).
    return sorted([*SHM_DIRECTORY.glob(f"sem.{name[1:]}.*.bell"), *SHM_DIRECTORY.glob(f"{name[1:]}.*.bell.fifo")])


def remove_stale(name: str) -> bool:
    """Remove segment `name` (and its doorbells) if its creator has exited.

    Returns:
        True if a stale segment was removed, False if there was none.

    Raises:
        SegmentError: the segment's creator is still running, or the segment is not a seqd
            segment (then nothing is removed).
    """
    _check_name(name)
    fields = _read_header(name)
    if fields is None:
        if not _shm_path(name).exists():
            return False
        raise SegmentError(f"{name} is too small to be a seqd segment; not removing it.")
    magic, pid, start_time_s = fields[0], fields[5], fields[6]
    if magic not in (MAGIC, b"\0" * len(MAGIC)) or pid == 0:
        raise SegmentError(
            f"{name} is not a seqd segment (magic {magic!r}, creator pid {pid}); not removing it. "
            f"Remove {_shm_path(name)} by hand if it is garbage."
        )
    if creator_status(pid, start_time_s) is None:
        raise SegmentError(
            f"{name} is in use: its creator, pid {pid}, is running. Stop it first; not removing."
        )
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    for path in _companion_paths(name):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return True
