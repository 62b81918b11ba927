"""Blue-green switch-over under load: the unavailability a client sees (issue 16, part 2).

    python -m benches.bluegreen [--quick] [--json] [--clients N] [--in-flight N] [--load-s S]

What runs: blue, a node on the ledger v1, serves CLIENTS clients, each pipelining deposits
(IN_FLIGHT at a time, as fast as replies come: a closed loop); green, a node on the ledger v2,
stands by (`[standby]`, `FromLedgerV1`) and follows blue. After LOAD_S seconds `switch()` (the
code of `seqd bluegreen switch`) asks green, stops blue, and returns once green serves; the
clients reconnect and resend, and the load goes on for LOAD_S more seconds.

`switch_unavailable_ms`: for each client, the longest time between two consecutive replies in a
window around the switch (from a second before it to the end of the run); the largest over the
clients. It is the time a client under load got no answer: blue's drain, green's last records,
the bind, the client's reconnect backoff (10 ms doubling) and its resend. For comparison,
`baseline_gap_ms`: the same figure over the second before the switch (the gaps of normal
service on a busy machine), and `switch_s`, what `switch()` measured from blue's SIGTERM to
green's socket.

Napkin math. Blue's drain is a few event-loop passes and its blp catching up (~ms); green is
a few ms behind blue, so its last records take ~ms; the bind is immediate. The cost is the
clients' reconnect: a client that loses blue retries after 10, 20, 40, 80... ms, so a gap of
~100 ms on a quiet machine; process scheduling on a loaded 2-core machine adds to each step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from daemon.harness import NodeProcess
from daemon.standby import switch
from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount
from sequencer.client import Client

TARGET_UNAVAILABLE_MS = 1000.0  # issue 16: under a second
BASELINE_WINDOW_S = 1.0  # the normal gaps are measured over this much time before the switch


class Depositor:
    """One client pipelining deposits on a thread, noting when each reply arrived."""

    def __init__(self, socket_path: str, account: str, in_flight: int) -> None:
        self.socket_path = socket_path
        self.account = account
        self.in_flight = in_flight
        self.replied_at: list[float] = []
        self.reconnects = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"depositor-{account}", daemon=True)

    def _run(self) -> None:
        _version, payload = LEDGER_SCHEMA.encode_command(Deposit(self.account, 1))
        try:
            with Client(self.socket_path, timeout_s=60, reconnect_timeout_s=60,
                        in_flight_max=self.in_flight) as client:  # fmt: skip
                window = [client.submit(payload) for _ in range(self.in_flight)]
                while not self.stop.is_set():
                    window.pop(0).result()
                    self.replied_at.append(time.monotonic())
                    window.append(client.submit(payload))
                for request in window:
                    request.result()
                self.reconnects = client.stats["reconnects"]
        except BaseException as error:
            self.error = error


def longest_gap_s(times: list[float], start: float, end: float) -> float:
    inside = [t for t in times if start <= t <= end]
    return max((b - a for a, b in itertools.pairwise(inside)), default=end - start)


def run(clients: int, in_flight: int, load_s: float, directory: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bg-", dir=directory))
    (root / "blue").mkdir()
    (root / "green").mkdir()
    tag = f"bg{os.getpid()}"
    blue = NodeProcess(root / "blue", f"{tag}b")
    green = NodeProcess(root / "green", f"{tag}g", {
        "node": {"app": "sequencer.apps.ledger_v2:LedgerV2"},
        "socket": {"path": blue.socket_path},
        "standby": {"blue_config": str(blue.config_path), "transform": "sequencer.apps.ledger_v2:FromLedgerV1"},
    })  # fmt: skip
    results: dict[str, Any] = {"clients": clients, "in_flight": in_flight, "load_s": load_s}
    depositors: list[Depositor] = []
    try:
        blue.start()
        accounts = [f"acct-{number}" for number in range(clients)]
        with Client(blue.socket_path, schema=Ledger.schema, timeout_s=60) as client:
            for account in accounts:
                client.call(OpenAccount(account))
        green.start()
        depositors = [Depositor(blue.socket_path, account, in_flight) for account in accounts]
        for depositor in depositors:
            depositor.thread.start()
        time.sleep(load_s)
        switch_at = time.monotonic()
        results["load_average_1m_at_switch"] = os.getloadavg()[0]
        results["switch_s"] = switch(blue.config, green.config, say=lambda line: None)
        time.sleep(load_s)
        end = time.monotonic()
        for depositor in depositors:
            depositor.stop.set()
        for depositor in depositors:
            depositor.thread.join(60)
            if depositor.error is not None:
                raise RuntimeError(f"client {depositor.account} failed: {depositor.error!r}") from depositor.error
        gaps = [longest_gap_s(d.replied_at, switch_at - BASELINE_WINDOW_S, end) for d in depositors]
        baseline = [longest_gap_s(d.replied_at, switch_at - BASELINE_WINDOW_S, switch_at) for d in depositors]
        results["switch_unavailable_ms"] = max(gaps) * 1000
        results["switch_unavailable_ms_per_client"] = [round(gap * 1000, 1) for gap in gaps]
        results["baseline_gap_ms"] = max(baseline) * 1000
        results["reconnects"] = sum(d.reconnects for d in depositors)
        before = sum(1 for d in depositors for t in d.replied_at if t < switch_at)
        after = sum(1 for d in depositors for t in d.replied_at if t > switch_at + results["switch_s"])
        results["deposits_per_s_blue"] = before / load_s
        results["deposits_per_s_green"] = after / max(end - switch_at - results["switch_s"], 1e-9)
        results["target_met"] = results["switch_unavailable_ms"] < TARGET_UNAVAILABLE_MS
    finally:
        for depositor in depositors:
            depositor.stop.set()
        for node in (green, blue):
            node.stop()
            node.remove_shared_memory()
        shutil.rmtree(root, ignore_errors=True)
    results["python"] = sys.version.split()[0]
    results["cpus"] = os.cpu_count()
    results["load_average_1m"] = os.getloadavg()[0]
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in results.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s of load before the switch and 2 s after")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--clients", type=int, default=4, help="clients, each on its own account (default 4)")
    parser.add_argument("--in-flight", type=int, default=16, help="pipelined deposits per client (default 16)")
    parser.add_argument("--load-s", type=float, default=None, help="seconds of load before and after the switch")
    parser.add_argument("--dir", type=Path, default=None, help="where the nodes' directories go (default /tmp)")
    args = parser.parse_args(argv)
    load_s = args.load_s or (2.0 if args.quick else 10.0)
    results = run(args.clients, args.in_flight, load_s, args.dir)
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:36} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
