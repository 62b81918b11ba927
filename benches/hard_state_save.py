"""How long the replicator's loop is held by its once-a-second commit-hint save, before and after
the save moved to a worker thread (daemon/roles/hard_state_saver.py).

    python -m benches.hard_state_save [--saves 100] [--dir /tmp] [--json]

before: `HardStateFile.save` on the loop's thread (temp file, fsync, rename, directory fsync),
        what `Replicator._publish` did once a second with the commit index alone changed.
after:  `HardStateSaver.look` with a hint due: the hand-off to the worker; the save itself runs
        on the worker (its time is shown too: the disk's, no longer the loop's).

Each figure is the wall time of the call on the caller's thread, so the loop's time blocked in
hard-state saves per second is the per-save figure times one save a second. Wall-clock: the
machine's load and the disk move it; say the load average with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from daemon.roles.hard_state_saver import HARD_STATE_COMMIT_SAVE_S, HardStateSaver
from sequencer.hard_state import HardStateFile
from sequencer.raft.messages import HardState


def _summary(name: str, samples_s: list[float]) -> str:
    samples_us = sorted(sample * 1e6 for sample in samples_s)
    p99 = samples_us[min(len(samples_us) - 1, int(len(samples_us) * 0.99))]
    return (f"{name:<34} median {statistics.median(samples_us):>9.1f} us   p99 {p99:>9.1f} us   "
            f"max {samples_us[-1]:>9.1f} us   ({len(samples_us)} saves)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="on the data directory's file system")
    parser.add_argument("--json", action="store_true", help="one JSON line of medians (us) last")
    arguments = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="seqd-hss-", dir=arguments.dir))
    try:
        file = HardStateFile.open(directory / "before")
        before = []
        for commit_index in range(1, arguments.saves + 1):
            started = time.perf_counter()
            file.save(HardState(term=1, vote=1, commit_index=commit_index))
            before.append(time.perf_counter() - started)
        saver = HardStateSaver(HardStateFile.open(directory / "after"))
        after, worker = [], []
        for commit_index in range(1, arguments.saves + 1):
            saver.note(HardState(term=1, vote=1, commit_index=commit_index))
            started = time.perf_counter()
            saver.look(saver.saved_s + HARD_STATE_COMMIT_SAVE_S)
            after.append(time.perf_counter() - started)
            with saver.changed:  # the next hint once this one is on disk, as a second later
                while saver.saved_number < saver.submitted_number:
                    saver.changed.wait()
            worker.append(time.perf_counter() - started)
        saver.stop()
        print(f"load average {os.getloadavg()[0]:.1f}; directory {directory}")
        print(_summary("before: loop blocked (save)", before))
        print(_summary("after:  loop blocked (look)", after))
        print(_summary("after:  worker's save (off loop)", worker))
        if arguments.json:
            print(json.dumps({"before_loop_blocked_us": statistics.median(before) * 1e6,
                              "after_loop_blocked_us": statistics.median(after) * 1e6,
                              "after_worker_save_us": statistics.median(worker) * 1e6}))  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
