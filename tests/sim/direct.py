"""A step-by-step cluster for unit tests: messages move only when the test says so.

Where `Simulation` runs time and faults at random, `DirectCluster` is the etcd-io/raft
interaction-test style: `tick`, `process` (drain readies into an outbox), `deliver` (with a filter
that drops messages), `stabilize`. The same checks run on every ready.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from sequencer.raft import (
    DurableState,
    HardState,
    Message,
    RaftConfig,
    RaftCore,
    RaftRole,
)
from tests.sim.checks import Checker, check_nothing_ready, check_persisted_before_send

__all__ = ["DirectCluster"]

STABILIZE_ROUNDS_MAX = 1000  # a quiet cluster settles in a few rounds; more means a livelock


class DiskStorage:
    """The `LogStorage` of a node whose disk is a `DurableState` (entries after its snapshot)."""

    def __init__(self, disk: DurableState) -> None:
        self.disk = disk
        self.reads = 0  # entries read back, for assertions
        self.term_reads = 0  # terms asked for one by one, for assertions

    def _base(self) -> int:
        return self.disk.snapshot.index if self.disk.snapshot is not None else 0

    def term(self, index: int) -> int | None:
        self.term_reads += 1
        offset = index - self._base()
        if offset <= 0 or offset > len(self.disk.terms):
            return None
        return self.disk.terms[offset - 1]

    def entries(
        self, first_index: int, last_index: int, bytes_max: int
    ) -> tuple[list[int], list[bytes]]:
        low = first_index - self._base() - 1
        high = last_index - self._base()
        assert 0 <= low < high <= len(self.disk.terms), (first_index, last_index)
        end = low
        total_bytes = 0
        while end < high and total_bytes < bytes_max:
            total_bytes += len(self.disk.payloads[end])
            end += 1
        self.reads += end - low
        return self.disk.terms[low:end], self.disk.payloads[low:end]


class DirectCluster:
    def __init__(
        self, node_count: int = 3, *, seed: int = 0, durable: dict[int, DurableState] | None = None,
        **config: int,
    ) -> None:
        self.ids = tuple(range(1, node_count + 1))
        self.rng = random.Random(seed)
        self.config = config
        self.checker = Checker(unique_payloads=False)
        self.cores: dict[int, RaftCore] = {}
        self.disks: dict[int, DurableState] = {}
        self.applied: dict[int, list[bytes]] = {}
        self.outbox: list[Message] = []
        self.blocked: set[tuple[int, int]] = set()
        self.sent: list[Message] = []  # every message ever sent, for assertions
        # With a retention window configured, each core reads what it dropped from its disk.
        self.storages: dict[int, DiskStorage] = {}
        for node_id in self.ids:
            self.disks[node_id] = (durable or {}).get(node_id) or DurableState(HardState(0, 0, 0))
            self.start(node_id)

    def start(self, node_id: int) -> None:
        disk = self.disks[node_id]
        config = RaftConfig(node_id, self.ids, **self.config)  # type: ignore[arg-type]
        durable = DurableState(disk.hard_state, disk.snapshot, list(disk.terms),
                               list(disk.payloads))
        storage = None
        if "log_retention_entries" in self.config:
            storage = self.storages[node_id] = DiskStorage(disk)
        self.cores[node_id] = RaftCore(config, random.Random(self.rng.getrandbits(32)), durable,
                                       storage)
        self.applied[node_id] = []

    def crash(self, node_id: int) -> None:
        del self.cores[node_id]

    def restart(self, node_id: int) -> None:
        self.start(node_id)

    def core(self, node_id: int) -> RaftCore:
        return self.cores[node_id]

    def leader(self) -> int | None:
        leaders = [n for n, c in self.cores.items() if c.raft_role == RaftRole.LEADER]
        return max(leaders, key=lambda n: self.cores[n].term) if leaders else None

    def process(self, node_id: int | None = None) -> None:
        for nid in [node_id] if node_id is not None else list(self.cores):
            core = self.cores.get(nid)
            if core is None:
                continue
            while core.has_ready():
                ready = core.ready()
                disk = self.disks[nid]
                if ready.entries is not None:
                    previous = core.log.term_at(ready.entries.first_index - 1)
                    self.checker.check_written(nid, previous, ready.entries)
                if ready.snapshot is not None:
                    disk.snapshot = ready.snapshot
                    disk.terms, disk.payloads = [], []
                    self.applied[nid] = [b"?"] * ready.snapshot.index
                if ready.entries is not None:
                    entries = ready.entries
                    base = disk.snapshot.index if disk.snapshot is not None else 0
                    keep = entries.first_index - 1 - base
                    del disk.terms[keep:]
                    del disk.payloads[keep:]
                    disk.terms.extend(entries.terms)
                    disk.payloads.extend(entries.payloads)
                if ready.hard_state is not None:
                    disk.hard_state = ready.hard_state
                base = disk.snapshot.index if disk.snapshot is not None else 0
                for message in ready.messages:
                    check_persisted_before_send(message, disk.hard_state.term,
                                                disk.hard_state.vote, base + len(disk.terms))
                    self.sent.append(message)
                    self.outbox.append(message)
                if ready.committed is not None:
                    for index, term, payload in ready.committed.items():
                        self.checker.check_applied(nid, index, term, payload)
                        self.applied[nid].append(payload)
                        assert len(self.applied[nid]) == index, (nid, index)
                before = core.commit_index
                core.advance(ready)
                self.checker.check_commit(nid, before, core.commit_index)
                if core.raft_role == RaftRole.LEADER:
                    self.checker.check_leader(nid, core.term)
            check_nothing_ready(core)

    def deliver(self, drop: Callable[[Message], bool] | None = None) -> int:
        """Deliver every queued message once (unless blocked or `drop` says so)."""
        outbox, self.outbox = self.outbox, []
        delivered = 0
        for message in outbox:
            core = self.cores.get(message.target)
            if core is None or (message.source, message.target) in self.blocked:
                continue
            if drop is not None and drop(message):
                continue
            core.step(message)
            delivered += 1
        return delivered

    def stabilize(self) -> None:
        for _ in range(STABILIZE_ROUNDS_MAX):
            self.process()
            if not self.outbox:
                return
            self.deliver()
        raise AssertionError("the cluster did not settle: messages keep flowing")

    def tick(self, node_id: int | None = None, count: int = 1) -> None:
        for _ in range(count):
            for nid in [node_id] if node_id is not None else list(self.cores):
                if nid in self.cores:
                    self.cores[nid].tick()

    def elect(self, node_id: int) -> None:
        """Let `node_id`'s election timer fire and the cluster settle; it must win."""
        core = self.cores[node_id]
        while core.raft_role == RaftRole.FOLLOWER:
            core.tick()
        self.stabilize()
        assert core.raft_role == RaftRole.LEADER, (node_id, core.raft_role)

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.blocked.add((node_id, other))
                self.blocked.add((other, node_id))

    def heal(self) -> None:
        self.blocked.clear()
