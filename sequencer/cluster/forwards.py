"""Records this node sequenced, kept until they are committed, so none is lost when the leader
changes (cluster mode, docs/cluster.md).

The replicator takes each record its sequencer wrote to the proposal ring and keeps it here until
it sees the same record committed in its own log. A record is recognised by everything but its
stamp (index, term, timestamp, which the leader sets): its length, type, version, session id,
request id and payload (`record_key`). When the leader (or its term) changes, every record still
held is sent again, in order, to the new leader, those already in this node's log included
(`PendingForwards`); a node that became leader proposes again those not in its log: one that the
old leader had committed after all then reaches the log twice, which every record type tolerates
(the blp's dedup table and idempotence rules).

Not only on that edge: a forward can be lost with no change of leader (sent before the peer link
to the leader was up, dropped by a full socket, refused by a node that no longer leads: each of
these now also restarts the stream, below). So each record also carries when it was last sent
(`since_s`), and once the oldest has waited longer than the replicator's resend timeout
(`overdue`), every record not in this node's log is sent again (`resend`). The age is the oldest record's own, not the time since anything committed: a
node whose other clients keep committing must still resend the one record that was lost (issue
11: a lost node_start, resent only at the next leader change, after its node's first client).

Bounded (`PENDING_RECORDS_MAX`, `PENDING_BYTES_MAX`): when full the replicator stops reading the
proposal ring, which backpressures the sequencer through the ring, and so the clients.

A resend alone cannot repair a record lost while later ones of its session went through: those
commit first, and the resent record, behind a later request id of its client, is answered from the
blp's dedup table (DUPLICATE) without being applied. So the records forwarded on one connection
form a gapless, ordered stream, and every break restarts it with an ordered resend:

- the sender (`ForwardStream`): the peer transport numbers each link's forward stream and starts a
  new one on every authenticated connection and after every record it drops (no connection, a full
  socket); a record sent on an older stream is dropped. Before anything new goes on a new stream
  the replicator sends every pending record not in its log, in order (`resend`), once the link is
  writable; so nothing behind a dropped record reaches the leader before it.
- the receiver (`ForwardInbox`): a leader that cannot take a forwarded record (it no longer
  leads, its inbox is full) takes nothing more from that connection and closes it, and one that
  discards records it had taken (it stepped down, or started a term) closes their senders'
  connections: the sender reconnects, which starts a new stream with the ordered resend.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any

from sequencer.cluster.ring_entries import record_timestamp_ns, stamped
from sequencer.record import RECORD_HEADER_BYTES

__all__ = [
    "INBOX_RECORDS_MAX",
    "PENDING_BYTES_MAX",
    "PENDING_RECORDS_MAX",
    "RESTART_DELAY_MAX_S",
    "ForwardInbox",
    "ForwardStream",
    "PendingForwards",
    "record_key",
]

# About one second of a busy node's records (tens of thousands per second), and what a leader
# change must resend at once: 16 MiB is one log ring's worth, 64k records a few peer frames each.
PENDING_RECORDS_MAX = 1 << 16
PENDING_BYTES_MAX = 16 << 20

# Records followers forwarded held on the leader until its next pass: one follower's whole resend
# (PENDING_RECORDS_MAX) fits. Beyond, the connection that brought more is closed (its sender
# restarts its stream once the leader's pass made room).
INBOX_RECORDS_MAX = PENDING_RECORDS_MAX
# Restarts of a forward stream that follow each other closely (a leader whose inbox stays full, a
# node that no longer leads and closes every new connection until the follower learns the new
# leader) wait from RESTART_DELAY_FIRST_S doubling to this, so a resend of up to PENDING_BYTES_MAX
# is not repeated every reconnect (tens a second); a restart after a quiet RESTART_QUIET_S is
# immediate.
RESTART_DELAY_FIRST_S = 0.01
RESTART_DELAY_MAX_S = 1.0
RESTART_QUIET_S = 2.0

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

    Each is also marked once seen in this node's log (`logged`). Under the leader that sent it
    such a record is not sent again (it is in that leader's log, which that leader commits). On a
    change of term or leader it is (`with_logged`): it may be in this follower's log and not in the
    next leader's (five voters, or three and a learner: the old leader reached this node and no
    other before it died), and a conflict would then cut it here and restart this node's
    pipeline; its client's resend of it would come behind a later request of the same client that
    did commit, and be answered DUPLICATE without ever being applied (found in review, issue 11).
    A node that leads itself leaves its logged records out (its own log is what it commits).
    Duplicates in the log are harmless (the blp's idempotence rules; the client ignores a reply
    it no longer waits for). Identical records (the same key) are counted, so each commit of one
    releases one.

    Two ways of holding a record, one meaning. By key (`add`): a follower's records, which come
    back stamped by the leader, recognised by everything but the stamp. By index (`proposed`): a
    leader's own new proposals of the term it leads, whose log indexes it chose, so the commit
    passing an index releases its record with no key built or looked up, and a run of them is
    logged by construction (the core hands a leader's proposals back as `ready.entries` in the
    same pass). A run is held by key (`hold_by_key`) once its index no longer names it: at a
    change of term or leader (the next leader may put other entries there), before a record is
    held by key (so the key-held records stay the older: the resend order is the taking order),
    and before a query or change by record (`records`, `logged`, `unlogged`, `committed`).
    Per record this saves the leader three dict entries and five dict operations: its bookkeeping
    and stamping went from 14.4k to 5.2k instructions a record (benches.replicator_paths
    `leader_records`, callgrind; benches/RESULTS.md, "leadrepl").
    """

    __slots__ = ("_key_records", "_records", "_run_offset", "_run_offset_bytes", "_run_records", "_runs", "bytes")

    def __init__(self) -> None:
        # key -> [record, pending count, of which seen in the log, last sent (s)]; a dict keeps
        # insertion order, and `resend` stamps every record at once, so the first record has the
        # oldest `since_s` (invariant): `overdue` looks at it alone.
        self._records: dict[bytes, list[Any]] = {}
        self._key_records = 0  # the records held by key, each duplicate counted
        self.bytes = 0
        # The leader's proposals held by index: (first index, stamped copies, proposed at (s),
        # the copies' bytes), in index order; the first run's first `_run_offset` copies, of
        # `_run_offset_bytes` bytes, are committed already. Invariants: every run is newer than
        # every record held by key (`add` holds the runs by key first), and every copy in a run is
        # in this node's log (`proposed`). Bounded with the rest (`full`): `_run_records` copies.
        self._runs: deque[tuple[int, list[bytes], float, int]] = deque()
        self._run_offset = self._run_offset_bytes = 0
        self._run_records = 0

    def __len__(self) -> int:
        """The records held, each duplicate counted."""
        return self._key_records + self._run_records

    def full(self) -> bool:
        return len(self) >= PENDING_RECORDS_MAX or self.bytes >= PENDING_BYTES_MAX

    def add(self, record: bytes, now_s: float = 0.0) -> bytes:
        """Hold `record`, taken from the proposal ring at `now_s` and about to be sent (or
        proposed), until it is seen committed; returns its key."""
        if self._runs:
            self.hold_by_key()
        key = record_key(record)
        held = self._records.get(key)
        if held is None:
            self._records[key] = [record, 1, 0, now_s]
        else:
            held[1] += 1
        self._key_records += 1
        self.bytes += len(record)
        return key

    def add_all(self, records: list[bytes], now_s: float) -> list[bytes]:
        """`add` of each of `records` (a batch from the proposal ring), in one loop; their keys."""
        assert not records or min(map(len, records)) >= RECORD_HEADER_BYTES, records
        if self._runs:
            self.hold_by_key()
        held_records = self._records
        get = held_records.get
        keys = [record[:_STAMP_START] + record[_STAMP_END:] for record in records]  # record_key
        for record, key in zip(records, keys, strict=True):
            held = get(key)
            if held is None:
                held_records[key] = [record, 1, 0, now_s]
            else:
                held[1] += 1
        self._key_records += len(records)
        self.bytes += sum(map(len, records))
        return keys

    def proposed(self, first_index: int, copies: list[bytes], now_s: float, copies_bytes: int = -1) -> None:
        """The leader proposed `copies` at `first_index`, ... in the term it leads: new records
        taken from the proposal ring (never `add`ed), stamped (`RecordStamper.stamp_region`).
        Held by index until the commit passes them (`committed_all`); the caller calls
        `hold_by_key` when its term or leader changes. `copies_bytes`: their total length, if the
        caller knows it (the length of the region they were stamped from): no walk to sum it,
        here or when the commit releases the whole run (~490 instructions a record of the ~6.2k
        of `benches.replicator_paths` `leader_records`: benches/RESULTS.md, "leadrec2")."""
        if not copies:
            return
        runs = self._runs
        assert not runs or first_index >= runs[-1][0] + len(runs[-1][1]), (first_index, runs[-1][0])
        if copies_bytes < 0:
            copies_bytes = sum(map(len, copies))
        runs.append((first_index, copies, now_s, copies_bytes))
        self._run_records += len(copies)
        self.bytes += copies_bytes

    def hold_by_key(self) -> None:
        """Hold the leader's runs by key, as `add` would have, marked seen in the log: their index
        no longer names them (a change of term or leader), or a record is about to be held or
        looked up by key. Each record held is its copy with index and term 0 again, and the
        timestamp the leader gave it (at or after its own; what it is resent with, a time that
        another pending record of this leader's, bound for the log too, already carries)."""
        runs = self._runs
        if not runs:
            return
        held_records = self._records
        get = held_records.get
        offset = self._run_offset
        for _first_index, copies, since_s, _bytes in runs:
            for copy in islice(copies, offset, None):
                key = copy[:_STAMP_START] + copy[_STAMP_END:]
                held = get(key)
                if held is None:
                    held_records[key] = [stamped(copy, 0, 0, record_timestamp_ns(copy)), 1, 1, since_s]
                else:
                    held[1] += 1
                    held[2] += 1
            offset = 0
        runs.clear()
        self._key_records += self._run_records
        self._run_offset = self._run_offset_bytes = self._run_records = 0

    def _runs_over(self, first_index: int, end_index: int) -> list[tuple[int, int]]:
        """The held index ranges [start, end) of the runs that meet [first_index, end_index), in
        order, walked from the nearer end of the runs: a commit meets the oldest runs, a write to
        the log the newest, and a walk from the other end per batch grew with the square of the
        runs (a resend while the commit stalled, then single-record passes)."""
        runs = self._runs
        head_offset = self._run_offset
        front = first_index - runs[0][0] <= runs[-1][0] - first_index
        over: list[tuple[int, int]] = []
        for position, (run_first, copies, _since_s, _bytes) in enumerate(runs if front else reversed(runs)):
            start = run_first + (head_offset if (position == 0 if front else position == len(runs) - 1) else 0)
            end = run_first + len(copies)
            if front:
                if end <= first_index:
                    continue
                if start >= end_index:
                    break
            else:
                if start >= end_index:
                    continue
                if end <= first_index:
                    break
            over.append((start, end))
        if not front:
            over.reverse()
        return over

    def _by_key(self, records: list[bytes], first_index: int) -> list[bytes]:
        """Of the entries `records` from `first_index`, those not held in a run (only while
        records are held by key as well as by index: the first passes of a leader's term)."""
        if not self._runs or not records:
            return records
        out: list[bytes] = []
        taken = 0  # records[:taken] are decided
        for start, end in self._runs_over(first_index, first_index + len(records)):
            start, end = start - first_index, min(end - first_index, len(records))
            if start > taken:
                out += records[taken:start]
            taken = max(taken, end)
        out += records[taken:]
        return out

    def logged(self, record: bytes | bytearray | memoryview) -> bool:
        """A record was written to this node's log (uncommitted): mark a pending one like it."""
        self.hold_by_key()
        if not self._records:
            return False
        held = self._records.get(record_key(record))
        if held is None or held[2] >= held[1]:
            return False
        held[2] += 1
        return True

    def logged_all(self, records: list[bytes], first_index: int) -> None:
        """`logged` of each of `records` (the entries `first_index`, ... written to this node's
        log), in one loop; those held in a run are (`proposed`) already."""
        held_records = self._records
        if not held_records:
            return
        get = held_records.get
        for record in self._by_key(records, first_index):
            held = get(record[:_STAMP_START] + record[_STAMP_END:])  # record_key
            if held is not None and held[2] < held[1]:
                held[2] += 1

    def unlogged(self, record: bytes | bytearray | memoryview) -> None:
        """A record marked `logged` left the log before it committed (replaced before it reached
        the ring): it is sent again at the next change of leader."""
        self.hold_by_key()
        held = self._records.get(record_key(record)) if self._records else None
        if held is not None and held[2] > 0:
            held[2] -= 1

    def committed(self, record: bytes | bytearray | memoryview) -> bool:
        """A record of the log is committed: release the pending one like it, if any."""
        self.hold_by_key()
        if not self._records:
            return False
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
        self._key_records -= 1
        self.bytes -= len(pending)
        return True

    def committed_all(self, records: list[bytes], first_index: int) -> None:
        """`committed` of each of `records` (the entries `first_index`, ... committed in this
        node's log), in one loop; those held in a run are released by their index, whole runs
        at a time (the commit is a prefix of the log: every run entry up to the last is)."""
        if self._runs:
            by_key = self._by_key(records, first_index) if self._records else records
            self._release_runs(first_index + len(records) - 1)
            records = by_key
        held_records = self._records
        if not held_records:
            return
        get = held_records.get
        released = released_bytes = 0
        for record in records:
            key = record[:_STAMP_START] + record[_STAMP_END:]  # record_key
            held = get(key)
            if held is None:
                continue
            count = held[1]
            if count == 1:
                del held_records[key]
            else:
                held[1] = count - 1
                held[2] = max(0, held[2] - 1)
            released += 1
            released_bytes += len(held[0])
        self._key_records -= released
        self.bytes -= released_bytes

    def _release_runs(self, last_index: int) -> None:
        """Release every copy held in a run at or below `last_index` (committed)."""
        runs = self._runs
        offset, offset_bytes = self._run_offset, self._run_offset_bytes
        released_records = released_bytes = 0
        while runs:
            first_index, copies, _since_s, run_bytes = runs[0]
            end = last_index - first_index + 1  # copies[:end] are committed
            if end <= offset:
                break
            if end >= len(copies):  # the whole rest of the run: its bytes known, not summed
                released_records += len(copies) - offset
                released_bytes += run_bytes - offset_bytes
                runs.popleft()
                offset = offset_bytes = 0
                continue
            part_bytes = sum(map(len, islice(copies, offset, end)))
            released_records += end - offset
            released_bytes += part_bytes
            offset = end
            offset_bytes += part_bytes
            break
        self._run_offset, self._run_offset_bytes = offset, offset_bytes
        self._run_records -= released_records
        self.bytes -= released_bytes

    def records(self, with_logged: bool = False) -> list[bytes]:
        """Every pending record not seen in this node's log (`with_logged`: every pending record),
        oldest first, a duplicate as often as it is counted: what goes (again) to the leader."""
        self.hold_by_key()
        out: list[bytes] = []
        for record, count, logged, _since_s in self._records.values():
            times = count if with_logged else count - logged
            if times > 0:
                out.extend([record] * times)
        return out

    def overdue(self, now_s: float, after_s: float) -> bool:
        """Whether the oldest pending record was sent more than `after_s` before `now_s` and is
        still not committed: time to `resend`."""
        for held in self._records.values():
            return now_s - held[3] > after_s
        if self._runs:
            return now_s - self._runs[0][2] > after_s
        return False

    def resend(self, now_s: float, with_logged: bool = False) -> list[bytes]:
        """`records(with_logged)`, to be sent again now: the resend timeout restarts for every
        record."""
        self.hold_by_key()
        for held in self._records.values():
            held[3] = now_s
        return self.records(with_logged)


