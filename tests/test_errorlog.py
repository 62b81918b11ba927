"""DistinctErrorLog: every error counted, each kind logged once, repeats summarised per window."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from daemon.errorlog import OVERFLOW_KEY, DistinctErrorLog, exception_key

LOGGER_NAME = "seqd.test.errorlog"
WINDOW_S = 60.0


class SharedCounter:
    """Stands in for an ipc.counters Counter: only `add` is used."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, delta: int) -> int:
        self.value += delta
        return self.value


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def make_log(counter: SharedCounter | None = None, **kwargs: float) -> DistinctErrorLog:
    return DistinctErrorLog(
        logging.getLogger(LOGGER_NAME),
        counter_add=counter.add if counter else None,
        window_s=kwargs.get("window_s", WINDOW_S),
        keys_max=int(kwargs.get("keys_max", 1024)),
    )


def test_a_thousand_repeats_log_one_line_and_count_a_thousand(log_lines: list[str]) -> None:
    counter = SharedCounter()
    errors = make_log(counter)
    for i in range(1000):
        errors.record("protocol.bad_version", f"client {i} sent version 9", now_s=10.0 + i * 0.01)
    assert log_lines == ["protocol.bad_version: client 0 sent version 9"]
    assert counter.value == 1000
    assert errors.total == 1000
    assert errors.counts() == {"protocol.bad_version": 1000}


def test_repeats_are_summarised_at_most_once_per_window(log_lines: list[str]) -> None:
    errors = make_log()
    assert errors.record("journal.slow_sync", "fsync took 900 ms", now_s=0.0)
    for second in range(1, 150):
        errors.record("journal.slow_sync", f"fsync took {second} ms", now_s=float(second))
    # First at 0 s, summaries at 60 s and 120 s: three lines in 149 s.
    assert len(log_lines) == 3
    assert log_lines[1].startswith("60 more of journal.slow_sync")
    assert "fsync took 60 ms" in log_lines[1]
    assert log_lines[2].startswith("60 more of journal.slow_sync")
    observation = errors.observation("journal.slow_sync")
    assert observation is not None
    assert observation.total == 150
    assert observation.unlogged == 29


def test_distinct_keys_are_logged_separately(log_lines: list[str]) -> None:
    counter = SharedCounter()
    errors = make_log(counter)
    errors.record("protocol.bad_version", "version 9", now_s=0.0)
    errors.record("protocol.frame_too_large", "2 MiB frame", now_s=0.0)
    errors.record("protocol.bad_version", "version 9", now_s=1.0)
    assert log_lines == [
        "protocol.bad_version: version 9",
        "protocol.frame_too_large: 2 MiB frame",
    ]
    assert counter.value == 3


def test_flush_reports_a_burst_that_stopped(log_lines: list[str]) -> None:
    errors = make_log()
    for i in range(5):
        errors.record("snapshot.write", "disk full", now_s=float(i))
    assert errors.flush(now_s=30.0) == 0  # window not over
    assert errors.flush(now_s=60.0) == 1
    assert log_lines[-1].startswith("4 more of snapshot.write")
    assert errors.flush(now_s=500.0) == 0  # nothing new since


def test_forced_flush_reports_every_pending_repeat(log_lines: list[str]) -> None:
    errors = make_log()
    errors.record("a", "x", now_s=0.0)
    errors.record("a", "x", now_s=1.0)
    errors.record("b", "y", now_s=0.0)
    assert errors.flush(now_s=2.0, force=True) == 1
    assert log_lines[-1].startswith("1 more of a")


def test_per_call_counter_overrides_the_default() -> None:
    default = SharedCounter()
    journal = SharedCounter()
    errors = make_log(default)
    errors.record("journal.crc", "bad crc", now_s=0.0, counter_add=journal.add)
    assert (default.value, journal.value) == (0, 1)


def test_keys_past_the_bound_are_pooled_and_still_counted(log_lines: list[str]) -> None:
    counter = SharedCounter()
    errors = make_log(counter, keys_max=3)
    for i in range(10):
        errors.record(f"client.{i}", "bad frame", now_s=0.0)
    assert counter.value == 10
    assert errors.total == 10
    counts = errors.counts()
    assert len(counts) == 4
    assert counts[OVERFLOW_KEY] == 7
    # Three keys and one overflow line: the flood did not reach the log.
    assert len(log_lines) == 4
    assert "client.3" in log_lines[3]


def test_exception_key_names_type_and_raising_line_not_message() -> None:
    def fail(detail: str) -> None:
        raise ValueError(detail)

    keys = set()
    for detail in ("a", "b"):
        try:
            fail(detail)
        except ValueError as error:
            keys.add(exception_key(error))
    (key,) = keys
    assert key.startswith("builtins.ValueError@")
    assert key.endswith(f":{fail.__code__.co_firstlineno + 1}")


def test_record_exception_logs_the_traceback_once(log_lines: list[str]) -> None:
    errors = make_log()
    for i in range(3):
        try:
            raise OSError(f"disk gone {i}")
        except OSError as error:
            errors.record_exception(error, now_s=float(i))
    assert len(log_lines) == 1
    assert "disk gone 0" in log_lines[0]
    assert "Traceback" in log_lines[0]
    assert list(errors.counts().values()) == [3]
