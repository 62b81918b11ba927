"""`python -m tests.nemesis.tally SUMMARY.json...`: the totals of many seeds' `summary.json`
(a long run's record for benches/RESULTS.md): seeds, sizes, time, faults by kind, skipped
faults, operations and violations."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def tally(paths: list[Path]) -> str:
    summaries = [json.loads(path.read_text()) for path in paths]
    faults: Counter[str] = Counter()
    evidence: Counter[str] = Counter()
    operations: Counter[str] = Counter()
    sizes: Counter[int] = Counter()
    skipped = violations = 0
    failed = []
    for summary in summaries:
        faults.update(summary["applied"])
        evidence.update(summary.get("evidence", {}))  # older summaries have none
        operations.update(summary["operations"])
        sizes[summary["nodes"]] += 1
        skipped += len(summary["skipped"])
        violations += len(summary["violations"])
        if not summary["ok"]:
            failed.append(summary["seed"])
    elapsed_s = sum(summary["elapsed_s"] for summary in summaries)
    faulted_s = sum(summary["duration_s"] for summary in summaries)
    seeds = sorted(summary["seed"] for summary in summaries)
    return "\n".join([
        f"seeds: {len(summaries)} ({seeds[0] if seeds else '-'}..{seeds[-1] if seeds else '-'}), "
        f"by cluster size {dict(sorted(sizes.items()))}",
        f"time: {elapsed_s / 60:.1f} min of runs ({faulted_s / 60:.1f} min of fault schedules)",
        f"faults applied: {sum(faults.values())} {dict(sorted(faults.items()))}; skipped {skipped}",
        f"evidence: {dict(sorted(evidence.items()))}",
        f"operations: {dict(sorted(operations.items()))}",
        f"violations: {violations}" + (f" (seeds {failed})" if failed else ""),
    ])  # fmt: skip


if __name__ == "__main__":
    print(tally([Path(argument) for argument in sys.argv[1:]]))
