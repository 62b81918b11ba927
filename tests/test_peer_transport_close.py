"""PeerTransport.close() ends its dial loops even when a cancel is lost (sequencer/raft/transport.py,
`_dial`): on Python 3.11, asyncio.wait_for swallows a cancel that arrives as the connect attempt
it waits for fails, and a dial loop that went on held close() (so a node's shutdown) forever."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from daemon.faultproxy import free_loopback_ports
from tests.test_peer_transport import TEST_S, Node, config, until

ROUNDS = 20  # the race is made exactly each time; a few rounds in case a loop orders it otherwise
CLOSE_S = 5.0  # close() ends at once; beyond this it is stuck (no timing is measured)


@pytest.mark.parametrize("connect_ends", ["failed", "connected"])
def test_close_ends_a_dial_loop_whose_cancel_wait_for_swallowed(connect_ends: str) -> None:
    """The connect attempt ends (refused, or connected to nothing that answers) in the same loop
    pass as close() cancels the dial loop: wait_for then hands back the attempt's outcome instead
    of the cancel. The loop must still end, and close() with it, without dialling again."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        attempts: list[asyncio.Future[Any]] = []  # this round's connect attempts, left pending

        async def connect(*args: Any, **kwargs: Any) -> Any:
            attempt = loop.create_future()
            attempts.append(attempt)
            return await attempt

        for _ in range(ROUNDS):
            ports = dict(zip((1, 2), free_loopback_ports(2), strict=True))
            node = Node(config(2, ports, reconnect_first_ms=1.0, reconnect_max_ms=2.0))
            attempts.clear()
            loop.create_connection = connect  # type: ignore[method-assign]
            try:
                await node.transport.start()
                await until(lambda: len(attempts) == 1, "the first connect attempt")
                if connect_ends == "failed":
                    attempts[0].set_exception(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
                else:
                    attempts[0].set_result((None, None))  # a stream nobody connects: never closed
                closing = asyncio.ensure_future(node.transport.close())  # its cancel: this pass
                done, _ = await asyncio.wait([closing], timeout=CLOSE_S)
                assert done == {closing}, "close() stuck on a dial loop that did not end"
                assert len(attempts) == 1, "dialled again after close()"
            finally:
                del loop.create_connection  # the loop's own again
                for link in node.transport._links.values():
                    if link.task is not None:
                        link.task.cancel()  # when the test failed: do not leave it dialling

    asyncio.run(asyncio.wait_for(main(), TEST_S))
