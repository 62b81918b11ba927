"""A deterministic simulator that runs a whole Raft cluster in one process.

One `random.Random(seed)` drives everything: the network (per-link delay, loss, duplication and
the reordering that random delays cause; partitions of every shape), the disks (a crash loses the
ready being persisted and may tear it: a prefix of its entries reaches the disk), the clocks (each
node ticks at its own drifting rate; pauses stop a node while messages queue for it), the clients
(proposals and linearizable reads) and the seeds of each core's election timer. Nothing reads the
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
from dataclasses import dataclass, field

import msgspec

from sequencer.raft import (
    MESSAGE_DECODER,
    DurableState,
    HardState,
    Message,
    NotLeaderError,
    ProposalRejected,
    RaftConfig,
    RaftCore,
    RaftRole,
    Ready,
    Snapshot,
)
from tests.sim.checks import (
    Checker,
    SafetyViolation,
    check_nothing_ready,
    check_persisted_before_send,
)

__all__ = ["LivenessFailure", "NetworkProfile", "SimNode", "Simulation"]

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
class Disk:
    """What survives a crash: the hard state, the snapshot and the entries after it."""

    hard_state: HardState = field(default_factory=lambda: HardState(0, 0, 0))
    snapshot: Snapshot | None = None
    terms: list[int] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.index if self.snapshot is not None else 0

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.terms)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.terms = []
        self.payloads = []

    def write_entries(self, first_index: int, terms: list[int], payloads: list[bytes]) -> None:
        keep = first_index - 1 - self.snapshot_index
        assert 0 <= keep <= len(self.terms), (first_index, self.snapshot_index, len(self.terms))
        del self.terms[keep:]
        del self.payloads[keep:]
        self.terms.extend(terms)
        self.payloads.extend(payloads)

    def compact(self, snapshot: Snapshot) -> None:
        drop = snapshot.index - self.snapshot_index
        assert 0 < drop <= len(self.terms), (snapshot.index, self.snapshot_index)
        del self.terms[:drop]
        del self.payloads[:drop]
        self.snapshot = snapshot


class SimNode:
    def __init__(self, node_id: int, tick_us: int) -> None:
        self.id = node_id
        self.core: RaftCore | None = None
        self.disk = Disk()
        self.applied: list[bytes] = []  # the state machine: payloads by index - 1
        self.tick_us = tick_us
        self.paused_until_us = 0
        self.incarnation = 0
        self.crash_at_next_ready = False
        self.commit_seen = 0
        self.role_seen = RaftRole.FOLLOWER
        self.compact_every_entries = 0  # 0: never compact


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
        rng: random.Random | None = None,
    ) -> None:
        self.seed = seed
        self.rng = rng if rng is not None else random.Random(seed)
        self.now_us = 0
        self.network = network or NetworkProfile()
        self.checker = Checker()
        self._events: list[tuple[int, int, int, object]] = []
        self._sequence = 0
        self._hash = hashlib.blake2b(digest_size=16)
        self.trace: deque[str] = deque(maxlen=TRACE_LINES_MAX)
        self.trace_all = False
        self.ids = tuple(range(1, node_count + 1))
        self.blocked: set[tuple[int, int]] = set()
        self.election_ticks = election_ticks
        self.entries_per_message_max = entries_per_message_max
        self.inflight_messages_max = inflight_messages_max
        self.nodes: dict[int, SimNode] = {}
        for node_id in self.ids:
            skew = 1.0 + self.rng.uniform(-drift, drift)
            node = SimNode(node_id, int(TICK_US * skew))
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
        config = RaftConfig(
            node.id,
            self.ids,
            cluster_id=7,
            election_ticks=self.election_ticks,
            entries_per_message_max=self.entries_per_message_max,
            inflight_messages_max=self.inflight_messages_max,
        )
        durable = DurableState(disk.hard_state, disk.snapshot, list(disk.terms),
                               list(disk.payloads))
        node.core = RaftCore(config, random.Random(self.rng.getrandbits(64)), durable)
        node.applied = (
            list(STATE_DECODER.decode(disk.snapshot.data)) if disk.snapshot is not None else []
        )
        node.incarnation += 1
        node.crash_at_next_ready = False
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
        node.core.step(message)
        self._drain(node)

    def _send(self, message: Message) -> None:
        self.messages_sent += 1
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
        """Do every ready the node has, as the replication role would: persist, send, apply."""
        core = node.core
        assert core is not None
        while core.has_ready():
            ready = core.ready()
            if ready.entries is not None:
                previous_term = core.log.term_at(ready.entries.first_index - 1)
                self.checker.check_written(node.id, previous_term, ready.entries)
            if node.crash_at_next_ready:
                self._persist_torn(node, ready)
                self._crash_now(node, "torn")
                return
            self._persist(node.disk, ready)
            disk = node.disk
            durable_term, durable_vote = disk.hard_state.term, disk.hard_state.vote
            durable_last = disk.last_index
            for message in ready.messages:
                check_persisted_before_send(message, durable_term, durable_vote, durable_last)
                self._send(message)
            self._apply(node, ready)
            core.advance(ready)
            self._check_node(node)
        check_nothing_ready(core)
        self._check_node(node)
        if node.compact_every_entries and (
            core.applied_index - core.log.snapshot_index >= node.compact_every_entries
        ):
            data = STATE_ENCODER.encode(node.applied)
            index = core.applied_index
            core.compact(index, data)
            assert core.snapshot is not None
            node.disk.compact(core.snapshot)
            self._record(f"compact n{node.id} to {index}")

    @staticmethod
    def _persist(disk: Disk, ready: Ready) -> None:
        if ready.snapshot is not None:
            disk.write_snapshot(ready.snapshot)
        if ready.entries is not None:
            entries = ready.entries
            disk.write_entries(entries.first_index, entries.terms, entries.payloads)
        if ready.hard_state is not None:
            disk.hard_state = ready.hard_state

    def _persist_torn(self, node: SimNode, ready: Ready) -> None:
        """A crash during persistence: the writes so far reach the disk, the last one torn."""
        disk = node.disk
        rng = self.rng
        if ready.snapshot is not None:
            if rng.random() < 0.5:
                return
            disk.write_snapshot(ready.snapshot)
        if ready.entries is not None:
            entries = ready.entries
            kept = rng.randint(0, len(entries))
            disk.write_entries(entries.first_index, entries.terms[:kept], entries.payloads[:kept])
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
        if role != node.role_seen:
            self._record(f"role n{node.id} {role.name} term={core.term}")
            if role == RaftRole.LEADER:
                checker.check_leader(node.id, core.term)
                checker.check_new_leader_log(core)
            node.role_seen = role

    # ------------------------------------------------------------------------- faults

    def crash(self, node_id: int, *, torn: bool = False) -> None:
        """Crash a node now, or (torn) in the middle of persisting its next ready."""
        node = self.nodes[node_id]
        if node.core is None:
            return
        if torn:
            node.crash_at_next_ready = True
            self._record(f"crash-armed n{node_id}")
        else:
            self._crash_now(node, "clean")

    def _crash_now(self, node: SimNode, how: str) -> None:
        node.core = None
        node.crash_at_next_ready = False
        self._record(f"crash n{node.id} {how}")

    def restart(self, node_id: int) -> None:
        """Start a crashed node from its disk (a live node only loses an armed torn crash)."""
        node = self.nodes[node_id]
        if node.core is not None:
            node.crash_at_next_ready = False
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
