"""The seqd client library: the wire protocol codec and blocking and asyncio clients.

    from sequencer.client import Client
    with Client("/run/seqd/seqd.sock", client_id=stored_id, schema=Ledger.schema) as client:
        reply = client.call(Deposit(account="alice", amount=5))

See docs/client.md for the protocol, the session rules and examples.
"""

from .errors import (
    ClientClosed,
    ClientError,
    CommandRejected,
    ConnectionLost,
    Duplicate,
    ProtocolViolation,
    TimedOut,
)
from .protocol import ProtocolError
from .unix import (
    AsyncClient,
    AsyncPendingRequest,
    Client,
    ClientSchema,
    PendingRequest,
    new_client_id,
)

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
