"""The supervisor's query replicas (`[replicas] count`), and the snapshotter (`snapshot.writer =
"replica"`, daemon/roles/snapshotter.py), which is run the same way: started, watched, restarted,
stopped.

Replicas are not roles of the pipeline: nothing the pipeline does waits for them (they read the
journal and the commit counter, nothing else), so one that dies is started again alone, after a
backoff, and the pipeline carries on. They are started once the pipeline runs (the commit index
is known) and belong to the incarnation: its shared memory goes with it, so a pipeline restart
stops them and the next incarnation starts them again. Their subscribers and queries resume on
their own (the client library reconnects).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Final, Protocol

import psutil

from daemon.config import SNAPSHOT_WRITER_REPLICA, Config
from daemon.layout import REPLICA_COUNTERS, SNAPSHOTTER_COUNTERS, CounterSpec, CounterView
from daemon.roles.common import EPOCH_ENV, SUPERVISOR_PID_ENV

__all__ = ["REPLICA_NUMBER_ENV", "REPLICA_RESTART_BACKOFF_S_MAX", "ReplicaSet"]

log = logging.getLogger("seqd.supervisor")

# A replica that dies is started again after this, doubling per death to the maximum: a replica
# that cannot start (a bad socket directory, an app query that crashes it) must not eat a CPU.
REPLICA_RESTART_BACKOFF_S_MIN: Final = 0.2
REPLICA_RESTART_BACKOFF_S_MAX: Final = 10.0
REPLICA_STOP_TIMEOUT_S: Final = 5.0
REPLICA_NUMBER_ENV: Final = "SEQD_REPLICA_NUMBER"  # which slot a started replica is
# The replicas apply the same code as the blp: the same PYTHONHASHSEED, so set iteration agrees.
_HASH_SEED: Final = "0"


class _LaunchCounters(Protocol):
    """The supervisor's counters of a process it runs beside the pipeline."""

    @property
    def pid(self) -> CounterSpec: ...
    @property
    def start_time_ms(self) -> CounterSpec: ...
    @property
    def stop(self) -> CounterSpec: ...
    @property
    def restarts(self) -> CounterSpec: ...


@dataclass
class _Slot:
    number: int  # a query replica's slot; -1: the snapshotter
    block: _LaunchCounters
    module: str  # what `python -m` runs
    name: str  # in the log: "query replica 0", "snapshotter"
    process: subprocess.Popen[bytes] | None = None
    restart_at: float = 0.0
    backoff_s: float = REPLICA_RESTART_BACKOFF_S_MIN


class ReplicaSet:
    """The replicas of one incarnation (see the module docstring)."""

    def __init__(self, config: Config, counters: CounterView, epoch: int) -> None:
        self.config = config
        self.counters = counters
        self.epoch = epoch
        self.slots = [
            _Slot(number, REPLICA_COUNTERS[number], "daemon.roles.replica", f"query replica {number}")
            for number in range(config.replicas.count)
        ]
        if config.snapshot.writer == SNAPSHOT_WRITER_REPLICA:
            self.slots.append(_Slot(-1, SNAPSHOTTER_COUNTERS, "daemon.roles.snapshotter", "snapshotter"))

    def _spawn(self, slot: _Slot) -> None:
        block = slot.block
        environment = dict(os.environ)
        environment["SEQD_CONFIG_JSON"] = self.config.to_json().decode()
        environment[SUPERVISOR_PID_ENV] = str(os.getpid())
        environment[EPOCH_ENV] = str(self.epoch)
        if slot.number >= 0:
            environment[REPLICA_NUMBER_ENV] = str(slot.number)
        environment["PYTHONHASHSEED"] = _HASH_SEED
        self.counters[block.stop].set(0)
        process = subprocess.Popen([sys.executable, "-m", slot.module], env=environment)
        start_time_s = psutil.Process(process.pid).create_time()
        self.counters[block.start_time_ms].set(round(start_time_s * 1000))
        self.counters[block.pid].set(process.pid)
        slot.process = process
        log.info("started %s as pid %d", slot.name, process.pid)

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def check(self, now: float) -> None:
        """Start again, after its backoff, a replica that died; never touch the pipeline."""
        for slot in self.slots:
            process = slot.process
            if process is not None:
                code = process.poll()
                if code is None:
                    continue
                block = slot.block
                self.counters[block.restarts].add(1)
                self.counters[block.pid].set(0)
                slot.process = None
                slot.restart_at = now + slot.backoff_s
                log.error(
                    "%s (pid %d) exited with %s; starting it again in %.1f s "
                    "(the pipeline goes on; a replica's subscribers resume)",
                    slot.name, process.pid, code, slot.backoff_s,
                )  # fmt: skip
                slot.backoff_s = min(slot.backoff_s * 2, REPLICA_RESTART_BACKOFF_S_MAX)
            elif now >= slot.restart_at:
                self._spawn(slot)

    def stop(self) -> None:
        """Ask every replica to stop (they tell their clients `replica_stopping`), then kill
        what has not stopped within REPLICA_STOP_TIMEOUT_S."""
        for slot in self.slots:
            if slot.process is not None:
                self.counters[slot.block.stop].set(1)
        deadline = time.monotonic() + REPLICA_STOP_TIMEOUT_S
        for slot in self.slots:
            if slot.process is None:
                continue
            try:
                slot.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.error("%s did not stop; killing it", slot.name)
        self.kill()

    def kill(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.wait(timeout=REPLICA_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.error("%s pid %d did not die after SIGKILL", slot.name, slot.process.pid)
                slot.process = None
