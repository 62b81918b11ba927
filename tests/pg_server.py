"""The PostgreSQL server fixture (benches/_postgres.py starts it): one per test session, a new
database per test. Without a binary the tests that need it are skipped, except under CI
(`CI=true`), where they fail: CI must run them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benches._postgres import NO_BINARY, PostgresServer, find_bindir, start_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if find_bindir() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{NO_BINARY}; CI must run the PostgreSQL tests", pytrace=False)
        pytest.skip(NO_BINARY)
    server = start_server(fsync=False)
    try:
        yield server
    finally:
        server.stop()
