"""The peer protocol's handshake: who may talk to a node, and how each end proves it.

Theory of operation
-------------------

Every directed pair of nodes has its own TCP connection: node A dials node B to send A's messages
to B, and B dials A for its own (`docs/peer-transport.md` says why). Each connection opens with a
three-frame challenge-response handshake, and from then on every frame carries a sequence number
and an HMAC-SHA256 over the frame.

    dialler D                                              acceptor A
    HELLO      cluster_id, D, A, nonce_d           ->
               <- CHALLENGE  cluster_id, A, D, nonce_a, proof_a
    AUTH       proof_d                             ->
    MESSAGES / COMMANDS  sequence 1, 2, ... + MAC  ->      (either way; the transport's
                                                           acceptors send none)

Both ends derive one session key from the cluster secret and the whole transcript (protocol label,
cluster id, the dialler's and the acceptor's node ids, both nonces), then four keys from it, each
with its own label: the acceptor's proof, the dialler's proof, the dialler-to-acceptor frame key,
the acceptor-to-dialler frame key. So:

- a proof or a frame from one connection is worthless on another (fresh nonces from both ends
  give a fresh session key);
- a proof or frame reflected back to its sender fails (each direction and each role has its own
  label, hence its own key);
- a replayed, dropped or reordered frame fails: each direction numbers its frames 1, 2, ... and
  the receiver accepts only the next number (TCP delivers in order, so any other number is an
  attack or a bug). The sequence number is in the header and covered by the MAC, so the receiver
  can tell a replay (`replayed_frame`) from tampering (`bad_mac`);
- the dialler proves nothing until the acceptor has proved it holds the secret, so a process that
  answers a node's dial learns nothing from it; the acceptor's proof, given to anyone who dials,
  lets an eavesdropper or a dialler test guesses of the secret offline, which is why the secret
  must be random and at least `SECRET_BYTES_MIN` bytes (not a password).

Before the handshake completes the codec accepts only the next handshake frame, of its exact
size, so an unauthenticated process can make it buffer no more than one read and can never reach
a decoder: it is refused at the 8-byte header or at the proof.

This module holds the handshake's layouts, the cluster identity, the key derivation and one
function per step, each checking what it receives and answering with the frame to send and the
keys to use; the codec (`sequencer.raft.peer_protocol`) keeps the connection's state and calls
them. Like the codec, it touches no socket, file, clock or random source: the nonces come in as
arguments.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from sequencer.raft.peer_wire import (
    FRAME_HEADER,
    MAC_BYTES,
    PROTOCOL_VERSION,
    FrameKind,
    PeerProtocolError,
)

__all__ = [
    "AUTH_BODY",
    "CHALLENGE_BODY",
    "CLUSTER_ID_MAX",
    "HELLO_BODY",
    "NODE_ID_MAX",
    "NONCE_BYTES",
    "SECRET_BYTES_MIN",
    "ChallengeAnswer",
    "ClusterIdentity",
    "HelloAnswer",
    "answer_challenge",
    "answer_hello",
    "check_auth",
    "hello_frame",
]

NONCE_BYTES: Final = 32  # 256 random bits from each end: a repeated nonce pair is never seen
# A captured handshake lets anyone test guesses of the secret offline (the acceptor's proof is a
# function of the secret and public values), so the secret must be a random 256-bit key, the
# strength of HMAC-SHA256 itself; a short or human-chosen secret would fall to a dictionary.
SECRET_BYTES_MIN: Final = 32
NODE_ID_MAX: Final = (1 << 32) - 1  # u32 on the wire
CLUSTER_ID_MAX: Final = (1 << 64) - 1  # u64 on the wire

HELLO_BODY: Final = struct.Struct("<QII32s")  # cluster_id, dialler id, acceptor id, nonce_d
CHALLENGE_BODY: Final = struct.Struct("<QII32s32s")  # cluster_id, acceptor, dialler, nonce_a, proof
AUTH_BODY: Final = struct.Struct("<32s")  # the dialler's proof
_TRANSCRIPT_IDS: Final = struct.Struct("<QII")  # cluster_id, dialler id, acceptor id
_TRANSCRIPT_LABEL: Final = b"seqd peer protocol v1"

assert HELLO_BODY.size == 48, HELLO_BODY.size
assert CHALLENGE_BODY.size == 80, CHALLENGE_BODY.size
assert AUTH_BODY.size == MAC_BYTES, AUTH_BODY.size


@dataclass(frozen=True, slots=True)
class ClusterIdentity:
    """Who this node is, who may talk to it, and the secret they share. Validated on creation.

    Raises:
        ValueError: an id out of range, this node not a member, or a secret too short.
    """

    cluster_id: int
    node_id: int
    members: frozenset[int]
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.cluster_id <= CLUSTER_ID_MAX:
            raise ValueError(f"cluster id {self.cluster_id} is outside 0..2**64-1")
        bad = sorted(m for m in self.members if not 0 < m <= NODE_ID_MAX)
        if bad:
            raise ValueError(f"node ids {bad} are outside 1..2**32-1: use small positive ids")
        if self.node_id not in self.members:
            raise ValueError(
                f"node {self.node_id} is not among the members {sorted(self.members)}: "
                "list every node of the cluster, this one included"
            )
        if len(self.secret) < SECRET_BYTES_MIN:
            raise ValueError(
                f"the cluster secret is {len(self.secret)} bytes < SECRET_BYTES_MIN="
                f"{SECRET_BYTES_MIN}: generate a random one (python -c 'import secrets; "
                "print(secrets.token_hex(32))') and give every node the same"
            )


def _session_keys(
    identity: ClusterIdentity, dialler: int, acceptor: int, nonce_d: bytes, nonce_a: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """(acceptor proof, dialler proof, dialler->acceptor frame key, acceptor->dialler frame key).

    The session key binds the protocol, the cluster, both node ids in their roles (so the
    direction of the connection) and both nonces; each derived value has a label of its own.
    """
    transcript = (
        _TRANSCRIPT_LABEL
        + _TRANSCRIPT_IDS.pack(identity.cluster_id, dialler, acceptor)
        + nonce_d
        + nonce_a
    )
    session_key = hmac.digest(identity.secret, transcript, "sha256")
    return (
        hmac.digest(session_key, b"acceptor proof", "sha256"),
        hmac.digest(session_key, b"dialler proof", "sha256"),
        hmac.digest(session_key, b"frames dialler to acceptor", "sha256"),
        hmac.digest(session_key, b"frames acceptor to dialler", "sha256"),
    )


def _check_cluster(identity: ClusterIdentity, cluster_id: int, peer_name: str) -> None:
    if cluster_id != identity.cluster_id:
        raise PeerProtocolError(
            "wrong_cluster",
            f"{peer_name} belongs to cluster {cluster_id}, this node {identity.node_id}"
            f" to cluster {identity.cluster_id}: check [cluster] id in both configs and "
            "the peer addresses",
        )


def hello_frame(identity: ClusterIdentity, peer_id: int, nonce_d: bytes) -> bytes:
    """The dialler's HELLO frame (header included) to node `peer_id`."""
    return FRAME_HEADER.pack(
        HELLO_BODY.size, FrameKind.HELLO, PROTOCOL_VERSION, 0
    ) + HELLO_BODY.pack(identity.cluster_id, identity.node_id, peer_id, nonce_d)


