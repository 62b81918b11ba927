"""A cluster of seqd nodes on this machine: for the fault tests, `benches.cluster` and demos.

    with Cluster(directory, "t1a2b3", size=3) as cluster:   # configs, secret, fault proxies
        cluster.start()                                      # every node; waits until each serves
        leader = cluster.wait_leader()                       # a majority agrees on it
        cluster.network.isolate(leader)                      # the fault proxy cuts its links
        cluster.kill(leader)                                 # kill -9 of the node's process group
    # everything stopped and removed: processes, shared memory, proxies

Theory of operation
-------------------

Each node is a `ClusterNode` (a `daemon.harness.NodeProcess`: its own directory with a config
file, data directory and client socket; a node name that carries the caller's unique prefix, so
its shared-memory segments `/seqd.<prefix>n<number>.*` never collide with another test's). Every
config has the same `[cluster]` table (cluster id, secret file, timeouts, members with their ids
and client socket paths) except where the members' peer addresses point:

- a node listens on its own member's `peer_address`, a real free loopback port;
- with `proxied=True` (the default), the `peer_address` it is given for each other member is the
  port of the fault proxy's link "<self>-><other>" (`daemon.faultproxy.FaultNetwork`), which
  forwards to that member's real port. Each node dials each other member for its own messages
  (`sequencer.raft.transport`), so every directed link A -> B is one proxy link that the test can
  drop, delay, blackhole or cut one way, while B -> A is a link of its own. The membership the
  nodes check at the handshake is the set of ids, never the addresses, so the nodes accept each
  other although each sees different addresses for its peers;
- with `proxied=False` the nodes dial each other directly (the benchmark: no proxy hop).

The cluster secret is written once, mode 0600 from its creation (never readable by others for
an instant), 32 random bytes as 64 hex digits.

Control: `start`, `stop` (SIGTERM: a drain), `kill` (SIGKILL to the node's whole process group:
the supervisor and every role, a power cut), `pause`/`resume` (SIGSTOP/SIGCONT to the group),
`kill_role` (SIGKILL to one role; its supervisor restarts the pipeline). Observation: `views()`
reads every node's counters (`RaftView`: Raft standing, term, leader, commit and applied index,
rolling hash) without talking to the nodes; `wait_leader` and `wait_converged` poll them until a
condition holds or a timeout names what every node showed.

Cleanup: `close()` (also at the end of a `with` block, and at interpreter exit for a caller that
forgot) resumes paused nodes, stops every node (SIGTERM, then SIGKILL of its group), removes every
shared-memory segment and doorbell semaphore whose name carries a node's name, stops the proxy
and, if the cluster made its directory, removes it. Each step runs even when an earlier one
failed, and `close()` is idempotent.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import psutil

from daemon.faultproxy import FaultNetwork, FaultProxy
from daemon.harness import NodeError, NodeProcess
from daemon.layout import (
    BLP_APPLIED_INDEX,
    BLP_ROLLING_HASH,
    COMMIT_INDEX,
    JOURNAL_DURABLE_INDEX,
    NODE_STATE,
    RAFT_COMMIT_INDEX,
    RAFT_LEADER,
    RAFT_ROLE,
    RAFT_TERM,
    ROLE_COUNTERS,
    NodeState,
    Role,
)
from ipc.segment import SHM_DIRECTORY
from sequencer.raft.raft_role import RaftRole

__all__ = [
    "CLUSTER_SIZES",
    "LEADER_TIMEOUT_S",
    "RAFT_COMMIT_INDEX_NAME",
    "Cluster",
    "ClusterError",
    "ClusterNode",
    "RaftView",
    "agreed_leader",
    "cluster_settings",
    "ephemeral_port_range",
    "listen_ports",
    "node_shm_paths",
    "write_secret",
]

CLUSTER_SIZES: Final = (3, 5)  # what daemon.config accepts
SECRET_BYTES: Final = 32  # random bytes, written as 64 hex digits (the config wants >= 32 bytes)
# A leader is elected within a few election timeouts (hundreds of ms); 30 s covers a 2-core
# machine that also runs the test's clients and other engineers' tests, and a node's start-up.
LEADER_TIMEOUT_S: Final = 30.0
# Followers catch up with the leader's commit within seconds; 60 s bounds a hang, not a speed.
CONVERGE_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.02
EPHEMERAL_RANGE_FILE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Peer ports are drawn from [LISTEN_PORT_MIN, start of the ephemeral range): above the ports
# services usually take, below what the kernel hands to outgoing connections.
LISTEN_PORT_MIN: Final = 20000
LISTEN_PORT_ATTEMPTS_MAX: Final = 1000  # random draws before giving up (a machine out of ports)
# A signal reaches every process of a node within milliseconds; 10 s bounds a hang.
SIGNAL_TIMEOUT_S: Final = 10.0
RAFT_COMMIT_INDEX_NAME: Final = RAFT_COMMIT_INDEX.name  # the replicator's, in a cluster


class ClusterError(Exception):
    """A cluster did not reach the state waited for; the message shows every node's view."""


