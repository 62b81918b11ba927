"""The seqd client library: the wire protocol codec, a sans-I/O session core, and blocking and
asyncio clients built on it.

    from sequencer.client import Client
    with Client("/run/seqd/seqd.sock", client_id=stored_id, schema=Ledger.schema) as client:
        reply = client.call(Deposit(account=1, amount=5))

See docs/client.md for the protocol, the session rules and examples.
"""

from .aio import AsyncClient, AsyncPendingRequest
from .blocking import Client, PendingRequest
from .errors import (
    ClientClosed,
    ClientError,
    CommandRejected,
    ConnectionLost,
    Duplicate,
    ProtocolViolation,
    TimedOut,
)
from .ids import new_client_id
from .protocol import ProtocolError
from .session import ClientSchema

__all__ = [
    "AsyncClient",
    "AsyncPendingRequest",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientSchema",
    "CommandRejected",
    "ConnectionLost",
    "Duplicate",
    "PendingRequest",
    "ProtocolError",
    "ProtocolViolation",
    "TimedOut",
    "new_client_id",
]
