"""A deterministic simulator that runs a whole Raft cluster in one process.

One `random.Random(seed)` drives everything: the network (per-link delay, loss, duplication and
the reordering that random delays cause; partitions of every shape), the disks (each node's entry
writes complete in order after a random fsync latency, while its messages are already out, as the
replication role does it; a crash loses the writes in progress, or lets a prefix of them land, and
may tear the ready being persisted), the clocks (each node ticks at its own drifting rate; pauses
stop a node while messages queue for it), the clients (proposals and linearizable reads) and the
seeds of each core's election timer. Nothing reads the
wall clock or iterates a hash-ordered collection of strings or bytes, so a seed replays exactly:
same events, same trace hash, under any PYTHONHASHSEED.

Time is an integer number of microseconds. Events sit in a heap ordered by (time, sequence number).
After every event the nodes it touched drain their readies (persist, check, send, apply, advance)
and the checks in `tests.sim.checks` run.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from sequencer.raft import (
    MESSAGE_DECODER,
    AppendEntries,
    DurableState,
    HardState,
    MemoryLogStorage,
    Message,
    NotLeaderError,
    ProposalRejected,
    RaftConfig,
    RaftCore,
    RaftRole,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
)
from tests.sim.checks import (
    Checker,
    NoticeAnswers,
    SafetyViolation,
    check_nothing_ready,
    check_persisted_before_send,
)

__all__ = ["DiskProfile", "LivenessFailure", "NetworkProfile", "SimNode", "Simulation"]

MS = 1000  # microseconds per millisecond
TICK_US = 10 * MS  # nominal tick: 10 ms, so elections take 100-200 ms (RaftConfig defaults)
TRACE_LINES_MAX = 80  # lines kept for the failure report: enough to see the last elections
STATE_ENCODER = msgspec.msgpack.Encoder()
STATE_DECODER = msgspec.msgpack.Decoder(list[bytes])


class LivenessFailure(AssertionError):
    """The cluster did not elect a leader and converge within the bound after faults stopped."""


@dataclass
class NetworkProfile:
    """Per-message fault probabilities and delays of every link."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay_min_us: int = 200
    delay_max_us: int = 2 * MS


@dataclass
class DiskProfile:
    """How long one entry write takes to become durable (uniform in the range), or None: the
    node's shell writes synchronously (persist, then send, then `advance`)."""

    fsync_min_us: int = 0
    fsync_max_us: int = 0


class Disk:
    """What survives a crash: the hard state, the snapshot and the durable entries after it.

    The entries are a `MemoryLogStorage`, which is also the core's `LogStorage` (read back when it
    has dropped entries from memory): the simulator's disk is the Raft log's storage, as the
    journal is the daemon's.
    """

    def __init__(self) -> None:
        self.hard_state = HardState(0, 0, 0)
        self.snapshot: Snapshot | None = None
        self.log = MemoryLogStorage()

    @property
    def last_index(self) -> int:
        return self.log.last_index

    def term_at(self, index: int) -> int | None:
        if self.snapshot is not None and index == self.snapshot.index:
            return self.snapshot.term
        return self.log.term(index)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.log.restore(snapshot.index)

    def write_entries(self, first_index: int, terms: list[int], payloads: list[bytes]) -> None:
        self.log.write(first_index, terms, payloads)

    def compact(self, snapshot: Snapshot) -> None:
        self.log.compact(snapshot.index)
        self.snapshot = snapshot


@dataclass
class Write:
    """An entry write in progress: durable at `done_us`, lost (or partly landed) in a crash."""

    first_index: int
    terms: list[int]
    payloads: list[bytes]
    done_us: int