# ---- configuration (no I/O but the secret's file) ------------------------------------------------


def write_secret(path: Path) -> Path:
    """Write a fresh cluster secret to `path`, mode 0600 from its creation.

    Raises:
        FileExistsError: `path` exists (a secret is never silently replaced).
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(SECRET_BYTES) + "\n")
    return path


def ephemeral_port_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default if the
    file cannot be read)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def listen_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` distinct loopback ports, free now, below the ephemeral range.

    A node's peer port is chosen before the node binds it, seconds later (the configs name every
    member's port first). A port from the ephemeral range (what binding port 0 gives) can be taken
    meanwhile by any outgoing connection on the machine (the fault proxy's own dials, other
    tests); below the range only a process binding that port explicitly can take it.

    Raises:
        ClusterError: no free ports found (the range below the ephemeral one is exhausted).
    """
    rng = rng or random.Random()
    high = ephemeral_port_range()[0] - 1
    low = LISTEN_PORT_MIN if high >= LISTEN_PORT_MIN + 1000 else 1024  # a tuned-down range: any
    chosen: list[int] = []
    for _attempt in range(LISTEN_PORT_ATTEMPTS_MAX):
        if len(chosen) == count:
            return chosen
        port = rng.randint(low, high)
        if port in chosen:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise ClusterError(f"found only {len(chosen)} of {count} free loopback ports in {low}..{high}")


def cluster_settings(
    directories: Mapping[int, Path],
    names: Mapping[int, str],
    peer_ports: Mapping[int, int],
    dial_ports: Mapping[tuple[int, int], int],
    secret_file: Path,
    cluster: Mapping[str, Any] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    learners: Iterable[int] = (),
) -> dict[int, dict[str, dict[str, Any]]]:
    """Each node's config sections ({section: {key: value}}, as `daemon.harness.write_config`).

    Args:
        directories: node number -> its directory (config, data, socket).
        names: node number -> node name (it names the shared-memory segments).
        peer_ports: node number -> the loopback port it listens on for peers.
        dial_ports: (source, target) -> the port `source` dials to reach `target` (a proxy link's,
            or `peer_ports[target]` for a direct link).
        secret_file: the cluster secret (the same file for every node).
        cluster: `[cluster]` settings over the defaults (timeouts, cluster id).
        extra: other sections merged into every node's config (`{"snapshot": {...}}`).
        learners: the node numbers that are learners (non-voting members).

    Raises:
        ValueError: not 3 or 5 voters, or a directed link without a port to dial.
    """
    numbers = sorted(directories)
    learner_set = set(learners)
    voters = [n for n in numbers if n not in learner_set]
    if len(voters) not in CLUSTER_SIZES:
        besides = " besides the learners" if learner_set else ""
        raise ValueError(f"{len(voters)} nodes{besides}: a cluster has {' or '.join(map(str, CLUSTER_SIZES))} voters")
    missing = [(s, t) for s in numbers for t in numbers if s != t and (s, t) not in dial_ports]
    if missing:
        raise ValueError(f"no port to dial for the links {missing}: give every directed link one")
    result = {}
    for number in numbers:
        members = [
            {
                "id": member,
                "peer_address": f"127.0.0.1:{peer_ports[member] if member == number else dial_ports[(number, member)]}",
                "socket_path": str(directories[member] / "seqd.sock"),
                **({"learner": True} if member in learner_set else {}),
            }
            for member in numbers
        ]
        settings: dict[str, dict[str, Any]] = {
            "node": {"name": names[number], "number": number},
            "cluster": {"secret_file": str(secret_file), **(cluster or {}), "members": members},
        }
        for section, values in (extra or {}).items():
            settings.setdefault(section, {}).update(values)
        result[number] = settings
    return result


