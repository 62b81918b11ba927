"""The replicator's I/O-free helpers (`sequencer/cluster/`), its record checks, the journaller's
cluster mode and the supervisor's journal cut on a replicator's request, each alone."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

import ipc
from daemon.config import ClusterConfig, Config, MemberConfig, NodeConfig
from daemon.layout import (
    RECOVERY_COMMIT_INDEX,
    RECOVERY_LAST_INDEX,
    SUPERVISOR,
    CounterView,
    create_counters,
)
from daemon.raft_truncate import TRUNCATE_NAME, read_truncate_request, write_truncate_request
from daemon.roles.journaller import JournallerAgent
from daemon.roles.replicator_setup import (
    PROPOSAL_BYTES_PER_PASS_MAX,
    ForwardFaults,
    MalformedProposal,
    answer_needs_pass,
    check_proposals,
    forwarded_refusal,
    malformed,
    poll_region,
)
from daemon.supervisor import Supervisor
from ipc.ring import Ring
from sequencer.cluster import (
    PENDING_RECORDS_MAX,
    ForwardInbox,
    ForwardStream,
    MalformedFrame,
    PendingForwards,
    RecordStamper,
    RingPositions,
    may_propose,
    record_from_frame,
    record_index,
    record_key,
    record_term,
    ring_entries,
)
from sequencer.cluster.forwards import RESTART_DELAY_MAX_S, RESTART_QUIET_S
from sequencer.cluster.ring_entries import record_timestamp_ns
from sequencer.hard_state import HardStateFile
from sequencer.journal import Journal, read_records
from sequencer.raft.messages import HardState
from sequencer.record import (
    FRAME_HEADER_BYTES,
    RECORD_HEADER_BYTES,
    RecordType,
    encode_record,
    frame_type,
)
from tests.test_agents import NOW_NS, SEGMENT_BYTES, Node, make_node


def command(request_id: int, timestamp_ns: int = 0, payload: bytes = b"x", index: int = 0, term: int = 0) -> bytes:
    return encode_record(RecordType.COMMAND, 1, index, term, timestamp_ns, 99, request_id, payload)


# ---- stamping ------------------------------------------------------------------------------------


def test_the_leader_stamps_index_and_term_and_a_timestamp_that_never_goes_back() -> None:
    stamper = RecordStamper(last_timestamp_ns=1_000)
    first = stamper.stamp(command(1, timestamp_ns=5_000), index=7, term=3)
    # A follower's sequencer whose clock is behind: its record keeps the log's last time.
    behind = stamper.stamp(command(2, timestamp_ns=4_000), index=8, term=3)
    assert (record_index(first), record_term(first), record_timestamp_ns(first)) == (7, 3, 5_000)
    assert (record_index(behind), record_term(behind), record_timestamp_ns(behind)) == (8, 3, 5_000)
    assert first[32:] == command(1)[32:]  # session, request and payload untouched


def test_a_new_leader_continues_from_the_timestamps_it_observed_in_its_log() -> None:
    stamper = RecordStamper(last_timestamp_ns=0)
    stamper.observe(command(1, timestamp_ns=9_000, index=1, term=1))  # another leader's record
    term_start = stamper.term_start(index=2, term=2, now_ns=8_000)  # this node's clock is behind
    assert record_timestamp_ns(term_start) == 9_000
    assert struct.unpack_from("<IH", term_start)[1] == RecordType.TERM_START
    assert record_timestamp_ns(stamper.stamp(command(2, timestamp_ns=1), 3, 2)) == 9_000


def test_a_ring_frame_becomes_the_whole_record_again() -> None:
    record = command(1, payload=b"abc")  # 51 bytes of record, padded to 56
    length = RECORD_HEADER_BYTES + 3
    rebuilt = record_from_frame(frame_type(RecordType.COMMAND, 1), memoryview(record)[FRAME_HEADER_BYTES:length])
    assert rebuilt == record


# ---- pending forwards ------------------------------------------------------------------------------


def test_a_pending_record_is_released_by_its_stamped_copy_committed_in_the_log() -> None:
    pending = PendingForwards()
    record = command(1, timestamp_ns=10)
    pending.add(record)
    pending.add(command(2))
    stamped = RecordStamper(50).stamp(record, index=12, term=4)
    assert not pending.committed(command(3))  # another record: nothing released
    assert pending.committed(stamped)
    assert pending.records() == [command(2)]
    assert pending.bytes == len(command(2))


def test_identical_pending_records_are_released_one_commit_each_and_resent_in_order() -> None:
    pending = PendingForwards()
    snapshot = encode_record(RecordType.SNAPSHOT, 0, 0, 0, 0, 0, 0)
    pending.add(command(1))
    pending.add(snapshot)
    pending.add(snapshot)
    assert pending.records() == [command(1), snapshot, snapshot]
    assert pending.committed(snapshot)
    assert pending.records() == [command(1), snapshot]


def test_a_pending_record_seen_in_this_nodes_log_is_not_sent_again() -> None:
    # In the log it either commits (the new leader holds every committed entry) or is cut by a
    # conflict, which restarts the node and its sessions: resending it would only duplicate it.
    pending = PendingForwards()
    pending.add(command(1))
    pending.add(command(2))
    assert pending.logged(RecordStamper(0).stamp(command(1), index=5, term=2))
    assert pending.records() == [command(2)]
    pending.unlogged(command(1))  # replaced in the log before it reached the ring
    assert pending.records() == [command(1), command(2)]
    assert not pending.logged(command(3))


def test_a_lost_forward_is_resent_after_the_timeout_while_later_records_commit() -> None:
    # Issue 11: a follower's node_start forward was lost (sent before its link to the leader was
    # up); its clients' records kept committing, which kept a "nothing committed for 2 s" clock
    # from ever firing, so the node_start went again only at the next leader change, after the
    # client's session open, and closed that session. The age is the oldest record's own.
    pending = PendingForwards()
    lost, later = command(1), command(2)
    pending.add(lost, now_s=10.0)
    for step in range(1, 5):  # a record every half second, each committed at once
        pending.add(later, now_s=10.0 + step / 2)
        assert pending.committed(later)
    assert not pending.overdue(now_s=11.9, after_s=2.0)
    assert pending.overdue(now_s=12.1, after_s=2.0)
    assert pending.resend(now_s=12.1) == [lost]
    assert not pending.overdue(now_s=14.0, after_s=2.0)  # the timeout restarts at each resend
    assert pending.overdue(now_s=14.2, after_s=2.0)
    assert pending.committed(lost)
    assert not pending.overdue(now_s=100.0, after_s=2.0)  # nothing pending: nothing to resend


def test_a_resend_sends_every_pending_record_not_in_the_log_in_order() -> None:
    pending = PendingForwards()
    for request_id in range(1, 4):
        pending.add(command(request_id), now_s=float(request_id))
    assert pending.logged(RecordStamper(0).stamp(command(2), index=5, term=2))
    assert pending.overdue(now_s=3.5, after_s=2.0)  # the oldest, command 1, is 2.5 s old
    assert pending.resend(now_s=3.5) == [command(1), command(3)]
    pending.add(command(4), now_s=4.0)
    assert not pending.overdue(now_s=5.0, after_s=2.0)


def test_a_proposal_region_is_stamped_as_its_records_would_be() -> None:
    # The leader builds each proposal stamped from a region of its proposal ring (whole frames,
    # `stamp_region`), never the unstamped record: the same bytes and last timestamp as stamping
    # the records, with payloads of every pad and timestamps that go back.
    rng = random.Random(3)
    records = [command(n, timestamp_ns=rng.randint(95, 105), payload=bytes(rng.randint(0, 17))) for n in range(60)]
    by_records, by_region = RecordStamper(100), RecordStamper(100)
    assert by_region.stamp_region(b"".join(records), 7, 3) == by_records.stamp_all(records, 7, 3)
    assert by_region.last_timestamp_ns == by_records.last_timestamp_ns


def test_a_malformed_frame_in_a_proposal_region_stops_the_stamp_and_names_the_frame() -> None:
    # The frames' check (`check_proposals`) folded into the stamp's walk: a TERM_START, a frame
    # shorter than a record header, or a region cut inside a header raises with that frame,
    # which `check_proposals` turns into the replicator's stop.
    good = command(1)
    term_start = encode_record(RecordType.TERM_START, 0, 0, 0, 0, 0, 0)
    short = struct.pack("<II", 16, int(RecordType.COMMAND)) + bytes(8)
    for bad, after in ((term_start, good), (short, good), (good[:24], b"")):
        with pytest.raises(MalformedFrame) as raised:
            RecordStamper(0).stamp_region(good + bad + after, 1, 1)
        assert bytes(raised.value.view) == bad[FRAME_HEADER_BYTES : struct.unpack_from("<I", bad)[0]]
        with pytest.raises(MalformedProposal, match="malformed record to its proposal ring"):
            check_proposals([(raised.value.frame_type, raised.value.view)], node=2)


def _stamped_or_raised(stamp: object, region: bytes) -> object:
    """What a stamp of `region` gives: its records and last timestamp, or its MalformedFrame's
    type and bytes."""
    try:
        return stamp(region, 9, 4, 50)  # type: ignore[operator]
    except MalformedFrame as bad:
        return bad.frame_type, bytes(bad.view)


def test_a_proposal_region_is_stamped_as_the_frame_by_frame_checked_walk_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # `stamped_region` walks a copy of the region checking each frame's length and type, and its
    # room once at the end; any region that fails goes to the checked walk (each frame's room
    # before it is read). Whole regions never leave the fast walk, and every region, whole, cut
    # anywhere, or with a header overwritten (short, zero, long, a leader's type, high type
    # bits), gives the checked walk's records and last timestamp, or its error on the same frame.
    checked = ring_entries._stamped_region_checked
    falls_back: list[int] = []

    def noted(region: bytes | memoryview, *args: int) -> tuple[list[bytes], int]:
        falls_back.append(len(region))
        return checked(region, *args)

    monkeypatch.setattr(ring_entries, "_stamped_region_checked", noted)
    uniform = ring_entries._stamped_uniform
    by_stride: list[bool] = []  # whether each region of one stride was stamped by it

    def noted_uniform(*args: int) -> tuple[list[bytes], int] | None:
        stamped = uniform(*args)  # type: ignore[arg-type]
        by_stride.append(stamped is not None)
        return stamped

    monkeypatch.setattr(ring_entries, "_stamped_uniform", noted_uniform)
    rng = random.Random(17)
    types = (int(RecordType.COMMAND), int(RecordType.TERM_START), int(RecordType.PADDING),
             int(RecordType.COMMAND) | 1 << 16, int(RecordType.TERM_START) | 1 << 20)  # fmt: skip
    for _ in range(600):
        # Payloads small, and around the frame size past which a frame is copied from a view;
        # in a third of the regions every frame of one stride (their lengths within 8 bytes,
        # `_stamped_uniform`'s walk), in another third of one length.
        shape = rng.randrange(3)
        base = rng.choice((rng.randint(0, 40), rng.randint(960, 1100)))
        records = [command(n, timestamp_ns=rng.randint(40, 60),
                           payload=bytes((base & -8) + rng.randrange(8) if shape == 0 else base if shape == 1
                                         else rng.choice((rng.randint(0, 40), rng.randint(960, 1100)))))
                   for n in range(rng.randint(0, 6))]  # fmt: skip
        region = b"".join(records)
        falls_back.clear()
        by_stride.clear()
        assert ring_entries.stamped_region(region, 9, 4, 50) == checked(region, 9, 4, 50)
        as_the_ring_gives_it = memoryview(bytearray(region))  # the leader's: a view of the ring
        assert ring_entries.stamped_region(as_the_ring_gives_it, 9, 4, 50) == checked(region, 9, 4, 50)
        large_first = bool(records) and len(records[0]) > ring_entries._SLICED_BYTES_MAX  # the checked walk's
        assert len(falls_back) == 2 * large_first, "a region of whole frames left the fast walk (or a large one did not)"
        if records and not large_first and len({len(record) for record in records}) == 1:
            assert by_stride == [True, True], "a region of one stride was walked frame by frame"
        if not records:
            continue
        bad = bytearray(region)
        at = sum(map(len, records[: rng.randrange(len(records))]))  # a frame's start
        change = rng.randrange(3)
        if change == 0:
            bad = bad[: rng.randrange(len(bad))]  # cut anywhere
        elif change == 1:
            struct.pack_into("<I", bad, at, rng.choice((0, 8, 40, 47, 48, 56, len(bad) - at + 8, 1 << 20)))
        else:
            struct.pack_into("<I", bad, at + 4, rng.choice(types))
        stamped_bad = _stamped_or_raised(ring_entries.stamped_region, bytes(bad))
        assert stamped_bad == _stamped_or_raised(checked, bytes(bad)), (change, at)
        for stamped, of in ((ring_entries.stamped_region(region, 9, 4, 50), region), (stamped_bad, bad)):
            if type(stamped) is tuple and type(stamped[0]) is list:
                # The leader counts a region's records' bytes as the region's length
                # (`PendingForwards.proposed`'s `copies_bytes`, from `_propose`): no sum a record.
                assert sum(map(len, stamped[0])) == len(of), (change, at)


def test_the_leader_takes_its_proposal_ring_in_regions_across_the_wrap_and_a_record_over_the_bound(unique: str) -> None:
    # The leader's proposals are regions of whole frames (`poll_region`) stamped in one walk,
    # their zero pads from the ring's writer: every record taken once, in order, the same bytes
    # as stamping each record; across the ring's wraps (the padding skipped), and a record over
    # PROPOSAL_BYTES_PER_PASS_MAX taken alone (a region of that bound would be empty for good:
    # the leader would stall with the ring readable; polled to the ring's capacity, it would
    # bring the rest of the lap behind it, thousands of records in one pass).
    capacity = 1 << 21
    ring = Ring.create(ipc.segment_name(unique, "proposal"), capacity, readers=("replicator",))
    try:
        writer, reader = ring.writer(), ring.reader("replicator")
        rng = random.Random(5)
        written: list[bytes] = []
        taken: list[bytes] = []
        stamper = RecordStamper(0)
        for burst in range(4):
            records = [command(len(written) + n, timestamp_ns=rng.randint(0, 99), payload=bytes(rng.randint(0, 300)))
                       for n in range(3000)]  # fmt: skip
            if burst == 1:
                records.insert(1000, command(0, payload=bytes(PROPOSAL_BYTES_PER_PASS_MAX + 8)))
            for record in records:  # as the sequencer writes them: claimed, then the bytes
                length, type_ = struct.unpack_from("<II", record)
                view = writer.try_claim(length - FRAME_HEADER_BYTES, type_)
                assert view is not None, "the test's ring is too small for a burst"
                view[:] = record[FRAME_HEADER_BYTES:length]
            writer.publish()
            written += records
            while reader.ready():
                region = poll_region(reader, ForwardFaults())
                assert region, "the ring is readable and the leader took nothing: it would stall"
                stamped = stamper.stamp_region(region, len(taken) + 1, 1)
                assert region.nbytes <= PROPOSAL_BYTES_PER_PASS_MAX or len(stamped) == 1, (
                    f"a region of {region.nbytes} bytes, {len(stamped)} records: over the bound, "
                    "a record is taken alone, not with the records behind it")  # fmt: skip
                taken += stamped
                reader.release()
        assert taken == RecordStamper(0).stamp_all(written, 1, 1)
    finally:
        ring.close()
        ring.unlink()


def _hold_by_key(model: PendingForwards, records: list[bytes], now_s: float) -> bool:
    """`add` each of `records` to `model`; whether any is a duplicate of a record it holds."""
    held = list(map(record_key, model.records(with_logged=True)))
    for record in records:
        model.add(record, now_s)
    held += map(record_key, records)
    return len(set(held)) < len(held)


def test_a_leaders_proposals_held_by_index_are_logged_resent_and_released_as_held_by_key() -> None:
    """The leader holds its new proposals by log index (`proposed`, released by `committed_all`'s
    index, `hold_by_key` at a change of leader); a model holds every record by key, one call per
    record, as a follower does. Mixed with records held by key (resends, a refused batch: both
    proposed again), entries of other nodes' clients (forwarded), duplicates, timestamps that go
    back: the same count, bytes, resend order and overdue clock at every step."""
    rng = random.Random(11)
    for _ in range(200):
        model, pending, stamper = PendingForwards(), PendingForwards(), RecordStamper(500)
        log: list[bytes] = []  # the entries, index 1 first
        committed, outbox, now_s = 0, [], 0.0
        shared_clock = False  # a duplicate was held
        for _ in range(12):
            now_s += 0.5
            step = rng.random()
            if step < 0.15:
                pending.hold_by_key()  # a change of leader: this node leads a later term
            elif step < 0.25:
                refused = [command(rng.randint(1, 6), timestamp_ns=rng.randint(495, 505)) for _ in range(rng.randint(1, 4))]
                shared_clock |= _hold_by_key(model, refused, now_s)
                pending.add_all(refused, now_s)
                outbox += refused
            else:  # a pass: the outbox, new proposals, forwarded records; then a commit
                first = len(log) + 1
                new = [command(rng.randint(1, 6), timestamp_ns=rng.randint(495, 505)) for _ in range(rng.randint(0, 6))]
                # Another node's clients' records: never a pending record's (a key of this node's
                # pending records is released by its own copy committed, held by index or by key).
                forwarded = [command(100 + len(log) + n) for n in range(rng.randint(0, 2))]
                entries, copies = stamper.stamp_batch(outbox, b"".join(new), forwarded, first, 2)
                assert entries[len(outbox) : len(outbox) + len(copies)] == copies
                assert list(map(record_index, entries)) == list(range(first, first + len(entries)))
                shared_clock |= _hold_by_key(model, new, now_s)
                pending.proposed(first + len(outbox), copies, now_s)
                outbox = []
                log += entries
                for record in entries:
                    model.logged(record)
                pending.logged_all(entries, first)
                upto = rng.randint(committed, len(log))
                for record in log[committed:upto]:
                    model.committed(record)
                if upto > committed:
                    pending.committed_all(log[committed:upto], committed + 1)
                committed = upto
            assert (len(pending), pending.bytes) == (len(model), model.bytes)
            # By key a duplicate keeps the first one's place and clock after that one commits; by
            # index each keeps its own: the same records, ordered and timed alike without them.
            order = list if not shared_clock else sorted
            if not shared_clock:
                assert pending.overdue(now_s, 1.0) == model.overdue(now_s, 1.0)
            if rng.random() < 0.2:  # a resend: overdue, or this node leads a later term
                outbox = pending.resend(now_s)
                assert order(map(record_key, outbox)) == order(map(record_key, model.resend(now_s)))
            for with_logged in (False, True):
                assert order(map(record_key, pending.records(with_logged))) == order(
                    map(record_key, model.records(with_logged)))


def test_a_run_held_by_key_goes_first_unstamped_and_seen_in_the_log() -> None:
    # A leader's proposals held by index, then a batch the core refused (held by key): at a
    # change of leader the proposals go again first, as taken, with index and term 0 again.
    pending, stamper = PendingForwards(), RecordStamper(0)
    proposals = [command(1, timestamp_ns=5), command(2, timestamp_ns=6)]
    pending.proposed(10, stamper.stamp_all(proposals, 10, 3), now_s=1.0)
    pending.add(command(3, timestamp_ns=7), now_s=2.0)
    assert pending.records() == [command(3, timestamp_ns=7)]  # the proposals are in the log
    assert pending.records(with_logged=True) == [*proposals, command(3, timestamp_ns=7)]
    assert pending.overdue(now_s=3.1, after_s=2.0)  # the oldest, proposed at 1.0


def test_the_commit_releases_a_leaders_proposals_by_index_run_by_run() -> None:
    pending, stamper = PendingForwards(), RecordStamper(0)
    runs = [(10, [command(1), command(2), command(3)]), (14, [command(4)]), (15, [command(5), command(6)])]
    for first, records in runs:
        pending.proposed(first, stamper.stamp_all(records, first, 3), now_s=1.0)
    forwarded = stamper.stamp(command(9), 13, 3)  # between two runs: no pending record's
    assert (len(pending), pending.bytes) == (6, 6 * len(command(1)))
    pending.committed_all([forwarded], 13)  # below it, the first run's entries: committed too
    assert (len(pending), pending.bytes) == (3, 3 * len(command(1)))
    pending.committed_all([stamper.stamp(command(5), 15, 3)], 15)  # part of the last run
    assert pending.records(with_logged=True) == [command(6)]
    assert not pending.overdue(now_s=2.9, after_s=2.0) and pending.overdue(now_s=3.1, after_s=2.0)
    # A record held by index is logged and released by its index alone, never a record like it
    # held by key (here: taken again by a client's resend, not yet proposed).
    pending.add(command(7), now_s=4.0)
    copy = stamper.stamp(command(7), 17, 3)
    pending.proposed(17, [copy], now_s=4.0)
    pending.logged_all([copy], 17)
    pending.committed_all([copy], 17)
    assert pending.records() == [command(7)]  # not seen in the log: it goes again


def test_a_record_taken_after_a_drop_is_not_sent_before_the_ordered_restart() -> None:
    # The defect (issue 11): the transport dropped command 2 (a full socket) and sent command 3,
    # which committed first; command 2, resent later, was answered DUPLICATE and never applied.
    # A drop gives the link a new stream number: nothing goes on it but the restart, which
    # sends every pending record not in the log, in order, before anything new.
    pending, stream = PendingForwards(), ForwardStream()
    for request_id in (1, 2):
        pending.add(command(request_id), now_s=1.0)
    assert stream.records_to_send(5, 0, True, pending, [command(1), command(2)], now_s=1.0) == [
        command(1), command(2)]  # the first stream of the link: every pending record
    assert pending.logged(RecordStamper(0).stamp(command(1), index=3, term=1))
    pending.add(command(3), now_s=1.1)
    assert stream.records_to_send(5, 0, True, pending, [command(3)], now_s=1.1) == [command(3)]
    # Command 3 was dropped on the way: the link's stream is now 1. While the link is full,
    # nothing goes (command 4 stays pending); once writable, the restart comes first.
    pending.add(command(4), now_s=1.2)
    assert stream.records_to_send(5, 1, False, pending, [command(4)], now_s=1.2) is None
    assert stream.records_to_send(5, 1, True, pending, [], now_s=1.3) == [
        command(2), command(3), command(4)]
    assert stream.records_to_send(5, 1, True, pending, [command(5)], now_s=1.3) == [command(5)]


def test_a_new_connection_or_a_new_leader_restarts_the_stream_with_every_pending_record() -> None:
    pending, stream = PendingForwards(), ForwardStream()
    pending.add(command(1), now_s=0.0)
    assert stream.records_to_send(5, 3, True, pending, [command(1)], now_s=0.0) == [command(1)]
    pending.add(command(2), now_s=5.0)
    # Another leader, then the same leader on a new connection: each a restart, in order.
    assert stream.records_to_send(6, 3, True, pending, [command(2)], now_s=5.0) == [command(1), command(2)]
    assert stream.records_to_send(6, 4, True, pending, [], now_s=10.0) == [command(1), command(2)]
    assert stream.restarts == 3


def test_a_record_in_this_followers_log_goes_again_to_another_leader_not_to_the_same_one() -> None:
    # Found in review (issue 11): five voters; a client on this follower pipelines 1 and 2; the
    # old leader's first AppendEntries here carries only 1 (logged here), then it dies before any
    # other node has 1. Left out of the restart, 1 would never reach the new leader: 2 commits
    # there, this node cuts 1 on the conflict and restarts, and its client's resend of 1, behind
    # its committed 2, is answered DUPLICATE without ever being applied.
    pending, stream = PendingForwards(), ForwardStream()
    for request_id in (1, 2):
        pending.add(command(request_id), now_s=1.0)
    assert stream.records_to_send(5, 0, True, pending, [command(1), command(2)], now_s=1.0) == [
        command(1), command(2)]
    assert pending.logged(RecordStamper(0).stamp(command(1), index=7, term=3))
    # The same leader on a new connection: 1 is in its log, which it commits.
    assert stream.records_to_send(5, 1, True, pending, [], now_s=1.1) == [command(2)]
    # Another leader: its log may lack 1, so 1 goes again, first.
    assert stream.records_to_send(6, 1, True, pending, [], now_s=9.0) == [command(1), command(2)]
    # The replicator's own resend on a change of standing says the same (`with_logged`).
    assert pending.resend(now_s=9.0, with_logged=True) == [command(1), command(2)]
    assert pending.resend(now_s=9.0) == [command(2)]


def test_restarts_that_follow_each_other_closely_back_off_and_a_quiet_one_goes_at_once() -> None:
    # A leader whose inbox stays full closes every new connection: each restart would resend
    # everything pending again, tens of times a second, without the back-off.
    pending, stream = PendingForwards(), ForwardStream()
    pending.add(command(1))
    now_s = 100.0
    assert stream.records_to_send(5, 1, True, pending, [], now_s) == [command(1)]  # at once
    delays = []
    for new_stream in range(2, 12):
        waited = now_s
        while stream.records_to_send(5, new_stream, True, pending, [], now_s) is None:
            now_s += 0.001
        delays.append(round(now_s - waited, 3))
    assert delays[0] <= RESTART_DELAY_MAX_S / 50  # the second restart barely waits
    assert delays == sorted(delays) and delays[-1] == pytest.approx(RESTART_DELAY_MAX_S, abs=0.002)
    now_s += RESTART_QUIET_S  # quiet for a while: the next restart goes at once
    assert stream.records_to_send(5, 12, True, pending, [], now_s) == [command(1)]


def test_the_leaders_inbox_takes_a_batch_whole_or_refuses_it_and_names_whom_to_close() -> None:
    inbox = ForwardInbox(records_max=3)
    assert not inbox.take(2, [command(1)], leading=False)  # not leading: refused, counted
    assert inbox.take(2, [command(1), command(2)], leading=True)
    assert not inbox.take(3, [command(7), command(8)], leading=True)  # no room for the whole batch
    assert inbox.records_dropped == 3
    drained = inbox.drain()
    assert drained == [command(1), command(2)] and not inbox
    assert inbox.take(3, [command(7)], leading=True)
    inbox.put_back(drained)  # the core refused the proposal: first again
    assert inbox.records == [command(1), command(2), command(7)]
    assert inbox.clear() == {2, 3}  # stepped down holding them: both senders must restart
    assert inbox.records_dropped == 6
    assert inbox.take(2, [command(3)], leading=True)
    inbox.drain()
    assert inbox.clear() == set()  # nothing held: no connection to close


def test_the_leader_says_why_it_refuses_a_forwarded_batch() -> None:
    """What the follower's log will say (the transport's REFUSED frame): which node, and why."""
    from types import SimpleNamespace

    from ipc.counters import Counter
    from sequencer.raft.raft_role import FOLLOWER, LEADER

    errors = Counter("replicator.errors", memoryview(bytearray(8)).cast("q"), 0)
    faults = ForwardFaults(1)
    inbox = ForwardInbox(records_max=2)
    follower = SimpleNamespace(id=1, raft_role=FOLLOWER, term=4, leader_id=3)
    leader = SimpleNamespace(id=1, raft_role=LEADER, term=4, leader_id=1)
    assert forwarded_refusal(2, [command(1)], faults, inbox, follower, errors) == "node 1 does not lead (term 4, leader 3)"
    assert forwarded_refusal(2, [command(1)], faults, inbox, leader, errors) is None  # taken
    full = forwarded_refusal(2, [command(2), command(3)], faults, inbox, leader, errors)
    assert full == ("node 1's inbox holds 1 forwarded records: no room for 2 more (INBOX_RECORDS_MAX 2) "
                    "until its next pass")  # fmt: skip
    short = command(4)[:40]
    wrong = forwarded_refusal(2, [command(4), short], faults, inbox, leader, errors)
    assert wrong is not None and wrong.startswith("record 2 of 2 it forwarded is malformed (40 bytes, shorter")
    assert errors.get() == 1  # only the malformed one is an error
    assert inbox.records == [command(1)]


def test_the_malform_hook_on_a_leaders_region_stops_the_stamp_and_leaves_the_ring_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SEQD_FAULT_MALFORM_COMMAND_PROPOSAL on the leader's path (a region, `ForwardFaults.region`):
    # the N-th COMMAND becomes a TERM_START in a copy, which the stamp's walk refuses; the ring's
    # own bytes (the region given) are not written.
    from daemon.fault_hooks import FAULT_MALFORM_COMMAND_PROPOSAL_ENV

    setting = tmp_path / "malform"
    setting.write_text("2")
    monkeypatch.setenv(FAULT_MALFORM_COMMAND_PROPOSAL_ENV, str(setting))
    ring_bytes = bytearray(command(1) + command(2) + command(3))
    hooked = ForwardFaults(1).region(memoryview(ring_bytes))
    assert bytes(ring_bytes) == command(1) + command(2) + command(3)
    with pytest.raises(MalformedFrame) as raised:
        RecordStamper(0).stamp_region(hooked, 1, 1)
    assert raised.value.frame_type & 0xFFFF == RecordType.TERM_START
    second = len(command(1))  # the offset of the second record (every one is as long)
    length = struct.unpack_from("<I", hooked, second)[0]
    assert bytes(raised.value.view) == bytes(hooked[second + FRAME_HEADER_BYTES : second + length])
    assert ForwardFaults(1).region(memoryview(ring_bytes)) == memoryview(ring_bytes)  # once: done


def test_a_leader_takes_a_pass_after_an_answer_only_when_the_answer_moved_something() -> None:
    # The replicator's pass after peer messages (`answer_needs_pass`): the answer that makes the
    # majority commits (a pass), the other follower's, past that commit, leaves the leader nothing
    # to do (no pass: before, every answer cost one). A follower's messages keep their pass.
    from sequencer.raft.messages import AppendEntriesResponse
    from tests.sim.direct import DirectCluster

    cluster = DirectCluster(3, defer_commit_notices=True)
    cluster.elect(1)
    cluster.stabilize()
    leader = cluster.core(1)
    leader.propose_batch([b"x"])
    cluster.process(1)
    cluster.deliver()
    for node in (2, 3):
        cluster.process(node)
    answers = [m for m in cluster.outbox if isinstance(m, AppendEntriesResponse)]
    cluster.outbox.clear()
    assert [m.target for m in answers] == [1, 1]
    leader.step(answers[0])
    assert answer_needs_pass(leader)  # a majority: the commit moves
    cluster.process(1)
    leader.step(answers[1])
    assert not answer_needs_pass(leader)  # past the commit: nothing to do
    assert answer_needs_pass(cluster.core(2))


def test_pending_forwards_say_full_at_their_bound() -> None:
    pending = PendingForwards()
    for request_id in range(PENDING_RECORDS_MAX - 1):
        pending.add(command(request_id))
    assert not pending.full()
    pending.add(command(PENDING_RECORDS_MAX))
    assert pending.full()


def test_a_forwarded_record_must_be_whole_and_not_a_leaders_or_the_rings() -> None:
    assert malformed(command(1)) is None
    assert malformed(command(1)[:-8]) is not None  # cut short: its length says more
    assert malformed(command(1)[:40]) is not None
    assert malformed(encode_record(RecordType.TERM_START, 0, 0, 0, 0, 0, 0)) is not None


def test_a_malformed_record_is_named_with_what_is_wrong() -> None:
    assert malformed(command(1)) is None
    assert malformed(command(1)[:40]) == "40 bytes, shorter than a record header (48 bytes)"
    assert malformed(command(1)[:-8]) == "its header says 49 bytes, but it holds 48"
    assert malformed(command(1) + b"\0") == "57 bytes, not a multiple of 8"
    assert "TERM_START" in str(malformed(encode_record(RecordType.TERM_START, 0, 0, 0, 0, 0, 0)))


def test_a_record_no_follower_may_forward_stops_the_proposals_with_its_session_and_request() -> None:
    good = command(1)
    bad = encode_record(RecordType.TERM_START, 0, 0, 0, 0, 99, 5, b"")

    def frames(*records: bytes) -> list[tuple[int, memoryview]]:
        return [(struct.unpack_from("<II", r)[1], memoryview(r)[FRAME_HEADER_BYTES:struct.unpack_from("<I", r)[0]])
                for r in records]  # fmt: skip

    check_proposals(frames(good, good), node=2)  # nothing wrong: nothing raised
    with pytest.raises(MalformedProposal, match=r"node 2's sequencer .* TERM_START .* session 0x63, request 5"):
        check_proposals(frames(good, bad), node=2)


# ---- when to propose ------------------------------------------------------------------------------


def test_a_leader_proposes_only_once_the_start_of_the_term_it_leads_now_has_committed() -> None:
    # Raft 8: the no-op at the start of the term comes first, and commits first.
    assert not may_propose(True, term=4, leader_id=1, term_started=(4, 18), commit_index=17)
    assert may_propose(True, term=4, leader_id=1, term_started=(4, 18), commit_index=18)
    # It led term 2 before: that term's start (long committed) says nothing about term 4's.
    assert not may_propose(True, term=4, leader_id=1, term_started=(2, 10), commit_index=17)


def test_a_follower_forwards_only_to_a_leader_it_knows() -> None:
    assert may_propose(False, term=4, leader_id=2, term_started=(0, 0), commit_index=0)
    assert not may_propose(False, term=4, leader_id=0, term_started=(2, 10), commit_index=99)


# ---- ring positions --------------------------------------------------------------------------------


def test_the_commit_position_moves_only_to_the_end_of_committed_entries_written_to_the_ring() -> None:
    positions = RingPositions(start_index=10, start_position=0)
    assert not positions.commit(12)  # committed, but not in the ring yet: the blp must wait
    positions.wrote(11, 64)
    positions.wrote(12, 128)
    positions.wrote(13, 200)
    assert positions.commit(12)
    assert (positions.commit_index, positions.commit_position) == (12, 128)
    positions.drop_after(12)
    positions.wrote(13, 256)
    assert positions.commit(20)
    assert (positions.commit_index, positions.commit_position) == (13, 256)



def test_a_run_of_entries_written_at_once_ends_where_each_written_alone_would() -> None:
    lengths = [64, 48, 200, 8, 136]
    alone = RingPositions(start_index=10, start_position=0)
    end = 4096
    for offset, length in enumerate(lengths):
        end += length
        alone.wrote(11 + offset, end)
    run = RingPositions(start_index=10, start_position=0)
    run.wrote_run(11, 4096, end, [bytes(length) for length in lengths])
    assert run.written_index == alone.written_index == 15
    for index in (12, 13, 15):
        assert run.commit(index) == alone.commit(index)
        assert (run.commit_index, run.commit_position) == (alone.commit_index, alone.commit_position)
    run.wrote_run(16, end, end, [])  # an empty run writes nothing
    assert run.written_index == 15


def test_the_commit_position_held_by_runs_moves_as_one_entry_at_a_time_would() -> None:
    """Runs of entries written, cut by a conflict and committed part-way, in a random order:
    the commit index and position always match a map of each entry's end."""
    rng = random.Random(11)
    for _ in range(200):
        positions = RingPositions(start_index=5, start_position=640)
        ends = {5: 640}  # index -> end position: the model
        commit = 5
        for _ in range(40):
            step = rng.random()
            written = positions.written_index
            if step < 0.4:
                lengths = [rng.choice((48, 64, 136)) for _ in range(rng.randint(0, 6))]
                end = start = ends[written]
                for offset, length in enumerate(lengths):
                    end += length
                    ends[written + 1 + offset] = end
                positions.wrote_run(written + 1, start, end, [bytes(length) for length in lengths])
            elif step < 0.55:
                positions.wrote(written + 1, ends[written] + 56)
                ends[written + 1] = ends[written] + 56
            elif step < 0.7:
                cut = rng.randint(positions.commit_index, written)
                positions.drop_after(cut)
                ends = {index: end for index, end in ends.items() if index <= cut}
            else:
                index = rng.randint(commit - 1, written + 2)
                expected = min(max(commit, index), written)
                assert positions.commit(index) == (expected > commit)
                commit = expected
            assert positions.written_index == max(ends)
            assert (positions.commit_index, positions.commit_position) == (commit, ends[commit])


