"""The replicator role (cluster mode only): Raft for this node, and the one writer of its log ring.

Theory of operation
-------------------
The replicator drives the sans-I/O `RaftCore` on one uvloop thread: its clock (a tick every
`cluster.tick_ms`), its sockets (`PeerTransport`), its disk (the hard state file, written by one
worker thread, `HardStateSaver`: a commit hint off the loop; the journal is the journaller's).
Everything that moves the core goes through one method, `_process`, which runs to the end without
waiting, so no ready is ever outstanding while a peer's message is stepped:

    report durable entries      journal.durable.index -> core.durable(...)
    take proposals              proposal ring (+ records forwarded by followers, on the leader)
    for each ready:             save hard state (fsync first when the term or vote changed),
                                queue its entries for the log ring, send its messages,
                                note its committed entries, advance, stamp a TERM_START
    write the log ring          queued entries, as far as the ring has room
    publish the commit          raft.commit.index, then raft.commit.position; ring the blp

One writer (docs/cluster.md): the replicator writes the log ring on every node, leader or
follower, so nothing changes hands when the Raft standing does. A leader's own proposals come
back to it as `ready.entries` like a follower's replicated entries: one path. The journaller
journals the ring as before and rings this role's doorbell (on the proposal ring) after each
fdatasync (the doorbell is a FIFO the loop itself watches, `ipc.doorbell_fifo.LoopWaiter`, with no
thread; the sequencer's proposals ring it too); the entries it made durable are reported to the
core, which acknowledges them (a follower) or counts them toward the majority (the leader). The commit the core hands out
(`ready.committed`: committed and durable here) is turned into a ring position
(`RingPositions`) that limits the blp.

Proposals: the sequencer writes its records, unstamped, to the proposal ring. Each is kept in
`PendingForwards` until seen committed (and marked once seen in this node's log). The leader
stamps (`RecordStamper`) and proposes them, and the records followers forward; a follower
forwards them, raw, to the leader it knows, and holds them while it knows none (it then stops
reading the proposal ring: backpressure through the ring). Once the oldest pending record waited
RESEND_AFTER_S, every one not in this node's log goes again in order; on a change of leader or
term, every one (a follower's log may hold what the next leader's lacks) goes again in order; a
duplicate in the log is harmless (the blp's idempotence rules). A new leader proposes nothing
before its TERM_START commits. Forwards on one connection are a gapless stream (forwards.py): a
dropped record or a new connection restarts it with every pending record first
(`ForwardStream`); a leader that cannot take a batch closes its connection (`ForwardInbox`).

Restart: the blp replays the journal only up to `recovery.commit.index` (what is known
committed). The journal's tail after it is loaded into the core (durable) and written first into
the new log ring (the journaller skips records it holds), so the blp applies it once committed.

Conflicts: entries the leader replaces that this node already holds (in the ring or the journal)
cannot be cut in place; the role writes `raft.truncate` and exits with ROLE_EXIT_RAFT_TRUNCATE,
and the next incarnation cuts the journal before recovery (daemon/raft_truncate.py).

Linearizable queries: each pass also gives the core a ReadIndex request for every query replica
that asked a read round (`daemon/read_rounds.py`), and publishes the read points the core hands
out in `ready.reads`. A learner (`learner = true`) runs the same role; its core never campaigns.

Snapshots: the core is told where the journal now starts (`CompactionWatch`: retention deleted
the segments before it), so a leader sends InstallSnapshot to a follower that needs entries before
it; the file moves in chunks (daemon/snapshot_install.py), and a follower that takes it writes
`raft.install` and exits with ROLE_EXIT_RAFT_TRUNCATE like a conflict, the supervisor installing
it before the next recovery.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque

import uvloop

from daemon.fault_hooks import wall_clock_ns
from daemon.layout import (
    JOURNAL_DURABLE_INDEX,
    LOG_PUBLISHED_INDEX,
    LOG_PUBLISHED_POSITION,
    RAFT_COMMIT_INDEX,
    RAFT_COMMIT_POSITION,
    RAFT_LAST_INDEX,
    RAFT_LEADER,
    RAFT_LEARNER,
    RAFT_PASSES,
    RAFT_PEER_MATCH_INDEX,
    RAFT_PEER_NODE,
    RAFT_PEER_SLOTS,
    RAFT_PENDING_FORWARDS,
    RAFT_RETAIN_INDEX,
    RAFT_ROLE,
    RAFT_TERM,
    READ_ROUND_COUNTERS,
    RECOVERY_COMMIT_INDEX,
    RECOVERY_LAST_INDEX,
    RECOVERY_LAST_TIMESTAMP_NS,
    Role,
    RoleState,
    log_name,
    proposal_name,
)
from daemon.raft_truncate import write_truncate_request
from daemon.read_rounds import ReadRounds
from daemon.roles.commit_notices import CommitNoticeTimer
from daemon.roles.common import (
    ROLE_EXIT_RAFT_TRUNCATE,
    RoleContext,
    loop_waiter,
    report_start_failure,
    start_role,
)
from daemon.roles.hard_state_saver import HardStateSaver
from daemon.roles.replicator_ops import ReplicatorOperations
from daemon.roles.replicator_ring import RingFeed
from daemon.roles.replicator_setup import (
    ForwardFaults,
    InstallRequired,
    TruncateRequired,
    answer_needs_pass,
    check_proposals,
    forwarded_refusal,
    poll_region,
    start_raft_core,
    transport_config,
)
from daemon.roles.replicator_ticks import CompactionWatch, QuietTicks, TickTimer
from daemon.snapshot_install import SnapshotReceiver, SnapshotSender, write_install_request
from ipc.ring import Ring
from sequencer.cluster import (
    ForwardInbox,
    ForwardStream,
    MalformedFrame,
    PendingForwards,
    RecordStamper,
    RingPositions,
    may_propose,
    records_from_frames,
)
from sequencer.hard_state import HardStateFile
from sequencer.journal import JournalLogStorage
from sequencer.raft.config import NO_NODE, STORAGE_READ_BYTES_MAX
from sequencer.raft.errors import ProposalRejected
from sequencer.raft.messages import (
    DurableState,
    Entries,
    HardState,
    InstallSnapshot,
    Message,
    Ready,
    Snapshot,
    SnapshotChunk,
    SnapshotChunkAck,
)
from sequencer.raft.peer_protocol import ForwardedRecord
from sequencer.raft.raft_role import FOLLOWER, LEADER
from sequencer.raft.transport import PeerTransport

log = logging.getLogger("seqd.replicator")

# Records taken from the proposal ring (or forwarded to the leader) per pass: one pass stays a
# few milliseconds, so ticks and peer messages interleave (a leader's, by bytes: `poll_region`).
PROPOSALS_PER_PASS_MAX = 4096
# Entries waiting for room in the log ring (the blp or the journaller is behind) beyond which the
# leader takes no new proposals: the backpressure reaches the sequencer through the proposal ring
# instead of growing this process. A follower's queue is bounded by the leader's flow control (it
# acknowledges only what is durable, hence written).
UNWRITTEN_ENTRIES_MAX = 1 << 16
# The oldest pending record not committed this long after it was sent (a dropped forward, a leader
# that lost it): send every pending record again. Several election timeouts, so a healthy cluster
# never resends; the age is the oldest record's own, so other records committing meanwhile do not
# hold a lost one back (sequencer/cluster/forwards.py).
RESEND_AFTER_S = 2.0


class Replicator:
    def __init__(self, context: RoleContext, loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.loop = loop
        config = context.config
        cluster = config.cluster
        assert cluster is not None, "the replicator runs only in cluster mode"
        self.config = config
        self.tick_s = cluster.tick_ms / 1000
        counters = context.counters
        node = config.node.name
        self.log_ring = Ring.attach(log_name(node), epoch=context.epoch)
        self.proposal_ring = Ring.attach(proposal_name(node), epoch=context.epoch)
        self.writer = self.log_ring.writer()
        self.proposals = self.proposal_ring.reader(Role.REPLICATOR)
        # No safety-net timer of its own: every tick looks (`_has_work_outside`, replicator_ticks.py).
        self.bell_waiter = loop_waiter(loop, self.proposals.doorbell, self._on_bell, ring_name=self.proposal_ring.name,
                                       whose="replicator's", setting="PROPOSAL_POLLABLE", timeout_ms=0)  # fmt: skip
        self.blp_doorbell = self.log_ring.doorbell(Role.BLP)
        self.durable_index = counters[JOURNAL_DURABLE_INDEX]  # the journaller's
        self.commit_index_counter = counters[RAFT_COMMIT_INDEX]
        self.commit_position_counter = counters[RAFT_COMMIT_POSITION]
        self.role_counter = counters[RAFT_ROLE]
        self.term_counter = counters[RAFT_TERM]
        self.leader_counter = counters[RAFT_LEADER]
        self.last_index_counter = counters[RAFT_LAST_INDEX]
        self.pending_counter = counters[RAFT_PENDING_FORWARDS]
        self.retain_counter = counters[RAFT_RETAIN_INDEX]
        self.passes_counter = counters[RAFT_PASSES]
        self.peers = tuple(m.id for m in cluster.members if m.id != config.node.number)
        assert len(self.peers) <= RAFT_PEER_SLOTS, self.peers
        for slot, peer in enumerate(self.peers):
            counters[RAFT_PEER_NODE[slot]].set(peer)
        self.match_counters = tuple(counters[RAFT_PEER_MATCH_INDEX[slot]] for slot in range(len(self.peers)))
        counters[RAFT_LEARNER].set(int(config.node.number in cluster.learners))
        # Linearizable queries of this node's replicas (daemon/read_rounds.py); a round lost with
        # a leader is asked again after an election timeout.
        self.read_rounds = ReadRounds(
            [counters[block.asked] for block in READ_ROUND_COUNTERS],
            [counters[block.index] for block in READ_ROUND_COUNTERS],
            [counters[block.answered] for block in READ_ROUND_COUNTERS],
            retry_s=cluster.election_timeout_ms / 1000,
        )
        self.operations = ReplicatorOperations(counters, self.peers, cluster.election_timeout_ms / 1000 + self.tick_s,
                                               context.errors)  # fmt: skip

        # The hard state file's one writer, a thread: a commit hint is saved off the loop.
        self.hard_state_saver = HardStateSaver(HardStateFile.open(config.node.data_dir))
        self.storage = JournalLogStorage(config.journal_dir)
        commit_index = counters[RECOVERY_COMMIT_INDEX].get()
        last_index = counters[RECOVERY_LAST_INDEX].get()
        self.stamper = RecordStamper(counters[RECOVERY_LAST_TIMESTAMP_NS].get())
        # The ring starts after the entry at the recovered commit (the blp replayed up to it).
        self.positions = RingPositions(commit_index, 0)
        # Entries waiting for room in the log ring; this role writes `log.published.*` there.
        self.feed = RingFeed(self.writer, self.positions, counters[LOG_PUBLISHED_INDEX],
                             counters[LOG_PUBLISHED_POSITION])  # fmt: skip
        durable = self._load(commit_index, last_index)
        # This start's Raft incarnation, durable before `serve` lets any message leave, then the core.
        self.core = start_raft_core(config, STORAGE_READ_BYTES_MAX, durable, self.storage)
        # The last index this node holds in its ring or its journal: a change of the log at or
        # below it is a conflict that needs the journal cut.
        self.stored_index = last_index
        self.commit_known = commit_index  # the highest committed, durable index the core gave
        # Entry writes handed to the ring and not yet reported durable: (last index, last term).
        self.writes: deque[tuple[int, int]] = deque()
        self.pending = PendingForwards()
        self.outbox: list[bytes] = []  # pending records to send (or propose) at the next chance
        self.inbox = ForwardInbox()  # records followers forwarded (on the leader)
        self.forward_stream = ForwardStream()  # this node's gapless stream of forwards to the leader
        self.standing = (-1, -1)  # (term, leader id) last seen, to notice a change of leader
        self.standing_published: tuple[int, int, int] | None = None  # what `_publish` last wrote
        self.pending_published = self.retain_published = -1
        # The term this node last led and its TERM_START's index: it proposes once that commits.
        self.term_started = (0, 0)
        self.transport = PeerTransport(transport_config(config), self._on_messages, self._on_records)
        self.faults = ForwardFaults(config.node.number)  # the proposals' check, the forwards' fault hooks
        self.process_scheduled: asyncio.Handle | None = None  # a pass `_schedule` asked for
        self.finished: asyncio.Future[int] = loop.create_future()
        self.notice_timer = CommitNoticeTimer(loop, self.core, self.finished, self._process,  # a held commit's bound
                                              self.proposals.ready)  # fmt: skip
        self.durable_seen = -1  # the journal's durable index last told to the core
        self.want_proposals = False  # proposals wake `_process` only while it takes them
        self.feed_flowing = False  # the last pass wrote to the ring and entries still wait
        self.snapshot_sender = SnapshotSender(cluster.cluster_id, config.node.number, config.snapshot_dir,
                                              self.transport.send)
        self.snapshot_receiver = SnapshotReceiver(config.snapshot_dir)
        self.compaction = CompactionWatch(str(config.journal_dir), self.storage)
        self.quiet_ticks = QuietTicks(cluster.tick_ms)
        self.tick_timer = TickTimer(loop, self.tick_s, self._tick)  # when the next tick is due
        self.passes = 0  # of `_process`, published once a tick's pass (`raft.passes`)

    def _load(self, commit_index: int, last_index: int) -> DurableState:
        """The core's state at start: the hard state, applied up to the recovered commit (the blp
        replayed that far: the core reads nothing before it again), and the journal's entries after
        it, which also go to the ring first, for the blp to apply once committed."""
        hard = self.hard_state_saver.submitted
        terms: list[int] = []
        payloads: list[bytes] = []
        index = commit_index + 1
        while index <= last_index:
            more_terms, more_payloads = self.storage.entries(index, last_index, STORAGE_READ_BYTES_MAX)
            self.feed.extend(more_payloads)
            for payload in more_payloads:
                self.stamper.observe(payload)
            terms.extend(more_terms)
            payloads.extend(more_payloads)
            index += len(more_terms)
        if commit_index:
            log.info("Raft log: committed up to %d, %d entries after it from the journal; term %d",
                     commit_index, len(terms), hard.term)
        # Retention (or an installed snapshot) deleted the journal before `compacted`: the core
        # starts with a snapshot there (its bytes are the snapshot files', never in the core).
        compacted = self.storage.first_index() - 1
        snapshot = None
        if compacted:
            term = self.storage.term(compacted)
            assert term is not None, compacted
            snapshot = Snapshot(compacted, term, b"")
        return DurableState(
            HardState(hard.term, hard.vote, max(hard.commit_index, commit_index)), snapshot,
            terms=terms, payloads=payloads, applied_index=max(commit_index, compacted),
            first_index=commit_index + 1 if commit_index > compacted else 0,
        )  # fmt: skip

    # ---- inputs --------------------------------------------------------------------------------

    def _on_messages(self, peer: int, messages: list[Message]) -> None:
        if self.finished.done():
            return  # stopping (a ready may be left outstanding by a truncation)
        self.operations.heard_from(peer, time.monotonic())
        core = self.core
        stepped = 0
        for message in messages:
            kind = type(message)
            if kind is SnapshotChunk:
                assert isinstance(message, SnapshotChunk)
                self._on_snapshot_chunk(message)
            elif kind is SnapshotChunkAck:
                assert isinstance(message, SnapshotChunkAck)
                self.snapshot_sender.acknowledged(message, time.monotonic())
            else:
                core.step(message)
                stepped += 1
        if stepped < len(messages) or answer_needs_pass(core) or self.feed_flowing or self._has_work_outside():
            self._schedule()
        else:  # an answer that freed a follower's window can leave a commit notice held for it
            self.notice_timer.arm()

    def _on_snapshot_chunk(self, chunk: SnapshotChunk) -> None:
        core = self.core
        if chunk.term < core.term or core.raft_role is LEADER:
            return  # from a deposed leader
        if chunk.index <= core.commit_index:
            received = chunk.file_bytes  # needed no longer: the leader ends the stream
        else:
            received = self.snapshot_receiver.chunk(chunk)
        self.transport.send([SnapshotChunkAck(chunk.cluster_id, core.id, chunk.source, chunk.term,
                                              chunk.index, received)])
        if self.snapshot_receiver.complete_index == chunk.index and received == chunk.file_bytes:
            # The file is durable and valid: the core decides (term rules, a log that covers it).
            core.step(InstallSnapshot(chunk.cluster_id, chunk.source, core.id, chunk.term,
                                      Snapshot(chunk.index, chunk.snapshot_term, b"")))
            if not core.has_ready():
                self.snapshot_receiver.discard()

    def _on_records(self, peer: int, records: list[ForwardedRecord]) -> bool | str:
        """Take a batch whole, or refuse it and say why (`forwarded_refusal`)."""
        refusal = forwarded_refusal(peer, [forwarded.record for forwarded in records], self.faults, self.inbox,
                                    self.core, self.context.errors)  # fmt: skip
        if refusal is None:
            self._schedule()
        return refusal or True

    def _tick(self) -> None:
        """The tick timer: a tick no pass took within its slack (`TickTimer`, replicator_ticks.py)."""
        if self.tick_timer.fired(time.monotonic()):
            self._process(tick=True)

    def _on_tick(self, scheduled: bool) -> bool:
        """Take a tick and tick the core; whether the tick is quiet: a follower's with nothing due
        makes no pass (replicator_ticks.py; `scheduled`: a pass is due anyway), nor a stop's."""
        self.tick_timer.took(now_s := time.monotonic())
        context, core = self.context, self.core
        if context.stop_requested:
            self.finished.set_result(0)
            return True
        context.heartbeat.add(1)
        self.snapshot_sender.tick(now_s)
        core.tick()
        if core.raft_role is FOLLOWER:
            self.read_rounds.ask(core, now_s)  # a replica's round waits at most a tick, as in a pass
            waiting = scheduled or self._has_work_outside() or bool(self.feed or self.pending)
            if self.quiet_ticks.quiet(core, self.standing, waiting):  # the outbox: no reason (quiet says why)
                return True
        if self.core.leader_id != NO_NODE and self.pending.overdue(now_s, RESEND_AFTER_S):
            self.outbox = self.pending.resend(now_s)
            self.operations.resent(len(self.outbox), f"the oldest not committed {RESEND_AFTER_S} s after it was sent")
        return False

    def _schedule(self) -> None:
        """A pass at the end of this loop iteration: whatever else is ready in it (peer messages,
        the doorbell) is read first and goes through the same pass."""
        if self.process_scheduled is None:
            self.process_scheduled = self.loop.call_soon(self._process)

    # ---- the one path through the core -------------------------------------------------------

    def _process(self, tick: bool = False) -> None:
        scheduled = self.process_scheduled
        if scheduled is not None:  # this pass (a tick's) does what the scheduled one would
            scheduled.cancel()
            self.process_scheduled = None
        if self.finished.done():
            return
        try:
            # The first pass at or after a tick's deadline takes the tick (replicator_ticks.py), and runs.
            ticked = tick or time.monotonic() >= self.tick_timer.deadline_s
            if ticked and self._on_tick(scheduled is not None or not tick):
                return  # a quiet tick: no pass
            self.passes += 1
            self._process_once(ticked)
        except BaseException as error:
            self.finished.set_exception(error)
            return
        self.notice_timer.arm()
        if self._has_work_outside() or self.feed_flowing:  # more than one pass takes (a run of the
            self._schedule()  # feed, a pass's bound on proposals), or new work

    def _process_once(self, tick: bool) -> None:
        core = self.core
        if tick or not self.compaction.looked:
            self.compaction.look(core)  # where the journal now starts (replicator_ticks.py)
        self._report_durable()
        self._check_standing()
        settled = may_propose(core.raft_role is LEADER, core.term, core.leader_id, self.term_started, self.commit_known)
        self.operations.check(core, now_s := time.monotonic(), settled)  # a leadership transfer: docs/cluster.md
        self._take_proposals()
        self.read_rounds.ask(core, now_s)
        while core.has_ready():
            self._handle_ready(core.ready())
            self._check_standing()
        self._write_ring()
        self._publish(tick or self.standing_published is None)

    def _report_durable(self) -> None:
        durable = self.durable_index.get()
        previous, self.durable_seen = self.durable_seen, durable
        writes = self.writes
        last: tuple[int, int] | None = None
        while writes and writes[0][0] <= durable:
            last = writes.popleft()
        if last is not None:
            self.core.durable(*last)
        if writes and durable > previous:
            # A write longer than the ring's free room lands in parts; the core must hear of each
            # part, or a follower whose ring is full of uncommitted entries (the blp reads only
            # up to the commit) would wait for itself for good.
            self.core.durable_through(durable)

    def _check_standing(self) -> None:
        core = self.core
        standing = (core.term, core.leader_id)
        if standing == self.standing:
            return
        self.standing = standing
        self.operations.role_changed(core)
        if core.raft_role is not LEADER:
            # Forwarded to a node that no longer leads: their senders restart their streams.
            self.transport.close_forwards_from(self.inbox.clear(), f"node {core.id} stopped leading (term {core.term})")
            self.snapshot_sender.stop_all()
        self.pending.hold_by_key()  # the next leader may put other entries at their indexes
        if standing[1] != NO_NODE:
            log.info("term %d: leader is node %d%s", standing[0], standing[1],
                     " (this node)" if standing[1] == core.id else "")
            # Everything not yet committed goes to the new leader (or is proposed again here).
            self.outbox = self.pending.resend(time.monotonic(), with_logged=standing[1] != core.id)
            self.operations.resent(len(self.outbox), f"a new leader, node {standing[1]}")

    def _take_proposals(self) -> None:
        if self.core.raft_role is not LEADER and not (self.outbox or self.pending or self.proposals.ready()):
            return  # a follower with nothing to forward: a new stream restarts once it has (forwards.py)
        self.want_proposals = self._proposals_wanted(ready := self._ready_to_propose())
        if not ready:
            return
        records = self.outbox  # pending already: resent, or refused by the core
        self.outbox = []
        if self.core.raft_role is LEADER:
            region = poll_region(self.proposals, self.faults) if self.want_proposals else None
            forwarded = self.inbox.drain()  # forwarded by followers: pending there, not here
            if records or region or forwarded:
                self._propose(records, region or b"", forwarded)
            if region:
                self._release_proposals()
            return
        frames = self.proposals.poll(PROPOSALS_PER_PASS_MAX) if self.want_proposals else None
        if frames:
            self.faults.check(frames)  # a malformed one stops the role (`check_proposals`)
            taken = records_from_frames(frames)
            self.pending.add_all(taken, time.monotonic())  # each one's resend clock starts now
            records += taken
            self._release_proposals()
        # Gapless (sequencer/cluster/forwards.py): on a new stream, every pending record first.
        transport, leader = self.transport, self.core.leader_id
        stream = transport.forward_stream(leader)
        send = self.forward_stream.records_to_send(leader, stream, transport.forward_writable(leader),
                                                   self.pending, records, time.monotonic())  # fmt: skip
        if send:
            self.faults.forward(transport, leader, stream, send)

    def _release_proposals(self) -> None:
        self.pending_published = len(self.pending)
        self.pending_counter.set(self.pending_published)  # before the release: the drain reads both
        self.proposals.release()

    def _propose(self, records: list[bytes], region: bytes | memoryview, forwarded: list[bytes]) -> None:
        """Stamp and propose `records` (pending here already), the records of `region` (new from
        the proposal ring: pending here by index once proposed), then `forwarded` (followers')."""
        core = self.core
        first_index, term = core.next_index(), core.term
        try:
            batch, copies = self.stamper.stamp_batch(records, region, forwarded, first_index, term)
        except MalformedFrame as bad:  # the role stops (`check_proposals` says why)
            check_proposals([(bad.frame_type, bad.view)], self.faults.node)
            raise
        new_index = first_index + len(records)
        try:
            core.propose_batch(batch, first_index=first_index, term=term)
        except ProposalRejected as error:
            # Too much uncommitted (no majority) or a leadership transfer: retry on a later pass.
            # Followers' records go back to the inbox, which closes their connections if dropped.
            log.warning("proposals refused, retrying later: %s", error)
            self.pending.add_all(copies, time.monotonic())  # by key (their stamps aside)
            self.outbox = records + copies + self.outbox  # stamped again when proposed
            self.inbox.put_back(forwarded)
            return
        self.notice_timer.forwarded(new_index + len(copies), len(forwarded))  # their commit: at once
        self.pending.proposed(new_index, copies, time.monotonic(), len(region))  # their bytes: the region's

    def _handle_ready(self, ready: Ready) -> None:
        core = self.core
        hard_state = ready.hard_state
        snapshot = ready.snapshot
        if snapshot is not None:
            # Only the InstallSnapshot `_on_snapshot_chunk` steps, once its file is whole.
            assert self.snapshot_receiver.complete_index == snapshot.index, snapshot.index
            if hard_state is not None:
                self.hard_state_saver.save(hard_state)
            write_install_request(self.config.node.data_dir, snapshot.index, snapshot.term)
            raise InstallRequired(snapshot.index)
        if hard_state is not None:
            if ready.sync_before_send:
                self.hard_state_saver.save(hard_state)  # the term and vote: durable before sending
            else:
                self.hard_state_saver.note(hard_state)  # a commit hint: saved off the loop
        if ready.entries is not None:
            self._queue_entries(ready.entries)
        messages = ready.messages
        if messages:
            for message in messages:
                if type(message) is InstallSnapshot:  # the file goes in chunks instead
                    self.snapshot_sender.start(message.target, message.term, time.monotonic())
                    messages = [m for m in messages if type(m) is not InstallSnapshot]
                    break
            self.transport.send(messages)
        if ready.reads:
            self.read_rounds.answer(ready.reads)
        committed = ready.committed
        if committed is not None:
            self.commit_known = committed.last_index
            self.pending.committed_all(committed.payloads, committed.first_index)
        core.advance(ready, entries_durable=False)
        term_start = ready.term_start
        if term_start is not None:
            record = self.stamper.term_start(term_start.index, term_start.term, wall_clock_ns())
            core.propose_batch([record], first_index=term_start.index, term=term_start.term)
            self.term_started = (term_start.term, term_start.index)
            self.transport.close_forwards_from(self.inbox.clear(), f"node {core.id} started term {term_start.term}")
            log.info("leading term %d from index %d", term_start.term, term_start.index)

    def _queue_entries(self, entries: Entries) -> None:
        first_index = entries.first_index
        if first_index <= self.stored_index:
            assert first_index > self.positions.commit_index, (first_index, self.positions.commit_index)
            raise TruncateRequired(first_index - 1)
        feed, pending = self.feed, self.pending
        while feed and feed.end_index > first_index:
            pending.unlogged(feed.pop_last())  # replaced before it reached the ring
        assert feed.end_index == first_index, (feed.end_index, first_index)
        payloads = entries.payloads
        feed.extend(payloads)
        # Log time never goes back (a leader stamps at or after what it saw): observe the last only.
        self.stamper.observe(payloads[-1])
        pending.logged_all(payloads, first_index)
        self.writes.append((entries.last_index, entries.terms[-1]))

    def _write_ring(self) -> None:
        wrote = self.feed.write()  # one run at most: the loop stays responsive, the rest next pass
        if wrote and self.positions.written_index > self.stored_index:
            self.stored_index = self.positions.written_index
        self.feed_flowing = wrote and len(self.feed) > 0  # a full ring waits for a bell, ack or tick

    def _publish(self, tick: bool) -> None:
        """The commit for the blp, and a changed standing (the sequencer's gate), pending count (a
        drain) or retain index. What only `seqd status` and the metrics read, and the hard state's
        save deadline, at a tick's pass (every tick on a leader, at least every QUIET_PASS_S on an
        idle follower: replicator_ticks.py): a pass runs per proposal batch, fdatasync and ack."""
        positions = self.positions
        if positions.commit(self.commit_known):
            # The index first: a reader that sees the position sees an index at least as new.
            self.commit_index_counter.set(positions.commit_index)
            self.commit_position_counter.set(positions.commit_position)
            self.blp_doorbell.ring()
        core = self.core
        standing = (core.raft_role, core.term, core.leader_id)
        if standing != self.standing_published:
            self.standing_published = standing
            self.role_counter.set(int(core.raft_role))
            self.term_counter.set(core.term)
            self.leader_counter.set(core.leader_id)
        pending = len(self.pending)
        if pending != self.pending_published:
            self.pending_published = pending
            self.pending_counter.set(pending)
        sender = self.snapshot_sender
        if sender.holds or self.retain_published:
            # A hold keeps the journal for a follower the snapshot stream feeds: published at once.
            retain = sender.retain_index(core.match_index, core.commit_index, time.monotonic())
            if retain != self.retain_published:
                self.retain_published = retain
                self.retain_counter.set(retain)
        if not tick:
            return
        self.last_index_counter.set(core.log.last_index)
        self.passes_counter.set(self.passes)
        for counter, peer in zip(self.match_counters, self.peers, strict=True):
            counter.set(core.match_index(peer))
        self.operations.publish(core, self.transport.counters, self.inbox.records_dropped)
        self.hard_state_saver.look(time.monotonic())  # a commit hint due; a failed one's error

    # ---- wake-ups from the other processes ---------------------------------------------------

    def _ready_to_propose(self) -> bool:
        """Whether this node proposes or forwards (not during a transfer: they wait in the ring)."""
        core = self.core
        return may_propose(core.raft_role is LEADER, core.term, core.leader_id, self.term_started,
                           self.commit_known) and not self.operations.holding_proposals(core)

    def _proposals_wanted(self, ready: bool) -> bool:
        """Whether a pass takes proposals from the ring now: `ready` and room to hold them."""
        return ready and not self.pending.full() and len(self.feed) < UNWRITTEN_ENTRIES_MAX

    def _has_work_outside(self) -> bool:
        """Entries made durable since the last pass, or proposals this node takes now (asked again:
        the term's first entry or a commit freeing the pending set may have come in the pass)."""
        if self.durable_index.get() != self.durable_seen:
            return True
        if not self.proposals.ready():
            return False
        if not self.want_proposals:
            self.want_proposals = self._proposals_wanted(self._ready_to_propose())
        return self.want_proposals

    def _on_bell(self) -> None:
        """The doorbell rang (the journaller after an fdatasync, the sequencer's proposals)."""
        if self._has_work_outside():
            self._schedule()

    # ---- life cycle ----------------------------------------------------------------------------

    async def serve(self) -> int:
        context = self.context
        await self.transport.start()
        self._process()  # the tail of the journal into the ring, counters
        self.bell_waiter.start()
        context.set_state(RoleState.RUNNING)
        log.info("node %d replicating with %s, term %d, last index %d", self.core.id, self.peers,
                 self.core.term, self.core.log.last_index)
        self.tick_timer.start(time.monotonic())
        try:
            return await self.finished
        except TruncateRequired as truncate:
            path = write_truncate_request(self.config.node.data_dir, truncate.index)
            log.warning("%s: wrote %s; restarting the node's pipeline to cut the journal", truncate, path)
            return ROLE_EXIT_RAFT_TRUNCATE
        except InstallRequired as install:
            log.warning("%s: restarting the node's pipeline on it", install)
            return ROLE_EXIT_RAFT_TRUNCATE
        finally:
            self.hard_state_saver.stop()  # the last commit hint, saved
            await self.transport.close()

    def close(self) -> None:
        self.bell_waiter.stop()
        self.snapshot_sender.stop_all()
        self.snapshot_receiver.close()
        self.storage.close()
        self.log_ring.close()
        self.proposal_ring.close()


def main() -> int:
    context = start_role(Role.REPLICATOR)
    uvloop.install()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with report_start_failure(context):
            replicator = Replicator(context, loop)
            try:
                code = loop.run_until_complete(replicator.serve())
            finally:
                replicator.close()
        if code == 0:
            context.set_state(RoleState.DRAINED)
        return code
    finally:
        loop.close()
        context.close()


if __name__ == "__main__":
    sys.exit(main())
