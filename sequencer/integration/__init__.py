"""Integration with external systems: gateways that turn the log's requests into calls and the
answers into commands (docs/integration.md).

    from sequencer.integration import ExternalSystem, IntegrationGateway, request_timer_id

`keys` is the state machine's half (idempotency keys and request timers, no I/O); `gateway` the
process's half (a client of the node).
"""

from typing import TYPE_CHECKING

from .keys import KEY_MAX, REQUEST_TIMER_BIT, request_key_of_timer, request_timer_id

# The gateway (and with it the client library's sockets) loads on first use, so a state machine
# importing the keys pulls in no I/O module (PEP 562, as sequencer.client does).
_LAZY = {"ExternalSystem": ".gateway", "GatewayStats": ".gateway", "IntegrationGateway": ".gateway"}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .gateway import ExternalSystem, GatewayStats, IntegrationGateway

__all__ = [
    "KEY_MAX",
    "REQUEST_TIMER_BIT",
    "ExternalSystem",
    "GatewayStats",
    "IntegrationGateway",
    "request_key_of_timer",
    "request_timer_id",
]
