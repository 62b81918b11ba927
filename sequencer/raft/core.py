"""The Raft consensus core: a state machine with no I/O, no clock and no threads.

Theory of operation
-------------------
The caller owns everything physical. It moves time forward with `tick()` (one call per tick of its
clock), hands in peer messages with `step(message)`, offers client payloads with `propose(...)` /
`propose_batch(...)` and read requests with `read_index(...)`. None of these does I/O: they change
in-memory state and queue work. The caller then collects the work with `ready()` and performs it in
the order documented on `Ready`:

    ready = core.ready()
    persist(ready.snapshot, ready.hard_state)   # fsync first if ready.sync_before_send
    start_write(ready.entries)                  # truncate after first_index - 1, append
    send(ready.messages)                        # need not wait for the entries' write
    apply(ready.committed); answer(ready.reads)
    core.advance(ready, entries_durable=False)
    ...
    core.durable(last_index, last_term)         # when the entries' write is durable

A synchronous caller writes the entries before sending and calls `core.advance(ready)`, which
means the same as reporting them durable at once.

A message is a promise about durable state, and the core keeps each promise by what it puts in a
ready, not by the caller's timing. The term and vote (and a snapshot) must be durable before the
ready's messages leave (`sync_before_send`): every message carries the term, and a granted vote
is a vote cast. The entries need not be (Raft thesis 10.2.1): the leader ships its AppendEntries
while its own write runs and counts itself toward a majority only up to `stable_index`, the index
up to which the caller reported its durable log agrees with the core's; a follower's successful
AppendEntriesResponse is produced only once what it acknowledges is durable (a retransmission of
durable entries is answered at once, anything else waits for `durable()`; `durability` tracks
the writes in progress, `follower` the acknowledgements that wait for them). Only durable
committed entries are handed out to apply, and the persisted commit index never passes
`stable_index`, so a restart never applies entries its disk holds from a deposed leader. The core never steps, ticks or proposes while a ready is outstanding (asserted: `advance`
comes right after sending), so nothing it says in a ready is contradicted before the caller acts
on it. The deterministic simulator (`tests/sim`) checks every promise on every message it sends,
with disks whose writes land long after the messages, or never.

One log: the core assigns every index. A leader announces where its term starts
(`Ready.term_start`: the no-op's index); the daemon's sequencer stamps a TERM_START record there
(the caller proposes it itself with `term_start_from_shell`) and stamps its records from
`next_index()`, handing them over with `propose_batch(records, first_index=..., term=...)`, which
refuses a stale stamp (`StampMismatch`).

Bounded memory: given a `LogStorage`, the log keeps in memory only what is not yet applied and
durable plus `log_retention_entries` below it (`follower_log_retention_entries` while not
leading); older entries are read back from storage in reads of at most `storage_read_bytes_max`
bytes when a lagging follower needs them, and a restart may load only the tail of the log
(`DurableState.first_index`) and start past what the caller's state machine holds already
(`DurableState.applied_index`), reading nothing back.

Randomness (election timeouts) comes only from the `random.Random` the caller passes in, so a
seeded caller gets an exactly reproducible core.

Features, with the sections of the Raft paper (extended version) they implement:
- leader election with randomized timeouts (5.2) and PreVote (thesis 9.6): a node whose timer
  fires first asks, without raising its term, whether it could win; a partitioned node therefore
  never disrupts a healthy leader when it returns;
- check-quorum (thesis 6.2): a leader that has not heard from a majority within an election
  timeout steps down, and followers that have heard from a leader within one ignore vote requests;
- a no-op entry (empty payload) at the start of each term (8), so the leader commits entries of
  earlier terms and learns the commit index;
- log replication with conflict back-off by term (5.3), commit of current-term entries only by
  counting (5.4.2, Figure 8), batching and pipelining of AppendEntries with a bounded window of
  messages and payload bytes in flight per follower (flow control);
- InstallSnapshot (7) for a follower that needs entries the leader has compacted;
- linearizable reads through ReadIndex (8, thesis 6.4): the leader records its commit index and
  answers only after a heartbeat round confirms a majority still follows it;
- leadership transfer (thesis 3.10): the leader stops taking proposals, catches the target up and
  sends it TimeoutNow; the target campaigns at once with a vote that overrides the voters' lease.

Membership is static: 1, 3 or 5 voters, and up to `LEARNERS_MAX` learners (non-voting members,
thesis 4.2.1) that receive the log but never vote, campaign or count toward a majority; neither
joint consensus nor single-server changes are implemented.

Where the parts live: this module is the node itself: its inputs, the term rules every message
passes, changes of standing and the commit rule. It delegates one concept to each of: `readies`
(the ready/advance contract: what `ready()` hands out, what `advance` and `durable` are told
back), `config` (`RaftConfig`), `errors` (what the caller is refused with),
`restart` (the state a restart loads), `election` (election timer, vote tally, the voter's rule),
`leader` (what a leader sends its followers and how it reads their answers; one `Leader` per term
led), `tracker` (each follower's progress and flow control, and the majority questions over
them), `follower` (the follower's handling of its leader's messages, and acknowledgements that
wait for durability), `durability` (the entry writes in progress and the durable index, with the
"ABA" rule), `read_index` (the queue of ReadIndex reads), `log` (the entries in memory),
`storage` (the `LogStorage` interface for the rest) and `quorum` (majority arithmetic).
"""

