"""Jepsen-style histories of a cluster's clients and the checker that judges them.

`recorder`: a `RecordingClient` writes every operation a client makes (invoke and completion
time, outcome) as a JSON line. `checker`: the histories and every node's journal in, violations
out. The nemesis (`python -m tests.nemesis`) and `seqd demo --cluster` both use them; see
docs/cluster.md, "Checking a cluster's history".
"""

from sequencer.history.checker import (
    VIOLATION_KINDS,
    Report,
    Violation,
    check,
    check_files,
    read_journal,
    read_snapshot_hashes,
)
from sequencer.history.recorder import (
    OUTCOMES,
    HistoryWriter,
    Operation,
    RecordingClient,
    RecordingRequest,
    read_history,
)

__all__ = [
    "OUTCOMES",
    "VIOLATION_KINDS",
    "HistoryWriter",
    "Operation",
    "RecordingClient",
    "RecordingRequest",
    "Report",
    "Violation",
    "check",
    "check_files",
    "read_history",
    "read_journal",
    "read_snapshot_hashes",
]
