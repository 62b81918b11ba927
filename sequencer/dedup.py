"""The processor's per-client bookkeeping: open sessions, the dedup table and client expiry
(sans-I/O).

Exactly-once. Each client numbers its requests. Per client id (stable across reconnects and
failovers) we keep the last applied request id and the replies not yet acknowledged; a command
whose request id is not above the last applied is a resend: it gets the saved reply (status and
payload of the original, the original index) or, once the client has acknowledged that reply
(`acked_request_id` in the COMMAND payload prefix) and it was pruned, status DUPLICATE. It is
never applied twice. The table is part of the state, so it survives snapshots and failover.

The processor applies a COMMAND against these entries inline (`Processor.apply_frame`, the hot
path, reads `ClientTable.sessions` and a `ClientEntry`'s fields directly); this module owns the
rest: opening and closing sessions, and forgetting clients idle past the expiry.

Every record is idempotent (cluster mode). A follower's replicator resends every record it
forwarded and has not yet seen in its log when the leader changes, so a record may reach the log
twice; a second copy must change nothing. A COMMAND is deduplicated by its request id (above); a
SESSION_CLOSE of a closed session is a no-op; a SESSION_OPEN of a session its node's incarnation
opened already, open or closed since, is a no-op (`open` returns False: the app is not told
twice); an ADMIN node_start that names an incarnation of its node already started is a no-op
(`node_start`), so it never closes the sessions that incarnation opened after its first copy;
and even a first copy closes only the sessions of the node's earlier incarnations, never one of
its own that reached the log before it (its forward was lost and resent).

How a second SESSION_OPEN is told from a new one: a session id is [node number][incarnation]
[counter], and the gateway of one incarnation hands out counters in increasing order (wrapping
after 2^32, skipping ids still open). So the table keeps, per incarnation, the highest counter
opened, and an open at or behind it (serial-number arithmetic, RFC 1982, so the wrap is a step
forward) is a second copy. A copy is never more than a resend window behind, far less than 2^31
sessions. The highest is kept from an incarnation's first open, not from its node_start: a
node_start may reach the log after its incarnation's first sessions opened, and closed (its forward
was lost and resent), and a copy of such an open resent after the node_start must not open the
session again, for good (nothing would close it: its client never idle, its entry never expiring,
on every replica). Before its node_start, an incarnation's highest is in `opened_early`; the
node_start moves it to `node_starts`.

Every ordering of one node's records and their copies, and what each does (X the incarnation
that runs, W an earlier one of the same node, s a session of X):
- X's node_start first, then s opens, closes, and copies of any of them: the copies change
  nothing (the open is at or behind X's highest; the close finds nothing; the node_start is X's).
- s opens (and maybe closes) before X's node_start, copies of the open before or after that
  node_start: the same (X's highest was kept from the first open; the node_start keeps s open).
- the node_start of X closes every session of W (not of a start up to NODE_STARTS_REMEMBERED ids
  after X: then X's node_start is late, behind the next start's first opens, and that start's
  own node_start, which names X, closes what X opened), and W is remembered as ended: an open of W
  (one of W's records arriving after X started, or a copy) is refused, and a node_start of W
  closes nothing. A node_start names the start before it (`previous`, kept in the data
  directory with the ids: daemon/incarnation.py), which ends there too, even if its own
  node_start never reached the log or is still on its way: a forward of a stopped start can
  arrive after its node's next start (its TCP segment retransmitted after a loss while the node
  restarted), and its node_start would otherwise close the live start's sessions, its opens
  stay open for good.
- which start runs is decided by the ids' order (ids go up by one a start), not by the order the
  node_starts were applied: a table built under rules 1 (which ignore `previous`) may have applied
  W's late node_start after X's. A first copy of a node_start up to NODE_STARTS_REMEMBERED ids
  behind a started one is ended there (it closes only its own sessions still open), and an open
  is judged against the node's newest start.
- an incarnation whose node_start carried none (an older seqd's) is not tracked; neither is any
  open before the first node_start that carries one (a log an older seqd wrote keeps its
  snapshots' bytes): such opens are judged by the open sessions alone, as before.
What the rules rely on: the first copies of one incarnation's records reach the log in the order
its gateway wrote them (a follower's forward stream is gapless and every break restarts it with an
ordered resend: sequencer/cluster/forwards.py); only copies come out of order. And incarnation ids
never repeat (daemon/incarnation.py): a start that took the id of one of its node's remembered
starts would be taken for it. What they cannot tell: a late node_start of a start whose id is not
within NODE_STARTS_REMEMBERED of the node's started ones (a data directory wiped, so a clock-chosen
id) is taken for a new start and closes the live start's sessions, and a start ended more than
NODE_STARTS_REMEMBERED starts back is forgotten.
The processor makes a TIMER_FIRED of a timer no longer pending a no-op, and a SNAPSHOT twice is
two snapshots of the same state.

These are session rules version 2. A log applies them only from the ADMIN rules_version record
a node asks for once every member reported code that applies them (sequencer/rules_versions.py);
before, it applies version 1, what every seqd before them did (sequencer/dedup_rules1.py), so that
replicas of both builds agree during a rolling upgrade and a journal the previous seqd wrote
replays to its state. A migration of a journal (sequencer/migrate/dedup_mirror.py) feeds its
records to a table of its own, through the same calls (`open`, `close`, `admin_record`), so it
tells resends and commands without a session from new requests under the same rules.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sequencer.app_versions import AppVersions
from sequencer.dedup_rules1 import node_start_rules1, open_is_new_rules1
from sequencer.record import (
    ADMIN_NODE_START,
    ADMIN_RULES_VERSION,
    SESSION_ID_COUNTER_BITS,
    incarnation_behind,
    session_incarnation,
    session_node_number,
)
from sequencer.rules_versions import RULES_VERSION, RulesVersions

__all__ = [
    "CLIENT_EXPIRY_NS_DEFAULT",
    "NODE_STARTS_REMEMBERED",
    "SAVED_REPLIES_MAX",
    "ClientEntry",
    "ClientTable",
    "SessionEntry",
]

# A client may pipeline requests; the replies it has not acknowledged are kept so a resend after a
# reconnect gets the original reply. A well-behaved client acks as replies arrive, so it holds a
# handful; the bound stops a client that never acks from growing the state without limit. Beyond
# it the oldest saved reply is dropped, and a resend of that request gets DUPLICATE (it was
# applied; its reply is gone). 1024 covers the client library's in-flight window with room.
CLIENT_EXPIRY_NS_DEFAULT = 24 * 3600 * 1_000_000_000  # a day without a session: forget the client
SAVED_REPLIES_MAX = (
    1024  # per client; the client library caps its window at this (IN_FLIGHT_LIMIT_MAX)
)
# The incarnations of each node whose node_start is remembered, newest last. A second copy of a
# node_start comes from a replicator's resend, which ends with the replicator (that is, with its
# incarnation): a copy of one more than a start or two back would need a forward to survive in
# flight across several restarts of its node. 8 is far past that, and costs 8 ints per node.
NODE_STARTS_REMEMBERED = 8
_COUNTER_MASK = (1 << SESSION_ID_COUNTER_BITS) - 1
_COUNTER_HALF = 1 << (SESSION_ID_COUNTER_BITS - 1)  # serial-number arithmetic's "behind"


def _behind(incarnation: int, later: int) -> bool:
    """Whether `incarnation` is a start up to NODE_STARTS_REMEMBERED starts before `later` (ids go
    up by one a start, wrapping: daemon/incarnation.py)."""
    return incarnation_behind(incarnation, later, NODE_STARTS_REMEMBERED)


def _ended(started: dict[int, int], incarnation: int) -> bool:
    """Whether one of the node's `started` incarnations came after `incarnation`: it ended."""
    return any(_behind(incarnation, later) for later in started)