class SimNode:
    def __init__(self, node_id: int, tick_us: int, disk_profile: DiskProfile | None) -> None:
        self.id = node_id
        self.core: RaftCore | None = None
        self.disk = Disk()
        self.disk_profile_at_start = disk_profile
        self.disk_profile = disk_profile  # a fault may change it until the next restart
        self.writes: deque[Write] = deque()  # in progress, oldest first
        self.unreported: tuple[int, int] | None = None  # durable, not yet told to the core
        self.applied: list[bytes] = []  # the state machine: payloads by index - 1
        self.tick_us = tick_us
        self.paused_until_us = 0
        self.incarnation = 0
        self.crash_at_next_ready = False
        self.crash_after_send = False
        self.commit_seen = 0
        self.role_seen = RaftRole.FOLLOWER
        self.compact_every_entries = 0  # 0: never compact
        self.notice_timer = False  # the leader's commit notice timer is armed


class Simulation:
    """A cluster of `node_count` cores on a simulated network, disk and clock.

    Use it scripted (`crash`, `partition`, `run_until`, ...) or randomized (`run_random`).
    """

    def __init__(
        self,
        seed: int,
        node_count: int = 3,
        *,
        network: NetworkProfile | None = None,
        drift: float = 0.0,
        compact_every_entries: int = 0,
        election_ticks: int = 10,
        entries_per_message_max: int = 1024,
        inflight_messages_max: int = 64,
        inflight_bytes_max: int = 4 << 20,
        disk_profiles: Sequence[DiskProfile | None] = (),
        log_retention_entries: int | None = None,
        term_start_from_shell: bool = False,
        rng: random.Random | None = None,
        learner_count: int = 0,
        commit_notice_delay_us: int | None = None,
        follower_log_retention_entries: int | None = None,
    ) -> None:
        self.seed = seed
        self.rng = rng if rng is not None else random.Random(seed)
        self.now_us = 0
        self.network = network or NetworkProfile()
        self.checker = Checker()
        self.notice_answers = NoticeAnswers()  # followers answer the commit notices they owe
        self._events: list[tuple[int, int, int, object]] = []
        self._sequence = 0
        self._hash = hashlib.blake2b(digest_size=16)
        self.trace: deque[str] = deque(maxlen=TRACE_LINES_MAX)
        self.trace_all = False
        # Voters 1..node_count, then learners (non-voting members) after them.
        self.voters = tuple(range(1, node_count + 1))
        self.learners = tuple(range(node_count + 1, node_count + learner_count + 1))
        self.ids = self.voters + self.learners
        self.blocked: set[tuple[int, int]] = set()
        self.election_ticks = election_ticks
        self.entries_per_message_max = entries_per_message_max
        self.inflight_messages_max = inflight_messages_max
        self.inflight_bytes_max = inflight_bytes_max
        # None: no storage, the cores keep their whole log in memory.
        self.log_retention_entries = log_retention_entries
        # While a node does not lead it keeps this many (None: RaftConfig's default, more than
        # any window drawn here, so a follower keeps what a leader keeps).
        self.follower_log_retention_entries = follower_log_retention_entries
        self.term_start_from_shell = term_start_from_shell
        # None: the cores send a new commit index at once. Else they hold it back
        # (`RaftConfig.defer_commit_notices`) and a leader's shell asks for it this long after
        # it was first held, as the replicator's timer does (0: no timer, only the heartbeats).
        self.commit_notice_delay_us = commit_notice_delay_us
        self.nodes: dict[int, SimNode] = {}
        for node_id in self.ids:
            skew = 1.0 + self.rng.uniform(-drift, drift)
            profile = disk_profiles[node_id - 1] if disk_profiles else None
            node = SimNode(node_id, int(TICK_US * skew), profile)
            node.compact_every_entries = compact_every_entries
            self.nodes[node_id] = node
            self._start(node)
        # Clients: proposals in flight (payload -> node, index, incarnation) and acknowledged ones.
        self.proposals: dict[bytes, tuple[int, int, int]] = {}
        self.acked: dict[bytes, int] = {}
        self.proposal_count = 0
        self.reads: dict[int, tuple[int, int, int]] = {}  # request id -> node, incarnation, floor
        self.reads_done = 0
        self.read_count = 0
        self.messages_sent = 0
        self.snapshots_installed = dict.fromkeys(self.ids, 0)

    # ------------------------------------------------------------------------- plumbing

    def _record(self, line: str) -> None:
        text = f"{self.now_us} {line}"
        self._hash.update(text.encode())
        self.trace.append(text)
        if self.trace_all:
            print(text)

    @property
    def trace_hash(self) -> str:
        return self._hash.hexdigest()

    def _schedule(self, at_us: int, kind: int, payload: object) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (at_us, self._sequence, kind, payload))

    def _start(self, node: SimNode) -> None:
        """Build a core from the node's disk (a first start or a restart after a crash)."""
        disk = node.disk
        retention = self.log_retention_entries
        config = RaftConfig(
            node.id,
            self.voters,
            learners=self.learners,
            cluster_id=7,
            election_ticks=self.election_ticks,
            entries_per_message_max=self.entries_per_message_max,
            inflight_messages_max=self.inflight_messages_max,
            inflight_bytes_max=self.inflight_bytes_max,
            log_retention_entries=retention if retention is not None else 0,
            **({} if self.follower_log_retention_entries is None
               else {"follower_log_retention_entries": self.follower_log_retention_entries}),
            # Small reads from storage, so an AppendEntries built from it is often cut short.
            storage_read_bytes_max=64,
            # And two of them per pass for all followers: catch-ups wait for answers and ticks.
            storage_read_bytes_per_pass_max=128,
            term_start_from_shell=self.term_start_from_shell,
            incarnation=node.incarnation + 1,
            defer_commit_notices=self.commit_notice_delay_us is not None,
        )
        storage = disk.log if retention is not None else None
        durable = DurableState(disk.hard_state, disk.snapshot, list(disk.log.terms),
                               list(disk.log.payloads))
        if storage is not None:
            # A bounded restart: load only a tail of the log, leaving committed entries on disk.
            base = storage.snapshot_index
            # (A snapshot installed in a ready is on disk before that ready's commit index.)
            committed = max(base, min(disk.hard_state.commit_index, storage.last_index))
            first_index = self.rng.randint(base + 1, committed + 1)
            if node.incarnation % 4 == 1:  # (no draw: the seeds' random streams stay as they were)
                first_index = committed + 1  # the daemon's own shape: its tail starts past the commit
            durable.first_index = first_index
            del durable.terms[: first_index - base - 1]
            del durable.payloads[: first_index - base - 1]
            if node.incarnation % 2:
                # Every other start as the daemon's: the state machine replays the disk up to the
                # tail (the blp's recovery) and the core starts applied there, reading nothing
                # back (half of those with the tail after the commit, as the daemon's; the other
                # half anywhere after the snapshot); the others rebuild from the snapshot and the
                # core hands out the rest.
                durable.applied_index = first_index - 1
        node.core = RaftCore(config, random.Random(self.rng.getrandbits(64)), durable, storage)
        node.applied = (
            list(STATE_DECODER.decode(disk.snapshot.data)) if disk.snapshot is not None else []
        )
        if durable.applied_index:
            assert storage is not None and len(node.applied) == storage.snapshot_index
            for offset in range(durable.applied_index - storage.snapshot_index):
                payload = storage.payloads[offset]
                index = storage.snapshot_index + offset + 1
                self.checker.check_applied(node.id, index, storage.terms[offset], payload)
                node.applied.append(payload)
            self._record(f"replay n{node.id} ..{durable.applied_index}")
        node.incarnation += 1
        node.crash_at_next_ready = False
        node.crash_after_send = False
        node.writes.clear()
        node.unreported = None
        node.disk_profile = node.disk_profile_at_start
        node.commit_seen = node.core.commit_index
        node.role_seen = RaftRole.FOLLOWER
        self._schedule(self.now_us + self.rng.randrange(node.tick_us), TICK, node.id)
        self._record(f"start n{node.id} inc={node.incarnation} term={node.core.term} "
                     f"last={node.core.log.last_index} commit={node.core.commit_index}")
        self._drain(node)

    # ---------------------------------------------------------------------- event loop

    def run_until_us(self, end_us: int) -> None:
        events = self._events
        while events and events[0][0] <= end_us:
            at_us, _, kind, payload = heapq.heappop(events)
            self.now_us = at_us
            if kind == TICK:
                self._on_tick(payload)  # type: ignore[arg-type]
            elif kind == DELIVER:
                self._on_deliver(payload)  # type: ignore[arg-type]
            elif kind == ACTION:
                payload()  # type: ignore[operator]
            elif kind == DURABLE:
                self._on_durable(payload)  # type: ignore[arg-type]
        self.now_us = max(self.now_us, end_us)

    def run_for_ms(self, duration_ms: float) -> None:
        self.run_until_us(self.now_us + int(duration_ms * MS))

    def run_until(self, predicate, timeout_ms: float, step_ms: float = 5) -> bool:  # type: ignore[no-untyped-def]
        """Run until `predicate()` holds (checked every `step_ms`) or `timeout_ms` passes."""
        deadline = self.now_us + int(timeout_ms * MS)
        while self.now_us < deadline:
            if predicate():
                return True
            self.run_until_us(min(deadline, self.now_us + int(step_ms * MS)))
        return bool(predicate())

    def at_ms(self, delay_ms: float, action) -> None:  # type: ignore[no-untyped-def]
        self._schedule(self.now_us + int(delay_ms * MS), ACTION, action)

    def _on_tick(self, node_id: int) -> None:
        node = self.nodes[node_id]
        core = node.core
        if core is None:
            return  # crashed: the restart schedules new ticks
        self._schedule(self.now_us + node.tick_us, TICK, node_id)
        if self.now_us < node.paused_until_us:
            return
        core.tick()
        self._drain(node)

    def _on_deliver(self, item: tuple[int, int, bytes]) -> None:
        source, target, data = item
        node = self.nodes[target]
        if node.core is None or (source, target) in self.blocked:
            return
        if self.now_us < node.paused_until_us:
            self._schedule(node.paused_until_us, DELIVER, item)
            return
        message = MESSAGE_DECODER.decode(data)
        core = node.core
        reported_before = self.notice_answers.reported_through(target, node.incarnation, message.term)
        core.step(message)
        self._drain(node)
        if node.core is core and node.unreported is None:  # (every durable write told to the core)
            durable_term = node.disk.term_at(message.previous_index) if isinstance(message, AppendEntries) else None
            self.notice_answers.delivered(message, core, node.incarnation, durable_term, reported_before)

    def _on_durable(self, item: tuple[int, int]) -> None:
        """Entry writes of a node reach their fsync: the disk holds them; the core is told."""
        node_id, incarnation = item
        node = self.nodes[node_id]
        core = node.core
        if core is None or node.incarnation != incarnation:
            return  # the writes were lost with the crash
        writes = node.writes
        while writes and writes[0].done_us <= self.now_us:
            write = writes.popleft()
            node.disk.write_entries(write.first_index, write.terms, write.payloads)
            node.unreported = (write.first_index + len(write.terms) - 1, write.terms[-1])
        if node.unreported is None:
            return
        if self.now_us < node.paused_until_us:
            # Durable on disk, but a stopped process learns it only when it runs again.
            self._schedule(node.paused_until_us, DURABLE, item)
            return
        index, term = node.unreported
        node.unreported = None
        # One report may stand for several writes (the shell saw them complete together).
        core.durable(index, term)
        self._record(f"durable n{node_id} {index}")
        self._drain(node)

    def _send(self, message: Message) -> None:
        if message.source in self.learners and isinstance(message, (RequestVote,
                                                                     RequestVoteResponse)):
            raise SafetyViolation(
                f"learner: node {message.source} sends {type(message).__name__} to node "
                f"{message.target}; a learner never campaigns nor votes"
            )
        self.messages_sent += 1
        self.notice_answers.sent(message, self.nodes[message.source].incarnation)
        self._record(
            f"send {type(message).__name__} n{message.source}->n{message.target} t{message.term}"
        )
        link = (message.source, message.target)
        if link in self.blocked:
            return
        rng = self.rng
        network = self.network
        if network.drop and rng.random() < network.drop:
            return
        data = msgspec.msgpack.encode(message)
        copies = 2 if network.duplicate and rng.random() < network.duplicate else 1
        for _ in range(copies):
            delay_us = rng.randint(network.delay_min_us, network.delay_max_us)
            self._schedule(self.now_us + delay_us, DELIVER, (message.source, message.target, data))

    # ------------------------------------------------------------------ the node's loop

    def _drain(self, node: SimNode) -> None:
        """Do every ready the node has, as the replication role would: persist the hard state
        (and a snapshot) before sending, start the entry write (a synchronous node finishes it
        first), send, apply, advance."""
        core = node.core
        assert core is not None
        synchronous = node.disk_profile is None
        while core.has_ready():
            ready = core.ready()
            entries = ready.entries
            if entries is not None:
                previous_term = core.term_at(entries.first_index - 1)
                self.checker.check_written(node.id, previous_term, entries)
            if node.crash_at_next_ready:
                self._persist_torn(node, ready)
                self._crash_now(node, "torn")
                return
            if ready.snapshot is not None:
                # Writes complete in order: the ones in progress land before the snapshot.
                self._finish_writes(node)
            self._persist(node.disk, ready)
            if entries is not None:
                if synchronous:
                    node.disk.write_entries(entries.first_index, entries.terms, entries.payloads)
                else:
                    self._start_write(node, entries.first_index, entries.terms, entries.payloads)
            disk = node.disk
            durable_term, durable_vote = disk.hard_state.term, disk.hard_state.vote
            for message in ready.messages:
                check_persisted_before_send(message, durable_term, durable_vote,
                                            disk.last_index, disk.term_at, core.term_at)
                self._send(message)
            self._apply(node, ready)
            core.advance(ready, entries_durable=synchronous)
            if ready.term_start is not None and self.term_start_from_shell:
                self._propose_term_start(node, ready.term_start.term, ready.term_start.index)
            self._check_node(node)
            if node.crash_after_send and node.writes and ready.messages and (
                core.commit_index > core.stable_index or core.raft_role != RaftRole.LEADER
            ):
                # A node that sent, then crashed before its write was durable (thesis 10.2.1);
                # a leader once it has sent a commit index past its own durable log, the moment
                # when counting its unsynced entries would have mattered.
                self._crash_now(node, "before its write was durable")
                return
        check_nothing_ready(core)
        self._check_node(node)
        if self.commit_notice_delay_us and not node.notice_timer and core.commit_notices_held():
            node.notice_timer = True
            self._schedule(self.now_us + self.commit_notice_delay_us, ACTION,
                           lambda: self._send_commit_notices(node, core))
        if node.compact_every_entries and (
            core.applied_index - core.log.snapshot_index >= node.compact_every_entries
        ):
            data = STATE_ENCODER.encode(node.applied)
            index = core.applied_index
            core.compact(index, data)
            assert core.snapshot is not None
            node.disk.compact(core.snapshot)
            self._record(f"compact n{node.id} to {index}")

    def _send_commit_notices(self, node: SimNode, core: RaftCore) -> None:
        """The leader's commit notice timer fires (`_drain` armed it)."""
        node.notice_timer = False
        if node.core is not core or self.now_us < node.paused_until_us:
            return  # crashed since (a new core arms its own), or stopped: heartbeats carry them
        core.send_commit_notices()
        self._record(f"commit-notices n{node.id}")
        self._drain(node)

    def _propose_term_start(self, node: SimNode, term: int, index: int) -> None:
        """The leader's sequencer stamps a TERM_START record at the term's first index."""
        core = node.core
        assert core is not None
        record = b"TERM_START n%d t%d i%d" % (node.id, term, index)
        assert core.propose_batch([record], first_index=index, term=term) == index
        self._record(f"term-start n{node.id} t{term} at {index}")

    def _start_write(
        self, node: SimNode, first_index: int, terms: list[int], payloads: list[bytes]
    ) -> None:
        profile = node.disk_profile
        assert profile is not None
        done_us = self.now_us + self.rng.randint(profile.fsync_min_us, profile.fsync_max_us)
        if node.writes:
            done_us = max(done_us, node.writes[-1].done_us)  # one fsync stream, in order
        node.writes.append(Write(first_index, terms, payloads, done_us))
        self._schedule(done_us, DURABLE, (node.id, node.incarnation))

    @staticmethod
    def _finish_writes(node: SimNode) -> None:
        """Wait for the writes in progress (the core no longer needs their reports)."""
        while node.writes:
            write = node.writes.popleft()
            node.disk.write_entries(write.first_index, write.terms, write.payloads)
        node.unreported = None

    @staticmethod
    def _persist(disk: Disk, ready: Ready) -> None:
        """The part of a ready that is durable before its messages leave."""
        if ready.snapshot is not None:
            disk.write_snapshot(ready.snapshot)
        if ready.hard_state is not None:
            disk.hard_state = ready.hard_state

    def _persist_torn(self, node: SimNode, ready: Ready) -> None:
        """A crash during persistence: the writes so far reach the disk, the last one torn."""
        disk = node.disk
        rng = self.rng
        if ready.snapshot is not None:
            if rng.random() < 0.5:
                return
            self._finish_writes(node)
            disk.write_snapshot(ready.snapshot)
        if ready.entries is not None:
            entries = ready.entries
            if node.disk_profile is not None:
                # Queued behind the writes in progress; the crash lets a prefix of them land.
                node.writes.append(Write(entries.first_index, entries.terms, entries.payloads,
                                         self.now_us))
            else:
                kept = rng.randint(0, len(entries))
                disk.write_entries(entries.first_index, entries.terms[:kept],
                                   entries.payloads[:kept])
                if kept < len(entries):
                    return
        if ready.hard_state is not None and rng.random() < 0.5:
            disk.hard_state = ready.hard_state

    def _apply(self, node: SimNode, ready: Ready) -> None:
        checker = self.checker
        if ready.snapshot is not None:
            node.applied = list(STATE_DECODER.decode(ready.snapshot.data))
            assert len(node.applied) == ready.snapshot.index, (node.id, ready.snapshot.index)
            self.snapshots_installed[node.id] += 1
            self._record(f"install n{node.id} snapshot {ready.snapshot.index}")
        committed = ready.committed
        if committed is not None:
            applied = node.applied
            assert committed.first_index == len(applied) + 1, (node.id, committed.first_index)
            proposals = self.proposals
            for index, term, payload in committed.items():
                checker.check_applied(node.id, index, term, payload)
                applied.append(payload)
                proposal = proposals.get(payload)
                if (
                    proposal is not None
                    and proposal[0] == node.id
                    and proposal[2] == node.incarnation
                ):
                    del proposals[payload]
                    if proposal[1] == index:
                        self.acked[payload] = index
            self._record(f"apply n{node.id} {committed.first_index}..{committed.last_index}")
        if ready.reads:
            for read in ready.reads:
                entry = self.reads.pop(read.request_id, None)
                if entry is None:
                    continue
                floor = entry[2]
                if read.index < floor:
                    raise SafetyViolation(
                        f"linearizable read: node {node.id} answers read {read.request_id} at "
                        f"index {read.index}, but index {floor} was committed before it was asked"
                    )
                self.reads_done += 1

    def _check_node(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        checker = self.checker
        checker.check_commit(node.id, node.commit_seen, core.commit_index)
        role = core.raft_role
        if role == RaftRole.LEADER and core.commit_index > node.commit_seen:
            checker.record_leader_commit(core, node.commit_seen, core.commit_index)
        node.commit_seen = core.commit_index
        if role != RaftRole.FOLLOWER and node.id in self.learners:
            raise SafetyViolation(f"learner: node {node.id} became {role.name} in term {core.term}")
        if role != node.role_seen:
            self._record(f"role n{node.id} {role.name} term={core.term}")
            if role == RaftRole.LEADER:
                checker.check_leader(node.id, core.term)
                checker.check_new_leader_log(core)
            node.role_seen = role

    # ------------------------------------------------------------------------- faults

    def crash(self, node_id: int, *, torn: bool = False, after_send: bool = False) -> None:
        """Crash a node now, or (torn) in the middle of persisting its next ready, or (after_send)
        once it has sent a ready while an entry write is still in progress."""
        node = self.nodes[node_id]
        if node.core is None:
            return
        if after_send:
            node.crash_after_send = True
            self._record(f"crash-after-send-armed n{node_id}")
        elif torn:
            node.crash_at_next_ready = True
            self._record(f"crash-armed n{node_id}")
        else:
            self._crash_now(node, "clean")

    def _crash_now(self, node: SimNode, how: str) -> None:
        """The process dies: writes in progress are lost, except that a prefix of them (in
        order, the last one maybe torn) may have reached the disk unsynced."""
        writes = node.writes
        landed = 0
        if writes and self.rng.random() < 0.5:
            for write in writes:
                kept = self.rng.randint(0, len(write.terms))
                node.disk.write_entries(write.first_index, write.terms[:kept],
                                        write.payloads[:kept])
                landed += kept
                if kept < len(write.terms):
                    break
        lost = sum(len(write.terms) for write in writes) - landed
        writes.clear()
        node.unreported = None
        node.core = None
        node.crash_at_next_ready = False
        node.crash_after_send = False
        self._record(f"crash n{node.id} {how} (unsynced entries lost: {lost})")

    def wipe(self, node_id: int) -> None:
        """Lose a crashed node's whole disk (its data directory removed): it restarts empty, with
        no term, vote or log, and must be fed everything again (a snapshot if the others have
        compacted). Raft assumes disks are never lost; a wiped node is safe only while the others
        hold every committed entry on a majority without it, which the scenarios that wipe keep."""
        node = self.nodes[node_id]
        assert node.core is None, f"crash node {node_id} before wiping its disk"
        node.disk = Disk()
        self._record(f"wipe n{node_id}")

    def restart(self, node_id: int) -> None:
        """Start a crashed node from its disk (a live node only loses an armed torn crash)."""
        node = self.nodes[node_id]
        if node.core is not None:
            node.crash_at_next_ready = False
            node.crash_after_send = False
            return
        self._start(node)

    def pause(self, node_id: int, duration_ms: float) -> None:
        node = self.nodes[node_id]
        node.paused_until_us = self.now_us + int(duration_ms * MS)
        self._record(f"pause n{node_id} {duration_ms}ms")

    def cut(self, source: int, target: int) -> None:
        self.blocked.add((source, target))

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.blocked.add((node_id, other))
                self.blocked.add((other, node_id))
        self._record(f"isolate n{node_id}")

    def partition(self, *groups: tuple[int, ...]) -> None:
        """Only nodes within one group talk to each other."""
        group_of = {node: number for number, group in enumerate(groups) for node in group}
        for source in self.ids:
            for target in self.ids:
                if source != target and group_of.get(source) != group_of.get(target):
                    self.blocked.add((source, target))
        self._record(f"partition {groups}")

    def heal(self) -> None:
        self.blocked.clear()
        self._record("heal")

    def live(self) -> list[int]:
        return [n for n in self.ids if self.nodes[n].core is not None]

    # ------------------------------------------------------------------------- clients

    def leader(self) -> int | None:
        """The live leader of the highest term, if any."""
        best: tuple[int, int] | None = None
        for node_id in self.ids:
            core = self.nodes[node_id].core
            if core is not None and core.raft_role == RaftRole.LEADER:
                if best is None or core.term > best[0]:
                    best = (core.term, node_id)
        return best[1] if best else None

    def propose(self, count: int = 1, node_id: int | None = None) -> int:
        """Offer `count` new unique payloads at `node_id` (default: a random live node, then the
        leader it names). Returns how many were accepted."""
        live = self.live()
        if not live:
            return 0
        target = node_id if node_id is not None else self.rng.choice(live)
        payloads = []
        for _ in range(count):
            self.proposal_count += 1
            payloads.append(f"s{self.seed}-p{self.proposal_count}".encode())
        for _ in range(2):
            node = self.nodes[target]
            core = node.core
            if core is None:
                return 0
            try:
                if self.term_start_from_shell and core.raft_role == RaftRole.LEADER:
                    # As the leader's sequencer does: stamp, then hand the stamped records over.
                    first_index = core.propose_batch(payloads, first_index=core.next_index(),
                                                     term=core.term)
                else:
                    first_index = core.propose_batch(payloads)
            except NotLeaderError as error:
                if error.leader_id and node_id is None:
                    target = error.leader_id
                    continue
                return 0
            except ProposalRejected:
                return 0
            for offset, payload in enumerate(payloads):
                self.proposals[payload] = (target, first_index + offset, node.incarnation)
            self._drain(node)
            return len(payloads)
        return 0

    def transfer(self, target: int) -> bool:
        """The leader (if any) hands leadership to `target` (a rolling restart's first step)."""
        leader = self.leader()
        if leader is None or leader == target:
            return False
        node = self.nodes[leader]
        assert node.core is not None
        node.core.transfer_leadership(target)
        self._record(f"transfer n{leader} -> n{target}")
        self._drain(node)
        return True

    def read(self) -> bool:
        """Ask a random node that believes it leads (a deposed leader too) for a read point."""
        leaders = [
            n for n in self.live()
            if self.nodes[n].core.raft_role == RaftRole.LEADER  # type: ignore[union-attr]
        ]
        if not leaders:
            return False
        leader = self.rng.choice(leaders)
        node = self.nodes[leader]
        assert node.core is not None
        self.read_count += 1
        self.reads[self.read_count] = (leader, node.incarnation, self.checker.commit_index_max)
        node.core.read_index(self.read_count)
        self._drain(node)
        return True

    def read_anywhere(self) -> bool:
        """Ask a random live node (a follower or learner asks its leader) for a read point."""
        live = self.live()
        if not live:
            return False
        node_id = self.rng.choice(live)
        node = self.nodes[node_id]
        assert node.core is not None
        self.read_count += 1
        try:
            node.core.read_index(self.read_count)
        except NotLeaderError:
            return False  # no leader known: the client asks again later
        self.reads[self.read_count] = (node_id, node.incarnation, self.checker.commit_index_max)
        self._drain(node)
        return True

    # ---------------------------------------------------------------------- convergence

    def converged(self) -> bool:
        """One leader; every node live, in its term, holding and applying all of its log."""
        leader = self.leader()
        if leader is None:
            return False
        core = self.nodes[leader].core
        assert core is not None
        last = core.log.last_index
        if core.log.last_term != core.term or core.commit_index != last:
            return False
        for node_id in self.ids:
            other = self.nodes[node_id].core
            if other is None or other.term != core.term:
                return False
            if other.commit_index != last or other.applied_index != last:
                return False
            if other.log.last_index != last or other.log.last_term != core.term:
                return False
        return True

    def check_final(self) -> None:
        """After convergence: identical state machines; every acknowledged payload in each,
        once, at the index it was acknowledged at."""
        reference = self.nodes[self.ids[0]].applied
        for node_id in self.ids:
            applied = self.nodes[node_id].applied
            if applied != reference:
                raise SafetyViolation(
                    f"state machines differ after convergence: node {node_id} applied "
                    f"{len(applied)} entries, node {self.ids[0]} {len(reference)}"
                )
        counts: dict[bytes, int] = {}
        for payload in reference:
            if payload:
                counts[payload] = counts.get(payload, 0) + 1
        for payload, index in self.acked.items():
            if counts.get(payload) != 1 or reference[index - 1] != payload:
                raise SafetyViolation(
                    f"acknowledged payload {payload!r} (index {index}) applied "
                    f"{counts.get(payload, 0)} times"
                )

    def await_convergence(self, timeout_ms: float) -> None:
        if not self.run_until(self.converged, timeout_ms):
            state = ", ".join(
                f"n{n}: " + (
                    "down" if (c := self.nodes[n].core) is None else
                    f"{c.raft_role.name} term={c.term} last={c.log.last_index} "
                    f"commit={c.commit_index} applied={c.applied_index}"
                )
                for n in self.ids
            )
            raise LivenessFailure(
                f"no leader and convergence within {timeout_ms} ms of simulated time after "
                f"faults stopped: {state}"
            )
        self.check_final()


TICK = 0
DELIVER = 1
ACTION = 2
DURABLE = 3
