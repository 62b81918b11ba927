"""Where `Client` and `AsyncClient` used to live: kept so old imports work.

The client is now a sans-I/O core (`session.py`) with a blocking shell (`blocking.py`) and an
asyncio shell (`aio.py`); import from `sequencer.client` instead.
"""

from __future__ import annotations

from .aio import AsyncClient, AsyncPendingRequest
from .blocking import Client, PendingRequest
from .ids import new_client_id
from .session import (
    EVENTS_BUFFERED_MAX,
    IN_FLIGHT_LIMIT_MAX,
    RECONNECT_BACKOFF_S_MAX,
    RECONNECT_BACKOFF_S_MIN,
    REDIRECTS_MAX,
    RETRYABLE_ERROR_CODES,
    SEND_BATCH_BYTES,
    ClientSchema,
)

__all__ = [
    "EVENTS_BUFFERED_MAX",
    "IN_FLIGHT_LIMIT_MAX",
    "RECONNECT_BACKOFF_S_MAX",
    "RECONNECT_BACKOFF_S_MIN",
    "REDIRECTS_MAX",
    "RETRYABLE_ERROR_CODES",
    "SEND_BATCH_BYTES",
    "AsyncClient",
    "AsyncPendingRequest",
    "Client",
    "ClientSchema",
    "PendingRequest",
    "new_client_id",
]