def _newest(started: dict[int, int]) -> int:
    """The node's running start among its non-empty `started`: the newest by the ids' serial order,
    not the last applied (a table built under rules 1 may have applied an earlier start's late
    node_start last). The last applied when no other is up to NODE_STARTS_REMEMBERED after it
    (ids not one a start apart: an older seqd's, or a data directory wiped)."""
    newest = last = next(reversed(started))
    for incarnation in started:
        if _behind(newest, incarnation) and _behind(last, incarnation):
            newest = incarnation
    return newest


def _forget_oldest(started: dict[int, int]) -> None:
    """Keeps the NODE_STARTS_REMEMBERED starts last applied, and always the running one."""
    while len(started) > NODE_STARTS_REMEMBERED:
        newest = _newest(started)
        del started[next(incarnation for incarnation in started if incarnation != newest)]


class ClientEntry:
    """The dedup entry of one client id."""

    __slots__ = ("acked_request_id", "idle_since_ns", "last_request_id", "replies", "sessions")

    def __init__(self) -> None:
        self.last_request_id = 0
        self.acked_request_id = 0
        self.sessions = 0  # open sessions of this client id (a reconnect race can make two)
        self.idle_since_ns = 0  # log time its last session closed; meaningful when sessions == 0
        # request_id -> (index, status, version, payload), ascending request_id (insertion order).
        # Invariant: every key is > acked_request_id and <= last_request_id.
        # An OrderedDict, not a dict: every command adds a reply at the end and (its client's ack)
        # drops one from the front, and a dict's first key is found by scanning past the entries
        # deleted since its last resize, ~0.6 us a command with 512 in flight (~1.5 us at 1024);
        # an OrderedDict finds it at once. Same items in the same order: nothing that reads them
        # (the snapshot, a resend) can tell (benches/RESULTS.md, "blpfast").
        self.replies: OrderedDict[int, tuple[int, int, int, bytes]] = OrderedDict()


