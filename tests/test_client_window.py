"""The client library keeps to the daemon's request window (WELCOME's in_flight_max).

The daemon refuses a request_id above acked_request_id + in_flight_max (`window_exceeded`). The
window therefore spans request ids: a request answered early (refused at the gateway) above one
still unanswered frees no room, or the next request would be refused in turn.
"""

from __future__ import annotations

import os
import signal

import pytest

from sequencer.apps.ledger import Balance, Ledger
from sequencer.client import Client, CommandRejected, TimedOut
from tests.node_fixtures import node_factory  # noqa: F401 (fixture)

IN_FLIGHT_MAX = 1024  # the daemon's window (SAVED_REPLIES_MAX) and the client's largest


def test_a_request_refused_early_inside_a_full_window_frees_no_room(node_factory) -> None:  # noqa: F811
    node = node_factory({"socket": {"command_bytes_max": 1024}})
    _version, balance = Ledger.schema.encode_command(Balance("@mint"))
    blp = node.role_pid("blp")
    with Client(node.socket_path, timeout_s=30, in_flight_max=IN_FLIGHT_MAX) as client:
        # With the blp stopped, requests 1 .. 1023 stay unanswered; request 1024 is too large and
        # is refused by the gateway at once.
        os.kill(blp, signal.SIGSTOP)
        try:
            pending = [client.submit(balance) for _ in range(IN_FLIGHT_MAX - 1)]
            oversized = client.submit(b"\x00" * 2048)
            with pytest.raises(CommandRejected) as rejected:
                oversized.result()
            assert rejected.value.code == "command_too_large"
            assert not any(request.done() for request in pending)
            # Ids 1 .. 1024 fill the window until request 1 is answered: request 1025 waits.
            with pytest.raises(TimedOut):
                client.submit(balance, timeout_s=0.2)
        finally:
            os.kill(blp, signal.SIGCONT)
        for request in pending:
            request.result()
        assert client.call(balance).payload  # room again, and inside the daemon's window