class HelloAnswer(NamedTuple):
    """What the acceptor learns from a valid HELLO, and what it answers."""

    dialler: int  # the peer's node id
    challenge: bytes  # the CHALLENGE frame to send
    proof_expected: bytes  # the proof the dialler's AUTH must carry
    send_key: bytes  # acceptor -> dialler frame key, used once AUTH verifies
    receive_key: bytes  # dialler -> acceptor frame key, likewise


def answer_hello(
    identity: ClusterIdentity, nonce_a: bytes, buffer: bytes | bytearray, body: int
) -> HelloAnswer:
    """The acceptor checks the HELLO body at `buffer[body:]` and answers with its CHALLENGE.

    Raises:
        PeerProtocolError: another cluster, or a dialler or acceptor id that is not the right
            member.
    """
    cluster_id, dialler, acceptor, nonce_d = HELLO_BODY.unpack_from(buffer, body)
    _check_cluster(identity, cluster_id, f"a node calling itself {dialler}")
    if dialler not in identity.members or dialler == identity.node_id:
        raise PeerProtocolError(
            "unknown_node",
            f"node {dialler} dialled, but the members of cluster {identity.cluster_id} other "
            f"than this node {identity.node_id} are "
            f"{sorted(identity.members - {identity.node_id})}: check the dialler's node id "
            "and the membership in both configs",
        )
    if acceptor != identity.node_id:
        raise PeerProtocolError(
            "unknown_node",
            f"node {dialler} dialled node {acceptor}, but this is node {identity.node_id}: "
            f"check the peer addresses in node {dialler}'s config",
        )
    proof_a, proof_d, key_d2a, key_a2d = _session_keys(
        identity, dialler, identity.node_id, nonce_d, nonce_a
    )
    challenge = FRAME_HEADER.pack(
        CHALLENGE_BODY.size, FrameKind.CHALLENGE, PROTOCOL_VERSION, 0
    ) + CHALLENGE_BODY.pack(identity.cluster_id, identity.node_id, dialler, nonce_a, proof_a)
    return HelloAnswer(dialler, challenge, proof_d, send_key=key_a2d, receive_key=key_d2a)