class SessionEntry:
    """An open session: its client id, the node it was opened on, and its client's entry."""

    __slots__ = ("client", "client_id", "local", "node")

    def __init__(self, client_id: int, node: str, client: ClientEntry, local: bool) -> None:
        self.client_id = client_id
        self.node = node
        self.client = client
        self.local = local  # replies to it are emitted by this node


class ClientTable:
    """The open sessions and the dedup entry of every client id still remembered.

    Args:
        node: this node's name; a session opened on it is `local` (its replies are emitted
            here). None: every session is local (single node, tests, replays).
        expiry_ns: how long a client id without a session is remembered (log time). Every
            replica and every replay must use the same: it decides what is deduplicated.

    Invariants (between calls): `sessions`, `clients` and `idle` are never rebound, so a caller
    may hold them (the processor's hot path does); every session's client is in `clients`;
    `idle` holds exactly the clients with no open session, oldest idle first.
    """

    __slots__ = (
        "clients", "expired", "expiry_ns", "idle", "node", "node_number", "node_starts", "opened_early", "rules",
        "sessions", "versions",
    )  # fmt: skip

    def __init__(self, node: str | None, expiry_ns: int, rules_version: int = RULES_VERSION) -> None:
        assert expiry_ns > 0, expiry_ns
        self.node = node
        # Set by `emit_for`: then a session is local when its id carries this node number.
        self.node_number: int | None = None
        # node number -> {incarnation whose node_start was applied: the highest session counter
        # it opened, -1 for none}, in the order applied, at most NODE_STARTS_REMEMBERED; the
        # newest by the ids' order is the node's running start (`_newest`), the others ended. Part of the state: it decides what a
        # node_start closes and which opens are second copies.
        self.node_starts: dict[int, dict[int, int]] = {}
        # node number -> {incarnation with opens but no node_start applied yet: the highest
        # counter it opened}, at most NODE_STARTS_REMEMBERED (state, as `node_starts`).
        self.opened_early: dict[int, dict[int, int]] = {}
        # What each node's node_start reported of its app's version, and the active one (state).
        self.versions = AppVersions()
        # The session rules version the log made active (state), and each node's report (not
        # state): these rules (`open`, `node_start`) from version 2 on, dedup_rules1.py's before.
        self.rules = RulesVersions(rules_version)
        self.expiry_ns = expiry_ns
        self.expired = 0  # client ids forgotten so far
        self.sessions: dict[int, SessionEntry] = {}
        self.clients: dict[int, ClientEntry] = {}
        # Clients with no open session, oldest idle first: client_id -> idle since (log time).
        self.idle: dict[int, int] = {}

    def client(self, client_id: int) -> ClientEntry:
        """The entry of `client_id`, created empty if it is not remembered."""
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = ClientEntry()
        return client

    def _local(self, session_id: int, node: str) -> bool:
        """Whether this node emits the replies of a session opened on `node` as `session_id`."""
        if self.node_number is not None:
            return session_node_number(session_id) == self.node_number
        return self.node is None or node == self.node

    def emit_for(self, node_number: int) -> None:
        """From now on a session is local when its id carries `node_number` (the node numbers of
        a cluster are unique; its node names need not be)."""
        self.node_number = node_number
        for session_id, session in self.sessions.items():
            session.local = self._local(session_id, session.node)

    def attach(self, session_id: int, client_id: int, node: str) -> None:
        """Records an open session of `client_id` on `node` (no expiry: restore uses it too)."""
        client = self.client(client_id)
        client.sessions += 1
        self.sessions[session_id] = SessionEntry(client_id, node, client, self._local(session_id, node))

    def open(self, session_id: int, client_id: int, node: str, now_ns: int) -> bool:
        """A SESSION_OPEN at log time `now_ns`: the client is no longer idle. False, changing
        nothing, for a second copy of a SESSION_OPEN (the session is open, or its incarnation
        opened it, or a later one, before) or an open of an ended incarnation (module
        docstring)."""
        if session_id in self.sessions:
            return False
        if self.rules.active < 2:
            if not open_is_new_rules1(self, session_id):
                return False
        elif self.node_starts:  # tracked once the log carries incarnations (module docstring)
            number = session_node_number(session_id)
            incarnation = session_incarnation(session_id)
            started = self.node_starts.get(number)
            if started is not None and incarnation == _newest(started):
                highests = started
            elif started is not None and (incarnation in started or _ended(started, incarnation)):
                return False  # an ended start: a later one of its node closed its sessions
            else:
                highests = self.opened_early.setdefault(number, {})
            counter = session_id & _COUNTER_MASK
            highest = highests.get(incarnation, -1)
            if highest >= 0 and (highest - counter) & _COUNTER_MASK < _COUNTER_HALF:
                return False  # at or behind the highest opened: a second copy
            highests[incarnation] = counter
            if len(highests) > NODE_STARTS_REMEMBERED:
                del highests[next(iter(highests))]
        self.attach(session_id, client_id, node)
        self.idle.pop(client_id, None)
        self.expire(now_ns)
        return True

    def close(self, session_id: int, now_ns: int) -> SessionEntry | None:
        """A SESSION_CLOSE at log time `now_ns`: the closed session, or None if it was not open
        (closed already, e.g. by a node_start: closing twice is a no-op)."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return None
        client = session.client
        client.sessions -= 1
        assert client.sessions >= 0, (session.client_id, client.sessions)
        if client.sessions == 0:
            client.idle_since_ns = now_ns
            self.idle[session.client_id] = now_ns
        self.expire(now_ns)
        return session

    def sessions_on(self, node: str) -> list[int]:
        """The ids of the sessions opened on `node`, in opening order."""
        return [sid for sid, session in self.sessions.items() if session.node == node]

    def admin_record(self, admin: dict[str, Any], index: int) -> list[int] | None:
        """What the ADMIN record `admin` at `index` does to the sessions, for every op: a
        node_start's closes (`node_start_record`), a rules_version's switch of the active rules,
        nothing for any other op ([]). The one entry of the processor and of a migration's mirror
        of it (sequencer/migrate/dedup_mirror.py), so both follow every op that changes sessions.

        Returns:
            the ids of the sessions to close, in order (the caller closes them), or None for a
            second copy of a node_start.

        Raises:
            RulesVersionError: the record makes rules active that this code does not know.
        """
        op = admin["op"]
        if op == ADMIN_NODE_START:
            return self.node_start_record(admin)
        if op == ADMIN_RULES_VERSION:
            self.rules.switch(admin["version"], index)
        return []

    def node_start_record(self, admin: dict[str, Any]) -> list[int] | None:
        """The ADMIN node_start record `admin`: its report of the session rules its node's code
        applies (sequencer/rules_versions.py), then what `node_start` says under the active
        rules. A node_start without `incarnation` (an older seqd's) closes every session opened
        under its node name."""
        incarnation = admin.get("incarnation")
        if incarnation is None:
            if "number" in admin:
                self.rules.node_started(admin["number"], None, admin.get("members"))
            return self.sessions_on(admin["node"])
        number: int = admin["number"]  # always with an incarnation
        if incarnation in self.node_starts.get(number, ()):
            return None  # a start already seen, or ended (both rules): a copy, its report with it
        self.rules.node_started(number, admin.get("rules_version"), admin.get("members"), incarnation,
                                NODE_STARTS_REMEMBERED)  # fmt: skip
        if self.rules.active < 2:
            return node_start_rules1(self, number, incarnation, NODE_STARTS_REMEMBERED)
        return self.node_start(number, incarnation, admin.get("previous"))

    def node_start(self, node_number: int, incarnation: int, previous: int | None = None) -> list[int] | None:
        """An ADMIN node_start of node `node_number`'s incarnation `incarnation`, which follows its
        start `previous` (None: not known): the ids of the sessions it closes (every session of
        that node that another start opened, in opening order), or None when that incarnation
        started already (a second copy of its node_start: the sessions it has opened since stay
        open) or ended (a later start of its node came first).

        A session of this very incarnation stays open even when its SESSION_OPEN reached the log
        first: a node_start whose first forward was lost (sent before the peer link to the leader
        was up) is resent later, after its node's first clients' records, and closing their live
        sessions would drop their commands (`commands_without_session`) with no reply and no
        resend (issue 11: a client on a follower stalled for good after a leader change). The
        highest counter it opened before comes with it (`opened_early`), so a copy of one of
        those opens stays a copy. The start it follows ends here, even if its own node_start
        never came or is still to come: that one's late first copy, and its late opens, then
        change nothing (no live session closed, no session open for good)."""
        started = self.node_starts.setdefault(node_number, {})
        if incarnation in started:
            return None
        if _ended(started, incarnation):
            return self._ended_start(node_number, started, incarnation)
        closing: list[int] = []
        highest = -1  # the counter of the last session this incarnation opened before its start
        for sid in self.sessions:
            if session_node_number(sid) == node_number:
                opened_by = session_incarnation(sid)
                if opened_by == incarnation:
                    highest = sid & _COUNTER_MASK  # opening order: the last one is the highest
                elif _behind(incarnation, opened_by):
                    # A later start's (ids go up by one a start: daemon/incarnation.py), whose own
                    # node_start is still to come: this one is late, and not the one to close it.
                    continue
                else:
                    closing.append(sid)
        early = self.opened_early.get(node_number)
        if early:
            highest = early.pop(incarnation, highest)  # every open since tracking began: the newest
        if previous is not None and previous != incarnation and previous not in started:
            started[previous] = early.pop(previous, -1) if early else -1  # ended before it started
        self._drop_if_empty(node_number)
        started[incarnation] = highest
        _forget_oldest(started)
        return closing

    def _ended_start(self, node_number: int, started: dict[int, int], incarnation: int) -> list[int]:
        """The late first copy of the node_start of `incarnation`, up to NODE_STARTS_REMEMBERED
        starts behind one of its node's started ones: it ends there, not made the running start
        (a table built under rules 1, which ignore `previous`, never marked it ended). It closes
        only its own sessions still open (opened under rules 1, which took its late opens for
        new): nothing else would close them."""
        early = self.opened_early.get(node_number)
        started[incarnation] = early.pop(incarnation, -1) if early else -1
        self._drop_if_empty(node_number)
        _forget_oldest(started)
        return [
            sid for sid in self.sessions
            if session_node_number(sid) == node_number and session_incarnation(sid) == incarnation
        ]  # fmt: skip

    def _drop_if_empty(self, node_number: int) -> None:
        # Never kept empty: a snapshot leaves empty ones out, and a replica restored from it would
        # re-create the node's entry elsewhere in the order, and encode other bytes.
        if self.opened_early.get(node_number) == {}:
            del self.opened_early[node_number]

    def expire(self, now_ns: int) -> None:
        """Forget the dedup state of clients without a session for `expiry_ns`.

        Without this the table grows with every client id ever seen (a client that takes a
        random id per process makes one per run). The queue is in idle-time order (log time is
        non-decreasing), so each check looks at its head only. A client that comes back after
        expiry with requests it never saw answered could have them applied twice: the expiry
        (a day by default) must be far longer than any client's reconnect timeout. Kafka's
        idempotent producer makes the same trade (`producer.id.expiration.ms`).
        """
        idle = self.idle
        deadline = now_ns - self.expiry_ns
        while idle:
            client_id = next(iter(idle))
            if idle[client_id] > deadline:
                break
            del idle[client_id]
            del self.clients[client_id]
            self.expired += 1

    def rebuild_idle(self, snapshot_ns: int) -> None:
        """After a restore: the idle queue in the order the live processor built it, by idle
        time, ties in the clients' order (the order of eviction among ties does not change what
        is evicted). A client saved before expiry existed is idle since the snapshot's time."""
        for client in self.clients.values():
            if client.sessions == 0 and client.idle_since_ns == 0:
                client.idle_since_ns = snapshot_ns
        idle = sorted(
            (client.idle_since_ns, position, client_id)
            for position, (client_id, client) in enumerate(self.clients.items())
            if client.sessions == 0
        )
        self.idle.clear()
        self.idle.update((client_id, since) for since, _, client_id in idle)
