"""What a bridge's target keeps: the last source index applied per stream (I/O-free, app side).

A bridge (docs/integration.md, "Bridges") delivers one service's events as commands to another,
each command sent with the bridge's client id for its stream and the source's log index as the
request id. The target's dedup table refuses a redelivery while the client id is remembered; the
target's *state* is what says how far a stream got, for good: every bridged command carries its
`stream` and `source_index`, and the target app records the index in the same `apply` as the
command's effect (the position stored atomically with the effect). So:

- a command whose index is at or below the stream's position is a redelivery: no effect
  (`Inbox.fresh` returns False), even after the dedup table forgot the client id;
- a restarted bridge asks the target for the position (`BridgePosition`, answered from the
  state through the log, so it counts every command applied before it) and resumes after it.
  Any lower bound would do: everything from it on is refused as a redelivery.

An app that is a bridge target keeps an `Inbox` in its state (its `positions` dict in its
snapshot), handles `BridgePosition` with `Inbox.position_reply`, and calls `Inbox.fresh` first
in the handler of each bridged command.
"""

from __future__ import annotations

import hashlib

import msgspec

from sequencer.state_machine import Rejected

__all__ = ["STREAM_BYTES_MAX", "BridgePosition", "BridgePositionReply", "Inbox", "stream_client_id"]

STREAM_BYTES_MAX = 128  # a stream is named, e.g. "shard0>shard1", not described


class BridgePosition(msgspec.Struct, tag=True):
    """Command: the last source index the target applied for `stream` (0: none yet)."""

    stream: str


class BridgePositionReply(msgspec.Struct, tag=True):
    stream: str
    source_index: int


def stream_client_id(stream: str) -> int:
    """The client id a bridge uses for `stream`: stable across restarts and machines (a hash of
    the name, not Python's salted `hash`), 63 bits like `new_client_id`, never 0."""
    digest = hashlib.blake2b(stream.encode(), digest_size=8, person=b"seqd-bridge").digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1) or 1


class Inbox:
    """The per-stream positions of a bridge target; part of the app's state.

    Invariant: `positions[stream]` is the highest source index of `stream` whose command was
    applied; a command at or below it is a redelivery.
    """

    __slots__ = ("positions",)

    def __init__(self, positions: dict[str, int] | None = None) -> None:
        self.positions = positions if positions is not None else {}

    def fresh(self, stream: str, source_index: int) -> bool:
        """True, and the position moved to `source_index`, for a command not applied before;
        False for a redelivery (the caller then changes nothing)."""
        if source_index <= self.positions.get(stream, 0):
            return False
        if not stream or len(stream.encode()) > STREAM_BYTES_MAX:
            raise Rejected("bad_stream", f"a stream name is 1 to {STREAM_BYTES_MAX} bytes")
        self.positions[stream] = source_index
        return True

    def position_reply(self, command: BridgePosition) -> BridgePositionReply:
        return BridgePositionReply(command.stream, self.positions.get(command.stream, 0))