class ForwardStream:
    """The follower's side of the gapless forward stream (module docstring): what to send to the
    leader now, given the link's current forward stream number.

    `records_to_send` answers the records themselves while the stream is the one this node
    restarted last; on a new stream, every pending record not in the log (`PendingForwards.resend`;
    with those in the log too when the leader is another one),
    once the link is writable and the restart delay has passed; else None (nothing goes: the
    records stay pending and go with the restart).
    """

    __slots__ = ("_delay_s", "_restarted_s", "_stream", "restarts")

    def __init__(self) -> None:
        self._stream: tuple[int, int] = (-1, -1)  # (leader, stream number) restarted last
        self._restarted_s = float("-inf")
        self._delay_s = 0.0
        self.restarts = 0

    def records_to_send(
        self, leader: int, stream: int, writable: bool, pending: PendingForwards,
        records: list[bytes], now_s: float,
    ) -> list[bytes] | None:  # fmt: skip
        if (leader, stream) == self._stream:
            return records
        if not writable or now_s - self._restarted_s < self._delay_s:
            return None
        if now_s - self._restarted_s >= RESTART_QUIET_S:
            self._delay_s = 0.0  # the first restart in a while goes at once
        else:
            self._delay_s = min(max(self._delay_s * 2, RESTART_DELAY_FIRST_S), RESTART_DELAY_MAX_S)
        another_leader = leader != self._stream[0]  # its log may lack what this node logged
        self._stream = (leader, stream)
        self._restarted_s = now_s
        self.restarts += 1
        return pending.resend(now_s, with_logged=another_leader)


