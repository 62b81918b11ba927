"""The nats-server fixture (benches/_nats.py starts it): a server with JetStream per test, on
127.0.0.1 and a free port, in a temporary directory. Without a binary the tests that need it are
skipped, except under CI (`CI=true`), where they fail: CI must run them. Without nats-py (the
`export` extra, in the test extras) they fail too: the test extras install it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benches._nats import NO_BINARY, NatsServer, find_binary


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    if find_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{NO_BINARY}; CI must run the JetStream export tests", pytrace=False)
        pytest.skip(NO_BINARY)
    server = NatsServer.create()
    try:
        yield server
    finally:
        server.stop()
