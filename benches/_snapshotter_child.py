"""The snapshotter's side of `benches.recovery`'s replica-writer stall (`snapshot.writer =
"replica"`): a process of its own with its own copy of the state, built from the same records as
the blp's, fed every later record through a file (the real snapshotter reads the journal from
the page cache), applying them on the same fast path (`Processor.replay_run`, what
`LogFollower.advance` calls) and writing the snapshot file at the SNAPSHOT record.

    python -m benches._snapshotter_child FEED SNAPSHOT_DIR ACCOUNTS READY RESULT POLICY

FEED holds length-prefixed runs of records (`benches.recovery.FEED_LENGTH`); a length of 0 ends
it. READY is created once the state is built; RESULT gets the figures as JSON. POLICY "idle":
once its state is built it runs at SCHED_IDLE, as the real snapshotter does
(`daemon.roles.snapshotter.run_at_idle_priority`); "idle-off:N": that, and on every CPU but N,
the blp's (`keep_off_the_blps_cpu`); "normal": at the bench's own priority.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benches.recovery import FEED_LENGTH, build_state
from daemon.roles.snapshotter import keep_off_the_blps_cpu, run_at_idle_priority
from sequencer import snapshot as snapshots
from sequencer.processor import Processor

FOLLOWER_NODE = "\0follower"  # sequencer.follow's: no session is on it
FEED_POLL_S = 0.0005  # at the end of the feed: the blp has not written the next run yet


def main(argv: list[str]) -> int:
    feed_path, snapshot_dir, accounts, ready_path, result_path, policy = argv
    # The same records as the blp's (seed 1), on a processor of no node's, as the snapshotter's
    # (it builds no reply frames; the state is the same: the two hashes are compared at the end).
    processor, source = build_state(int(accounts), FOLLOWER_NODE)
    del source
    # After the build: at SCHED_IDLE from the start it would build only on a CPU no one wants.
    scheduling = run_at_idle_priority() if policy.startswith("idle") else "normal"
    if policy.startswith("idle-off:"):  # the blp pinned there
        blp_cpu = int(policy.partition(":")[2])
        keep_off_the_blps_cpu(blp_cpu)
        scheduling += f", off CPU {blp_cpu}"
    Path(ready_path).write_text("ready")
    write_cpu_s = 0.0
    write_wall_s = 0.0
    written: list[int] = []

    def on_snapshot(state: Processor[Any]) -> None:
        nonlocal write_cpu_s, write_wall_s
        cpu, wall = time.process_time(), time.perf_counter()
        header, body = state.snapshot_file_contents()
        snapshots.write_snapshot(snapshot_dir, header, body)
        write_cpu_s += time.process_time() - cpu
        write_wall_s += time.perf_counter() - wall
        written.append(header.index)

    records = 0
    started_cpu = time.process_time()
    with open(feed_path, "rb") as feed:
        while True:
            position = feed.tell()
            head = feed.read(FEED_LENGTH.size)
            length = FEED_LENGTH.unpack(head)[0] if len(head) == FEED_LENGTH.size else -1
            run = feed.read(length) if length > 0 else b""
            if length < 0 or len(run) < length:  # not all written yet
                feed.seek(position)
                time.sleep(FEED_POLL_S)
                continue
            if length == 0:
                break
            records += processor.replay_run(memoryview(run), None, on_snapshot)
    apply_cpu_s = time.process_time() - started_cpu - write_cpu_s
    Path(result_path).write_text(json.dumps({
        "records": records,
        "apply_cpu_s": apply_cpu_s,
        "write_cpu_s": write_cpu_s,
        "write_wall_s": write_wall_s,
        "written": written,
        "scheduling": scheduling,
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
        "state_hash": processor.state_hash().hex(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
