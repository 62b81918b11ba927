"""A blocking idle strategy wakes, without an exception, when a signal arrives (SIGTERM stops roles)."""

from __future__ import annotations

import os
import signal
import threading
import time

from ipc.doorbell import Doorbell


def test_doorbell_wait_interrupted_by_a_signal_returns_instead_of_raising(unique: str) -> None:
    bell = Doorbell.create(f"/seqd.{unique}.bell")
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.start()
        started = time.monotonic()
        assert bell.wait(5000) is False
        assert time.monotonic() - started < 4.0
        timer.join()
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
        bell.close()
        bell.unlink()