class ChallengeAnswer(NamedTuple):
    """What the dialler answers a valid CHALLENGE with, and the keys it then uses."""

    auth: bytes  # the AUTH frame to send
    send_key: bytes  # dialler -> acceptor frame key
    receive_key: bytes  # acceptor -> dialler frame key


def answer_challenge(
    identity: ClusterIdentity, peer_id: int, nonce_d: bytes, buffer: bytes | bytearray, body: int
) -> ChallengeAnswer:
    """The dialler of node `peer_id` checks the CHALLENGE body at `buffer[body:]`, its proof
    included, and answers with its AUTH.

    Raises:
        PeerProtocolError: another cluster, another node than the one dialled, or a proof that
            does not verify (another secret).
    """
    cluster_id, acceptor, dialler, nonce_a, proof_a = CHALLENGE_BODY.unpack_from(buffer, body)
    _check_cluster(identity, cluster_id, f"the node answering at node {peer_id}'s address")
    if acceptor != peer_id:
        raise PeerProtocolError(
            "unknown_node",
            f"node {acceptor} answered at the address configured for node {peer_id}: "
            "check the peer addresses in this node's config",
        )
    if dialler != identity.node_id:
        raise PeerProtocolError(
            "unknown_node",
            f"node {acceptor} answered a dial from node {dialler}, but this is node "
            f"{identity.node_id}: the peer is broken or replaying another handshake",
        )
    expected_a, proof_d, key_d2a, key_a2d = _session_keys(
        identity, identity.node_id, acceptor, nonce_d, nonce_a
    )
    if not hmac.compare_digest(proof_a, expected_a):
        raise PeerProtocolError(
            "bad_proof",
            f"node {acceptor}'s handshake proof does not verify: it holds another cluster "
            "secret (give every node the same), or something else answers at its address",
        )
    auth = FRAME_HEADER.pack(AUTH_BODY.size, FrameKind.AUTH, PROTOCOL_VERSION, 0)
    return ChallengeAnswer(auth + AUTH_BODY.pack(proof_d), send_key=key_d2a, receive_key=key_a2d)


def check_auth(proof_expected: bytes, peer_id: int, buffer: bytes | bytearray, body: int) -> None:
    """The acceptor checks the dialler's proof in the AUTH body at `buffer[body:]`.

    Raises:
        PeerProtocolError: the proof does not verify (another secret, or a replayed handshake).
    """
    (proof_d,) = AUTH_BODY.unpack_from(buffer, body)
    if not hmac.compare_digest(proof_d, proof_expected):
        raise PeerProtocolError(
            "bad_proof",
            f"the dialler calling itself node {peer_id} failed the handshake proof: it "
            "holds another cluster secret (give every node the same), or it replays a "
            "captured handshake",
        )
