"""Run a sharded ledger on this machine: N nodes and a bridge per ordered pair of shards, as
child processes, for the tests (tests/test_shards.py) and the benchmark (benches/shards.py).

    with ShardSystem(directory, "t1", shard_count=3) as system:
        with system.client() as client:            # a ShardedClient
            client.call(Transfer("alice", "bob", 5))
        system.wait_settled()                       # every saga finished
        system.bridges[(0, 1)].kill(); system.bridges[(0, 1)].start()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon.harness import NodeProcess, write_config

__all__ = ["BridgeProcess", "ShardSystem"]

SHARDED_APP = "sequencer.apps.sharded_ledger:ShardedLedger"
STOP_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 120.0


class BridgeProcess:
    """`seqd bridge run` from shard `source` to shard `target` in a child process."""

    def __init__(self, directory: Path, source: NodeProcess, target: NodeProcess,
                 source_shard: int, target_shard: int, source_kind: str = "journal") -> None:  # fmt: skip
        from sequencer.apps.sharded_ledger import stream_name

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stream = stream_name(source_shard, target_shard)
        self.status_path = self.directory / f"bridge{source_shard}{target_shard}.json"
        self.config_path = write_config(self.directory / f"bridge{source_shard}{target_shard}.toml", {"": {
            "source_config": str(source.config_path),
            "target_config": str(target.config_path),
            "route": "sequencer.apps.sharded_ledger:ShardRoute",
            "route_args": {"target_shard": target_shard},
            "stream": self.stream,
            "source": source_kind,
            "status_file": str(self.status_path),
        }})  # fmt: skip
        self.log_path = self.directory / f"bridge{source_shard}{target_shard}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "bridge", "run", "--config", str(self.config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def status(self) -> dict[str, Any]:
        from daemon.bridge import read_status

        return read_status(str(self.config_path))

    def kill(self) -> None:
        """kill -9."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=STOP_TIMEOUT_S)
            self.process = None

    def stop(self) -> int | None:
        """SIGTERM (it finishes what is in flight), then kill -9 if it does not exit in time."""
        process = self.process
        if process is None:
            return None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class ShardSystem:
    """`shard_count` nodes running the sharded ledger and the bridges between every pair.

    Args:
        directory: where each node's and bridge's files go (a short path: socket names).
        name: a prefix unique to this system (it names the nodes' shared memory).
        settings: extra config sections for every node.
    """

    def __init__(self, directory: Path, name: str, shard_count: int,
                 settings: dict[str, dict[str, Any]] | None = None, source_kind: str = "journal") -> None:  # fmt: skip
        self.directory = Path(directory)
        self.shard_count = shard_count
        merged: dict[str, dict[str, Any]] = {"node": {"app": SHARDED_APP}}
        for section, values in (settings or {}).items():
            merged.setdefault(section, {}).update(values)
        self.nodes: list[NodeProcess] = []
        for shard in range(shard_count):
            node_directory = self.directory / f"s{shard}"
            node_directory.mkdir(parents=True, exist_ok=True)
            self.nodes.append(NodeProcess(node_directory, f"{name}s{shard}", merged))
        self.bridges = {
            (source, target): BridgeProcess(self.directory / "bridges", self.nodes[source],
                                            self.nodes[target], source, target, source_kind)
            for source in range(shard_count) for target in range(shard_count) if source != target
        }  # fmt: skip

    @property
    def socket_paths(self) -> list[str]:
        return [node.socket_path for node in self.nodes]

    def client(self, **client_args: Any) -> Any:
        from sequencer.client.sharded import ShardedClient

        return ShardedClient(self.socket_paths, **client_args)

    def start(self) -> ShardSystem:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_serving()
        with self.client(timeout_s=60) as client:
            client.init_shards()
        for bridge in self.bridges.values():
            bridge.start()
        return self

    def summaries(self) -> list[Any]:
        from sequencer.apps.sharded_ledger import ShardSummary

        with self.client(timeout_s=60, reconnect_timeout_s=60) as client:
            return [client.client(shard).call(ShardSummary()) for shard in range(self.shard_count)]

    def wait_settled(self, timeout_s: float = SETTLE_TIMEOUT_S) -> list[Any]:
        """Wait until every saga has finished on every shard: no hold, no held credit, no
        refunded transfer awaiting its answer. Returns the shards' summaries then."""
        deadline = time.monotonic() + timeout_s
        while True:
            summaries = self.summaries()
            if all(s.holds_open == s.incoming_held == s.awaiting_answer == 0 for s in summaries):
                return summaries
            if time.monotonic() > deadline:
                logs = {pair: bridge.log_text()[-1500:] for pair, bridge in self.bridges.items()}
                raise AssertionError(f"sagas still open after {timeout_s} s: {summaries}; "
                                     f"bridge logs: {logs}")  # fmt: skip
            time.sleep(0.05)

    def stop(self) -> None:
        for bridge in self.bridges.values():
            bridge.stop()
        for node in self.nodes:
            node.stop()
            node.remove_shared_memory()

    def __enter__(self) -> ShardSystem:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:  # fmt: skip
        self.stop()
