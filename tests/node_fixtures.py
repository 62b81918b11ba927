"""Fixtures for tests that run a real node: processes, shared memory, journal, socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.harness import NodeProcess
from sequencer.apps.ledger import Balance, Deposit, Ledger, OpenAccount, Transfer

# `sequencer.client` is imported where it is used, so the raw-bytes conformance suite
# (tests/test_conformance*.py) can take `node_factory` without loading the project's client.

DEPOSIT = 1_000_000_000


@pytest.fixture
def node_factory(tmp_dir: Path, unique: str) -> Iterator[Callable[..., NodeProcess]]:
    """Make nodes in the test's directory; every one is stopped and cleaned up at the end."""
    made: list[NodeProcess] = []

    def make(settings: dict[str, dict[str, Any]] | None = None, start: bool = True, **start_args: Any) -> NodeProcess:
        node = NodeProcess(tmp_dir, f"{unique}n{len(made)}", settings)
        made.append(node)
        if start:
            node.start(**start_args)
        return node

    yield make
    for node in made:
        node.stop()
        node.remove_shared_memory()


def open_accounts(socket_path: str, names: list[str]) -> None:
    from sequencer.client import Client

    with Client(socket_path, schema=Ledger.schema, timeout_s=30) as client:
        pending = []
        for name in names:
            pending.append(client.submit(OpenAccount(name)))
            pending.append(client.submit(Deposit(name, DEPOSIT)))
        for request in pending:
            request.result()


def balances(socket_path: str, names: list[str]) -> dict[str, int]:
    from sequencer.client import Client

    with Client(socket_path, schema=Ledger.schema, timeout_s=30) as client:
        pending = {name: client.submit(Balance(name)) for name in names}
        return {name: request.result().balance for name, request in pending.items()}


@dataclass
class TransferDriver:
    """A thread with one client sending pipelined transfers until told to stop.

    Records what was acknowledged. The client never gives up (a long reconnect timeout), so
    after `stop()` every transfer it submitted has been acknowledged.
    """

    socket_path: str
    accounts: list[str]
    seed: int
    in_flight: int = 16
    acknowledged: list[tuple[str, str, int]] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TransferDriver:
        self._thread = threading.Thread(target=self._run, name=f"driver-{self.seed}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import random

        from sequencer.client import Client

        rng = random.Random(self.seed)
        try:
            with Client(
                self.socket_path,
                schema=Ledger.schema,
                timeout_s=120,
                reconnect_timeout_s=120,
                in_flight_max=self.in_flight,
            ) as client:
                window: list[tuple[tuple[str, str, int], Any]] = []
                while not self._stop.is_set():
                    source, target = rng.sample(self.accounts, 2)
                    transfer = (source, target, rng.randrange(1, 100))
                    window.append((transfer, client.submit(Transfer(*transfer))))
                    if len(window) >= self.in_flight:
                        done, pending = window[0]
                        pending.result()
                        self.acknowledged.append(done)
                        del window[0]
                for done, pending in window:
                    pending.result()
                    self.acknowledged.append(done)
        except BaseException as error:
            self.error = error

    def wait_acknowledged(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acknowledged) < count:
            if self.error is not None:
                raise AssertionError(f"driver {self.seed} failed: {self.error!r}")
            assert time.monotonic() < deadline, f"driver {self.seed}: only {len(self.acknowledged)} acks"
            time.sleep(0.01)

    def stop(self, timeout_s: float = 150.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), f"driver {self.seed} did not finish"
        if self.error is not None:
            raise AssertionError(f"driver {self.seed} failed: {self.error!r}") from self.error


def expected_balances(names: list[str], drivers: list[TransferDriver]) -> dict[str, int]:
    expected = dict.fromkeys(names, DEPOSIT)
    for driver in drivers:
        for source, target, amount in driver.acknowledged:
            expected[source] -= amount
            expected[target] += amount
    return expected
