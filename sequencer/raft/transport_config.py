"""The peer transport's configuration and counters (`sequencer.raft.transport`), split from it by
concept: what a node's transport is told, and what it reports."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Final

from sequencer.raft.peer_protocol import PEER_FRAME_BYTES_MAX, REFUSAL_CODES, ClusterIdentity

__all__ = ["TRANSPORT_REFUSAL_CODES", "TransportConfig", "TransportCounters"]

# The transport's own refusals, besides the codec's.
TRANSPORT_REFUSAL_CODES: Final = (*REFUSAL_CODES, "handshake_timeout", "handshakes_pending_full")


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """One node's peer transport. Validated on creation.

    Args:
        cluster_id, node_id: this node; every peer must share the cluster id.
        secret: the cluster secret, at least SECRET_BYTES_MIN random bytes, the same on every node.
        listen_host, listen_port: the address to accept peers on: an IP literal; port 0 picks a
            free one (tests). Loopback only unless `allow_non_loopback`.
        peers: every other member's node id -> (host, port) to dial.
        handshake_timeout_ms: an inbound or outbound connection that has not authenticated by
            then is aborted. A LAN handshake takes one round trip; 2 s allows a loaded machine.
        connect_timeout_ms: bound on one TCP connect (a blackholed SYN).
        reconnect_first_ms, reconnect_max_ms: the dialler's backoff. 20 ms is two heartbeats; at
            most 1 s so a restarted peer is reached again well within a failover's budget.
        send_buffer_bytes_max: unsent bytes on one socket beyond which messages to that peer are
            dropped: by default two largest frames (the replicator sets the byte window plus one
            frame), so a healthy link never drops and a stalled one holds at most that of
            messages; forwarded records are dropped only once it is reached (a stream's resend
            goes whole: PENDING_BYTES_MAX at most past it).

    Raises:
        ValueError: a bad address, a non-loopback listen address without `allow_non_loopback`,
            this node among its peers, or an identity error (see ClusterIdentity).
    """

    cluster_id: int
    node_id: int
    secret: bytes = field(repr=False)
    listen_host: str
    listen_port: int
    peers: Mapping[int, tuple[str, int]]
    allow_non_loopback: bool = False
    handshake_timeout_ms: float = 2000.0
    connect_timeout_ms: float = 1000.0
    reconnect_first_ms: float = 20.0
    reconnect_max_ms: float = 1000.0
    send_buffer_bytes_max: int = 2 * PEER_FRAME_BYTES_MAX

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise ValueError(
                f"peer listen host {self.listen_host!r} is not an IP address: give one "
                "(127.0.0.1 or ::1 on a single machine), so what is exposed is never a DNS guess"
            ) from None
        if not address.is_loopback and not self.allow_non_loopback:
            raise ValueError(
                f"peer listen host {self.listen_host} is not a loopback address: the peer port "
                "would be reachable from the network. Set allow_non_loopback (cluster."
                "allow_non_loopback) for a cluster spread over machines, or listen on 127.0.0.1"
            )
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"peer listen port {self.listen_port} is outside 0..65535")
        if not self.peers:
            raise ValueError("a peer transport needs at least one peer: list the other members")
        if self.node_id in self.peers:
            raise ValueError(
                f"node {self.node_id} lists itself among its peers {sorted(self.peers)}: list "
                "only the other members"
            )
        for peer, (host, port) in self.peers.items():
            if not host or not 0 < port <= 65535:
                raise ValueError(f"peer {peer} has address {host!r}:{port}: give host and port")
        for name in ("handshake_timeout_ms", "connect_timeout_ms", "reconnect_first_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not self.send_buffer_bytes_max >= PEER_FRAME_BYTES_MAX:
            raise ValueError(
                f"send_buffer_bytes_max={self.send_buffer_bytes_max} < PEER_FRAME_BYTES_MAX="
                f"{PEER_FRAME_BYTES_MAX}: a healthy link must hold one largest frame"
            )
        self.identity  # noqa: B018 - validates the ids and the secret now

    @property
    def identity(self) -> ClusterIdentity:
        return ClusterIdentity(
            cluster_id=self.cluster_id,
            node_id=self.node_id,
            members=frozenset({self.node_id, *self.peers}),
            secret=self.secret,
        )


@dataclass(slots=True)
class TransportCounters:
    """What the transport did, as plain ints (the daemon copies `as_dict()` into its counters).

    `refused` has one entry per code of TRANSPORT_REFUSAL_CODES, all present from the start.
    """

    frames_in: int = 0  # authenticated data frames accepted
    frames_out: int = 0
    bytes_in: int = 0  # every byte read from a peer socket, refused ones included
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    records_in: int = 0
    records_out: int = 0
    messages_dropped: int = 0  # no authenticated link, or its send buffer was full
    records_dropped: int = 0
    forward_streams_broken: int = 0  # outbound forward streams ended by a dropped record
    forward_streams_refused: int = 0  # inbound connections closed: a forwarded batch not taken
    forward_refusals_received: int = 0  # the peer dialled said why it took no more forwards (REFUSED)
    linger_bytes_discarded: int = 0  # read after this node's REFUSED frame and dropped unread
    lingers_cut: int = 0  # connections aborted at LINGER_S or LINGER_BYTES_MAX after a REFUSED frame
    connects: int = 0  # outbound connections authenticated
    accepts: int = 0  # inbound connections authenticated
    connect_failures: int = 0  # TCP connects that failed or timed out
    disconnects: int = 0  # authenticated connections that ended
    handshakes_failed: int = 0  # connections, either way, that ended before authenticating
    refused: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(TRANSPORT_REFUSAL_CODES, 0)
    )

    def as_dict(self) -> dict[str, int]:
        figures = {
            item.name: getattr(self, item.name) for item in fields(self) if item.name != "refused"
        }
        figures.update({f"refused_{code}": count for code, count in self.refused.items()})
        figures["refused_total"] = sum(self.refused.values())
        return figures
