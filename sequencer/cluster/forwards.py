"""Records this node sequenced, kept until they are committed, so none is lost when the leader
changes (cluster mode, docs/cluster.md).

The replicator takes each record its sequencer wrote to the proposal ring and keeps it here until
it sees the same record committed in its own log. A record is recognised by everything but its
stamp (index, term, timestamp, which the leader sets): its length, type, version, session id,
request id and payload (`record_key`). When the leader changes, every record still held that never
reached this node's log is sent again, in order, to the new leader (or proposed again, on the
node that became leader): one that the old leader had committed after all then reaches the log
twice, which every record type tolerates (the blp's dedup table and idempotence rules).

Not only on that edge: a forward can be lost with no change of leader (sent before the peer link
to the leader was up, dropped by a full socket, refused by a node that no longer leads). So
each record also carries when it was last sent (`since_s`), and once the oldest has waited longer
than the replicator's resend timeout (`overdue`), every record not in this node's log is sent
again (`resend`). The age is the oldest record's own, not the time since anything committed: a
node whose other clients keep committing must still resend the one record that was lost (issue
11: a lost node_start, resent only at the next leader change, after its node's first client).

Bounded (`PENDING_RECORDS_MAX`, `PENDING_BYTES_MAX`): when full the replicator stops reading the
proposal ring, which backpressures the sequencer through the ring, and so the clients.
"""

from __future__ import annotations

from typing import Any

from sequencer.record import RECORD_HEADER_BYTES

__all__ = ["PENDING_BYTES_MAX", "PENDING_RECORDS_MAX", "PendingForwards", "record_key"]

# About one second of a busy node's records (tens of thousands per second), and what a leader
# change must resend at once: 16 MiB is one log ring's worth, 64k records a few peer frames each.
PENDING_RECORDS_MAX = 1 << 16
PENDING_BYTES_MAX = 16 << 20

_STAMP_START = 8  # index, term, timestamp: what the leader sets
_STAMP_END = 32


def record_key(record: bytes | bytearray | memoryview) -> bytes:
    """A record without its stamp: what identifies it before and after the leader stamped it."""
    assert len(record) >= RECORD_HEADER_BYTES, len(record)
    if type(record) is bytes:  # every record the replicator holds: slices are bytes already
        return record[:_STAMP_START] + record[_STAMP_END:]
    return bytes(record[:_STAMP_START]) + bytes(record[_STAMP_END:])


class PendingForwards:
    """Records taken from the proposal ring and not yet seen committed, oldest first.

    Each is also marked once seen in this node's log (`logged`): such a record is not sent
    again, because it is either committed in time (Raft: the new leader holds every committed
    entry) or cut from this log by a conflict, which restarts this node's pipeline and its
    clients' sessions anyway (they resend). So a change of leader resends only what never reached
    this node's log, which keeps duplicates rare (a record the old leader committed and this node
    had not yet learned committed is in its log: not resent). Identical records (the same key) are
    counted, so each commit of one releases one.
    """

    __slots__ = ("_keys", "_records", "bytes")

    def __init__(self) -> None:
        # key -> [record, pending count, of which seen in the log, last sent (s)]; a dict keeps
        # insertion order, and `resend` stamps every record at once, so the first record has the
        # oldest `since_s` (invariant): `overdue` looks at it alone.
        self._records: dict[bytes, list[Any]] = {}
        self.bytes = 0
        # A leader's stamped copy of a pending record -> the record's key, until the copy is
        # seen committed (`stamped`): the copy comes back from the Raft core as the same bytes
        # object, twice (logged, committed), so its key is looked up (its hash is cached in the
        # object) instead of built again from two slices each time. A lookup only saves work: the
        # key it gives is `record_key` of the copy. Bounded: one per pending record (`add`
        # refuses nothing, but the caller stops taking proposals when `full`), emptied by
        # `forget_stamped` when this node stops leading or a proposal is refused.
        self._keys: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._records)

    def full(self) -> bool:
        return len(self._records) >= PENDING_RECORDS_MAX or self.bytes >= PENDING_BYTES_MAX

    def add(self, record: bytes, now_s: float = 0.0) -> bytes:
        """Hold `record`, taken from the proposal ring at `now_s` and about to be sent (or
        proposed), until it is seen committed; returns its key (for `stamped`)."""
        key = record_key(record)
        held = self._records.get(key)
        if held is None:
            self._records[key] = [record, 1, 0, now_s]
        else:
            held[1] += 1
        self.bytes += len(record)
        return key

    def stamped(self, copies: list[bytes], keys: list[bytes]) -> None:
        """A leader proposed `copies`, the stamped copies of the pending records whose keys
        `add` returned (in the same order)."""
        known = self._keys
        if len(known) >= PENDING_RECORDS_MAX:
            known.clear()  # copies released by equal records committed elsewhere: start afresh
        known.update(zip(copies, keys, strict=True))

    def forget_stamped(self) -> None:
        """The stamped copies will not all come back (this node stops leading, or the core
        refused them): their keys are built again if they do."""
        self._keys.clear()

    def _key(self, record: bytes | bytearray | memoryview) -> bytes:
        if type(record) is bytes:
            key = self._keys.get(record)
            if key is not None:
                return key
        return record_key(record)

    def logged(self, record: bytes | bytearray | memoryview) -> bool:
        """A record was written to this node's log (uncommitted): mark a pending one like it."""
        if not self._records:
            return False
        held = self._records.get(self._key(record))
        if held is None or held[2] >= held[1]:
            return False
        held[2] += 1
        return True

    def unlogged(self, record: bytes | bytearray | memoryview) -> None:
        """A record marked `logged` left the log before it committed (replaced before it reached
        the ring): it is sent again at the next change of leader."""
        held = self._records.get(self._key(record)) if self._records else None
        if held is not None and held[2] > 0:
            held[2] -= 1

    def committed(self, record: bytes | bytearray | memoryview) -> bool:
        """A record of the log is committed: release the pending one like it, if any."""
        if not self._records:
            if self._keys:
                self._keys.clear()  # nothing pending: no copy's key is needed
            return False
        key = self._keys.pop(record, None) if type(record) is bytes else None
        if key is None:
            key = record_key(record)
        held = self._records.get(key)
        if held is None:
            return False
        pending, count, logged, _since_s = held
        if count == 1:
            del self._records[key]
        else:
            held[1] = count - 1
            held[2] = max(0, logged - 1)
        self.bytes -= len(pending)
        return True

    def records(self) -> list[bytes]:
        """Every pending record not seen in this node's log, oldest first (a duplicate as often
        as it is counted): what goes (again) to a new leader."""
        out: list[bytes] = []
        for record, count, logged, _since_s in self._records.values():
            if count > logged:
                out.extend([record] * (count - logged))
        return out

    def overdue(self, now_s: float, after_s: float) -> bool:
        """Whether the oldest pending record was sent more than `after_s` before `now_s` and is
        still not committed: time to `resend`."""
        for held in self._records.values():
            return now_s - held[3] > after_s
        return False

    def resend(self, now_s: float) -> list[bytes]:
        """`records()`, to be sent again now: the resend timeout restarts for every record."""
        for held in self._records.values():
            held[3] = now_s
        return self.records()
