"""Where a running node's time goes: py-spy profiles of every role at once under a ledger load
(issue 6).

    python -m benches.profile [--quick] [--json] [--duration 10] [--rate 100] [--clients 2]

Starts a node (`daemon.harness.NodeProcess`, a temp dir), opens `--accounts` accounts, runs a
closed-loop transfer load (`daemon.load.run_load`) in a background thread, reads the roles' pids
from `seqd status --json`, and runs `py-spy record` on every role and the supervisor at the same
time, twice per process: a flame graph SVG and a speedscope JSON. Then it stops the load and the
node and prints, per role and thread, the functions with the most self time (from the
speedscope samples).

Output goes to `benches/out/profile/` (gitignored): `<role>.svg`, `<role>.speedscope.json`,
`summary.json`.

Method. Samples include idle threads (`--idle`), so a role's percentages are of wall time and
its wait for work shows as the idle strategy's frame; `cpu_percent` (psutil, over the same
window) says how busy the process was. py-spy pauses a process for each sample (ptrace); at
100 Hz that costs the role ~1% (two samplers each), measurable as a lower `load.per_s` than an
unprofiled run. Self time is aggregated per function (name and file), not per line.

Napkin math. On 2 cores the load's client processes, the sequencer, the journaller and the blp
share 2 CPUs: ~5 busy processes, so no role gets a core to itself, and the node's throughput is
bounded by whichever of them needs the most CPU per transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from daemon.harness import NodeProcess
from daemon.layout import BLP_APPLIED_INDEX
from daemon.load import LoadResult, run_load, setup_accounts

OUT_DIR = Path(__file__).resolve().parent / "out" / "profile"
PY_SPY = Path(sys.executable).parent / "py-spy"
TOP_FUNCTIONS = 10
STATUS_TIMEOUT_S = 30.0
LOAD_JOIN_TIMEOUT_S = 120.0  # the load is sized to end a few s after the profile; this is slack
PY_SPY_SLACK_S = 30.0  # py-spy writes its files after `--duration`; beyond this it is stuck
CALIBRATE_TRANSFERS = 2000  # per client: enough for a rate within ~20%, done in ~1 s
LOAD_MARGIN_S = 3.0  # the load runs this much longer than the profile, so it covers it
# Innermost frames that are a thread waiting for work (blocked in the kernel, no CPU): the
# doorbell futex wait, a condition variable, the supervisor's monitor sleep. uvloop's epoll wait
# is not here: it is C code inside the sequencer's `main` frame and py-spy (without --native)
# cannot tell it from the event loop's own work.
WAITING_FUNCTIONS = ("Doorbell.wait (doorbell.py)", "Condition.wait (threading.py)",
                     "Supervisor.monitor (supervisor.py)")  # fmt: skip


def _cpu_percent_or_none(process: psutil.Process) -> float | None:
    """The process's CPU share since the last call, or None once it has exited."""
    try:
        return process.cpu_percent(None)
    except psutil.NoSuchProcess:
        return None


def role_pids(config_path: Path) -> dict[str, int]:
    """{role: pid} from `seqd status --json`, the supervisor included."""
    completed = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "status", "--config", str(config_path), "--json"],
        capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, check=False,
    )  # fmt: skip
    if not completed.stdout.strip():
        raise RuntimeError(
            f"seqd status --json printed nothing (exit {completed.returncode}): "
            f"{completed.stderr.strip()}"
        )
    status = json.loads(completed.stdout)
    pids = {"supervisor": status["supervisor"]["pid"]}
    for role, values in status["roles"].items():
        if values["pid"]:
            pids[role] = values["pid"]
    missing = [role for role, pid in pids.items() if not pid]
    if missing:
        raise RuntimeError(f"seqd status --json has no pid for {missing}: {completed.stdout}")
    return pids


