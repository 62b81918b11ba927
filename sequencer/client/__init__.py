"""The seqd client library: the wire protocol codec, a sans-I/O session core, and blocking and
asyncio clients built on it.

    from sequencer.client import Client
    with Client("/run/seqd/seqd.sock", client_id=stored_id, schema=Ledger.schema) as client:
        reply = client.call(Deposit(account="alice", amount=5))

See docs/client.md for the protocol, the session rules and examples.
"""

from typing import TYPE_CHECKING

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

# The clients (and with them socket, selectors and asyncio) load on first use, not with the package:
# the daemon's blp and gateway import the wire codec (`sequencer.client.protocol`) for its frame
# limits, and must not pull I/O modules in through this package's __init__ (PEP 562).
_LAZY = {
    "AsyncClient": ".aio",
    "AsyncPendingRequest": ".aio",
    "Client": ".blocking",
    "PendingRequest": ".blocking",
    "ClientSchema": ".session",
    "new_client_id": ".ids",
    "Subscription": ".subscription",
    "AsyncSubscription": ".aio_subscription",
    "AsyncReplicaQueries": ".aio_subscription",
    "ReplicaQueries": ".subscription",
    "SubscriptionItem": ".replica",
    "QueryResult": ".replica",
    "QueryError": ".replica",
    "SubscriptionError": ".replica",
    "Consistency": ".replica",
    "ItemKind": ".replica",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .aio import AsyncClient, AsyncPendingRequest
    from .aio_subscription import AsyncReplicaQueries, AsyncSubscription
    from .blocking import Client, PendingRequest
    from .ids import new_client_id
    from .replica import (
        Consistency,
        ItemKind,
        QueryError,
        QueryResult,
        SubscriptionError,
        SubscriptionItem,
    )
    from .session import ClientSchema
    from .subscription import ReplicaQueries, Subscription

__all__ = [
    "AsyncClient",
    "AsyncPendingRequest",
    "AsyncReplicaQueries",
    "AsyncSubscription",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientSchema",
    "CommandRejected",
    "ConnectionLost",
    "Consistency",
    "Duplicate",
    "ItemKind",
    "PendingRequest",
    "ProtocolError",
    "ProtocolViolation",
    "QueryError",
    "QueryResult",
    "ReplicaQueries",
    "Subscription",
    "SubscriptionError",
    "SubscriptionItem",
    "TimedOut",
    "new_client_id",
]
