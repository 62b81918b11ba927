"""Run one ring benchmark pair for a while, for py-spy to sample (profile before optimising).

    /work/venv/bin/py-spy record --subprocesses --format raw -o /tmp/ring.txt -- \
        /work/venv/bin/python -m benches._ring_profile per-record 5

`per-record` runs `try_write` / `read`; `batch` runs `try_write_batch` / `poll`. The raw output
folds stacks per line, so `sort -t' ' -k2 -n` shows where the time goes.
"""

from __future__ import annotations

import sys

from benches import ring


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "per-record"
    duration_s = float(argv[1]) if len(argv) > 1 else 5.0
    rate = ring.bench_ring(duration_s, 0.25, mode == "batch", 1, "spin")
    print(f"{mode}: {rate:,.0f} msgs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