class ForwardInbox:
    """The leader's side: records followers forwarded, held until its next pass proposes them.

    `take` takes a batch whole or not at all: False (the batch dropped and counted in
    `records_dropped`) when this node does not lead or the inbox has no room for it, and the
    caller then closes the connection it came on, so nothing later from that connection is taken
    after a record it dropped. `clear` discards what is held and names the senders whose
    connections must be closed for the same reason.
    """

    __slots__ = ("_senders", "records", "records_dropped", "records_max")

    def __init__(self, records_max: int = INBOX_RECORDS_MAX) -> None:
        self.records: list[bytes] = []
        self.records_max = records_max
        self.records_dropped = 0
        self._senders: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def take(self, sender: int, records: list[bytes], leading: bool) -> bool:
        if not leading or len(self.records) + len(records) > self.records_max:
            self.records_dropped += len(records)
            return False
        self.records.extend(records)
        self._senders.add(sender)
        return True

    def drain(self) -> list[bytes]:
        """Everything held, oldest first, to propose now (`put_back` if the proposal is refused)."""
        records, self.records = self.records, []
        return records

    def put_back(self, records: list[bytes]) -> None:
        """Drained records the core refused (too much uncommitted): first again at the next pass."""
        self.records[:0] = records

    def clear(self) -> set[int]:
        """Discard what is held (this node stopped leading, or starts a term): the senders whose
        connections to close, so each restarts its stream with the records discarded here (every
        sender since the last `clear` while any record is held: a superset, which costs a
        reconnect)."""
        senders = self._senders if self.records else set()
        self.records_dropped += len(self.records)
        self.records = []
        self._senders = set()
        return senders
