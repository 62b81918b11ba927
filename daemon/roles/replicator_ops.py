"""The replicator's operating side: leadership transfer, and what `seqd status` shows of a cluster.

Leadership transfer (thesis 3.10; the core's `RaftCore.transfer_leadership`) is asked for in two
ways, both through the counters, so neither needs a socket into the daemon:

- an operator runs `seqd cluster transfer-leader [--to N]`, which writes `raft.transfer.request`
  (a request number << 8 | the target, 0: the best follower; its one writer is the tool) and
  waits for `raft.transfer.handled` to echo it, then for the outcome;
- the supervisor drains a node on SIGTERM and first sets `node.state` HANDING_OVER: then, while
  this node leads, it hands leadership to the best follower, again after each attempt that found
  no follower or timed out, until it no longer leads; the supervisor waits for that (bounded) before it stops
  the roles (daemon/handover.py).

While a transfer runs the replicator takes nothing from the proposal ring: the sequencer's
records wait there (backpressure, as with no leader) and go to the new leader once it is known,
so a local client's command is never refused, only delayed. The core gives the transfer up after
an election timeout and takes proposals again (ABORTED); this class does the same on its own
clock, a tick later, so the two never disagree for long (if they do, a proposal the core refuses
is retried: `ProposalRejected`).

The best follower is the one with the highest match index among those heard from within an
election timeout: it needs the least catching up, and a silent one (down, partitioned) would
only make the transfer time out.

Also here: elections and step-downs counted and logged once each (`raft.elections`,
`raft.step_downs`), the peer transport's refusals (`errors.peer_refused`), when each peer
was last heard from (`raft.peer<k>.last_contact_ms`), the peak of each follower's byte window
(`raft.peer<k>.inflight_bytes_peak`), the entries in AppendEntries a leader read back from its journal,
resends included (`raft.stored_entries_sent`), and the forward stream's faults: records
dropped, streams broken and refused (the transport's `TransportCounters` and the leader's
`ForwardInbox`), records resent (`raft.forwards_*`, `raft.forward_streams_*`), and the leader's
refusals of this node's forwards heard back with their reasons (`raft.forward_refusals_received`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from daemon.layout import (
    ERRORS_PEER_REFUSED,
    NODE_STATE,
    RAFT_APPEND_ANSWERS_SENT,
    RAFT_APPENDS_SENT,
    RAFT_COMMIT_NOTICES_SENT,
    RAFT_ELECTIONS,
    RAFT_EMPTY_APPENDS_SENT,
    RAFT_FORWARD_REFUSALS_RECEIVED,
    RAFT_FORWARD_STREAMS_BROKEN,
    RAFT_FORWARD_STREAMS_REFUSED,
    RAFT_FORWARDS_DROPPED,
    RAFT_FORWARDS_RESENT,
    RAFT_NOTICES_UNANSWERED,
    RAFT_PEER_INFLIGHT_BYTES_PEAK,
    RAFT_PEER_LAST_CONTACT_MS,
    RAFT_STEP_DOWNS,
    RAFT_STORED_ENTRIES_SENT,
    RAFT_TRANSFER_HANDLED,
    RAFT_TRANSFER_OUTCOME,
    RAFT_TRANSFER_REQUEST,
    RAFT_TRANSFER_TARGET_BITS,
    CounterView,
    NodeState,
    TransferOutcome,
)
from ipc.counters import Counter
from sequencer.raft.config import NO_NODE
from sequencer.raft.core import RaftCore
from sequencer.raft.raft_role import CANDIDATE, LEADER
from sequencer.raft.transport_config import TransportCounters

__all__ = ["ReplicatorOperations", "contact_wall_ms"]

log = logging.getLogger("seqd.replicator")

_TARGET_MASK = (1 << RAFT_TRANSFER_TARGET_BITS) - 1


def contact_wall_ms(heard_s: float, now_s: float, wall_ns: int) -> int:
    """The wall-clock ms (floored) of a message heard at monotonic `heard_s`, from the two clocks
    read together at `now_s` and `wall_ns`: their offset, in ns, put on `heard_s`.

    Derived once per message heard (`publish` keeps it until another comes), so a contact shows
    one value for as long as it is the last: derived again each tick, from the whole ms of each
    clock, it moved by 1 ms between ticks (the two floors fall at different instants) and could
    even lie 1 ms after the message. Exact up to the few microseconds between the clock reads
    (which can only tip a contact that close to a whole ms, once). The age `seqd status` shows,
    its own now in whole ms less this, is the count of whole ms passed since: less than 1 ms off
    the true age, as any age in whole ms is.
    """
    return (wall_ns - round((now_s - heard_s) * 1e9)) // 1_000_000


class ReplicatorOperations:
    """See the module docstring. Called from the replicator's one loop, with no ready outstanding.

    Args:
        counters: the replicator's view of the node's counters.
        peers: the other members, in the config's order (the `raft.peer<k>` slots).
        election_timeout_s: the cluster's election timeout, plus a tick (the core's own bound on
            a transfer, seen on this process's clock).
        errors: the role's error total (`replicator.errors`), which counts refusals too.
    """

    def __init__(self, counters: CounterView, peers: tuple[int, ...], election_timeout_s: float,
                 errors: Counter) -> None:  # fmt: skip
        self.peers = peers
        self.election_timeout_s = election_timeout_s
        self.errors = errors
        self.contact_counters = tuple(counters[RAFT_PEER_LAST_CONTACT_MS[slot]] for slot in range(len(peers)))
        self.peak_counters = tuple(counters[RAFT_PEER_INFLIGHT_BYTES_PEAK[slot]] for slot in range(len(peers)))
        self.elections = counters[RAFT_ELECTIONS]
        self.step_downs = counters[RAFT_STEP_DOWNS]
        self.peer_refused = counters[ERRORS_PEER_REFUSED]
        self.forwards_dropped = counters[RAFT_FORWARDS_DROPPED]
        self.streams_broken = counters[RAFT_FORWARD_STREAMS_BROKEN]
        self.streams_refused = counters[RAFT_FORWARD_STREAMS_REFUSED]
        self.refusals_received = counters[RAFT_FORWARD_REFUSALS_RECEIVED]
        self.forwards_resent = counters[RAFT_FORWARDS_RESENT]
        self.records_resent = 0  # published once a tick, as the transport's figures
        self.message_counters = tuple(counters[spec] for spec in (
            RAFT_APPENDS_SENT, RAFT_EMPTY_APPENDS_SENT, RAFT_COMMIT_NOTICES_SENT, RAFT_APPEND_ANSWERS_SENT,
            RAFT_NOTICES_UNANSWERED, RAFT_STORED_ENTRIES_SENT))
        self.node_state = counters[NODE_STATE]  # the supervisor's
        self.request = counters[RAFT_TRANSFER_REQUEST]  # the operator's
        self.handled = counters[RAFT_TRANSFER_HANDLED]
        self.outcome = counters[RAFT_TRANSFER_OUTCOME]
        self.request_seen = self.request.get()  # a request older than this incarnation is done
        # peer -> monotonic time of its last message (its wall-clock ms, for the counters, is
        # derived in `publish`, once per message heard: a clock read per message batch was the
        # other half)
        self.heard_s: dict[int, float] = {}
        self.contact_ms: dict[int, tuple[float, int]] = {}  # peer -> (heard_s, its wall-clock ms)
        self.target = NO_NODE  # the transfer under way, or NO_NODE
        self.deadline_s = 0.0
        self.retry_s = 0.0  # a drain tries again no sooner than this
        self.raft_role_seen = -1
        self.refused_seen = 0

    # ---- inputs ---------------------------------------------------------------------------------

    def heard_from(self, peer: int, now_s: float) -> None:
        self.heard_s[peer] = now_s

    def role_changed(self, core: RaftCore) -> None:
        """After a change of term or leader: count and log an election or a step-down."""
        role = int(core.raft_role)
        previous, self.raft_role_seen = self.raft_role_seen, role
        if role == CANDIDATE:
            self.elections.add(1)
            log.warning("standing for election in term %d: no leader heard within the election timeout", core.term)
        if previous == LEADER and role != LEADER:
            self.step_downs.add(1)
            log.warning("stepped down in term %d (leader now: %s)", core.term, core.leader_id or "unknown")

    def resent(self, count: int, why: str) -> None:
        """`count` pending records go again (sent to the leader, or proposed here): counted, logged."""
        self.records_resent += count
        if count:
            log.info("resending %d pending records: %s", count, why)

    def holding_proposals(self, core: RaftCore) -> bool:
        """Whether the leader must leave the proposal ring alone: a transfer is under way."""
        return bool(self.target) and core.raft_role is LEADER

    # ---- the transfer ---------------------------------------------------------------------------

    def check(self, core: RaftCore, now_s: float, settled: bool) -> None:
        """Follow a transfer under way; start one an operator asked for, or the drain needs.

        Args:
            settled: this node leads and its term's TERM_START has committed (`may_propose`).
                A new leader hands nothing over before: its TERM_START must still be proposed
                (which a transfer under way would refuse), and a transfer right after an
                election would only start another. A request waits until then.
        """
        leading = core.raft_role is LEADER
        if self.target:
            if not leading:
                self._finish(core, TransferOutcome.DONE)
            elif now_s >= self.deadline_s:
                self.retry_s = now_s  # a drain tries again at once (another follower may do)
                self._finish(core, TransferOutcome.ABORTED)
        if leading and not settled:
            return
        request = self.request.get()
        if request != self.request_seen:
            self.request_seen = request
            self.outcome.set(int(self._start(core, request & _TARGET_MASK, now_s)))
            self.handled.set(request)  # after the outcome: the tool reads the outcome next
        elif leading and not self.target and now_s >= self.retry_s and self.node_state.get() == NodeState.HANDING_OVER:
            self.outcome.set(int(self._start(core, NO_NODE, now_s)))

    def _finish(self, core: RaftCore, outcome: TransferOutcome) -> None:
        log.info("leadership transfer to node %d: %s (term %d, leader %s)", self.target,
                 outcome.name.lower().replace("_", " "), core.term, core.leader_id or "unknown")
        self.target = NO_NODE
        self.outcome.set(int(outcome))

    def best_follower(self, match_index: Callable[[int], int], now_s: float) -> int:
        """The member heard from within an election timeout with the highest match index (the
        lowest id on a tie), or NO_NODE when none was."""
        recent = [peer for peer in self.peers if now_s - self.heard_s.get(peer, -1e9) < self.election_timeout_s]
        if not recent:
            return NO_NODE
        return max(recent, key=lambda peer: (match_index(peer), -peer))

    def _start(self, core: RaftCore, target: int, now_s: float) -> TransferOutcome:
        if core.raft_role is not LEADER:
            log.warning("leadership transfer to node %d refused: this node does not lead (leader: %s)",
                        target, core.leader_id or "unknown")
            return TransferOutcome.NOT_LEADER
        if target == NO_NODE:
            target = self.best_follower(core.match_index, now_s)
            if target == NO_NODE:
                self.retry_s = now_s + self.election_timeout_s
                log.warning("no leadership transfer: no other member was heard from within an election timeout")
                return TransferOutcome.NO_FOLLOWER
        elif target not in self.peers:
            log.warning("leadership transfer to node %d refused: the other members are %s", target, self.peers)
            return TransferOutcome.UNKNOWN_TARGET
        core.transfer_leadership(target)
        self.target = target
        self.deadline_s = now_s + self.election_timeout_s
        log.info("handing leadership to node %d (it matches %d of %d); proposals wait meanwhile",
                 target, core.match_index(target), core.log.last_index)
        return TransferOutcome.STARTED

    # ---- counters -------------------------------------------------------------------------------

    def publish(self, core: RaftCore, transport: TransportCounters, inbox_dropped: int) -> None:
        """Once a tick: when each peer was last heard from and its byte window's peak, the
        transport's refusals, and the forward stream's figures (`inbox_dropped`: records the
        leader's `ForwardInbox` dropped)."""
        heard_s, contact_ms = self.heard_s, self.contact_ms
        wall_ns, now_s = time.time_ns(), time.monotonic()
        for counter, peak, peer in zip(self.contact_counters, self.peak_counters, self.peers, strict=True):
            heard = heard_s.get(peer)
            if heard is None:
                counter.set(0)
            else:
                derived = contact_ms.get(peer)
                if derived is None or derived[0] != heard:
                    derived = contact_ms[peer] = (heard, contact_wall_ms(heard, now_s, wall_ns))
                counter.set(derived[1])
            peak.set(core.inflight_bytes_peak(peer))
        self.forwards_dropped.set(transport.records_dropped + inbox_dropped)
        self.streams_broken.set(transport.forward_streams_broken)
        self.streams_refused.set(transport.forward_streams_refused)
        self.refusals_received.set(transport.forward_refusals_received)
        self.forwards_resent.set(self.records_resent)
        for counter, value in zip(self.message_counters, (core.appends_sent, core.empty_appends_sent, core.commit_notices_sent,
                                  core.append_answers_sent, core.notices_unanswered, core.stored_entries_sent),
                                 strict=True):
            counter.set(value)
        refused_total = sum(transport.refused.values())
        if refused_total != self.refused_seen:
            self.errors.add(refused_total - self.refused_seen)
            self.peer_refused.set(refused_total)
            self.refused_seen = refused_total
