"""The peer transport's refusals, both ways: counted, logged sparingly, handed on.

Split from `sequencer.raft.transport` by concept (what a node says and counts when it refuses a
peer, or hears a peer refused it); the transport does the socket side (abort, or the last REFUSED
frame and the close) and keeps the rules in its module docstring:

- a refused connection (a `PeerProtocolError`, a handshake timeout, the pending-handshake bound)
  is counted by its code in `refused`, logged the first time and at every power of two of that
  code, then aborted;
- a forwarded batch this node did not take is counted in `forward_streams_refused` and logged the
  first time and at every power of two; the connection it came on closes;
- a REFUSED frame from a peer this node dialled is counted in `forward_refusals_received`, logged
  by its reason's kind (`sequencer.raft.reason_kinds`), and handed to `on_refused`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sequencer.raft.reason_kinds import ReasonKinds
from sequencer.raft.transport_config import TransportCounters

__all__ = ["Refusals", "RefusedCallback"]

log = logging.getLogger("seqd.peer")

RefusedCallback = Callable[[int, str], None]


class Refusals:
    """One node's refusals of its peers and the ones it hears back, in `counters`.

    Args:
        node_id: this node (for the log).
        counters: the transport's counters.
        on_refused: called with (peer id, reason) for each refusal heard back, or None.
    """

    __slots__ = ("_counters", "_kinds", "_node_id", "on_refused")

    def __init__(
        self, node_id: int, counters: TransportCounters, on_refused: RefusedCallback | None
    ) -> None:
        self._node_id = node_id
        self._counters = counters
        self._kinds = ReasonKinds()  # refusals heard back, by kind, for the log
        self.on_refused = on_refused

    def connection_refused(self, description: str, code: str, message: str) -> None:
        """A connection (`description`, as `_PeerStream.describe` says) refused for `code`."""
        refused = self._counters.refused
        refused[code] += 1
        count = refused[code]
        if count & (count - 1) == 0:  # the first time, then at every power of two
            log.warning(
                "node %d refused a peer connection, %s: %s: %s (%d so far)",
                self._node_id, description, code, message, count,
            )  # fmt: skip

    def forwards_refused(self, peer_id: int, reason: str | None) -> None:
        """This node did not take a batch `peer_id` forwarded (for `reason`, when it gave one)."""
        counters = self._counters
        counters.forward_streams_refused += 1
        count = counters.forward_streams_refused
        if count & (count - 1) == 0:  # the first time, then at every power of two
            log.info("node %d closed the connection from node %d: forwarded records not taken (%s; it "
                     "resends them on a new connection); %d so far", self._node_id, peer_id,
                     reason or "no reason given", count)  # fmt: skip

    def refusal_received(self, peer_id: int, reason: str) -> None:
        """The leader `peer_id` did not take this node's forwarded records, and said why: counted,
        and logged the first time and at every power of two of its reason's kind (the reason with
        its numbers masked: sequencer/raft/reason_kinds.py). It closes the connection next; the
        records go again, in order, on the next one."""
        counters = self._counters
        counters.forward_refusals_received += 1
        if kind_count := self._kinds.count(reason, time.monotonic()):
            log.warning("node %d's forwarded records were refused by node %d: %s; they go again on a "
                        "new connection (%d refusals so far, %d of this kind)", self._node_id,
                        peer_id, reason, counters.forward_refusals_received, kind_count)  # fmt: skip
        if self.on_refused is not None:
            self.on_refused(peer_id, reason)