from __future__ import annotations

import random

from sequencer.raft.candidate import Elections
from sequencer.raft.config import NO_NODE, RaftConfig
from sequencer.raft.durability import DurableWrites
from sequencer.raft.election import ElectionTimer, VoteTally
from sequencer.raft.errors import NotLeaderError, ProposalRejected, StampMismatch
from sequencer.raft.follower import Follower
from sequencer.raft.leader import Leader
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    DurableState,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    TermStart,
    TimeoutNow,
)
from sequencer.raft.quorum import quorum_size
from sequencer.raft.raft_role import CANDIDATE, FOLLOWER, LEADER, RaftRole
from sequencer.raft.read_index import ReadIndexQueue, Reads
from sequencer.raft.readies import Readies
from sequencer.raft.restart import restore
from sequencer.raft.storage import LogStorage

__all__ = [
    "NO_NODE",
    "NotLeaderError",
    "ProposalRejected",
    "RaftConfig",
    "RaftCore",
    "RaftRole",
    "StampMismatch",
]


class RaftCore(Elections, Reads, Readies):
    """One Raft node. See the module docstring for the contract."""

    def __init__(
        self,
        config: RaftConfig,
        rng: random.Random,
        durable: DurableState | None = None,
        storage: LogStorage | None = None,
    ) -> None:
        self.config = config
        self.id = config.node_id
        self.cluster_id = config.cluster_id
        self.peers = tuple(v for v in config.voters if v != config.node_id)  # voters only
        self._members = frozenset(config.members)
        self._learners = frozenset(config.learners)
        self.is_learner = config.is_learner
        self.quorum = quorum_size(len(config.voters))

        # With a storage, the log keeps only its tail in memory (`log_retention_entries`).
        self.log = RaftLog(storage=storage)
        self.term = 0
        self.vote = NO_NODE
        # Invariant: applied_index <= commit_index <= log.last_index.
        self.commit_index = 0
        self.snapshot: Snapshot | None = None  # the latest snapshot, sent to lagging followers
        # Invariant: log.snapshot_index <= applied_index (compaction only covers applied entries).
        self.applied_index = 0
        if durable is not None:
            self.term, self.vote, self.commit_index, self.applied_index, self.snapshot = restore(
                self.log, durable
            )
        # How far the durable log agrees with `log` (`stable_index`), and the writes in progress.
        self._durable = DurableWrites(self.log.last_index)
        # The start of the term this node leads, announced in the next ready (then None).
        self._term_start: TermStart | None = None
        # Entries from here on have not yet been handed out in a ready.
        self._unstable_from = self.log.last_index + 1
        self._persisted_hard_state = HardState(self.term, self.vote, self.commit_index)
        self._pending_snapshot: Snapshot | None = None
        self._ready_outstanding: Ready | None = None

        self.raft_role = FOLLOWER
        self.leader_id = NO_NODE
        self._messages: list[Message] = []
        # Invariant: _leader is not None exactly when raft_role is LEADER.
        self._leader: Leader | None = None
        self._votes = VoteTally(self.id, self.quorum)
        self._election_timer = ElectionTimer(config.election_ticks, rng)
        self._reads = ReadIndexQueue()
        self._follower = Follower(config, self.log, self._durable, self._send)

        # Operating counters: messages dropped at the gateway (wrong cluster, target or sender);
        # AppendEntries sent, of them those with no entries (probes, commits) and of those the
        # commit notices (`RaftConfig.defer_commit_notices`), and AppendEntriesResponses sent:
        # how many messages replication costs per command.
        self.messages_dropped = 0
        self.appends_sent = 0
        self.empty_appends_sent = 0
        self.commit_notices_sent = 0
        self.append_answers_sent = 0
        # Entries sent as leader in terms that ended (`stored_entries_sent`).
        self._stored_entries_sent_before = 0

    @property
    def election_elapsed_ticks(self) -> int:
        """Ticks since this node last heard from its leader, granted a vote or campaigned."""
        return self._election_timer.elapsed_ticks

    # ------------------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance this node's clock by one tick."""
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        timer = self._election_timer
        timer.elapsed_ticks += 1
        leader = self._leader
        if leader is None:
            if timer.expired():
                if not self.is_learner:
                    self._campaign(pre_vote=True)
                else:  # a learner never campaigns; it only stops naming a leader it lost
                    self.leader_id = NO_NODE
                    timer.reset()
            return
        leader.transfer_tick()
        if timer.elapsed_ticks >= self.config.election_ticks:
            timer.elapsed_ticks = 0
            if not leader.election_timeout():
                # Thesis 6.2: a leader that cannot hear a majority may have been replaced.
                self._become_follower(self.term, NO_NODE)
                return
        if leader.heartbeat_tick():
            self._broadcast_heartbeat()

    def propose(self, payload: bytes) -> int:
        """Append one client payload; returns its index. See `propose_batch`."""
        return self.propose_batch([payload])

    def next_index(self) -> int:
        """The index the next proposed entry gets (on a leader; a follower's log may change)."""
        return self.log.last_index + 1

    def propose_batch(
        self, payloads: list[bytes], *, first_index: int = 0, term: int = 0
    ) -> int:
        """Append client payloads as entries of the current term, in order.

        Args:
            payloads: the entries, opaque and non-empty (the daemon's stamped records).
            first_index: with `term`, the stamp: the index the caller already gave the first
                payload (one log: the sequencer stamps records before the core sees them). The
                core appends them only at exactly that index in exactly that term.
            term: the term the caller stamped them with (0: not stamped).

        Returns:
            The index of the first one (the rest follow consecutively). An entry is committed when
            it appears in a ready's `committed` with the same index and payload; a change of leader
            may discard it instead, and the client then retries.

        Raises:
            NotLeaderError: this node is not the leader.
            StampMismatch: the stamp is not (this term, `next_index()`).
            ProposalRejected: an empty payload (reserved for the no-op) or too many entries are
                waiting to commit.
        """
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        if self.raft_role is not LEADER:
            raise NotLeaderError(self.id, self.leader_id, self.term)
        if (first_index or term) and (
            first_index != self.log.last_index + 1 or term != self.term
        ):
            raise StampMismatch(term, first_index, self.term, self.log.last_index + 1)
        leader = self._leader
        assert leader is not None
        if leader.transfer_target:
            # Thesis 3.10: "The prior leader stops accepting new client requests."
            raise ProposalRejected(
                f"node {self.id} is handing leadership to node {leader.transfer_target}; retry at "
                "the new leader, or here after an election timeout if the transfer fails"
            )
        if not all(payloads):
            raise ProposalRejected(
                "an empty payload is reserved for the Raft no-op entry; send a non-empty payload"
            )
        log = self.log
        uncommitted = log.last_index - self.commit_index + len(payloads)
        if uncommitted > self.config.uncommitted_entries_max:
            raise ProposalRejected(
                f"{uncommitted} entries would be uncommitted > uncommitted_entries_max="
                f"{self.config.uncommitted_entries_max}: the cluster is not committing "
                "(no majority?); retry later"
            )
        first_index = log.last_index + 1
        log.append_run(self.term, payloads)
        return first_index

    def transfer_leadership(self, target: int) -> None:
        """Hand leadership to `target` (a rolling restart: move it off a node before stopping it).

        Thesis 3.10: the leader stops accepting proposals, brings the target's log up to date
        with normal replication, then sends it TimeoutNow: the target campaigns at once, with a
        real vote that voters grant even while they still hear from this leader. If no new
        leader appears within an election timeout, this leader takes proposals again.

        Raises:
            NotLeaderError: this node is not the leader.
            ValueError: `target` is not another voter.
        """
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        leader = self._leader
        if leader is None:
            raise NotLeaderError(self.id, self.leader_id, self.term)
        if target not in self.peers:
            raise ValueError(
                f"cannot hand leadership to node {target}: the other voters are {self.peers}"
            )
        leader.transfer_to(target)

    def compact(self, index: int, data: bytes) -> None:
        """Record the caller's snapshot of the state at `index` and drop the log up to it.

        The caller has already made `data` durable and may now delete its entries up to `index`.
        """
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        if not self.log.snapshot_index < index <= self.applied_index:
            raise ValueError(
                f"cannot compact to index {index}: it must be above the current snapshot "
                f"({self.log.snapshot_index}) and at most the applied index ({self.applied_index})"
            )
        term = self.log.term_at(index)
        assert term is not None, index
        self.log.compact(index)
        self.snapshot = Snapshot(index, term, data)

    def step(self, message: Message) -> None:
        """Handle one message from a peer."""
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        kind = type(message)
        if (
            message.cluster_id != self.cluster_id
            or message.target != self.id
            or message.source not in self._members
            or message.source == self.id
            # A learner never campaigns nor votes (thesis 4.2.1): an election message from or to
            # one is a misconfigured peer's; it must not move anyone's term or vote.
            or ((kind is RequestVote or kind is RequestVoteResponse)
                and (self.is_learner or message.source in self._learners))
        ):
            self.messages_dropped += 1
            return
        term = message.term
        if term > self.term:
            if kind is RequestVote:
                assert isinstance(message, RequestVote)
                if (
                    self.config.check_quorum
                    and not message.transfer
                    and self.leader_id != NO_NODE
                    and self._election_timer.elapsed_ticks < self.config.election_ticks
                ):
                    # Thesis 4.2.3: within the lease of a live leader, ignore would-be leaders.
                    return
                if not message.pre_vote:
                    self._become_follower(term, NO_NODE)
            elif kind is RequestVoteResponse:
                assert isinstance(message, RequestVoteResponse)
                if not (message.pre_vote and message.granted):
                    self._become_follower(term, NO_NODE)
            elif kind is AppendEntries or kind is Heartbeat or kind is InstallSnapshot:
                self._become_follower(term, message.source)
            else:
                self._become_follower(term, NO_NODE)
        elif term < self.term:
            if kind is AppendEntries or kind is Heartbeat or kind is InstallSnapshot:
                # Tell the stale leader about the newer term so it steps down.
                self._follower.answer(message.source, self.term, False, 0)
            elif kind is RequestVote:
                assert isinstance(message, RequestVote)
                if message.pre_vote:
                    self._send(RequestVoteResponse(self.cluster_id, self.id, message.source,
                                                   self.term, False, True))
            return

        if kind is AppendEntriesResponse:
            leader = self._leader
            if leader is not None:
                assert isinstance(message, AppendEntriesResponse)
                if leader.append_answered(message):
                    self._maybe_commit()
                    if message.source == leader.transfer_target:
                        leader.maybe_send_timeout_now()
        elif kind is AppendEntries:
            assert isinstance(message, AppendEntries)
            self._follow(message.source)
            self._handle_append(message)
        elif kind is HeartbeatResponse:
            leader = self._leader
            if leader is not None:
                assert isinstance(message, HeartbeatResponse)
                if leader.heartbeat_answered(message):
                    self._release_reads()
        elif kind is Heartbeat:
            assert isinstance(message, Heartbeat)
            self._follow(message.source)
            self.commit_index = self._follower.heartbeat(message, self.commit_index, self.term)
        elif kind is RequestVote:
            assert isinstance(message, RequestVote)
            self._handle_vote_request(message)
        elif kind is RequestVoteResponse:
            assert isinstance(message, RequestVoteResponse)
            self._handle_vote_response(message)
        elif kind is InstallSnapshot:
            assert isinstance(message, InstallSnapshot)
            self._follow(message.source)
            self._handle_install_snapshot(message)
        elif kind is TimeoutNow:
            # Thesis 3.10: "the same effect as the target server's election timer firing", with
            # no pre-vote: the leader asked, so this node's log is up to date.
            if (self.raft_role is FOLLOWER and message.source == self.leader_id
                    and not self.is_learner):
                self._campaign(pre_vote=False, transfer=True)
        elif kind is ReadIndexRequest:
            assert isinstance(message, ReadIndexRequest)
            self._handle_read_request(message)
        elif kind is ReadIndexResponse:
            assert isinstance(message, ReadIndexResponse)
            self._handle_read_response(message)
        else:
            raise AssertionError(f"unknown message type {kind.__name__}")

    # ------------------------------------------------------------------------ role changes

    def _become_follower(self, term: int, leader_id: int) -> None:
        assert term >= self.term, (term, self.term)
        if term > self.term:
            self._new_term(term)
            self.vote = NO_NODE
        self.raft_role = FOLLOWER
        self.leader_id = leader_id
        if self._leader is not None:
            self._stored_entries_sent_before += self._leader.stored_entries_sent
        self._leader = None
        self._term_start = None
        self._reads.drop_unconfirmed()
        self._election_timer.reset()

    def _follow(self, leader_id: int) -> None:
        """A message of the current term from its leader: follow it and restart the timer."""
        if self.raft_role is not FOLLOWER:
            # Election Safety makes a second leader in one term impossible.
            assert self.raft_role is not LEADER, (self.id, leader_id, self.term)
            self._become_follower(self.term, leader_id)
        self.leader_id = leader_id
        self._election_timer.elapsed_ticks = 0

    def _become_leader(self) -> None:
        assert self.raft_role is CANDIDATE, self.raft_role
        self.raft_role = LEADER
        self.leader_id = self.id
        self._election_timer.elapsed_ticks = 0
        self._leader = Leader(self.config, self.term, self.log, self.peers, self.quorum, self._send)
        # Section 8: a no-op entry of the new term lets the leader commit what earlier terms left.
        # The caller learns where it is from the next ready (`Ready.term_start`); with
        # `term_start_from_shell` the caller proposes it there itself (a TERM_START record).
        self._term_start = TermStart(self.term, self.log.last_index + 1)
        if not self.config.term_start_from_shell:
            self.log.append_run(self.term, [b""])

    # ------------------------------------------------------------------ follower replication

    def _handle_append(self, message: AppendEntries) -> None:
        self.commit_index, changed = self._follower.append(message, self.commit_index, self.term)
        if changed and changed < self._unstable_from:
            self._unstable_from = changed

    def _handle_install_snapshot(self, message: InstallSnapshot) -> None:
        snapshot = message.snapshot
        if self._follower.install_snapshot(message, self.commit_index, self.term):
            self.snapshot = snapshot
            self._pending_snapshot = snapshot
            self._unstable_from = snapshot.index + 1
        self.commit_index = max(self.commit_index, snapshot.index)

    # ------------------------------------------------------------------------- leading

    def _maybe_commit(self) -> None:
        leader = self._leader
        assert leader is not None
        index = leader.tracker.committed_index(self.stable_index)
        if index <= self.commit_index:
            return
        # 5.4.2: "Raft never commits log entries from previous terms by counting replicas. Only
        # log entries from the leader's current term are committed by counting replicas."
        if self.log.term_at(index) != self.term:
            return
        first_in_term = self.log.term_at(self.commit_index) != self.term
        self.commit_index = index
        if first_in_term and self._reads.waiting:
            self._start_reads(self._reads.take_waiting())

    def _release_reads(self) -> None:
        leader = self._leader
        assert leader is not None
        reads = self._reads
        if reads.has_pending():
            reads.confirm(leader.tracker.confirmed_read_sequence(reads.sequence), self.id)
            self._send_confirmed_reads()

    def _broadcast_heartbeat(self) -> None:
        leader = self._leader
        assert leader is not None
        leader.broadcast_heartbeat(self.commit_index, self._reads.sequence)

    def _send(self, message: Message) -> None:
        self._messages.append(message)
        kind = type(message)
        if kind is AppendEntries:
            self.appends_sent += 1
            if not message.terms:  # type: ignore[attr-defined]
                self.empty_appends_sent += 1
                if message.notice:  # type: ignore[attr-defined]
                    self.commit_notices_sent += 1
        elif kind is AppendEntriesResponse:
            self.append_answers_sent += 1

    def send_commit_notices(self) -> None:
        """On a leader: send the commit index it holds back (`RaftConfig.defer_commit_notices`)
        to every follower that lacks it, in the next ready. The caller's bound on how long a
        follower waits for a commit with no entries to ride on; no-op elsewhere."""
        assert self._ready_outstanding is None, "advance() the outstanding ready first"
        if self._leader is not None:
            self._leader.send_commit_notices(self.commit_index)

    def commit_notices_held(self) -> bool:
        """Whether a leader holds its commit index back from a follower with no entries due: the
        caller then calls `send_commit_notices` within its bound (a query)."""
        leader = self._leader
        return leader is not None and leader.commit_notices_held(self.commit_index)

    @property
    def notices_unanswered(self) -> int:
        """Commit notices this node, following, left unanswered (an operating counter)."""
        return self._follower.notices_unanswered

    # ------------------------------------------------------------------------- inspection

    def durable_state(self) -> DurableState:
        """What a caller that persisted every ready holds (for tests and the benchmark)."""
        log = self.log
        terms: list[int] = []
        payloads: list[bytes] = []
        index = log.snapshot_index + 1
        while index <= log.last_index:
            more_terms, more_payloads = log.read(index, log.last_index + 1,
                                                 self.config.storage_read_bytes_max)
            terms.extend(more_terms)
            payloads.extend(more_payloads)
            index += len(more_terms)
        return DurableState(HardState(self.term, self.vote, self.commit_index), self.snapshot,
                            terms, payloads)

    def match_index(self, peer: int) -> int:
        """On a leader: the last index `peer` holds durably in agreement with it; 0 elsewhere."""
        leader = self._leader
        if leader is None:
            return 0
        return leader.tracker.progress[peer].match_index

    def inflight_bytes_peak(self, peer: int) -> int:
        """On a leader: the most payload bytes `peer` had unanswered at once; 0 elsewhere."""
        leader = self._leader
        return 0 if leader is None else leader.tracker.progress[peer].inflight_bytes_peak

    @property
    def stored_entries_sent(self) -> int:
        """Entries in AppendEntries this node sent as leader, in every term since it started,
        that it read back from its `LogStorage` (dropped from memory: a follower behind the
        retention window), resends included: not a count of distinct entries."""
        leader = self._leader
        return self._stored_entries_sent_before + (0 if leader is None else leader.stored_entries_sent)

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index` (from storage if dropped from memory), or None."""
        return self.log.term_at(index)