# ---- what the counters say -------------------------------------------------------------------------


@dataclass(frozen=True)
class RaftView:
    """One node's counters, as far as a cluster test cares. None: unknown (not written yet, or
    a counter this release does not have)."""

    number: int
    node_state: int | None
    raft_role: RaftRole | None
    term: int | None
    leader: int | None  # 0: no leader known
    commit_index: int | None  # raft.commit.index in a cluster (commit.index on a single node)
    durable_index: int | None
    applied_index: int | None
    rolling_hash: int | None

    @classmethod
    def from_counters(cls, number: int, values: Mapping[str, int]) -> RaftView:
        role = values.get(RAFT_ROLE.name)
        commit = values.get(RAFT_COMMIT_INDEX_NAME, values.get(COMMIT_INDEX.name))
        return cls(
            number=number,
            node_state=values.get(NODE_STATE.name),
            raft_role=RaftRole(role) if role is not None and role in RaftRole._value2member_map_ else None,
            term=values.get(RAFT_TERM.name),
            leader=values.get(RAFT_LEADER.name),
            commit_index=commit,
            durable_index=values.get(JOURNAL_DURABLE_INDEX.name),
            applied_index=values.get(BLP_APPLIED_INDEX.name),
            rolling_hash=values.get(BLP_ROLLING_HASH.name),
        )

    def describe(self) -> str:
        role = self.raft_role.name.lower() if self.raft_role is not None else "?"
        state = "?"
        if self.node_state is not None and self.node_state in NodeState._value2member_map_:
            state = NodeState(self.node_state).name.lower()
        return (
            f"node {self.number}: {state}, {role} term {self.term} leader {self.leader} commit "
            f"{self.commit_index} durable {self.durable_index} applied {self.applied_index}"
        )


def agreed_leader(views: Iterable[RaftView | None], quorum: int) -> RaftView | None:
    """The leader that `quorum` nodes agree on, in the highest such term, or None.

    A node counts as leader L of term T when it says it leads (`raft.role` LEADER) at T; L is
    agreed when at least `quorum` nodes (L among them) are at term T and name L as leader. A
    paused or partitioned old leader still says LEADER at its older term: the highest agreed
    term wins, and a lone node that thinks it leads is never agreed.
    """
    known = [view for view in views if view is not None]
    found: RaftView | None = None
    for candidate in known:
        if candidate.raft_role is not RaftRole.LEADER or candidate.term is None:
            continue
        agreeing = sum(
            1 for view in known if view.term == candidate.term and view.leader == candidate.number
        )
        if agreeing >= quorum and (found is None or (found.term or 0) < candidate.term):
            found = candidate
    return found


def node_shm_paths(node: str, directory: Path = SHM_DIRECTORY) -> list[Path]:
    """Every shared-memory file of node `node`: its segments `/seqd.<node>.<name>` and their
    doorbell semaphores (`sem.seqd.<node>.<name>.<reader>.bell`), whatever segments a release
    has. The dot after the name keeps node "n1" from matching node "n10"."""
    prefix = f"seqd.{node}."
    return sorted(
        path
        for path in directory.iterdir()
        if path.name.startswith(prefix) or path.name.startswith("sem." + prefix)
    )


# ---- processes -----------------------------------------------------------------------------------------