# ---- the journaller in a cluster -------------------------------------------------------------------


@pytest.fixture
def node(unique: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    yield from make_node(unique, tmp_path, 1 << 16)


def test_the_journaller_skips_the_journal_tail_written_again_and_leaves_the_commit_to_raft(node: Node, unique: str) -> None:
    proposal_ring = Ring.create(ipc.segment_name(unique, "proposal"), 1 << 16, readers=("replicator",))
    try:
        journal = Journal.open(node.journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False)
        node.journals.append(journal)
        agent = JournallerAgent(node.log_ring, journal, CounterView(node.counters, "journaller"),  # type: ignore[arg-type]
                                batch_bytes_max=1 << 16, delete_journal=False,
                                replicator_doorbell=proposal_ring.doorbell("replicator"))  # fmt: skip
        agent.on_start()
        writer = node.sequencer.writer

        def write(index: int) -> None:
            record = command(index, timestamp_ns=index, index=index, term=1)
            assert writer.try_write(record[FRAME_HEADER_BYTES : RECORD_HEADER_BYTES + 1], frame_type(RecordType.COMMAND, 1))

        for index in (1, 2, 3):
            write(index)
        agent.do_work(NOW_NS)
        # A restart: the replicator writes the journal's uncommitted tail (2, 3) into the ring
        # again before the new entries; the journaller holds them already.
        for index in (2, 3, 4, 5):
            write(index)
        agent.do_work(NOW_NS)
        assert [r.index for r in read_records(node.journal_dir, 1, 5)] == [1, 2, 3, 4, 5]
        assert node["journal.durable.index"] == 5
        assert (node["commit.index"], node["commit.position"]) == (0, 0)  # Raft's, not the journal's
        assert agent.do_work(NOW_NS) == 0
        assert agent.drained()  # everything the ring's writer published is journaled
    finally:
        proposal_ring.close()
        proposal_ring.unlink()


# ---- the supervisor cuts the journal where the replicator asked ------------------------------------


def test_recovery_cuts_the_journal_where_the_replicator_asked_and_replays_only_what_is_committed(
    tmp_path: Path, unique: str
) -> None:
    data_dir = tmp_path / "data"
    config = Config(
        node=NodeConfig(name=unique, number=1, data_dir=str(data_dir)),
        cluster=ClusterConfig(members=[MemberConfig(id=k, peer_address=f"127.0.0.1:{7000 + k}") for k in (1, 2, 3)]),
    )
    config.journal_dir.mkdir(parents=True)
    with Journal.open(config.journal_dir, segment_bytes=SEGMENT_BYTES, preallocate=False) as journal:
        journal.append(b"".join(command(i, index=i, term=1) for i in range(1, 11)))
        journal.sync()
    HardStateFile.open(data_dir).save(HardState(term=1, vote=1, commit_index=4))
    write_truncate_request(data_dir, 6)
    counters = CounterView(create_counters(unique), SUPERVISOR)
    try:
        Supervisor(config).recover_journal(counters)
        assert counters[RECOVERY_LAST_INDEX].get() == 6
        assert counters[RECOVERY_COMMIT_INDEX].get() == 4  # the blp replays only what is committed
    finally:
        counters.close()
        counters.counters.unlink()
    assert [r.index for r in read_records(config.journal_dir, 1)] == [1, 2, 3, 4, 5, 6]
    assert read_truncate_request(data_dir) is None
    assert not (data_dir / TRUNCATE_NAME).exists()


# ---- the replicator's feed into the log ring -------------------------------------------------------


def test_a_feed_that_meets_the_wrap_writes_one_run_and_publishes_it_not_its_whole_queue(unique: str) -> None:
    """A follower catching up queues tens of thousands of entries. Where a run meets the end of
    the ring it goes entry by entry; it went on through the whole queue in one write, holding the
    replicator's loop and publishing nothing until the ring was full while the journaller and the
    blp idled. One write is one run at most; the queue still arrives whole and in order."""
    from daemon.roles.replicator_ring import WRITE_RUN_RECORDS_MAX, RingFeed
    from ipc.counters import Counter

    record_bytes = 64
    capacity = 1 << 16  # 1024 records a lap
    ring = Ring.create(f"/seqd.{unique}.feed", capacity, readers=("journaller", "blp"))
    try:
        words = memoryview(bytearray(16)).cast("q")
        positions = RingPositions(start_index=0, start_position=0)
        feed = RingFeed(ring.writer(), positions, Counter("index", words, 0), Counter("position", words, 1))
        readers = [ring.reader("journaller"), ring.reader("blp")]
        seen: list[int] = []

        def records(first: int, count: int) -> list[bytes]:
            return [struct.pack("<IIQ", record_bytes, 7, index) + bytes(record_bytes - 16)
                    for index in range(first, first + count)]  # fmt: skip

        def drain() -> None:
            for reader in readers:
                frames = reader.poll(capacity)
                if reader is readers[0]:
                    seen.extend(struct.unpack_from("<Q", view)[0] for _, view in frames)
                reader.release()

        lap = capacity // record_bytes
        feed.extend(records(1, lap - 3))  # the next run meets the wrap after 3 entries
        while feed.write():
            drain()
        assert len(feed) == 0
        queued = 4 * WRITE_RUN_RECORDS_MAX
        feed.extend(records(lap - 2, queued))
        published = words[1]
        assert feed.write()
        assert words[0] == lap - 3 + WRITE_RUN_RECORDS_MAX  # one run, published
        assert words[1] > published
        assert len(feed) == queued - WRITE_RUN_RECORDS_MAX
        drain()
        while feed.write():
            drain()
        assert len(feed) == 0
        assert seen == list(range(1, lap - 2 + queued))
    finally:
        ring.close()
        ring.unlink()


def test_a_feed_of_the_lists_handed_in_puts_each_entry_where_one_write_at_a_time_would(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feed keeps the lists it is handed (no per-entry copy into a queue) and the positions
    work out a run's entry ends only when a commit falls inside it. Random lists queued, entries
    replaced before they reach the ring, writes that meet the wrap and the gate, runs gathered
    across lists, commits anywhere: the journaller reads every entry kept, once, in order; each
    commit position is where the entry ends when the same entries are written one at a time into
    a ring of the same size; the counters follow; no list handed in is changed."""
    from daemon.roles import replicator_ring
    from daemon.roles.replicator_ring import RingFeed
    from ipc.counters import Counter

    monkeypatch.setattr(replicator_ring, "WRITE_RUN_RECORDS_MAX", 9)  # runs gathered and cut often
    capacity = 1 << 12
    rng = random.Random(23)

    def record(index: int) -> bytes:
        length = rng.choice((24, 29, 48, 61, 136, 203))  # frame bytes, some padded to 8
        body = struct.pack("<IIQ", length, 7, index) + bytes(length - 16)
        return body + bytes(-length & 7)

    for trial in range(40):
        ring = Ring.create(f"/seqd.{unique}.feed{trial}", capacity, readers=("journaller", "blp"))
        reference = Ring.create(f"/seqd.{unique}.ref{trial}", capacity, readers=("journaller",))
        try:
            words = memoryview(bytearray(16)).cast("q")
            positions = RingPositions(start_index=0, start_position=0)
            feed = RingFeed(ring.writer(), positions, Counter("index", words, 0), Counter("position", words, 1))
            journaller, blp = ring.reader("journaller"), ring.reader("blp")
            handed: list[tuple[list[bytes], list[bytes]]] = []  # each list, and a copy of it
            kept: list[bytes] = []  # every entry queued and not replaced, in index order
            seen: list[bytes] = []
            commits: list[tuple[int, int]] = []

            def drain(reader: ipc.RingReader, into: list[bytes] | None) -> None:
                while reader.ready():  # one poll stops at the wrap
                    frames = reader.poll(capacity)
                    if into is not None:
                        into += (bytes(view) for _, view in frames)
                    reader.release()

            for _ in range(60):
                step = rng.random()
                if step < 0.3:
                    records = [record(feed.end_index + k) for k in range(rng.randint(0, 14))]
                    handed.append((records, list(records)))
                    feed.extend(records)
                    kept += records
                elif step < 0.4 and len(feed):
                    assert feed.pop_last() == kept.pop()
                elif step < 0.7:
                    feed.write()
                elif step < 0.85:
                    drain(journaller, seen)
                    drain(blp, None)  # the blp reads only what is committed: a lagging one gates
                elif positions.written_index:
                    positions.commit(rng.randint(positions.commit_index, positions.written_index + 2))
                    commits.append((positions.commit_index, positions.commit_position))
                assert feed.next_index == positions.written_index + 1 == words[0] + 1
                assert feed.end_index == len(kept) + 1
                assert len(feed) == len(kept) - positions.written_index
            while len(feed):
                drain(journaller, seen)
                drain(blp, None)
                assert feed.write()
            drain(journaller, seen)
            assert words[1] == feed.writer.published_position
            assert seen == [record[8 : struct.unpack_from("<I", record)[0]] for record in kept]
            assert all(records == copy for records, copy in handed)
            positions.commit(len(kept))
            commits.append((positions.commit_index, positions.commit_position))
            writer, reference_reader = reference.writer(), reference.reader("journaller")
            ends = {0: 0}
            for index, entry in enumerate(kept, 1):
                length, frame_type = struct.unpack_from("<II", entry)
                assert writer.try_write(entry[8:length], frame_type)
                ends[index] = writer.claim_position
                drain(reference_reader, None)
            assert all(ends[index] == position for index, position in commits), commits
        finally:
            for made in (ring, reference):
                made.close()
                made.unlink()


def test_entries_held_in_runs_are_told_apart_from_the_rest_from_either_end_of_the_runs() -> None:
    """`_by_key` (which of a batch of entries are not held by index) against a walk of every
    index: runs with gaps, a released head, batches before, over, between and after the runs. It
    walks from the nearer end of the runs (a commit meets the oldest, a log write the newest):
    one walk from the front per batch grew with the square of the runs (3 s for one commit at
    8,000 runs)."""
    rng = random.Random(5)
    for _ in range(300):
        pending = PendingForwards()
        index = rng.randint(1, 5)
        held: set[int] = set()
        for _ in range(rng.randint(1, 12)):
            index += rng.randint(0, 3)  # a gap: entries of other nodes or of an earlier batch
            length = rng.randint(1, 4)
            pending.proposed(index, [b"r" * RECORD_HEADER_BYTES] * length, 0.0)
            held.update(range(index, index + length))
            index += length
        head = pending._runs[0]
        released = rng.randint(0, len(head[1]) - 1)
        pending._run_offset = released  # the commit released the head run's first copies
        held.difference_update(range(head[0], head[0] + released))
        for _ in range(20):
            first = rng.randint(1, index + 2)
            records = [struct.pack(">Q", first + k) for k in range(rng.randint(0, 9))]
            expected = [r for k, r in enumerate(records) if first + k not in held]
            assert pending._by_key(records, first) == expected, (first, len(records), pending._runs)
