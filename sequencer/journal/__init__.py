"""The journal: append-only segment files that make log records durable.

Theory of operation (docs/journal.md has the long form). A journal is a directory of segment
files named after their first index (`00000000000000000001.seg`). Each segment starts with a
64-byte header and then holds CRC-32C framed batches of whole records, exactly as they sat in the
ring, back to back; order is proven by the indexes, not by a chained CRC, so every batch verifies
on its own and a reader can start anywhere.

One module per concept; every public name is re-exported here, so `from sequencer.journal import
...` is the API:

    format.py   the on-disk format: segment and batch headers, their checks, records read back
                (I/O-free: a follower checks a batch received over the network with it)
    scan.py     reading segment files and diagnosing damage (torn tail or corruption)
    space.py    room on the file system: reserved ahead, a full disk is a state
    reader.py   reading an index range back: replay, `seqd log`, entries for followers
    log_storage.py  the journal as the Raft log's storage: entries and terms by index
    truncate.py crash-safe truncation of the tail (a Raft follower's conflict): an intent, redone
                at open
    writer.py   `Journal`: recovery at open, append, group commit, roll, truncation, retention

Readers use no lock and only ever return complete, CRC-valid batches, so they can follow a
journal another process is appending to. Snapshot + replay is `sequencer.recovery`.
"""

from sequencer.journal.errors import (
    JournalCorruptError,
    JournalError,
    JournalFailedError,
    JournalFullError,
    JournalLockedError,
    JournalSyncError,
    JournalWriteError,
)
from sequencer.journal.format import (
    BATCH_HEADER,
    BATCH_HEADER_BYTES,
    BATCH_MAGIC,
    SEGMENT_BYTES_DEFAULT,
    SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN,
    SEGMENT_HEADER,
    SEGMENT_HEADER_BYTES,
    SEGMENT_LAYOUT_VERSION,
    SEGMENT_MAGIC,
    SPARE_NAME,
    Record,
    segment_name,
)
from sequencer.journal.log_storage import JournalLogStorage
from sequencer.journal.reader import JournalReader, read_records, read_runs
from sequencer.journal.repair import RecoveryReport, TornTail
from sequencer.journal.scan import Damage, SegmentScan, list_segments, scan_segment
from sequencer.journal.space import (
    FAULT_DISK_BYTES_ENV,
    RESERVE_AHEAD_AT_FRACTION,
    WRITE_SLACK_BYTES,
    DiskSpace,
    LimitedDiskSpace,
    SpaceShortage,
    disk_space_from_environment,
)
from sequencer.journal.truncate import INTENT_NAME, INTENT_TEMP_NAME, TRUNCATION_STEPS
from sequencer.journal.writer import Journal

__all__ = [
    "BATCH_HEADER",
    "BATCH_HEADER_BYTES",
    "BATCH_MAGIC",
    "FAULT_DISK_BYTES_ENV",
    "INTENT_NAME",
    "INTENT_TEMP_NAME",
    "RESERVE_AHEAD_AT_FRACTION",
    "SEGMENT_BYTES_DEFAULT",
    "SEGMENT_BYTES_MAX",
    "SEGMENT_BYTES_MIN",
    "SEGMENT_HEADER",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_LAYOUT_VERSION",
    "SEGMENT_MAGIC",
    "SPARE_NAME",
    "TRUNCATION_STEPS",
    "WRITE_SLACK_BYTES",
    "Damage",
    "DiskSpace",
    "Journal",
    "JournalCorruptError",
    "JournalError",
    "JournalFailedError",
    "JournalFullError",
    "JournalLockedError",
    "JournalLogStorage",
    "JournalReader",
    "JournalSyncError",
    "JournalWriteError",
    "LimitedDiskSpace",
    "Record",
    "RecoveryReport",
    "SegmentScan",
    "SpaceShortage",
    "TornTail",
    "disk_space_from_environment",
    "list_segments",
    "read_records",
    "read_runs",
    "scan_segment",
    "segment_name",
]
