"""The seqd client library: the wire protocol codec and blocking and asyncio clients.

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
    name: ".unix"
    for name in ("AsyncClient", "AsyncPendingRequest", "Client", "ClientSchema", "PendingRequest", "new_client_id")
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