def start_py_spy(pid: int, output: Path, file_format: str, duration_s: int, rate: int,
                 native: bool) -> subprocess.Popen[bytes]:  # fmt: skip
    command = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(duration_s),
               "--rate", str(rate), "--format", file_format, "--output", str(output), "--idle"]
    if native:
        command.append("--native")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def top_functions(speedscope_path: Path, top: int = TOP_FUNCTIONS) -> dict[str, Any]:
    """Self and total time per function, per thread, from a py-spy speedscope file.

    Self time: the sample's innermost frame. Total time: every function on the stack, once per
    sample. Percentages are of the thread's samples (its wall time: idle is sampled too);
    `top_busy` leaves out the samples spent waiting (WAITING_FUNCTIONS) and gives percentages
    of the rest, the thread's working time.
    """
    document = json.loads(speedscope_path.read_text())
    frames = document["shared"]["frames"]
    names = [f"{frame['name']} ({Path(frame.get('file') or '?').name})" for frame in frames]
    threads = {}
    for profile in document["profiles"]:
        self_weight: Counter[str] = Counter()
        total_weight: Counter[str] = Counter()
        samples = 0
        for stack in profile["samples"]:  # every weight is 1 / rate: count samples
            samples += 1
            if not stack:
                continue
            self_weight[names[stack[-1]]] += 1
            for name in {names[index] for index in stack}:
                total_weight[name] += 1
        # py-spy names a thread `Thread <tid> "<name>"`; keep the name.
        thread = profile["name"].split('"')[1] if '"' in profile["name"] else profile["name"]
        waiting = sum(self_weight[name] for name in WAITING_FUNCTIONS)
        busy = samples - waiting
        threads[thread] = {
            "samples": samples,
            "waiting_pct": round(100 * waiting / samples, 1) if samples else 0.0,
            "top_busy": [
                {"function": name, "self_pct_of_busy": round(100 * count / busy, 1)}
                for name, count in self_weight.most_common(top + len(WAITING_FUNCTIONS))
                if name not in WAITING_FUNCTIONS
            ][:top] if busy else [],
            "top_self": [
                {
                    "function": name,
                    "self_pct": round(100 * count / samples, 1),
                    "total_pct": round(100 * total_weight[name] / samples, 1),
                }
                for name, count in self_weight.most_common(top)
            ],
            "top_total": [
                {"function": name, "total_pct": round(100 * count / samples, 1)}
                for name, count in total_weight.most_common(top * 2)
            ],
        }
    return threads


class BackgroundLoad:
    """`run_load` in a thread; `result` or `error` when it is done."""

    def __init__(self, socket_path: str, clients: int, transfers: int, in_flight: int,
                 accounts: int) -> None:  # fmt: skip
        self.result: LoadResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(socket_path, clients, transfers, in_flight, accounts),
            name="load", daemon=True,
        )  # fmt: skip

    def _run(self, socket_path: str, clients: int, transfers: int, in_flight: int,
             accounts: int) -> None:  # fmt: skip
        try:
            self.result = run_load(socket_path, clients, transfers, in_flight, accounts)
        except BaseException as error:  # reported by the main thread
            self.error = error

    def join(self, timeout_s: float) -> LoadResult:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"the load did not finish within {timeout_s} s of the profile")
        if self.error is not None:
            raise RuntimeError(f"the load failed: {self.error!r}") from self.error
        assert self.result is not None
        return self.result


