"""`seqd bridge`: deliver one node's events as commands to another node (docs/integration.md).

    seqd bridge run --config bridge.toml       # until SIGTERM (systemd: systemd/seqd-bridge@.service)
    seqd bridge status --config bridge.toml [--json]

The bridge's config (its own small TOML file; the nodes' configs say where their logs are):

    source_config = "/etc/seqd/shard0.toml"              # the node whose events are read
    target_config = "/etc/seqd/shard1.toml"              # the node the commands go to
    route = "sequencer.apps.sharded_ledger:ShardRoute"   # module:Class, built with route_args
    route_args = { target_shard = 1 }
    stream = "shard0>shard1"       # default "<source node>><target node>"; names the client id
    source = "journal"             # or "subscription" (the source's query replicas)
    in_flight_max = 256
    status_file = ""               # default: <target socket dir>/bridge.<stream>.json

Status: the bridge is a client of two nodes and has no shared memory of its own, so it writes
its progress to `status_file` (JSON, replaced atomically at most every STATUS_INTERVAL_S and
on exit), and `seqd bridge status` reads that file and the source node's commit index (its
counters) for the lag. Its own command rather than a section of the target's `seqd status`:
one target may have bridges from many sources, a bridge may run on a host where neither node's
status is read, and `seqd status` reads one node's shared memory only.

Exit codes: 0 stopped on request, 65 (DATAERR) the bridge cannot deliver in order
(`BridgeError`, the message says why; systemd does not restart it), 78 a bad config.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from daemon.config import Config, ConfigError, load_config
from daemon.exits import ExitCode
from sequencer.bridge import STREAM_BYTES_MAX
from sequencer.bridge.bridge import IN_FLIGHT_DEFAULT, Bridge, BridgeError, BridgeProgress, Route
from sequencer.client.session import IN_FLIGHT_LIMIT_MAX
from sequencer.state_machine import load_app

__all__ = ["BridgeConfig", "load_bridge_config", "make_bridge", "read_status", "run_bridge"]

log = logging.getLogger("seqd.bridge")

STATUS_INTERVAL_S = 0.5  # the status file is rewritten at most this often: cheap, and fresh
# A status file not rewritten for this long while its pid lives: the bridge is stuck.
STATUS_STALE_S = 30.0


class BridgeConfig(msgspec.Struct, forbid_unknown_fields=True):
    source_config: str
    target_config: str
    route: str  # "module:Class", built as Class(**route_args)
    route_args: dict[str, Any] = {}
    stream: str = ""
    source: Literal["journal", "subscription"] = "journal"
    in_flight_max: int = IN_FLIGHT_DEFAULT
    status_file: str = ""


def load_bridge_config(path: str | Path) -> BridgeConfig:
    """Raises ConfigError naming the file and what is wrong."""
    try:
        config = msgspec.convert(tomllib.loads(Path(path).read_text()), BridgeConfig)
    except FileNotFoundError:
        raise ConfigError(f"bridge config {path} does not exist") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as error:
        raise ConfigError(f"bridge config {path}: {error}") from None
    if not 1 <= config.in_flight_max <= IN_FLIGHT_LIMIT_MAX:
        raise ConfigError(f"bridge config {path}: in_flight_max = {config.in_flight_max} must be "
                          f"1 to {IN_FLIGHT_LIMIT_MAX}")  # fmt: skip
    if len(config.stream.encode()) > STREAM_BYTES_MAX:
        raise ConfigError(f"bridge config {path}: stream is over {STREAM_BYTES_MAX} bytes")
    return config


def _nodes(config: BridgeConfig) -> tuple[Config, Config, str, Path]:
    source = load_config(config.source_config)
    target = load_config(config.target_config)
    stream = config.stream or f"{source.node.name}>{target.node.name}"
    status = Path(config.status_file or Path(target.socket.path).parent / f"bridge.{stream}.json")
    return source, target, stream, status


def load_route(spec: str, args: dict[str, Any]) -> Route:
    module_name, _, class_name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
        route = found(**args)
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(
            f"route = {spec!r} with route_args = {args!r} cannot be built ({error}): name a class "
            "as 'module:Class' with a command_for(stream, source_index, event) method, e.g. "
            "'sequencer.apps.sharded_ledger:ShardRoute'"
        ) from None
    if not callable(getattr(route, "command_for", None)):
        raise ConfigError(f"route = {spec!r} has no command_for(stream, source_index, event)")
    return route  # type: ignore[no-any-return]


def make_bridge(config: BridgeConfig) -> tuple[Bridge, Any, Path]:
    """The bridge, its source and its status file."""
    from daemon.project import make_source

    source_node, target_node, stream, status_path = _nodes(config)
    bridge = Bridge(
        load_route(config.route, config.route_args), stream, target_node.socket.path,
        load_app(target_node.node.app).schema, in_flight_max=config.in_flight_max,
    )  # fmt: skip
    return bridge, make_source(source_node, config.source, follow=True), status_path


class _StatusWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.written_at = 0.0
        self.state = "starting"

    def due(self) -> bool:
        return time.monotonic() - self.written_at >= STATUS_INTERVAL_S

    def __call__(self, progress: BridgeProgress, force: bool = False) -> None:
        if not force and not self.due():
            return
        self.written_at = time.monotonic()
        record = {"pid": os.getpid(), "state": self.state, "written_at_s": time.time(),
                  **dataclasses.asdict(progress)}  # fmt: skip
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.path)


def run_bridge(config_path: str) -> int:
    """`seqd bridge run`; returns the exit code."""
    from daemon.notify import Notifier

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s seqd[bridge:%(process)d] %(levelname)s %(message)s")  # fmt: skip
    bridge, source, status_path = make_bridge(load_bridge_config(config_path))
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True  # the loop reads it (a handler does nothing else)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier = Notifier.from_environment()
    writer = _StatusWriter(status_path)
    ready = False

    def on_progress(progress: BridgeProgress) -> None:
        nonlocal ready
        if not writer.due():
            return  # called per event: the file and the watchdog at most every interval
        if bridge.resumed and not ready:
            ready = True
            writer.state = "running"
            notifier.ready(f"bridge {progress.stream} delivering")
        notifier.watchdog()
        writer(progress)

    bridge.on_progress = on_progress
    writer(bridge.progress, force=True)
    try:
        bridge.run(source, lambda: stopping)
    except BridgeError as error:
        writer.state = "failed"
        writer(bridge.progress, force=True)
        log.error("%s", error)
        return ExitCode.DATAERR
    writer.state = "stopped"
    writer(bridge.progress, force=True)
    notifier.stopping()
    return ExitCode.OK


def read_status(config_path: str) -> dict[str, Any]:
    """The bridge's status file with `running`, and the source's commit index and the lag."""
    from daemon.layout import committed_index
    from daemon.status import read_counters

    config = load_bridge_config(config_path)
    source_node, _target, stream, status_path = _nodes(config)
    try:
        status: dict[str, Any] = json.loads(status_path.read_text())
    except FileNotFoundError:
        status = {"stream": stream, "state": "never started", "pid": 0}
    pid = int(status.get("pid", 0))
    status["running"] = pid > 0 and status["state"] in ("starting", "running") and _alive(pid)
    if status["state"] in ("starting", "running") and not status["running"]:
        status["state"] = "dead"  # killed, or crashed without a word: systemd restarts it
    if status["running"] and time.time() - float(status.get("written_at_s", 0)) > STATUS_STALE_S:
        status["state"] = "stuck"
    values, _why_not = read_counters(source_node.node.name)
    commit = None if values is None else committed_index(values)
    status["source_commit_index"] = commit
    status["lag"] = None if commit is None else max(0, commit - int(status.get("read_index", 0)))
    status["status_file"] = str(status_path)
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def show_status(config_path: str, as_json: bool) -> int:
    status = read_status(config_path)
    if as_json:
        print(json.dumps(status, indent=2))
        return ExitCode.OK
    print(f"bridge {status['stream']}: {status['state']}"
          f"{' (pid ' + str(status['pid']) + ')' if status['running'] else ''}")  # fmt: skip
    for key in ("resumed_after", "read_index", "delivered_index", "in_flight", "delivered",
                "redeliveries", "rejected", "last_rejection", "source_commit_index", "lag"):
        if key in status:
            print(f"  {key:20} {status[key]}")
    return ExitCode.OK if status["running"] else 3


if __name__ == "__main__":
    sys.exit(run_bridge(sys.argv[1]))
