"""A ledger workload for cluster tests: one recording client per node, each in its own process.

Each client (`sequencer.history.RecordingClient`) sends pipelined Deposits and Transfers to
its node's socket and writes every operation to its own JSON-lines history, which the checker
(`sequencer.history.checker`) judges against every node's journal afterwards. The clients run in
processes, not threads of the test: the test process also runs the fault proxy, whose links must
not wait on the GIL behind the clients' encoding work (a slow proxy looks like a slow network and
starts elections the test did not ask for). They are plain subprocesses
(`python -m tests.cluster_workload`), not multiprocessing workers, whose shared counters would
start a resource-tracker process that outlives the test: the test counts a client's
acknowledgements in its history file (a line per operation, flushed as it completes) and stops it
with SIGTERM.

A client never gives up while the test runs (reply and reconnect timeouts of CLIENT_TIMEOUT_S):
through a node's kill and restart, a partition or a pause it waits, reconnects to its node and
resends, so every request it made ends ok (or, if the test stops it mid-flight, info).
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sequencer.apps.ledger import Deposit, Ledger, OpenAccount, Transfer

ACCOUNTS = ("alice", "bob", "carol", "dave", "erin", "frank")
OPENING_DEPOSIT = 10_000
WINDOW = 8  # requests in flight per client
# A client waits this long for a reply or for its node to come back: longer than any fault a
# test injects plus a restart on a loaded machine; after it the client fails the test.
CLIENT_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = CLIENT_TIMEOUT_S + 30.0
ROOT = Path(__file__).resolve().parent.parent


def _take(request: Any) -> None:
    from sequencer.client import CommandRejected

    try:
        request.result()
    except CommandRejected:
        pass  # insufficient funds: an answer, recorded ok/rejected


def run_client(socket_path: str, name: str, history: str, seed: int) -> None:
    """Send until SIGTERM, then take every reply still due and return."""
    from sequencer.client import Client
    from sequencer.history.recorder import HistoryWriter, RecordingClient

    stopping = [False]

    def stop(_signal: int, _frame: Any) -> None:
        stopping[0] = True  # only a flag: the loop finishes what is in flight

    signal.signal(signal.SIGTERM, stop)
    rng = random.Random(seed)
    with HistoryWriter(history) as sink, RecordingClient(
        Client(socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S,
               reconnect_timeout_s=CLIENT_TIMEOUT_S, in_flight_max=WINDOW, client_name=name),
        name, sink,
    ) as client:  # fmt: skip
        window: deque[Any] = deque()
        while not stopping[0]:
            if rng.random() < 0.1:
                command: object = Deposit(rng.choice(ACCOUNTS), rng.randrange(1, 50))
            else:
                source, target = rng.sample(ACCOUNTS, 2)
                command = Transfer(source, target, rng.randrange(1, 200))
            window.append(client.submit(command))
            if len(window) >= WINDOW:
                _take(window.popleft())
        while window:
            _take(window.popleft())


def open_accounts(socket_path: str, history: Path) -> None:
    """Open and fund ACCOUNTS through one node, recorded (the checker counts the deposits)."""
    from sequencer.client import Client
    from sequencer.history.recorder import HistoryWriter, RecordingClient

    with HistoryWriter(history) as sink, RecordingClient(
        Client(socket_path, schema=Ledger.schema, timeout_s=CLIENT_TIMEOUT_S), "setup", sink
    ) as client:  # fmt: skip
        pending = [client.submit(command) for account in ACCOUNTS
                   for command in (OpenAccount(account), Deposit(account, OPENING_DEPOSIT))]  # fmt: skip
        for request in pending:
            request.result()


class _History:
    """Counts the ok lines of a history file as it grows (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.ok = 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return 0
        whole = data[: data.rfind(b"\n") + 1]
        self.offset += len(whole)
        self.ok += whole.count(b'"outcome": "ok"')
        return self.ok


class LedgerWorkload:
    """One client process per given node: `{number: socket_path}`; histories in `directory`."""

    def __init__(self, sockets: dict[int, str], directory: Path, seed: int = 0) -> None:
        self.directory = directory
        self.histories = {number: directory / f"client-n{number}.jsonl" for number in sockets}
        self._counts = {number: _History(path) for number, path in self.histories.items()}
        self.logs = {number: directory / f"client-n{number}.log" for number in sockets}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        for number, path in sockets.items():
            with open(self.logs[number], "ab") as log:
                self.processes[number] = subprocess.Popen(
                    [sys.executable, "-m", "tests.cluster_workload", path, f"n{number}.c0",
                     str(self.histories[number]), str(seed * 100 + number)],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip

    def acknowledged(self) -> dict[int, int]:
        return {number: history.count() for number, history in self._counts.items()}

    def wait_progress(self, count: int, numbers: Iterable[int] | None = None,
                      timeout_s: float = 90.0, describe: Any = None) -> None:  # fmt: skip
        """Wait until each chosen client has `count` more acknowledgements than now."""
        chosen = list(self.processes if numbers is None else numbers)
        start = self.acknowledged()
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.acknowledged()
            if all(now[n] - start[n] >= count for n in chosen):
                return
            self._raise_errors()
            if time.monotonic() > deadline:
                where = f"; {describe()}" if describe is not None else ""
                raise AssertionError(
                    f"clients on nodes {chosen} did not get {count} more acknowledgements within "
                    f"{timeout_s} s: from {start} to {now}{where}"
                )
            time.sleep(0.02)

    def _raise_errors(self) -> None:
        for number, process in self.processes.items():
            if process.poll() is not None and process.returncode != 0:
                raise AssertionError(
                    f"the client on node {number} exited with {process.returncode}: "
                    f"{self.logs[number].read_text(errors='replace')[-3000:]}"
                )

    def stop(self) -> list[Path]:
        """Stop sending, wait for every request in flight, and return the histories."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        alive = [n for n, p in self.processes.items() if p.poll() is None]
        self.kill()
        assert not alive, f"the clients on nodes {alive} did not finish their requests in flight"
        self._raise_errors()
        return list(self.histories.values())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Every client stopped (SIGSTOP) inside, continued after: nothing new is sent meanwhile,
        so the nodes can settle at one commit index (the requests in flight commit; their replies
        wait in the sockets). A pause of well under `CLIENT_TIMEOUT_S` times out no request."""
        stopped = [p for p in self.processes.values() if p.poll() is None]
        for process in stopped:
            process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for process in stopped:
                process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(10)


if __name__ == "__main__":
    run_client(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
