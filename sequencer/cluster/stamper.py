"""The leader's stamp on a proposal: its index, its term and a timestamp that never goes back.

In cluster mode the sequencer writes its records unstamped (index 0, term 0) into the proposal
ring, and a follower forwards its sequencer's records to the leader as raw bytes. Only the
leader's replicator knows the next index and the term (the Raft core assigns them), so it stamps
every record just before `propose_batch`. The timestamp is the record's own (its sequencer's
clock) unless that is behind the last one stamped in the log: then the last one. So the log's
clock never goes backwards, even when a new leader's clock is behind the old one's or a
follower's sequencer's clock is behind the leader's (a state machine reads `ctx.now` from it).

The stamper also follows what other leaders stamped (`observe`, for every entry this node writes
to its log), so a node that becomes leader continues from the log's last timestamp.
"""

from __future__ import annotations

from sequencer.cluster.ring_entries import record_timestamp_ns, stamped, stamped_region, stamped_run
from sequencer.record import RecordType, encode_record

__all__ = ["RecordStamper"]


class RecordStamper:
    """Stamps records for the log. Invariant: `last_timestamp_ns` is the largest timestamp of any
    record this node has stamped or observed in its log."""

    __slots__ = ("last_timestamp_ns",)

    def __init__(self, last_timestamp_ns: int) -> None:
        self.last_timestamp_ns = last_timestamp_ns

    def observe(self, record: bytes | bytearray | memoryview) -> None:
        """A record of the log (written by this node, stamped by any leader)."""
        timestamp_ns = record_timestamp_ns(record)
        if timestamp_ns > self.last_timestamp_ns:
            self.last_timestamp_ns = timestamp_ns

    def stamp(self, record: bytes | bytearray | memoryview, index: int, term: int) -> bytes:
        """A copy of `record` with `index`, `term` and its timestamp made monotonic."""
        assert index >= 1, index
        assert term >= 1, term
        timestamp_ns = record_timestamp_ns(record)
        if timestamp_ns < self.last_timestamp_ns:
            timestamp_ns = self.last_timestamp_ns
        self.last_timestamp_ns = timestamp_ns
        return stamped(record, index, term, timestamp_ns)

    def stamp_all(self, records: list[bytes], first_index: int, term: int) -> list[bytes]:
        """`stamp` of each of `records` at `first_index`, `first_index + 1`, ... (a proposal batch,
        in one loop)."""
        assert first_index >= 1, first_index
        assert term >= 1, term
        out, self.last_timestamp_ns = stamped_run(records, first_index, term, self.last_timestamp_ns)
        return out

    def stamp_region(self, region: bytes | memoryview, first_index: int, term: int) -> list[bytes]:
        """`stamp_all` of the records of `region`, a run of whole proposal ring frames
        (`RingReader.poll_region`), each built stamped from the ring's bytes in one copy.

        Raises:
            MalformedFrame: a frame that is no record a follower may forward (`stamped_region`).
        """
        assert first_index >= 1, first_index
        assert term >= 1, term
        out, self.last_timestamp_ns = stamped_region(region, first_index, term, self.last_timestamp_ns)
        return out

    def stamp_batch(self, records: list[bytes], region: bytes | memoryview, forwarded: list[bytes],
                    first_index: int, term: int) -> tuple[list[bytes], list[bytes]]:  # fmt: skip
        """A leader's proposal batch from `first_index`: `records` (pending already), the records
        of `region` (new from the proposal ring), then `forwarded` (followers'), stamped in that
        order; and the stamped copies of `region`'s records alone (held pending by index)."""
        batch = self.stamp_all(records, first_index, term) if records else []
        copies = self.stamp_region(region, first_index + len(batch), term) if region else []
        batch += copies
        if forwarded:
            batch += self.stamp_all(forwarded, first_index + len(batch), term)
        return batch, copies

    def term_start(self, index: int, term: int, now_ns: int) -> bytes:
        """The TERM_START record (the term's Raft no-op, section 8) at `index`: timestamped with
        the new leader's clock `now_ns`, or the log's last timestamp if that is later."""
        timestamp_ns = max(now_ns, self.last_timestamp_ns)
        self.last_timestamp_ns = timestamp_ns
        return encode_record(RecordType.TERM_START, 0, index, term, timestamp_ns, 0, 0)
