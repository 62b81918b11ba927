"""The index map of a migration: where each old index went in the new journal (`IndexMap`),
stored as runs in a file with a CRC (`INDEX_MAP_FILE`, beside the new journal's segments).
"""

from __future__ import annotations

import bisect
import struct

import crc32c

from sequencer.migrate.errors import MigrationError

__all__ = ["INDEX_MAP_FILE", "IndexMap"]

INDEX_MAP_FILE = "migration.index-map"  # beside the new journal's segments

# magic, layout version, header bytes, crc32c of the file with this field zeroed, old last index,
# new last index, run count; then the runs.
_MAP_HEADER = struct.Struct("<8sHHIQQQ")
# old first index, new first index, old count, new records per old record
_MAP_RUN = struct.Struct("<QQII")
_MAP_MAGIC = b"SEQDIMAP"
_MAP_LAYOUT_VERSION = 1
_MAP_CRC_OFFSET = 12
_RUN_COUNT_MAX = (1 << 32) - 1  # old_count is a u32: a longer run is stored as several


class IndexMap:
    """Where each old index went in a migration: old index -> the new indexes of its records.

    Stored as runs (old first, new first, old count, new records per old record): a stretch of
    records copied one for one is one run, a stretch of transfers split in two another. The file
    (`INDEX_MAP_FILE`, beside the new journal's segments) is a 40-byte header (magic
    `SEQDIMAP`, layout version, header bytes, CRC-32C of the file with this field zeroed, old
    last index, new last index, run count), then 24 bytes per run (`<QQII`), little-endian.

    Args:
        runs: (old_first, new_first, old_count, per_old), ascending and contiguous from old 1.
        source_last_index: the old journal's last index.
        target_last_index: the new journal's last index (records after `covering(
            source_last_index)` were added by the migration itself).
    """

    def __init__(self, runs: list[tuple[int, int, int, int]], source_last_index: int,
                 target_last_index: int) -> None:  # fmt: skip
        self.runs = runs
        self.source_last_index = source_last_index
        self.target_last_index = target_last_index
        self._old_firsts = [run[0] for run in runs]
        expected_old, expected_new = 1, 1
        for old_first, new_first, old_count, per_old in runs:
            assert old_first == expected_old, (old_first, expected_old)
            assert new_first == expected_new, (new_first, expected_new)
            assert old_count > 0, old_count
            expected_old += old_count
            expected_new += old_count * per_old
        assert expected_old == source_last_index + 1, (expected_old, source_last_index)
        assert expected_new <= target_last_index + 1, (expected_new, target_last_index)
        self._carried = [run for run in runs if run[3] > 0]
        self._new_firsts = [run[1] for run in self._carried]

    def targets(self, old_index: int) -> range:
        """The new indexes of the records old record `old_index` became: one for a copy, several
        for a split, none for a dropped record or a request merged into a later one (the empty
        range then starts where its records would have been).

        Raises:
            KeyError: `old_index` is not in 1..source_last_index.
        """
        if not 1 <= old_index <= self.source_last_index:
            raise KeyError(f"old index {old_index} is outside the migrated journal (1..{self.source_last_index})")
        old_first, new_first, _old_count, per_old = self.runs[bisect.bisect_right(self._old_firsts, old_index) - 1]
        start = new_first + (old_index - old_first) * per_old
        return range(start, start + per_old)

    def covering(self, old_index: int) -> int:
        """The last new index whose records all come from old indexes up to `old_index`: a
        follower that had applied the old journal to `old_index` resumes after this (0: none)."""
        return self.targets(old_index).stop - 1

    def source(self, new_index: int) -> int | None:
        """The old index a new record came from; None for a record the migration added at the end.

        Raises:
            KeyError: `new_index` is not in 1..target_last_index.
        """
        if not 1 <= new_index <= self.target_last_index:
            raise KeyError(f"new index {new_index} is outside the new journal (1..{self.target_last_index})")
        position = bisect.bisect_right(self._new_firsts, new_index) - 1
        if position < 0:
            return None
        old_first, new_first, old_count, per_old = self._carried[position]
        offset = (new_index - new_first) // per_old
        return old_first + offset if offset < old_count else None

    def to_bytes(self) -> bytes:
        runs = []
        for old_first, new_first, old_count, per_old in self.runs:
            while old_count > _RUN_COUNT_MAX:
                runs.append(_MAP_RUN.pack(old_first, new_first, _RUN_COUNT_MAX, per_old))
                old_first += _RUN_COUNT_MAX
                new_first += _RUN_COUNT_MAX * per_old
                old_count -= _RUN_COUNT_MAX
            runs.append(_MAP_RUN.pack(old_first, new_first, old_count, per_old))
        header = _MAP_HEADER.pack(_MAP_MAGIC, _MAP_LAYOUT_VERSION, _MAP_HEADER.size, 0,
                                  self.source_last_index, self.target_last_index, len(runs))  # fmt: skip
        body = b"".join(runs)
        crc = crc32c.crc32c(body, crc32c.crc32c(header))
        return header[:_MAP_CRC_OFFSET] + struct.pack("<I", crc) + header[_MAP_CRC_OFFSET + 4 :] + body

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "index map") -> IndexMap:
        """Raises MigrationError on a damaged or foreign file (`name` says which, in the message)."""
        if len(data) < _MAP_HEADER.size:
            raise MigrationError(f"{name} is {len(data)} bytes, too short for its header: not an index map")
        magic, layout, header_bytes, crc, source_last, target_last, count = _MAP_HEADER.unpack_from(data)
        if magic != _MAP_MAGIC:
            raise MigrationError(f"{name} does not start with {_MAP_MAGIC!r}: not a seqd index map")
        if layout != _MAP_LAYOUT_VERSION or header_bytes != _MAP_HEADER.size:
            raise MigrationError(f"{name} has layout version {layout}; this seqd reads {_MAP_LAYOUT_VERSION}")
        if len(data) != header_bytes + count * _MAP_RUN.size:
            raise MigrationError(f"{name} is {len(data)} bytes but its header says {count} runs: cut short?")
        zeroed = data[:_MAP_CRC_OFFSET] + bytes(4) + data[_MAP_CRC_OFFSET + 4 : header_bytes]
        if crc32c.crc32c(data[header_bytes:], crc32c.crc32c(zeroed)) != crc:
            raise MigrationError(f"{name} fails its CRC-32C: the file is damaged")
        runs = [_MAP_RUN.unpack_from(data, header_bytes + n * _MAP_RUN.size) for n in range(count)]
        return cls(runs, source_last, target_last)