def profile_node(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="seqd-prof-", dir="/tmp"))  # short: a socket path
    node = NodeProcess(root, args.node or f"prof{os.getpid()}")
    spies: list[subprocess.Popen[bytes]] = []
    try:
        node.start()
        socket_path = node.socket_path
        setup_accounts(socket_path, args.accounts)
        calibration = run_load(socket_path, args.clients, CALIBRATE_TRANSFERS, args.in_flight,
                               args.accounts)  # fmt: skip
        # Size the load to outlast the profile; a closed loop cannot be stopped midway.
        warmup_s = 1.0
        transfers = int(calibration.per_s * (warmup_s + args.duration + LOAD_MARGIN_S)
                        / args.clients) + 1  # fmt: skip
        load = BackgroundLoad(socket_path, args.clients, transfers, args.in_flight, args.accounts)
        load.thread.start()
        time.sleep(warmup_s)  # the clients connect and the pipeline fills
        pids = role_pids(node.config_path)
        processes = {role: psutil.Process(pid) for role, pid in pids.items()}
        # The load's client processes (multiprocessing children of this process): on 2 cores
        # they compete with the roles, so their CPU belongs in the picture.
        clients = [child for child in psutil.Process().children()
                   if "multiprocessing" in " ".join(child.cmdline())]  # fmt: skip
        for process in clients:
            process.cpu_percent(None)
        for process in processes.values():
            process.cpu_percent(None)  # starts the window
        counters_before = node.read_counters()
        started = time.perf_counter()
        for role, pid in pids.items():
            for file_format, name in (("flamegraph", f"{role}.svg"),
                                      ("speedscope", f"{role}.speedscope.json")):  # fmt: skip
                spies.append(start_py_spy(pid, out_dir / name, file_format, args.duration,
                                          args.rate, args.native))  # fmt: skip
        outputs = []
        for spy in spies:
            output, _ = spy.communicate(timeout=args.duration + PY_SPY_SLACK_S)
            command = [str(part) for part in spy.args]  # type: ignore[union-attr]
            outputs.append((command, spy.returncode, output.decode(errors="replace")))
        elapsed_s = time.perf_counter() - started
        cpu = {role: process.cpu_percent(None) for role, process in processes.items()}
        # A client process that finished its share before the window closed cannot be read any
        # more (the load is sized to outlast the profile, but a loaded machine skews the
        # calibration): its CPU is left out and the summary says how many were.
        clients_cpu_readings = [_cpu_percent_or_none(process) for process in clients]
        clients_cpu = sum(reading for reading in clients_cpu_readings if reading is not None)
        clients_exited = clients_cpu_readings.count(None)
        counters_after = node.read_counters()
        failed = [(command, code, text) for command, code, text in outputs if code != 0]
        if failed:
            command, code, text = failed[0]
            raise RuntimeError(
                f"py-spy failed ({len(failed)} of {len(outputs)}); first: {' '.join(command)} "
                f"exited {code}: {text.strip()[-2000:]}"
            )
        result = load.join(LOAD_JOIN_TIMEOUT_S)
        applied = (counters_after.get(BLP_APPLIED_INDEX.name, 0)
                   - counters_before.get(BLP_APPLIED_INDEX.name, 0))  # fmt: skip
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        node.stop()
        node.remove_shared_memory()
        shutil.rmtree(root, ignore_errors=True)

    roles = {}
    for role, pid in pids.items():
        threads = top_functions(out_dir / f"{role}.speedscope.json")
        roles[role] = {"pid": pid, "cpu_percent": cpu[role], "threads": threads}
    return {
        "duration_s": args.duration,
        "rate_hz": args.rate,
        "profile_elapsed_s": round(elapsed_s, 2),
        "records_applied_while_profiling": applied,
        "records_per_s_while_profiling": round(applied / elapsed_s),
        "load": {
            "clients": args.clients,
            "in_flight": args.in_flight,
            "accounts": args.accounts,
            "transfers": result.transfers,
            "rejected": result.rejected,
            "per_s": round(result.per_s),
            "latency_us_p50": round(result.percentile_us(0.5)),
            "latency_us_p99": round(result.percentile_us(0.99)),
            "calibration_per_s": round(calibration.per_s),
            "client_processes": len(clients),
            "clients_cpu_percent": round(clients_cpu),
            "client_processes_exited_before_the_window_closed": clients_exited,
        },
        "roles": roles,
        "out_dir": str(out_dir),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a 3 s profile")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--duration", type=int, default=None, help="seconds of sampling (10)")
    parser.add_argument("--rate", type=int, default=100, help="samples per second per process")
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument("--in-flight", type=int, default=64, help="pipelined requests per client")
    parser.add_argument("--accounts", type=int, default=1000, help="ledger accounts")
    parser.add_argument("--node", default=None, help="node name (default: prof<pid>)")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output dir ({OUT_DIR})")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if not PY_SPY.exists():
        print(f"py-spy is not at {PY_SPY}: install it into this virtualenv", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    load_average = os.getloadavg()
    summary = profile_node(args, args.out)
    summary["load_average_before"] = [round(value, 2) for value in load_average]
    summary["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    summary["python"] = sys.version.split()[0]
    summary["cpus"] = os.cpu_count()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"load: {summary['load']['per_s']:,} transfers/s over {summary['load']['clients']} "
          f"clients, p50 {summary['load']['latency_us_p50']} us, p99 "
          f"{summary['load']['latency_us_p99']} us; clients used {summary['load']['clients_cpu_percent']}% "
          f"CPU; machine load average "
          f"{summary['load_average_before'][0]} before, {summary['load_average_after'][0]} after")  # fmt: skip
    for role, figures in summary["roles"].items():
        for thread, rows in figures["threads"].items():
            print(f"\n{role} (pid {figures['pid']}, cpu {figures['cpu_percent']:.0f}%), thread "
                  f"{thread}, {rows['samples']} samples, {rows['waiting_pct']}% waiting")  # fmt: skip
            print(f"  {'self%':>6} {'total%':>6}  function")
            for row in rows["top_self"]:
                print(f"  {row['self_pct']:6.1f} {row['total_pct']:6.1f}  {row['function']}")
            if rows["top_busy"]:
                print("  of the working samples (self %):")
                for row in rows["top_busy"]:
                    print(f"  {row['self_pct_of_busy']:6.1f}         {row['function']}")
    print(f"\nflame graphs and speedscope files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