class ClusterNode(NodeProcess):
    """One member: a `NodeProcess` that knows its number and peer port, and can be paused."""

    def __init__(self, directory: Path, node: str, number: int, peer_port: int,
                 settings: dict[str, dict[str, Any]]) -> None:  # fmt: skip
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        super().__init__(directory, node, settings)
        self.number = number
        self.peer_port = peer_port
        self.paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signal_number: int) -> None:
        if self.process is None:
            raise NodeError(f"node {self.number} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal_number)

    def pause(self) -> None:
        """SIGSTOP the supervisor and every role: the node freezes mid-step (a long GC pause,
        a VM migration); its sockets stay open and its counters readable."""
        self.signal_group(signal.SIGSTOP)
        self.paused = True
        self._wait_group(lambda status: status in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE), "stopped")

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)
        self.paused = False
        self._wait_group(lambda status: status != psutil.STATUS_STOPPED, "resumed")

    def _wait_group(self, condition: Callable[[str], bool], what: str) -> None:
        """Wait until every process of the node (supervisor and roles) is in the state a signal
        asked for: a signal is delivered asynchronously, and the test's next step assumes it."""
        assert self.process is not None
        deadline = time.monotonic() + SIGNAL_TIMEOUT_S
        while True:
            try:
                supervisor = psutil.Process(self.process.pid)
                group = [supervisor, *supervisor.children(recursive=True)]
                if all(condition(process.status()) for process in group):
                    return
            except psutil.NoSuchProcess:
                return  # it died meanwhile: nothing left to wait for
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.number} was not {what} within {SIGNAL_TIMEOUT_S} s")
            time.sleep(0.001)

    def stop(self, timeout_s: float = 30.0, signalled: bool = False) -> int | None:
        """As NodeProcess.stop; `signalled`: its SIGTERM was sent already (`terminate`), so wait
        for it instead of sending another. A second SIGTERM can land after the supervisor has
        returned, while the interpreter finalises with the default handler back: it would end a
        clean stop with -15."""
        if self.paused and self.running:
            self.resume()  # a stopped process cannot take its SIGTERM
        self.paused = False
        if signalled and self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        return super().stop(timeout_s)

    def terminate(self) -> None:
        """SIGTERM to the supervisor only (it drains its roles), without waiting."""
        if self.paused and self.running:
            self.resume()
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        super().kill()
        self.paused = False

    def kill_role(self, role: Role) -> int:
        """SIGKILL one role's process; returns its pid. The supervisor sees it die and restarts
        the pipeline (`wait_serving(after_restarts=...)` waits for that)."""
        pid = self.read_counters()[ROLE_COUNTERS[role].pid.name]
        if pid <= 0:
            raise NodeError(f"node {self.number} has no {role} running (its pid counter is {pid})")
        os.kill(pid, signal.SIGKILL)
        return pid

    def view(self) -> RaftView | None:
        """What the counters say, or None when the node runs no counters segment (not started,
        killed: a dead node's segment is stale and refused)."""
        if not self.running:
            return None
        try:
            values = self.read_counters()
        except Exception:  # not created yet, or stale: the node is not serving
            return None
        return RaftView.from_counters(self.number, values)

    def remove_shared_memory(self) -> None:
        """Remove every segment and semaphore of this node (only call with the node stopped)."""
        for path in node_shm_paths(self.node):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def wipe_data(self) -> None:
        """Remove the node's data directory (journal, snapshots, Raft state) while it is down."""
        if self.running:
            raise NodeError(f"node {self.number} is running: stop or kill it before wiping its data")
        shutil.rmtree(self.config.node.data_dir, ignore_errors=True)


