"""How long a benchmark measures: every reported figure for at least MEASURE_S_MIN seconds.

A figure measured for a fraction of a second on a shared 2-core machine is mostly scheduler
noise (issue 13), so a bench sizes its runs by time, not by a fixed count:

- `repeat_for`: repeats a measurement (a figure and the seconds it measured) until both a minimum
  number of runs and MEASURE_S_MIN seconds have been measured, with RUNS_MAX so it stops by itself;
- `sized_for`: reruns one measurement of `count` items with a bigger count until one run alone
  measured MEASURE_S_MIN (the shorter runs are discarded, as warm-up), bounded by `count_max`.

Each bench reports the seconds it measured (`*_measured_s`) beside the figure, and takes
`--min-seconds` (0 lets the smoke tests run it short).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

MEASURE_S_MIN = 2.0  # issue 13: each figure measured for at least this long, even in --quick mode
RUNS_MAX = 10_000  # repeat_for stops here even if the runs measure (almost) no time
GROWTH_MARGIN = 1.25  # sized_for aims this much past the minimum, so one rerun is usually enough

Result = TypeVar("Result")


def repeat_for(
    measure: Callable[[], tuple[float, float]],
    runs_min: int,
    seconds_min: float = MEASURE_S_MIN,
    runs_max: int = RUNS_MAX,
) -> tuple[list[float], float]:
    """Calls `measure` (returning (figure, seconds measured)) until `runs_min` runs and
    `seconds_min` seconds; returns the figures and the seconds measured in all."""
    figures: list[float] = []
    measured_s = 0.0
    while len(figures) < runs_max and (len(figures) < runs_min or measured_s < seconds_min):
        figure, seconds = measure()
        figures.append(figure)
        measured_s += seconds
    return figures, measured_s


def sized_for(
    measure: Callable[[int], Result],
    seconds_of: Callable[[Result], float],
    count_min: int,
    count_max: int,
    seconds_min: float = MEASURE_S_MIN,
) -> Result:
    """Runs `measure(count)` from `count_min`, growing the count in proportion to the time
    still missing, until one run measured `seconds_min` or ran `count_max` items."""
    count = count_min
    while True:
        result = measure(count)
        seconds = seconds_of(result)
        if seconds >= seconds_min or count >= count_max:
            return result
        wanted = count * GROWTH_MARGIN * seconds_min / seconds if seconds > 0 else count * 10
        count = min(count_max, max(count + 1, math.ceil(wanted)))


def timed(measure: Callable[[], float]) -> Callable[[], tuple[float, float]]:
    """Wraps a measurement that returns only a figure: its seconds are the call's wall time."""
    def run() -> tuple[float, float]:
        started = time.perf_counter()
        figure = measure()
        return figure, time.perf_counter() - started

    return run
