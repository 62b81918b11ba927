"""Bridges: one service's events delivered as commands to another, exactly once.

    inbox.py   what a target app keeps: the last source index applied per stream (I/O-free;
               the names below, so an app importing them loads no client code)
    bridge.py  the loop: source events -> route -> target commands, request id = source index

    from sequencer.bridge.bridge import Bridge
    Bridge(route, "shard0>shard1", target_socket, TargetApp.schema).run(source, stop)

`seqd bridge run --config bridge.toml` runs one (daemon/bridge.py); docs/integration.md,
"Bridges", has the long form.
"""

from sequencer.bridge.inbox import (
    STREAM_BYTES_MAX,
    BridgePosition,
    BridgePositionReply,
    Inbox,
    stream_client_id,
)

__all__ = ["STREAM_BYTES_MAX", "BridgePosition", "BridgePositionReply", "Inbox", "stream_client_id"]
