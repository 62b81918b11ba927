"""Each role's CPU and wake-ups per command at a low fixed rate: the fixed cost of a wake-up.

    python -m benches.wake_cost [--rate 1000] [--seconds 4] [--open-rate 10000] [--strace ROLE]

A node with the default (blocking) idle strategies; two phases, each measured per role from
/proc (CPU time and voluntary/involuntary context switches of each role process):

- paced: one blocking client calls one ledger transfer at a time, each call starting on a fixed
  schedule of `--rate` per second, so every role parks between calls and wakes once (at least)
  per call. CPU per call here is the fixed cost of a wake-up (duty cycle, yield, park, wake),
  nearly nothing of it per-command work (2-6 us per command when loaded,
  benches.pipeline_cpu); a voluntary context switch is one park (or blocking system call).
- open: `--open-rate` per second from one open-loop client process (benches.e2e's latency
  figure: coordinated omission corrected), with p50/p99/p99.9 and this disk's fdatasync p50.

With `--strace ROLE` the paced phase runs a second time under `strace -c -f` of that role and
prints its system calls per call (strace slows the role: read the counts, not the times).
Judge a change by CPU and switches per call, alternated before/after: latency on a shared
machine is noisy (benches/RESULTS.md, "Target 1: per-wake cost").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from benches.call_rtt import fdatasync_p50_us
from daemon.harness import NodeProcess
from daemon.layout import node_roles
from daemon.load import account_name, run_load, setup_accounts
from sequencer.apps.ledger import Ledger, Transfer
from sequencer.client import Client

ROLES = [role.value for role in node_roles()]
OPEN_ACCOUNTS = 1000
OPEN_IN_FLIGHT = 64
STRACE_ATTACH_S = 0.5  # strace attaches to every thread in this time (it prints nothing when ready)


def role_sample(processes: dict[str, psutil.Process]) -> dict[str, tuple[float, ...]]:
    """Per role, summed over its threads: (ns on CPU, ns runnable but waiting for a CPU,
    voluntary switches, involuntary switches). /proc/PID/task/TID/schedstat is in nanoseconds
    (/proc/PID/stat's CPU times tick at 100 Hz: 3 us a call over 3,000 calls, too coarse)."""
    sample = {}
    for role, process in processes.items():
        on_cpu_ns = waiting_ns = 0
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
            except FileNotFoundError:  # a thread that just exited
                continue
            on_cpu_ns += int(fields[0])
            waiting_ns += int(fields[1])
        switches = process.num_ctx_switches()
        sample[role] = (on_cpu_ns, waiting_ns, switches.voluntary, switches.involuntary)
    return sample


def per_call(before: dict[str, tuple[float, ...]], after: dict[str, tuple[float, ...]],
             calls: int) -> dict[str, dict[str, float]]:
    figures = {}
    for role in before:
        on_cpu_ns, waiting_ns, voluntary, involuntary = (
            a - b for a, b in zip(after[role], before[role], strict=True)
        )
        figures[role] = {
            "cpu_us": on_cpu_ns / 1e3 / calls,
            "runq_us": waiting_ns / 1e3 / calls,
            "voluntary": voluntary / calls,
            "involuntary": involuntary / calls,
        }
    return figures


def paced_calls(client: Client, rate_per_s: float, seconds: float) -> list[float]:
    """One call at a time, each started at its slot of a fixed schedule (a late call starts at
    once); returns the round trips in seconds."""
    transfer = Transfer(account_name(0), account_name(1), 1)
    interval_s = 1.0 / rate_per_s
    timings = []
    started_s = time.perf_counter()
    due_s = started_s
    while due_s - started_s < seconds:
        wait_s = due_s - time.perf_counter()
        if wait_s > 0:
            time.sleep(wait_s)
        call_s = time.perf_counter()
        client.call(transfer)
        timings.append(time.perf_counter() - call_s)
        due_s += interval_s
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.wake_cost")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced calls per second")
    parser.add_argument("--seconds", type=float, default=4.0, help="each phase's length")
    parser.add_argument("--open-rate", type=float, default=10_000.0, help="0 skips the open-loop phase")
    parser.add_argument("--strace", choices=ROLES, help="count this role's system calls per call")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="seqd-wake-", dir="/tmp"))
    (directory / "node").mkdir()
    node = NodeProcess(directory / "node", f"wake{uuid.uuid4().hex[:6]}")
    result: dict[str, Any] = {"loadavg": os.getloadavg()}
    try:
        node.start()
        setup_accounts(node.socket_path, OPEN_ACCOUNTS)
        processes = {role: psutil.Process(node.role_pid(role)) for role in ROLES}
        with Client(node.socket_path, schema=Ledger.schema) as client:
            paced_calls(client, args.rate, 0.5)  # warm-up
            me = psutil.Process()
            before = role_sample(processes)
            client_before = role_sample({"client": me})
            timings = paced_calls(client, args.rate, args.seconds)
            after = role_sample(processes)
            client_after = role_sample({"client": me})
            calls = len(timings)
            result["paced"] = per_call(before, after, calls) | per_call(client_before, client_after, calls)
            timings.sort()
            result["paced_calls"] = calls
            result["paced_p50_us"] = timings[calls // 2] * 1e6
            result["paced_p99_us"] = timings[calls * 99 // 100] * 1e6
            if args.strace:
                result["strace"] = strace_paced(client, processes[args.strace].pid, args.rate, args.seconds)
        if args.open_rate > 0:
            count = int(args.open_rate * args.seconds)
            before = role_sample(processes)
            load = run_load(node.socket_path, 1, count, OPEN_IN_FLIGHT, OPEN_ACCOUNTS, rate_per_s=args.open_rate)
            after = role_sample(processes)
            result["open"] = per_call(before, after, max(1, load.transfers))
            result["open_per_s"] = load.per_s
            for name, fraction in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
                result[f"open_{name}_us"] = load.percentile_us(fraction)
            result["fdatasync_p50_us"] = fdatasync_p50_us(directory, seconds_min=1.0)[0]
    finally:
        node.stop()
        node.remove_shared_memory()
        shutil.rmtree(directory, ignore_errors=True)
    result["loadavg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 0


def strace_paced(client: Client, pid: int, rate_per_s: float, seconds: float) -> dict[str, float]:
    """The paced phase again under `strace -c -f -p pid`: system calls per call, by name."""
    output = tempfile.NamedTemporaryFile(prefix="seqd-strace-", suffix=".txt", delete=False)
    output.close()
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", output.name, "-p", str(pid)],
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(STRACE_ATTACH_S)
        calls = len(paced_calls(client, rate_per_s, seconds))
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    counts = {}
    for line in Path(output.name).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3]) / calls
    os.unlink(output.name)
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def report(result: dict[str, Any]) -> None:
    print(f"load average at start {result['loadavg'][0]:.2f}, at end {result['loadavg_end'][0]:.2f}")
    print(f"paced: {result['paced_calls']} calls, p50 {result['paced_p50_us']:.0f} us, "
          f"p99 {result['paced_p99_us']:.0f} us")
    print(f"{'role':<12} {'CPU us/call':>12} {'runq us/call':>13} {'vol sw/call':>12} {'invol/call':>11}")
    for role, figures in result["paced"].items():
        print(f"{role:<12} {figures['cpu_us']:12.1f} {figures['runq_us']:13.1f} {figures['voluntary']:12.2f} "
              f"{figures['involuntary']:11.2f}")
    if "strace" in result:
        print("system calls per call: " + ", ".join(f"{name} {count:.2f}" for name, count in result["strace"].items()))
    if "open" in result:
        print(f"open loop {result['open_per_s']:.0f}/s: p50 {result['open_p50_us']:.0f} us, p99 "
              f"{result['open_p99_us']:.0f} us, p99.9 {result['open_p999_us']:.0f} us; fdatasync p50 "
              f"{result['fdatasync_p50_us']:.0f} us")
        for role, figures in result["open"].items():
            print(f"  {role:<10} {figures['cpu_us']:8.1f} us/cmd {figures['runq_us']:6.1f} runq us/cmd "
                  f"{figures['voluntary']:6.2f} vol sw/cmd "
                  f"{figures['involuntary']:6.2f} invol/cmd")


if __name__ == "__main__":
    sys.exit(main())
