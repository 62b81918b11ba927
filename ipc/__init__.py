"""Shared memory for seqd: segments, the single-writer ring, counters, idle strategies.

`ipc` knows nothing of records: a ring carries frames of (type, payload bytes). See
docs/architecture.md, "Shared memory (ipc)", and `ipc.platform` for the memory-ordering argument.
"""

from ipc.affinity import available_cpus, pin, pinned_cpus
from ipc.counters import Counter, Counters
from ipc.doorbell import Doorbell, bell_name
from ipc.idle import (
    BackoffIdleStrategy,
    BlockingIdleStrategy,
    IdleStrategy,
    SpinIdleStrategy,
    YieldIdleStrategy,
    idle_strategy,
)
from ipc.platform import PlatformError, check_memory_ordering
from ipc.ring import (
    FRAME_HEADER_BYTES,
    PADDING_TYPE,
    RecordTooLarge,
    Ring,
    RingError,
    RingReader,
    RingWriter,
    frame_bytes,
)
from ipc.segment import Segment, SegmentError, remove_stale, segment_name

__all__ = [
    "FRAME_HEADER_BYTES",
    "PADDING_TYPE",
    "BackoffIdleStrategy",
    "BlockingIdleStrategy",
    "Counter",
    "Counters",
    "Doorbell",
    "IdleStrategy",
    "PlatformError",
    "RecordTooLarge",
    "Ring",
    "RingError",
    "RingReader",
    "RingWriter",
    "Segment",
    "SegmentError",
    "SpinIdleStrategy",
    "YieldIdleStrategy",
    "available_cpus",
    "bell_name",
    "check_memory_ordering",
    "frame_bytes",
    "idle_strategy",
    "pin",
    "pinned_cpus",
    "remove_stale",
    "segment_name",
]
