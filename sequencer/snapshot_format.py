"""The snapshot file format: header layout, encoding and validation, on bytes only (no I/O).

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

The processor builds headers (`SnapshotHeader`) without touching a file; `sequencer.snapshot`
reads and writes the files, and `daemon.snapshot_writer` forks the child that writes them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import crc32c

from sequencer.determinism import STATE_HASH_BYTES

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "SNAPSHOT_HEADER",
    "SNAPSHOT_HEADER_BYTES",
    "SnapshotError",
    "SnapshotHeader",
    "decode_snapshot",
    "encode_header",
]

MAGIC = b"SEQDSNAP"
SNAPSHOT_FORMAT_VERSION = 1
_HEADER_BEFORE_CRC = struct.Struct("<8sHH4xQQq16sQ32s")
_CRC = struct.Struct("<I4x")
SNAPSHOT_HEADER_BYTES = _HEADER_BEFORE_CRC.size + _CRC.size
SNAPSHOT_HEADER = _HEADER_BEFORE_CRC  # exported for tools that read headers
APP_NAME_BYTES_MAX = 32  # the header's fixed app_name field
# The written body is read back in one piece; 16 GiB is far beyond any state that fits the blp's
# memory on the machines seqd targets, so a larger length means a corrupt header.
BODY_BYTES_MAX = 16 << 30

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


def encode_header(header: SnapshotHeader, body: bytes) -> bytes:
    """The 104 header bytes that precede `body` in its file (the CRC covers both)."""
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


def decode_snapshot(data: bytes, source: str) -> tuple[SnapshotHeader, bytes]:
    """Validates a whole snapshot file's bytes (magic, format, lengths, CRC-32C over header and
    body) and returns its header and body. The state hash is not recomputed here: `seqd snapshot
    verify` does that, by rebuilding the state.

    Args:
        source: what the bytes are (the file's path), for the error messages.

    Raises:
        SnapshotError: with what is wrong with the bytes.
    """
    if len(data) < SNAPSHOT_HEADER_BYTES:
        raise SnapshotError(
            f"snapshot {source} is {len(data)} bytes, shorter than its header "
            f"({SNAPSHOT_HEADER_BYTES}): truncated"
        )
    (magic, format_version, app_version, index, term, timestamp_ns, hash_, body_bytes,
     name) = _HEADER_BEFORE_CRC.unpack_from(data, 0)  # fmt: skip
    if magic != MAGIC:
        raise SnapshotError(f"{source} is not a seqd snapshot (magic {magic!r} != {MAGIC!r})")
    if format_version > SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot {source} has format version {format_version} but this seqd reads up to "
            f"{SNAPSHOT_FORMAT_VERSION}: upgrade seqd to read it"
        )
    if format_version != SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(f"snapshot {source} has unknown format version {format_version}")
    if body_bytes > BODY_BYTES_MAX or SNAPSHOT_HEADER_BYTES + body_bytes != len(data):
        raise SnapshotError(
            f"snapshot {source} is {len(data)} bytes but its header says "
            f"{SNAPSHOT_HEADER_BYTES} + {body_bytes}: truncated or corrupt"
        )
    (crc_stored,) = _CRC.unpack_from(data, _HEADER_BEFORE_CRC.size)
    view = memoryview(data)
    body = view[SNAPSHOT_HEADER_BYTES:]
    crc = crc32c.crc32c(body, crc32c.crc32c(view[: _HEADER_BEFORE_CRC.size]))
    if crc != crc_stored:
        raise SnapshotError(
            f"snapshot {source} fails its CRC-32C check (stored {crc_stored:#010x}, computed "
            f"{crc:#010x}): the file is corrupt"
        )
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
