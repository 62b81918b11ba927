"""The asyncio client's own API against a fake daemon on a real Unix socket, under asyncio and uvloop.

The behaviour both clients share (resend, timeouts, the window, errors, redirects) is tested once
for every shell in tests/test_client.py; this file keeps what only the asyncio client has: `async
with`, `await pending`, `async for`, several submits in one loop iteration, and `close()` failing
the calls that wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from sequencer.client import (
    AsyncClient,
    ClientError,
    ConnectionLost,
)
from sequencer.client.protocol import Reply
from tests.test_client_fake_daemon import FakeDaemon, running_fake_daemon

SHORT_S = 0.3  # a timeout that is meant to expire
TEST_S = 60.0  # a whole test's coroutine; far above what any of them needs

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture
def daemon(tmp_dir: Path) -> Iterator[FakeDaemon]:
    with running_fake_daemon(tmp_dir / "seqd.sock") as fake:
        yield fake


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coroutine: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(coroutine, TEST_S))

    return run


def make(daemon: FakeDaemon, **options: Any) -> AsyncClient:
    options.setdefault("reconnect_timeout_s", 10.0)
    return AsyncClient(daemon.socket_path, **options)


def test_call_round_trips_a_command_and_its_reply(daemon: FakeDaemon, run: Runner) -> None:
    async def main() -> None:
        async with make(daemon, client_id=12) as client:
            reply = await client.call(b"echo:hi")
            assert isinstance(reply, Reply)
            assert (reply.request_id, reply.payload) == (1, b"hi")
            assert (await client.call(b"incr:a")).payload == b"1"
            assert client.acked_request_id == 2
            assert client.client_id == 12

    run(main())


def test_pipelined_submits_go_out_together_and_each_reply_matches(
    daemon: FakeDaemon, run: Runner
) -> None:
    async def main() -> None:
        async with make(daemon, in_flight_max=64) as client:
            pending = [await client.submit(f"echo:{i}".encode()) for i in range(500)]
            replies = await asyncio.gather(*(request.result() for request in pending))
            assert [reply.payload for reply in replies] == [str(i).encode() for i in range(500)]
            assert [reply.request_id for reply in replies] == list(range(1, 501))
            assert client.in_flight == 0

    run(main())
    assert 32 <= daemon.unacked_max <= 64


def test_resend_after_dropped_connection_applies_every_request_exactly_once(
    daemon: FakeDaemon, run: Runner
) -> None:
    async def main() -> None:
        async with make(daemon, client_id=21, in_flight_max=100) as client:
            daemon.drop_after_commands = 120
            pending = [await client.submit(b"incr:n") for _ in range(300)]
            replies = [await request for request in pending]
            assert sorted(int(reply.payload) for reply in replies) == list(range(1, 301))
            assert client.stats["reconnects"] >= 2

    run(main())
    assert daemon.values[b"n"] == 300
    assert set(daemon.applications.values()) == {1}
    assert len(daemon.applications) == 300


def test_events_reach_subscribed_clients_only(daemon: FakeDaemon, run: Runner) -> None:
    async def main() -> None:
        async with make(daemon, subscribe_events=True) as subscriber, make(daemon) as bystander:
            await bystander.call(b"publish:one")
            await bystander.call(b"publish:two")
            received = []
            async for event in subscriber.events(timeout_s=SHORT_S):
                received.append(event.payload)
            assert received == [b"one", b"two"]
            assert not bystander._events
            with pytest.raises(ClientError, match="subscribe"):
                await bystander.next_event(SHORT_S)

    run(main())


def test_close_fails_waiters_and_refuses_new_calls(daemon: FakeDaemon, run: Runner) -> None:
    async def main() -> None:
        client = make(daemon)
        await client.connect()
        daemon.pause()
        pending = await client.submit(b"echo:never")
        waiter = asyncio.ensure_future(pending.result())
        await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(ConnectionLost, match="closed"):
            await waiter
        with pytest.raises(ConnectionLost, match="closed"):
            await client.call(b"echo:x")

    run(main())
