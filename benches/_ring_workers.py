"""Producer and consumer processes for `benches.ring`, one pair of functions per transport.

Every consumer reports `(messages, seconds)` measured after a warm-up, between its first time check
after `warmup_s` and the stop message, so process start-up and cold caches are discarded. Every
producer sends `PAYLOAD_BYTES` messages for `duration_s`, then a stop message. The same loop shape
is used for every transport: one message per call for the per-record variants, a time check every
`CHECK_EVERY` messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ipc

PAYLOAD_BYTES = 64
BATCH_FRAMES_MAX = 256  # frames per batch write and per poll: ~18 KiB of 64-byte frames
CHECK_EVERY = 1024  # messages between clock reads in the consumers and producers
DATA_TYPE = 1
STOP_TYPE = 2
RING_CAPACITY_BYTES = 1 << 22  # 4 MiB: room for ~58k frames of 64 bytes, far more than a batch

Report = Callable[[tuple[int, float]], None]


class _Meter:
    """Counts messages and times them after the warm-up."""

    __slots__ = ("count", "first_s", "start_count", "start_s", "warmup_s")

    def __init__(self, warmup_s: float) -> None:
        self.warmup_s = warmup_s
        self.first_s = 0.0
        self.start_s = 0.0
        self.start_count = 0

    def check(self, count: int) -> None:
        now = time.perf_counter()
        if not self.first_s:
            self.first_s = now
        elif not self.start_s and now - self.first_s >= self.warmup_s:
            self.start_s, self.start_count = now, count

    def result(self, count: int) -> tuple[int, float]:
        now = time.perf_counter()
        if not self.start_s:  # the run was shorter than the warm-up: measure all of it
            self.start_s, self.start_count = self.first_s or now, 0
        return count - self.start_count, now - self.start_s


def _pin(cpu: int | None) -> None:
    if cpu is not None and cpu in ipc.available_cpus():
        ipc.pin(cpu)


# ---- this ring -------------------------------------------------------------------------------


def ring_producer(name: str, duration_s: float, batch: bool, idle: str, cpu: int | None, go: Any) -> None:
    _pin(cpu)
    ring = ipc.Ring.attach(name)
    try:
        writer = ring.writer()
        idler = ipc.idle_strategy(idle)
        payload = bytes(range(PAYLOAD_BYTES))
        frames = [payload] * BATCH_FRAMES_MAX
        go.wait()
        deadline = time.perf_counter() + duration_s
        if batch:
            try_write_batch = writer.try_write_batch
            while time.perf_counter() < deadline:
                for _ in range(8):
                    pending = frames
                    while pending:
                        written = try_write_batch(pending, DATA_TYPE)
                        idler.idle(written)
                        if written != len(pending):
                            pending = pending[written:]
                        else:
                            break
        else:
            try_write = writer.try_write
            while time.perf_counter() < deadline:
                for _ in range(CHECK_EVERY):
                    while not try_write(payload, DATA_TYPE):
                        idler.idle(0)
        while not writer.try_write(b"", STOP_TYPE):
            idler.idle(0)
    finally:
        ring.close()


def ring_consumer(
    name: str, reader_name: str, batch: bool, idle: str, warmup_s: float, cpu: int | None, report: Report
) -> None:
    _pin(cpu)
    ring = ipc.Ring.attach(name)
    try:
        reader = ring.reader(reader_name)
        idler = ipc.idle_strategy(idle)
        meter = _Meter(warmup_s)
        count = 0
        next_check = 0
        if batch:
            poll = reader.poll
            while True:
                frames = poll(BATCH_FRAMES_MAX)
                if not frames:
                    idler.idle(0)
                    continue
                count += len(frames)
                if frames[-1][0] == STOP_TYPE:
                    count -= 1
                    break
                if count >= next_check:
                    meter.check(count)
                    next_check = count + CHECK_EVERY
        else:
            read = reader.read
            while True:
                frame = read()
                if frame is None:
                    idler.idle(0)
                    continue
                if frame[0] == STOP_TYPE:
                    break
                count += 1
                if count >= next_check:
                    meter.check(count)
                    next_check = count + CHECK_EVERY
        report(meter.result(count))
    finally:
        ring.close()


# ---- multiprocessing.Queue -------------------------------------------------------------------


def queue_producer(queues: list[Any], duration_s: float, cpu: int | None, go: Any) -> None:
    _pin(cpu)
    payload = bytes(range(PAYLOAD_BYTES))
    puts = [q.put for q in queues]
    go.wait()
    deadline = time.perf_counter() + duration_s
    if len(puts) == 1:
        put = puts[0]
        while time.perf_counter() < deadline:
            for _ in range(CHECK_EVERY):
                put(payload)
    else:
        while time.perf_counter() < deadline:
            for _ in range(CHECK_EVERY):
                for put in puts:
                    put(payload)
    for put in puts:
        put(None)
    for q in queues:
        q.close()
        q.join_thread()


def queue_consumer(queue: Any, warmup_s: float, cpu: int | None, report: Report) -> None:
    """Consumer of a multiprocessing.Queue or a faster-fifo Queue (the same `get()`)."""
    _pin(cpu)
    get = queue.get
    meter = _Meter(warmup_s)
    count = 0
    next_check = 0
    while True:
        message = get()
        if message is None:
            break
        count += 1
        if count >= next_check:
            meter.check(count)
            next_check = count + CHECK_EVERY
    report(meter.result(count))


# ---- faster-fifo -----------------------------------------------------------------------------


def fifo_producer(queue: Any, duration_s: float, cpu: int | None, go: Any) -> None:
    _pin(cpu)
    payload = bytes(range(PAYLOAD_BYTES))
    put = queue.put
    go.wait()
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        for _ in range(CHECK_EVERY):
            put(payload)
    put(None)


# ---- pyzmq PUSH/PULL over ipc:// -------------------------------------------------------------


def zmq_producer(address: str, duration_s: float, cpu: int | None, go: Any) -> None:
    import zmq

    _pin(cpu)
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.connect(address)
    try:
        payload = bytes(range(PAYLOAD_BYTES))
        send = socket.send
        go.wait()
        deadline = time.perf_counter() + duration_s
        while time.perf_counter() < deadline:
            for _ in range(CHECK_EVERY):
                send(payload)
        send(b"")
    finally:
        socket.close(linger=5000)
        context.term()


def zmq_consumer(address: str, warmup_s: float, cpu: int | None, ready: Any, report: Report) -> None:
    import zmq

    _pin(cpu)
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.bind(address)
    ready.set()
    try:
        recv = socket.recv
        meter = _Meter(warmup_s)
        count = 0
        next_check = 0
        while True:
            message = recv()
            if not message:
                break
            count += 1
            if count >= next_check:
                meter.check(count)
                next_check = count + CHECK_EVERY
        report(meter.result(count))
    finally:
        socket.close(linger=0)
        context.term()


# ---- ping-pong round trips over two rings, busy-spinning -------------------------------------


def rtt_ponger(ping_name: str, pong_name: str, cpu: int | None) -> None:
    _pin(cpu)
    ping = ipc.Ring.attach(ping_name)
    pong = ipc.Ring.attach(pong_name)
    try:
        read = ping.reader("ponger").read
        try_write = pong.writer().try_write
        while True:
            frame = read()
            if frame is None:
                continue
            if frame[0] == STOP_TYPE:
                break
            while not try_write(frame[1], DATA_TYPE):
                pass
    finally:
        ping.close()
        pong.close()


def rtt_pinger(
    ping_name: str, pong_name: str, round_trips: int, warmup: int, cpu: int | None, report: Callable[[list[int]], None]
) -> None:
    _pin(cpu)
    ping = ipc.Ring.attach(ping_name)
    pong = ipc.Ring.attach(pong_name)
    try:
        try_write = ping.writer().try_write
        read = pong.reader("pinger").read
        clock = time.perf_counter_ns
        payload = bytes(range(PAYLOAD_BYTES))
        samples = [0] * round_trips
        for i in range(warmup + round_trips):
            start_ns = clock()
            try_write(payload, DATA_TYPE)
            while read() is None:
                pass
            if i >= warmup:
                samples[i - warmup] = clock() - start_ns
        try_write(b"", STOP_TYPE)
        report(samples)
    finally:
        ping.close()
        pong.close()
