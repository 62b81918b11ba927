"""The peer transport's refusals, both ways: counted, logged sparingly, handed on; and the close
after a REFUSED frame, which must not lose the frame.

Split from `sequencer.raft.transport` by concept (what a node says and counts when it refuses a
peer, or hears a peer refused it, and how it closes after saying why); the transport keeps the
rules in its module docstring:

- a refused connection (a `PeerProtocolError`, a handshake timeout, the pending-handshake bound)
  is counted by its code in `refused`, logged the first time and at every power of two of that
  code, then aborted;
- a forwarded batch this node did not take is counted in `forward_streams_refused` and logged the
  first time and at every power of two; the connection it came on is aborted, or, when the node
  says why, closed after a last REFUSED frame by `LingeringClose` (below);
- a REFUSED frame from a peer this node dialled is counted in `forward_refusals_received`, logged
  by its reason's kind (`sequencer.raft.reason_kinds`), and handed to `on_refused`.

Closing after the REFUSED frame
-------------------------------

The dialler of a refused batch has usually sent more behind it (a loaded follower forwards and
answers every pass), so the refusing socket holds bytes nobody will read. Closing a socket with
unread bytes makes Linux send a reset instead of a FIN, and so does any byte that reaches it once
it is closed. The reset does not erase the frame from the dialler's kernel, but its next write
fails, and asyncio and uvloop then close the connection without reading what the kernel still
holds (Linux 6.18 keeps it readable after the reset; the event loop never reads it): the dialler
never learns why (no log line, no `forward_refusals_received`) and resends blindly. So, as web
servers do after an error reply (a "lingering close": Apache's `ap_lingering_close`, nginx's
`lingering_close`), `LingeringClose` half-closes after the frame (the FIN follows it), then reads
and drops whatever arrives, delivering none of it, until the dialler closes its end (it does as
soon as it reads the FIN) or a bound is reached: LINGER_S, or LINGER_BYTES_MAX dropped. Then it
aborts (`lingers_cut`): a peer that never closes, or keeps sending, holds the socket no longer.
When the dialler's reset arrives before the half-close, the half-close fails (ENOTCONN under
asyncio) and the connection is aborted at once, nothing raised to whoever refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from sequencer.cluster.forwards import PENDING_BYTES_MAX
from sequencer.raft.config import INFLIGHT_BYTES_MAX_DEFAULT
from sequencer.raft.peer_wire import PEER_FRAME_BYTES_MAX
from sequencer.raft.reason_kinds import ReasonKinds
from sequencer.raft.transport_config import TransportCounters

__all__ = ["LINGER_BYTES_MAX", "LINGER_S", "LingeringClose", "Refusals", "RefusedCallback"]

log = logging.getLogger("seqd.peer")

# How long a refusing node keeps reading (and dropping) after its REFUSED frame, at most. A dialler
# that is not stalled reads the frame and the FIN and closes within a loop pass or two (0.7-11 ms
# from the refusal to the close in six runs on loopback, forwarding all the while, load average
# 5.4); 2 s covers a loaded machine's scheduling and a LAN's round trips, the same allowance as a
# handshake (`handshake_timeout_ms`). Not a config setting: nothing depends on it but how long a
# stuck peer holds one socket and one timer. Read at each refusal (tests lower it).
LINGER_S: Final = 2.0
# Bytes dropped before the linger is cut. What a healthy dialler can still have on its way when
# it meets the refusal: both kernels' socket buffers (tcp_wmem's ceiling 4 MiB, tcp_rmem's 6 MiB by
# default, 32 MiB on the test machine), its transport's send buffer (`send_buffer_bytes_max`, 8 MiB
# in the replicator) and one stream's resend (PENDING_BYTES_MAX, 16 MiB): ~34-60 MiB. Reading and
# dropping 64 MiB took 43 ms of CPU under asyncio, 7 ms under uvloop (socketpair, load average
# 5.5): what a peer that keeps sending can cost per refusal. Cutting early only risks the reset
# the linger avoids, on a connection the dialler is leaving anyway.
LINGER_BYTES_MAX: Final = 64 << 20
# The upper end of that sum, by the constants it is made of (the send buffer as the replicator
# sizes it by default: replicator_setup.py), so raising one of them cannot silently outgrow it.
_KERNEL_BUFFERS_BYTES: Final = (4 << 20) + (32 << 20)  # tcp_wmem's ceiling, the test's tcp_rmem
assert LINGER_BYTES_MAX >= (
    _KERNEL_BUFFERS_BYTES + INFLIGHT_BYTES_MAX_DEFAULT + PEER_FRAME_BYTES_MAX + PENDING_BYTES_MAX
), "LINGER_BYTES_MAX no longer covers what a healthy dialler can still send"

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


class LingeringClose(asyncio.Protocol):
    """A connection after this node's last frame on it: takes its transport over, half-closes
    it, drops what arrives, closes at the peer's EOF or aborts at a bound (module docstring).

    Args:
        transport: the connection's transport, its last frame written.
        stream: the protocol it replaces; told `connection_lost` when the socket ends.
        counters: `linger_bytes_discarded`, `bytes_in` and `lingers_cut` count here.
    """

    __slots__ = ("_bytes_left", "_counters", "_stream", "_timer", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        stream: asyncio.BaseProtocol,
        counters: TransportCounters,
    ) -> None:
        self._transport = transport
        self._stream = stream
        self._counters = counters
        self._bytes_left = LINGER_BYTES_MAX
        # Whole before the transport is handed over: its connection_lost comes here from now on.
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self._cut)
        transport.set_protocol(self)
        try:
            transport.write_eof()  # the FIN, once the frame has left
        except OSError:
            # The peer's reset arrived first (asyncio's shutdown() fails with ENOTCONN): nothing
            # left to linger for; the abort still ends the stream (connection_lost, here).
            transport.abort()

    def data_received(self, data: bytes) -> None:
        counters = self._counters
        counters.bytes_in += len(data)
        counters.linger_bytes_discarded += len(data)
        self._bytes_left -= len(data)
        if self._bytes_left < 0:
            self._cut()

    def eof_received(self) -> bool:
        return False  # the peer closed its end: close ours (the time bound holds until it is)

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._stream.connection_lost(exc)

    def _cut(self) -> None:
        self._timer.cancel()
        self._counters.lingers_cut += 1
        self._transport.abort()