class Cluster:
    """`size` nodes on loopback, each in `directory/n<number>`, named `<prefix>n<number>`.

    Args:
        directory: where the nodes' directories and the secret go (a short path: client socket
            paths are limited to 107 bytes); None: a new temporary directory, removed at close.
        prefix: unique per test or run (it names the shared-memory segments).
        size: 3 or 5 voters, numbered 1..size.
        learners: learners (non-voting members) besides, numbered size + 1 on.
        proxied: put a fault-proxy link on every directed peer link (`network`).
        cluster: `[cluster]` settings over the defaults (e.g. `{"election_timeout_ms": 500}`).
        settings: other config sections for every node (merged over NodeProcess's defaults).
    """

    def __init__(self, directory: Path | None, prefix: str, size: int = 3, *, proxied: bool = True,
                 cluster: Mapping[str, Any] | None = None,
                 settings: Mapping[str, Mapping[str, Any]] | None = None, learners: int = 0) -> None:  # fmt: skip
        if size not in CLUSTER_SIZES:
            raise ValueError(f"size={size}: a cluster has {' or '.join(map(str, CLUSTER_SIZES))} nodes")
        self._owns_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="seqd-cluster-", dir="/tmp")) if directory is None else Path(directory)
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.size = size
        self.learners = tuple(range(size + 1, size + learners + 1))
        self.quorum = size // 2 + 1
        self.nodes: dict[int, ClusterNode] = {}
        self.proxy: FaultProxy | None = None
        self.network: FaultNetwork | None = None
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(prefix, proxied, cluster, settings)
        except BaseException:
            self.close()
            raise

    def _build(self, prefix: str, proxied: bool, cluster: Mapping[str, Any] | None,
               settings: Mapping[str, Mapping[str, Any]] | None) -> None:  # fmt: skip
        numbers = list(range(1, self.size + len(self.learners) + 1))
        peer_ports = dict(zip(numbers, listen_ports(len(numbers)), strict=True))
        dial_ports: dict[tuple[int, int], int] = {}
        if proxied:
            self.proxy = FaultProxy()
            self.network = FaultNetwork(self.proxy)
            for source in numbers:
                for target in numbers:
                    if source != target:
                        dial_ports[(source, target)] = self.network.add(source, target, peer_ports[target])
        else:
            dial_ports = {(s, t): peer_ports[t] for s in numbers for t in numbers if s != t}
        self.secret_file = write_secret(self.directory / "cluster.secret")
        directories = {number: self.directory / f"n{number}" for number in numbers}
        names = {number: f"{prefix}n{number}" for number in numbers}
        every = cluster_settings(directories, names, peer_ports, dial_ports, self.secret_file,
                                 cluster, settings, self.learners)  # fmt: skip
        for number in numbers:
            self.nodes[number] = ClusterNode(directories[number], names[number], number,
                                             peer_ports[number], every[number])  # fmt: skip

    # -- control --------------------------------------------------------------------------------------

    def __getitem__(self, number: int) -> ClusterNode:
        return self.nodes[number]

    def start(self, numbers: Iterable[int] | None = None, wait: bool = True) -> None:
        """Start nodes (every node by default) at once, then wait until each serves."""
        chosen = list(self.nodes) if numbers is None else list(numbers)
        for number in chosen:
            self.nodes[number].start(wait=False)
        if wait:
            for number in chosen:
                self.nodes[number].wait_serving()

    def stop(self, numbers: Iterable[int] | None = None, timeout_s: float = 30.0) -> dict[int, int | None]:
        """SIGTERM nodes at once (a drain each), then wait; returns each exit code (None: it had to
        be killed)."""
        chosen = [n for n in (list(self.nodes) if numbers is None else numbers) if self.nodes[n].running]
        for number in chosen:
            self.nodes[number].terminate()
        return {number: self.nodes[number].stop(timeout_s, signalled=True) for number in chosen}

    def kill(self, numbers: int | Iterable[int]) -> None:
        """kill -9 of whole nodes (supervisor and roles), all signalled before any is waited for."""
        chosen = [numbers] if isinstance(numbers, int) else list(numbers)
        for number in chosen:
            self.nodes[number].signal_group(signal.SIGKILL)
        for number in chosen:
            self.nodes[number].kill()

    def pause(self, number: int) -> None:
        self.nodes[number].pause()

    def resume(self, number: int) -> None:
        self.nodes[number].resume()

    def kill_role(self, number: int, role: Role) -> int:
        return self.nodes[number].kill_role(role)

    # -- observation ----------------------------------------------------------------------------------

    def views(self) -> dict[int, RaftView | None]:
        return {number: node.view() for number, node in self.nodes.items()}

    def describe(self) -> str:
        lines = []
        for number, view in self.views().items():
            node = self.nodes[number]
            if view is None:
                lines.append(f"node {number}: not running" if not node.running else f"node {number}: no counters")
            else:
                lines.append(view.describe() + (" (paused)" if node.paused else ""))
        if self.network is not None:
            for (source, target), link in sorted(self.network.links.items()):
                stats = link.stats()
                lines.append(f"link {source}->{target}: {stats['connections_open']} open, "
                             f"{stats['bytes_upstream']} bytes up, {stats['bytes_downstream']} down")  # fmt: skip
        return "\n  ".join(["cluster:", *lines])

    def wait_leader(self, timeout_s: float = LEADER_TIMEOUT_S, among: Iterable[int] | None = None,
                    term_above: int = 0, agreeing: int | None = None) -> RaftView:  # fmt: skip
        """Wait until a majority of the cluster (or `agreeing` nodes) agrees on a leader (among
        the given nodes, if given, at a term above `term_above`); returns the leader's view.

        Raises:
            ClusterError: no such leader within `timeout_s`; names every node's view.
        """
        chosen = set(self.nodes if among is None else among)
        needed = self.quorum if agreeing is None else agreeing
        deadline = time.monotonic() + timeout_s
        while True:
            views = self.views()
            leader = agreed_leader([views[n] for n in chosen], needed)
            if leader is not None and (leader.term or 0) > term_above:
                return leader
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"no leader agreed by {needed} of nodes {sorted(chosen)} at a term above "
                    f"{term_above} within {timeout_s} s; {self.describe()}"
                )
            time.sleep(POLL_S)

    def wait_converged(self, numbers: Iterable[int] | None = None,
                       timeout_s: float = CONVERGE_TIMEOUT_S) -> int:  # fmt: skip
        """Wait until the nodes have applied the same index with the same rolling hash, and that
        index is their commit index (nothing committed is left to apply); returns the index.

        Raises:
            ClusterError: not converged within `timeout_s`; names every node's view.
        """
        chosen = sorted(self.nodes if numbers is None else numbers)
        deadline = time.monotonic() + timeout_s
        while True:
            exited = [n for n in chosen if not self.nodes[n].running]
            if exited:  # it will never converge: say so now, with why it ended
                node = self.nodes[exited[0]]
                raise ClusterError(f"node {exited[0]} is not running (exit {node.process and node.process.returncode}); "
                                   f"{self.describe()}\nits log:\n{node.log_text()[-3000:]}")  # fmt: skip
            views = [self.nodes[n].view() for n in chosen]
            if all(v is not None and v.applied_index is not None for v in views):
                applied = {v.applied_index for v in views if v is not None}
                hashes = {v.rolling_hash for v in views if v is not None}
                commits = {v.commit_index for v in views if v is not None}
                if len(applied) == 1 and len(hashes) == 1 and commits == applied:
                    return applied.pop() or 0
            if time.monotonic() >= deadline:
                raise ClusterError(f"nodes {chosen} did not converge within {timeout_s} s; {self.describe()}")
            time.sleep(POLL_S)

    # -- cleanup ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything and remove what the cluster created; every step runs even if another
        fails, and a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors: list[BaseException] = []
        running = [node for node in self.nodes.values() if node.running]
        for node in running:
            with _collect(errors):
                node.terminate()
        for node in self.nodes.values():
            with _collect(errors):
                node.stop(timeout_s=15.0, signalled=node in running)
        for node in self.nodes.values():
            with _collect(errors):
                node.remove_shared_memory()
        if self.proxy is not None:
            with _collect(errors):
                self.proxy.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:  # fmt: skip
        self.close()


@contextlib.contextmanager
def _collect(errors: list[BaseException]) -> Any:
    try:
        yield
    except Exception as error:
        errors.append(error)
