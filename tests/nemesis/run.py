"""The nemesis: a real cluster, a recorded ledger workload, a seeded fault schedule, the checker.

    result = run_nemesis(seed=7, duration_s=30, nodes=3, directory=Path("/tmp/nem7"))
    print(result.summary()); assert result.ok

Theory of operation. `Cluster` (daemon/cluster_harness.py) runs the nodes on loopback with a
fault-proxy link on every directed peer link. Every node starts with the fault hooks set
(`daemon.fault_hooks`, `SEQD_FAULT_DISK_BYTES`), each naming a file in the node's directory that
does not exist yet: the hooks are inert until a fault writes its file. `LedgerWorkload`
(tests/cluster_workload.py) runs one recording client per node in its own process, each writing
its history as JSON lines. The schedule (`schedule.make_schedule`) is applied one fault at a
time: apply, hold, heal. At the end everything is healed (the network, paused and killed nodes,
every hook file), the run waits until all nodes agree on a leader and every client has
progressed again, stops the clients (each takes every reply still due), waits until the nodes
converge, stops them (SIGTERM), and judges: `seqd log check` on every journal, then the checker
over every history and every node's journal and snapshots.

A power cut kills every node at once and then, on each, drops the journal's records after the
index its journaller last reported fdatasynced (SEQD_FAULT_SYNCED_INDEX, written after each
fdatasync and before the index is published): what a lost page cache loses. A kill -9 alone loses
nothing the journaller wrote (the page cache survives the process), so this is the fault that
tells an fdatasync apart from a write.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from daemon.cluster_harness import Cluster, ClusterError
from daemon.fault_hooks import (
    FAULT_CLOCK_OFFSET_ENV,
    FAULT_DROP_COMMAND_FORWARD_ENV,
    FAULT_FSYNC_DELAY_ENV,
    FAULT_MALFORM_COMMAND_PROPOSAL_ENV,
    FAULT_SYNCED_INDEX_ENV,
    synced_index,
)
from daemon.harness import NodeError
from daemon.incarnation import INCARNATION_NAME, RAFT_INCARNATION_NAME
from daemon.layout import INCARNATION_BITS, Role
from ipc.segment import SegmentError
from sequencer import logtools
from sequencer.history import Report, check_files, read_history
from sequencer.journal import FAULT_DISK_BYTES_ENV, Journal, JournalError, read_records
from sequencer.record import (
    ADMIN_NODE_START,
    RecordType,
    decode_admin,
    session_incarnation,
    session_node_number,
)
from tests.cluster_workload import LedgerWorkload, open_accounts

from .schedule import BURST_GAP_S, PROPOSAL_FAULTS, WARM_UP_S, Fault, make_schedule

__all__ = ["NemesisResult", "run_nemesis"]

# The config's defaults (docs/cluster.md): what a user runs.
TIMEOUTS: Final = {"tick_ms": 10, "heartbeat_ms": 50, "election_timeout_ms": 300}
# Small segments so that runs roll segments too (batch_bytes_max must be at most half of one).
# No preallocation: a preallocated segment takes writes until it is full whatever the disk's
# free space, so a full disk would bite only at a segment's roll, seconds of traffic away; without
# it every append grows the file and meets the full disk at once.
SETTINGS: Final = {"journal": {"segment_bytes": 4 << 20, "batch_bytes_max": 1 << 20, "preallocate": False}}
# Acknowledgements every client must get before the first fault (a client process takes seconds
# to start on a loaded machine: a fault before its traffic tests nothing), and after the heal:
# proof the cluster is live again.
ACKS_BEFORE_FAULTS: Final = 10
ACKS_AFTER_HEAL: Final = 20
# After the heal: a leader, then every client's progress, within these (a hang is a violation of
# liveness worth reporting, not a wait to extend).
HEAL_LEADER_TIMEOUT_S: Final = 60.0
HEAL_PROGRESS_TIMEOUT_S: Final = 120.0
# A node restarted by a heal serves within seconds; a fault aimed at one of its roles waits this
# long for it, then is skipped (and reported).
SERVING_TIMEOUT_S: Final = 30.0
# How long a proposal_fault's heal waits for its hook to fire (the pipeline's restart, then the
# N-th command: seconds on a loaded machine); then it disarms the hook and says it did not fire.
PROPOSAL_FAULT_WAIT_S: Final = 20.0
LOSS_RESET_S: Final = (0.05, 0.3)  # a lossy link's connections reset every so often
_HOOK_FILES: Final = {FAULT_FSYNC_DELAY_ENV: "fault.fsync_delay_ms", FAULT_CLOCK_OFFSET_ENV: "fault.clock_offset_ms",
                      FAULT_SYNCED_INDEX_ENV: "fault.synced_index", FAULT_DISK_BYTES_ENV: "fault.disk_bytes",
                      FAULT_MALFORM_COMMAND_PROPOSAL_ENV: "fault.malform_proposal",
                      FAULT_DROP_COMMAND_FORWARD_ENV: "fault.drop_forward"}  # fmt: skip
# proposal_fault's variants (schedule.PROPOSAL_FAULTS): the hook, and whom it is aimed at.
# (The leader's refusal of a forwarded batch, SEQD_FAULT_REFUSE_COMMAND_FORWARDS, is not one: its
# hook is read when the replicator starts, and a leader's replicator restarted to read it is
# seldom the leader again when the batches come: 0 of 1 fired in a trial.)
_PROPOSAL_FAULTS: Final = ((FAULT_MALFORM_COMMAND_PROPOSAL_ENV, "node"), (FAULT_DROP_COMMAND_FORWARD_ENV, "follower"))
assert [env.removeprefix("SEQD_FAULT_").lower() for env, _ in _PROPOSAL_FAULTS] == list(PROPOSAL_FAULTS)


@dataclass
class NemesisResult:
    seed: int
    nodes: int
    duration_s: float
    directory: Path
    faults: list[Fault]
    applied: Counter[str] = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)  # faults that could not be applied, and why
    # What the faults were seen to do (a fault kind's proof that it exercised what it aims at).
    evidence: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # liveness failures, log check failures
    report: Report | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.report is not None and self.report.ok

    def violations(self) -> list[str]:
        found = [str(violation) for violation in self.report.violations] if self.report is not None else []
        return found + self.problems

    def summary(self) -> str:
        head = (f"nemesis seed {self.seed}: {self.nodes} nodes, {self.elapsed_s:.1f} s, faults "
                f"{dict(sorted(self.applied.items()))}")  # fmt: skip
        if self.report is not None:
            head += f"; operations {self.report.operations}; journals {self.report.records}"
        verdict = "no violation" if self.ok else f"{len(self.violations())} VIOLATIONS"
        lines = [head, f"  verdict: {verdict}"]
        if self.evidence:
            lines.append(f"  evidence {dict(sorted(self.evidence.items()))}")
        lines += [f"  skipped {text}" for text in self.skipped]
        lines += ["  " + text.replace("\n", "\n  ") for text in self.violations()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "nodes": self.nodes, "duration_s": self.duration_s,
            "elapsed_s": round(self.elapsed_s, 2), "ok": self.ok,
            "faults": [fault.to_json() for fault in self.faults], "applied": dict(self.applied),
            "evidence": dict(self.evidence),
            "skipped": self.skipped, "violations": self.violations(),
            "kinds": dict(Counter(v.kind for v in self.report.violations)) if self.report else {},
            "operations": self.report.operations if self.report else {},
        }  # fmt: skip


class Nemesis:
    """Applies and heals faults on a running cluster (one at a time)."""

    def __init__(self, cluster: Cluster, seed: int, log: Callable[[str], None],
                 evidence: Counter[str] | None = None) -> None:  # fmt: skip
        self.cluster = cluster
        self.evidence: Counter[str] = Counter() if evidence is None else evidence
        self.log = log
        self.seed = seed
        self.hooks = {number: {env: node.directory / name for env, name in _HOOK_FILES.items()}
                      for number, node in cluster.nodes.items()}  # fmt: skip
        self.down: set[int] = set()  # killed, to restart at the heal
        self.armed: list[Path] = []  # the hook files the fault in progress wrote (`_arm`)
        self.burst_starts: set[tuple[int, int]] = set()  # (node, session incarnation) of a burst's starts

    def environment(self, number: int) -> dict[str, str]:
        return {env: str(path) for env, path in self.hooks[number].items()}

    def start(self, number: int) -> None:
        node = self.cluster[number]
        node.remove_shared_memory()  # a killed node's segments are stale
        node.start(wait=False, environment=self.environment(number))
        self.down.discard(number)

    def leader(self) -> int:
        return self.cluster.wait_leader(timeout_s=HEAL_LEADER_TIMEOUT_S).number

    def apply(self, fault: Fault) -> Callable[[], None]:
        """Apply `fault`; returns its heal. Raises NodeError/ClusterError when it cannot apply.

        Every hook the fault arms (`_arm`) is disarmed when its heal ends, whether the heal
        finished or raised, and at once when the fault fails halfway (a clock stepped back on a
        node whose kill or restart then failed): a fault skipped or half healed must not leave
        a node slow, behind or breaking proposals for the rest of the run."""
        self.armed = []
        try:
            heal = self._apply(fault)
        except BaseException:
            self._disarm()
            raise

        def heal_and_disarm() -> None:
            try:
                heal()
            finally:
                self._disarm()

        return heal_and_disarm

    def _disarm(self) -> None:
        armed, self.armed = self.armed, []
        for path in armed:
            path.unlink(missing_ok=True)  # an absent hook file is 0: inert (daemon/fault_hooks.py)

    def _apply(self, fault: Fault) -> Callable[[], None]:
        cluster, network = self.cluster, self.cluster.network
        assert network is not None
        kind = fault.kind
        if kind == "kill_node":
            cluster.kill(fault.node)
            self.down.add(fault.node)
            return lambda: self.start(fault.node)
        if kind == "kill_leader":
            leader = self.leader()
            cluster.kill(leader)
            self.down.add(leader)
            return lambda: self._note_leader_change(leader)
        if kind == "restart_clock_back":
            return self._restart_clock_back(fault)
        if kind == "restart_burst":
            return self._restart_burst(fault)
        if kind == "proposal_fault":
            return self._proposal_fault(fault)
        if kind == "kill_role":
            if not cluster[fault.node].running:
                raise NodeError(f"node {fault.node} is not running")
            # A node restarted by the last heal may still be starting (no counters yet).
            cluster[fault.node].wait_serving(timeout_s=SERVING_TIMEOUT_S)
            cluster.kill_role(fault.node, Role(fault.role))
            return lambda: None
        if kind == "pause":
            cluster.pause(fault.node)
            return lambda: cluster.resume(fault.node)
        if kind == "partition":
            network.partition(*fault.groups)
            return network.heal
        if kind == "isolate_leader":
            network.isolate(self.leader())
            return network.heal
        if kind == "bridge":
            first, second, _bridge = fault.groups
            for a in first:
                for b in second:
                    network.cut(a, b)
                    network.cut(b, a)
            return network.heal
        if kind == "one_way":
            for other in cluster.nodes:
                if other != fault.node:
                    network.cut(fault.node, other)
            return network.heal
        if kind == "delay":
            for (source, target), link in network.links.items():
                if fault.node in (source, target):
                    link.delay(fault.amount)
            return network.heal
        if kind == "slow_disk":
            self._arm(fault.node, FAULT_FSYNC_DELAY_ENV, fault.amount)
            return lambda: None
        if kind == "disk_full":
            follower = self._follower(fault)
            self._arm(follower, FAULT_DISK_BYTES_ENV, 0)
            return lambda: None
        if kind == "clock_back":
            leader = self.leader()
            self._arm(leader, FAULT_CLOCK_OFFSET_ENV, -fault.amount)
            return lambda: None
        if kind == "power_cut":
            # The cut lands while every disk is slow (fdatasync delayed `amount` ms): each node
            # then holds written, unsynced records, which a correct node never acknowledged.
            numbers = [n for n, node in cluster.nodes.items() if node.running]
            for number in numbers:
                self._arm(number, FAULT_FSYNC_DELAY_ENV, fault.amount)
            time.sleep(3 * fault.amount / 1000)
            cluster.kill(numbers)
            self.down.update(numbers)
            for number in numbers:
                self._lose_unsynced(number)
            return lambda: self._restart(numbers)
        if kind == "wipe":
            if cluster[fault.node].running:
                cluster.kill(fault.node)
            self.down.add(fault.node)
            cluster[fault.node].wipe_data()
            return lambda: self.start(fault.node)
        if kind == "loss":
            return lambda: None  # applied while held: see `hold`
        raise ValueError(f"unknown fault kind {kind!r}")

    def hold(self, fault: Fault, until: float) -> None:
        """Wait out the fault; a lossy link resets its connections meanwhile."""
        assert self.cluster.network is not None
        rng = random.Random(self.seed * 1_000_003 + fault.number)
        links = [link for (s, t), link in sorted(self.cluster.network.links.items()) if fault.node in (s, t)]
        while (left := until - time.monotonic()) > 0:
            if fault.kind != "loss":
                time.sleep(left)
                return
            rng.choice(links).reset()
            time.sleep(min(left, rng.uniform(*LOSS_RESET_S)))

    def heal_all(self) -> None:
        """Everything back: the network, paused and killed nodes, every hook file."""
        assert self.cluster.network is not None
        self.cluster.network.heal()
        for number, node in self.cluster.nodes.items():
            for env, path in self.hooks[number].items():
                if env != FAULT_SYNCED_INDEX_ENV:
                    path.unlink(missing_ok=True)
            if node.paused:
                node.resume()
            if not node.running:
                self.start(number)

    def _proposal_fault(self, fault: Fault) -> Callable[[], None]:
        """Arm one of the proposal hooks with `fault.amount` (the N-th command is hit) and restart
        the target's pipeline (kill -9 of its replicator) so its next replicator reads it: a
        malformed proposal (any node: fail-stop, its clients resend) or a follower's forward
        dropped as a full socket drops one (the gapless stream's resend). The heal waits for it
        to fire (bounded), disarms it and notes whether it fired."""
        env, target = _PROPOSAL_FAULTS[fault.pick % len(_PROPOSAL_FAULTS)]
        number = fault.node if target == "node" else self._follower(fault)
        if not self.cluster[number].running:
            raise NodeError(f"node {number} is not running")
        self.cluster[number].wait_serving(timeout_s=SERVING_TIMEOUT_S)
        path = self.hooks[number][env]
        fired = path.with_name(path.name + ".lost")
        fired.unlink(missing_ok=True)  # re-arms the malformed proposal's once-per-node
        self._arm(number, env, fault.amount)
        self.cluster.kill_role(number, Role.REPLICATOR)
        name = env.removeprefix("SEQD_FAULT_").lower()

        def heal() -> None:
            # The restarted pipeline may take seconds to start and to see its N-th command here.
            deadline = time.monotonic() + PROPOSAL_FAULT_WAIT_S
            while not fired.exists() and time.monotonic() < deadline and self.cluster[number].running:
                time.sleep(0.05)
            # Disarmed as the heal ends (`apply`): later starts are not armed (this one stays,
            # until it fires).
            self.evidence[f"proposal_fault: {name} {'fired' if fired.exists() else 'armed, not fired'}"] += 1

        return heal

    def _note_leader_change(self, killed: int) -> None:
        """The heal of kill_leader: note whether another node led meanwhile, restart the killed one."""
        views = [view for number, view in self.cluster.views().items() if number != killed and view is not None]
        if any(view.leader not in (None, 0, killed) for view in views):
            self.evidence["kill_leader: another node led before the heal"] += 1
        self.start(killed)

    def _restart_clock_back(self, fault: Fault) -> Callable[[], None]:
        """Step the node's clock back, kill -9 it and restart it; its heal waits until it serves,
        notes whether its start ids went up from the recorded ones although the clock was behind
        them, and puts the clock right."""
        number = fault.node
        before = self._start_ids(number)
        self._arm(number, FAULT_CLOCK_OFFSET_ENV, -fault.amount)
        self.cluster.kill(number)
        self.start(number)

        def heal() -> None:
            try:
                self.cluster[number].wait_serving(timeout_s=SERVING_TIMEOUT_S)
            except NodeError as error:
                self.log(f"  restart_clock_back: node {number} not serving, start ids not checked: "
                         f"{str(error).splitlines()[0]}")  # fmt: skip
            else:
                self._note_start_ids(number, before, "restart_clock_back")

        return heal

    def _restart_burst(self, fault: Fault) -> Callable[[], None]:
        """kill -9 and restart the node `fault.amount` times: each start is killed BURST_GAP_S
        after it serves (its node_start written, on its way to the leader or committed, its
        clients reconnecting and resending), so the node_starts and opens of several starts
        interleave (a kill during the recovery or the roles' start, before the node_start, would
        test nothing new: in seeds 6100-6200, 6 of 20 such starts had it in the log); its heal
        waits until it serves and notes how many starts took a start id."""
        number = fault.node
        rng = random.Random(self.seed * 1_000_003 + fault.number)
        before = self._start_ids(number)
        for restart in range(fault.amount):
            if restart:
                with contextlib.suppress(NodeError):  # not serving in time: kill it where it is
                    self.cluster[number].wait_serving(timeout_s=SERVING_TIMEOUT_S)
                time.sleep(rng.uniform(*BURST_GAP_S))
            self.cluster.kill(number)
            self.start(number)
            self.evidence["restart_burst: kill -9 and restart"] += 1

        def heal() -> None:
            try:
                self.cluster[number].wait_serving(timeout_s=SERVING_TIMEOUT_S)
            except NodeError as error:
                self.log(f"  restart_burst: node {number} not serving: {str(error).splitlines()[0]}")
            else:
                self._note_start_ids(number, before, "restart_burst")
                sessions, sessions_before = self._start_ids(number)[0], before[0]
                if sessions and sessions_before:
                    taken = (sessions[0] - sessions_before[0]) % (1 << INCARNATION_BITS)
                    self.burst_starts.update((number, (sessions[0] - k) % (1 << INCARNATION_BITS)) for k in range(taken))

        return heal

    def note_burst_starts_in_log(self, journal_dir: Path) -> None:
        """Evidence from a journal that the bursts' starts reached the log: how many of them had
        their node_start committed, and how many opened a client session (so node_starts and
        opens of starts killed moments later were sequenced and applied)."""
        if not self.burst_starts:
            return
        started: set[tuple[int, int]] = set()
        opened: set[tuple[int, int]] = set()
        try:
            for record in read_records(journal_dir):
                if record.type == RecordType.ADMIN:
                    admin = decode_admin(record.payload)
                    if admin["op"] == ADMIN_NODE_START and "incarnation" in admin:
                        started.add((admin["number"], admin["incarnation"]))
                elif record.type == RecordType.SESSION_OPEN:
                    opened.add((session_node_number(record.session_id), session_incarnation(record.session_id)))
        except JournalError as error:  # its start went with retention: `seqd log check` judges it
            self.log(f"  no burst evidence from {journal_dir}: {error}")
            return
        self.evidence["restart_burst: starts whose node_start is in the log"] += len(self.burst_starts & started)
        self.evidence["restart_burst: starts that opened a session"] += len(self.burst_starts & opened)

    def _start_ids(self, number: int) -> tuple[list[int], int | None]:
        """The node's recorded start ids: its last session incarnations (newest first) and its
        last Raft incarnation (daemon/incarnation.py); empty/None when not recorded yet."""
        data_dir = Path(self.cluster[number].config.node.data_dir)
        ids = []
        for name in (INCARNATION_NAME, RAFT_INCARNATION_NAME):
            try:
                ids.append([int(word) for word in (data_dir / name).read_text().split()])
            except (FileNotFoundError, ValueError):
                ids.append([])
        return ids[0], (ids[1][0] if ids[1] else None)

    def _note_start_ids(self, number: int, before: tuple[list[int], int | None], kind: str) -> None:
        """Evidence that the node's starts since `before` took ids from the recorded ones: the
        session id went up (by the starts that got as far as taking one), the newest names the
        one before it, and the Raft id is the last one + 1 when the clock was behind it."""
        (sessions, raft), (sessions_before, raft_before) = self._start_ids(number), before
        if sessions and sessions_before:
            starts = (sessions[0] - sessions_before[0]) % (1 << INCARNATION_BITS)
            self.evidence[f"{kind}: starts that took a session id"] += starts
            if starts and len(sessions) == 2 and (sessions[1] + 1) % (1 << INCARNATION_BITS) == sessions[0]:
                self.evidence[f"{kind}: newest start id = the one before + 1"] += 1
        if raft is not None and raft_before is not None and raft == raft_before + 1:
            # Not the clock's (ns, and the real clock is minutes past the recorded id): the
            # replicator's clock was the stepped-back one, and the recorded id won.
            self.evidence[f"{kind}: Raft id = the recorded one + 1 (clock behind)"] += 1

    def _restart(self, numbers: list[int]) -> None:
        self._disarm()  # before the starts: the disks are fast again from the first
        for number in numbers:
            self.start(number)

    def _arm(self, number: int, env: str, value: int) -> None:
        """Write a hook's file, to be disarmed when the fault heals or fails (`apply`)."""
        self._write(number, env, value)
        self.armed.append(self.hooks[number][env])

    def _write(self, number: int, env: str, value: int) -> None:
        path = self.hooks[number][env]
        temporary = path.with_suffix(".tmp")
        temporary.write_text(str(value))
        temporary.replace(path)  # a hook never reads half a number

    def _follower(self, fault: Fault) -> int:
        leader = self.leader()
        followers = sorted(n for n in self.cluster.nodes if n != leader)
        return followers[fault.pick % len(followers)]

    def _lose_unsynced(self, number: int) -> None:
        """Drop what the node's journal holds after its last fdatasync (the page cache's loss)."""
        node = self.cluster[number]
        synced = synced_index(self.hooks[number][FAULT_SYNCED_INDEX_ENV])
        if synced is None or not node.config.journal_dir.exists():
            return
        journal = Journal.open(node.config.journal_dir, segment_bytes=node.config.journal.segment_bytes,
                               preallocate=node.config.journal.preallocate)  # fmt: skip
        try:
            if synced < journal.last_index and synced >= journal.first_index - 1:
                self.log(f"  power cut: node {number} loses indexes {synced + 1}..{journal.last_index}")
                journal.truncate_after(synced)
        finally:
            journal.close()


def run_nemesis(seed: int, duration_s: float, nodes: int = 3, directory: Path | None = None, *,
                wipe: bool = False, kinds: tuple[str, ...] | None = None, prefix: str | None = None,
                log: Callable[[str], None] = print) -> NemesisResult:  # fmt: skip
    """One seed: see the module docstring. `directory` holds the nodes, the histories and
    `summary.json` (a new temporary directory if None; the caller removes it). `prefix` names the
    nodes' shared memory (unique per run; a random one if None)."""
    directory = Path(tempfile.mkdtemp(prefix=f"seqd-nemesis-{seed}-", dir="/tmp")) if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    faults = make_schedule(seed, duration_s, nodes, wipe=wipe, kinds=kinds)
    result = NemesisResult(seed, nodes, duration_s, directory, faults)
    started = time.monotonic()
    prefix = prefix or f"nm{uuid.uuid4().hex[:6]}"
    cluster = Cluster(directory, prefix, size=nodes, cluster=TIMEOUTS, settings=SETTINGS)
    workload: LedgerWorkload | None = None
    try:
        nemesis = Nemesis(cluster, seed, log, result.evidence)
        for number in cluster.nodes:
            nemesis.start(number)
        for node in cluster.nodes.values():
            node.wait_serving()
        leader = cluster.wait_leader(timeout_s=HEAL_LEADER_TIMEOUT_S).number  # a starved machine is slow
        open_accounts(cluster[leader].socket_path, directory / "setup.jsonl")
        workload = LedgerWorkload({n: node.socket_path for n, node in cluster.nodes.items()}, directory, seed)
        workload.wait_progress(ACKS_BEFORE_FAULTS, timeout_s=HEAL_PROGRESS_TIMEOUT_S, describe=cluster.describe)
        begin = time.monotonic() - WARM_UP_S  # the warm-up was the wait for every client's traffic
        for fault in faults:
            time.sleep(max(0.0, begin + fault.start_s - time.monotonic()))
            log(f"  {fault.describe()}")
            try:
                heal = nemesis.apply(fault)
            except (NodeError, ClusterError, SegmentError) as error:
                result.skipped.append(f"{fault.describe()}: {str(error).splitlines()[0]}")
                continue
            result.applied[fault.kind] += 1
            nemesis.hold(fault, time.monotonic() + fault.duration_s)
            heal()
        _heal_and_judge(cluster, nemesis, workload, result)
    finally:
        if workload is not None:
            workload.kill()
        cluster.close()
        result.elapsed_s = time.monotonic() - started
        (directory / "summary.json").write_text(json.dumps(result.to_json(), indent=1))
    return result


def _heal_and_judge(cluster: Cluster, nemesis: Nemesis, workload: LedgerWorkload, result: NemesisResult) -> None:
    nemesis.heal_all()
    try:
        for node in cluster.nodes.values():
            node.wait_serving()
        cluster.wait_leader(timeout_s=HEAL_LEADER_TIMEOUT_S, agreeing=cluster.size)
        workload.wait_progress(ACKS_AFTER_HEAL, timeout_s=HEAL_PROGRESS_TIMEOUT_S, describe=cluster.describe)
        histories = workload.stop()
        cluster.wait_converged()
    except (AssertionError, NodeError, ClusterError) as error:
        result.problems.append(f"liveness: after the heal, {error}")
        workload.kill()
        histories = list(workload.histories.values())
    histories.append(result.directory / "setup.jsonl")
    cluster.stop()
    nemesis.note_burst_starts_in_log(cluster[1].config.journal_dir)
    for number, node in cluster.nodes.items():
        report = logtools.check(node.config.journal_dir)
        if not report.ok:
            result.problems.append(f"seqd log check on node {number}: {report}")
    result.report = check_files(
        histories,
        {f"n{n}": node.config.journal_dir for n, node in cluster.nodes.items()},
        {f"n{n}": node.config.snapshot_dir for n, node in cluster.nodes.items()},
    )
    operations = [op for path in histories for op in read_history(path)]
    acknowledged = sum(op.outcome == "ok" for op in operations)
    if acknowledged == 0:
        result.problems.append("no operation was acknowledged: nothing to judge")




