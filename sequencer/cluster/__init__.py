"""Cluster mode's I/O-free helpers for the replicator role (`daemon/roles/replicator.py`).

    stamper.py     the leader stamps proposals: index, term, a timestamp that never goes back
    forwards.py    records this node sequenced, kept until they commit, resent on a leader change;
                   the gapless forward stream (sender and leader sides)
    positions.py   where each written entry ends in the log ring: commit index -> ring position
    ring_entries.py  records as ring frames and back (a record is a ring frame, see record.py)
    gate.py        when the replicator may take proposals (a leader: once its term's start commits)

None of them touches a socket, a file, a clock or shared memory: the role passes time and bytes
in, so each is tested alone (tests/test_cluster_helpers.py).
"""

from sequencer.cluster.forwards import (
    INBOX_RECORDS_MAX,
    PENDING_BYTES_MAX,
    PENDING_RECORDS_MAX,
    ForwardInbox,
    ForwardStream,
    PendingForwards,
    record_key,
)
from sequencer.cluster.gate import may_propose
from sequencer.cluster.positions import RingPositions
from sequencer.cluster.ring_entries import (
    MalformedFrame,
    record_from_frame,
    record_index,
    record_term,
    records_from_frames,
)
from sequencer.cluster.stamper import RecordStamper

__all__ = [
    "INBOX_RECORDS_MAX",
    "PENDING_BYTES_MAX",
    "PENDING_RECORDS_MAX",
    "ForwardInbox",
    "ForwardStream",
    "MalformedFrame",
    "PendingForwards",
    "RecordStamper",
    "RingPositions",
    "may_propose",
    "record_from_frame",
    "record_index",
    "record_key",
    "record_term",
    "records_from_frames",
]
