"""A load generator for the ledger app: client processes doing pipelined transfers.

Used by `seqd demo` and `benches/e2e.py`. Each worker is a separate process with one blocking
`Client`, keeps up to `in_flight` transfers outstanding and records every request's latency.

Closed loop (`rate_per_s=0`): as fast as the window allows; latency is submit-to-reply.
Open loop (`rate_per_s>0`): requests are due at fixed intervals and latency is measured from the
time a request was *due*, not from when it was sent, so a stall that delays sending is counted
in full (the coordinated-omission correction of wrk2 and HdrHistogram).
"""

from __future__ import annotations

import multiprocessing
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from sequencer.apps.ledger import Balance, Deposit, Ledger, OpenAccount, Transfer
from sequencer.client import Client

__all__ = ["LoadResult", "percentile", "run_load", "setup_accounts", "total_balance"]

DEPOSIT_PER_ACCOUNT = 1_000_000_000
TRANSFER_AMOUNT_MAX = 10
PROGRESS_EVERY = 256
OPEN_LOOP_POLL_NS_MAX = 200_000  # the longest an open-loop client waits on its socket between looks


def account_name(number: int) -> str:
    return f"acct-{number:06d}"


def setup_accounts(socket_path: str, accounts: int, timeout_s: float = 30.0) -> None:
    with Client(socket_path, schema=Ledger.schema, timeout_s=timeout_s) as client:
        pending = []
        for number in range(accounts):
            pending.append(client.submit(OpenAccount(account_name(number))))
            pending.append(client.submit(Deposit(account_name(number), DEPOSIT_PER_ACCOUNT)))
        for request in pending:
            request.result()


def total_balance(socket_path: str, accounts: int, timeout_s: float = 30.0) -> int:
    with Client(socket_path, schema=Ledger.schema, timeout_s=timeout_s) as client:
        pending = [client.submit(Balance(account_name(number))) for number in range(accounts)]
        return sum(request.result().balance for request in pending)


def _worker(
    socket_path: str,
    seed: int,
    transfers: int,
    in_flight: int,
    accounts: int,
    rate_per_s: float,
    progress: Synchronized,  # type: ignore[type-arg]
    results: Any,
    timeout_s: float,
    clients_per_process: int = 1,
) -> None:
    """One process: `clients_per_process` clients, each on its own thread (one in the common case)."""
    if clients_per_process == 1:
        _client_loop(socket_path, seed, transfers, in_flight, accounts, rate_per_s, progress, results, timeout_s)
        return
    import threading

    threads = [
        threading.Thread(
            target=_client_loop,
            args=(socket_path, seed * 1000 + number, transfers, in_flight, accounts, rate_per_s, progress, results, timeout_s),
        )
        for number in range(clients_per_process)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _client_loop(
    socket_path: str,
    seed: int,
    transfers: int,
    in_flight: int,
    accounts: int,
    rate_per_s: float,
    progress: Synchronized,  # type: ignore[type-arg]
    results: Any,
    timeout_s: float,
) -> None:
    rng = random.Random(seed)
    latencies_ns = array("q")
    rejected = 0
    interval_ns = int(1e9 / rate_per_s) if rate_per_s > 0 else 0
    with Client(
        socket_path, schema=Ledger.schema, in_flight_max=in_flight, timeout_s=timeout_s, reconnect_timeout_s=timeout_s
    ) as client:
        window: deque[tuple[int, Any]] = deque()
        start_ns = time.perf_counter_ns()
        done = 0

        def complete_oldest() -> None:
            nonlocal done, rejected
            started_ns, pending = window.popleft()
            try:
                pending.result()
            except Exception:
                rejected += 1
            latencies_ns.append(time.perf_counter_ns() - started_ns)
            done += 1
            if done % PROGRESS_EVERY == 0:
                with progress.get_lock():
                    progress.value += PROGRESS_EVERY

        for sent in range(transfers):
            if interval_ns:
                due_ns = start_ns + sent * interval_ns
                while True:
                    client.poll()
                    while window and window[0][1].done():
                        complete_oldest()
                    remaining_ns = due_ns - time.perf_counter_ns()
                    if remaining_ns <= 0:
                        break
                    # Wait on the socket, do not spin (the clients share the machine with the
                    # node) and do not sleep: a reply is timed when it arrives, not when a sleep
                    # ends (a sleep put up to its length, ~100 us at 10k/s, on every latency).
                    client.poll(min(remaining_ns, OPEN_LOOP_POLL_NS_MAX) / 1e9)
                started_ns = due_ns
            else:
                started_ns = time.perf_counter_ns()
            while len(window) >= in_flight:
                complete_oldest()
            source = rng.randrange(accounts)
            target = (source + 1 + rng.randrange(accounts - 1)) % accounts
            amount = 1 + rng.randrange(TRANSFER_AMOUNT_MAX)
            window.append((started_ns, client.submit(Transfer(account_name(source), account_name(target), amount))))
            if interval_ns:
                client.poll()  # open loop: send each request when it is due, not in batches
        while window:
            complete_oldest()
        elapsed_ns = time.perf_counter_ns() - start_ns
    with progress.get_lock():
        progress.value += done % PROGRESS_EVERY
    results.put((latencies_ns.tobytes(), rejected, elapsed_ns))


@dataclass
class LoadResult:
    transfers: int
    rejected: int
    elapsed_s: float
    latencies_us: list[float]

    @property
    def per_s(self) -> float:
        return self.transfers / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_us(self, fraction: float) -> float:
        return percentile(self.latencies_us, fraction)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    position = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[position]


def run_load(
    socket_path: str,
    clients: int,
    transfers: int,
    in_flight: int,
    accounts: int,
    rate_per_s: float = 0.0,
    on_progress: Any = None,
    timeout_s: float = 60.0,
    processes_max: int = 64,
) -> LoadResult:
    """Run `clients` clients of `transfers` each; `rate_per_s` is the total rate.

    Each client has its own process up to `processes_max`; beyond that clients share processes
    (one thread each), so 256 clients do not need 256 interpreters on a small machine.
    """
    context = multiprocessing.get_context("spawn")
    progress = context.Value("q", 0)
    results = context.Queue()
    per_client_rate = rate_per_s / clients if rate_per_s else 0.0
    processes = min(clients, processes_max)
    assert clients % processes == 0, f"clients={clients} must be a multiple of {processes} processes"
    per_process = clients // processes
    workers = [
        context.Process(
            target=_worker,
            args=(socket_path, seed, transfers, in_flight, accounts, per_client_rate, progress, results, timeout_s,
                  per_process),
            daemon=True,
        )
        for seed in range(processes)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    collected: list[tuple[bytes, int, int]] = []
    total = clients * transfers
    try:
        while len(collected) < clients:
            try:
                collected.append(results.get(timeout=0.1))
            except Exception:
                if not any(worker.is_alive() for worker in workers) and results.empty():
                    raise RuntimeError("a load worker died; see its traceback above") from None
            if on_progress is not None:
                on_progress(progress.value, total, time.perf_counter() - started)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    elapsed_s = max(elapsed_ns for _, _, elapsed_ns in collected) / 1e9
    latencies = array("q")
    for data, _, _ in collected:
        latencies.frombytes(data)
    return LoadResult(
        transfers=total,
        rejected=sum(rejected for _, rejected, _ in collected),
        elapsed_s=elapsed_s,
        latencies_us=sorted(value / 1000 for value in latencies),
    )
