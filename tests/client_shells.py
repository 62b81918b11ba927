"""Both client shells behind one blocking interface, so one behavioural test runs against each.

`open_client(shell, path, **options)` makes a blocking `Client` ("blocking"), or an `AsyncClient`
on an asyncio or uvloop event loop of its own thread ("asyncio", "uvloop") wrapped in
`AsyncShell`, which offers the blocking client's methods and runs each call on that loop. Errors
cross unchanged (the same exception object), so `pytest.raises` sees what the shell raised.
`close()` closes the client as `Client.close` does; `shutdown()` then stops the loop's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import uvloop

from sequencer.client import AsyncClient, AsyncPendingRequest, Client

SHELLS = ["blocking", "asyncio", "uvloop"]
CALL_WAIT_S = 60.0  # bounds one call across threads; every call has a shorter timeout of its own


class AsyncPending:
    """An `AsyncPendingRequest` with the blocking `PendingRequest` interface."""

    def __init__(self, shell: AsyncShell, pending: AsyncPendingRequest) -> None:
        self._shell = shell
        self.pending = pending
        self.request_id = pending.request_id

    def done(self) -> bool:
        return self.pending.done()

    def result(self, timeout_s: float | None = None) -> Any:
        return self._shell.run(self.pending.result(timeout_s))


class AsyncShell:
    """An `AsyncClient` driven from the test's thread through its own event-loop thread."""

    def __init__(self, loop_name: str, socket_path: str, **options: Any) -> None:
        self.client = AsyncClient(socket_path, **options)  # argument errors raise here, at once
        self.loop = uvloop.new_event_loop() if loop_name == "uvloop" else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.run(self.client.connect())
        except BaseException:
            self.close()
            self.shutdown()
            raise

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CALL_WAIT_S)

    def call(self, command: Any, timeout_s: float | None = None) -> Any:
        return self.run(self.client.call(command, timeout_s))

    def submit(self, command: Any, timeout_s: float | None = None) -> AsyncPending:
        return AsyncPending(self, self.run(self.client.submit(command, timeout_s)))

    def flush(self, timeout_s: float | None = None) -> None:
        self.run(self.client.flush(timeout_s))

    def next_event(self, timeout_s: float | None = None) -> Any:
        return self.run(self.client.next_event(timeout_s))

    def events(self, timeout_s: float | None = None) -> Iterator[Any]:
        async def collect() -> list[Any]:
            return [event async for event in self.client.events(timeout_s)]

        return iter(self.run(collect()))

    def close(self) -> None:
        """Close the client (idempotent); its loop keeps running for calls that must now fail."""
        if not self.loop.is_closed():
            self.run(self.client.close())

    def shutdown(self) -> None:
        """Stop and close the loop, after `close`."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_WAIT_S)
        self.loop.close()

    def __enter__(self) -> AsyncShell:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # client_id, next_request_id, acked_request_id, in_flight, stats, socket_path, _events
        return getattr(self.client, name)


def open_client(shell: str, socket_path: str, **options: Any) -> Client | AsyncShell:
    if shell == "blocking":
        return Client(socket_path, **options)
    return AsyncShell(shell, socket_path, **options)
