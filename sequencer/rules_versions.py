"""The active version of seqd's own session rules in a replicated log: which rules the processor's
client table (sequencer/dedup.py) applies at each index (sans-I/O).

Why. Replicas stay identical only if every one applies the same rules to the same records, and a
replay of a journal gives the state its writer computed only if it applies the rules its writer
did. The rules that decide what an ADMIN node_start closes and which SESSION_OPEN is a second copy
changed (version 2); in a rolling upgrade builds of both run side by side, and a journal written
under the old rules is replayed by the new build. So the rules, like the app's schema version
(sequencer/app_versions.py), change at one log index on every node, by a record, never by a
node's restart:

- every node_start reports `rules_version`, the newest rules its code applies (none: an older
  seqd's, which means 1). Each replica keeps the last report of each node (`known`, from the first
  copy of a start only: a copy of a start already seen, or ended, reports nothing, and neither
  does a late first copy of a start earlier than the one that last reported) and the members the
  last node_start named.
- once every member has reported code that knows a version above the active one (`due`), the
  node's sequencer sequences an ADMIN `rules_version` record (the blp publishes `due` in the
  counters); every replica makes that version active at that record, whatever it knows itself,
  and a later one asking for no more than the active version changes nothing (several nodes may
  ask). On a single node its own start is every member's report.
- the decision is in a record, not in the reports, because the reports are not all in every
  replica's state: a node upgraded second restores its own snapshot, taken by the previous seqd
  (which keeps no reports) after the first upgraded node reported, so it never learns that
  report; deciding at "the node_start that completes the reports" it would switch later than the
  others, in the ordinary upgrade procedure. So `known` is not state either (not in snapshots,
  not in the state hash): it only decides when to ask, and a replica that misses a report asks
  later or not at all while another asks. The active version is state.
- no operator command (unlike the app's `raise_version`): the rules change nothing a client sees
  or sends (no schema, no reply bytes), so nothing needs timing against clients, and every member
  applies the new rules by then. A command would only keep a rollback window open longer.
- a node whose code does not know the active version stops (`RulesVersionError`) rather than
  apply records it would read differently: only a node started with older (version-aware) code
  after it reported the newer, or an older build replaying another node's journal. A build from
  before rules versions cannot tell: it ignores the record (an unknown ADMIN op) and applies
  rules 1 whatever the log says (docs/evolution.md).

A log that only rules 1 applied has state bodies byte for byte the previous seqd's.

Versions:
1. what every seqd before rules versions did (sequencer/dedup_rules1.py): per started incarnation
   the highest session counter opened, from its node_start on; a node_start closes every session of
   its node that another start opened.
2. the highest counter kept from an incarnation's first open, before its node_start too
   (`opened_early`); a node_start ends the start it names as the one before it (`previous`); an
   open or node_start of an ended start changes nothing; a node_start closes no session of a start
   up to NODE_STARTS_REMEMBERED ids after its own, and one up to that many ids behind a started
   one is ended; the running start is the newest by the ids' order (sequencer/dedup.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from sequencer.record import incarnation_behind
from sequencer.schema import VersionError

__all__ = ["RULES_VERSION", "RULES_VERSION_UNREPORTED", "RulesAsks", "RulesVersionError", "RulesVersions"]

RULES_VERSION = 2  # the newest rules this code applies; a node_start reports it
RULES_VERSION_UNREPORTED = 1  # what a node_start without `rules_version` (an older seqd's) means


class RulesVersionError(VersionError):
    """The log made a rules version active that this node's code does not know: stop, do not
    diverge."""


class RulesVersions:
    """The active rules version, and each node's last report; see the module docstring.

    Args:
        code_version: the newest rules this node's code applies (RULES_VERSION; a test stands in
            for an older build with a lower one).

    Invariants: `active` never decreases and is never above `code_version` once a call returned;
    every value in `known` is above RULES_VERSION_UNREPORTED; `due` is 0 or above `active`.
    """

    __slots__ = ("active", "code_version", "due", "known", "members", "reported_by")

    def __init__(self, code_version: int = RULES_VERSION) -> None:
        assert RULES_VERSION_UNREPORTED <= code_version <= RULES_VERSION, code_version
        self.code_version = code_version
        self.active = RULES_VERSION_UNREPORTED  # state: what the log's records made active
        # Not state (module docstring): what this replica saw since it started.
        self.known: dict[int, int] = {}  # node number -> the rules its last start's code applies
        self.members: tuple[int, ...] = ()  # the members the last node_start named
        self.reported_by: dict[int, int] = {}  # node number -> the incarnation of its last report
        # The version every member last reported code that knows, when it is above the active
        # one: what this node asks the log to make active; 0: none. Kept, not computed, for the
        # blp's duty cycle, which reads it with every batch.
        self.due = 0

    def node_started(
        self, number: int, reported: int | None, members: Iterable[int] | None, incarnation: int | None = None,
        remembered: int = 0,
    ) -> None:
        """The report of a first copy of node `number`'s start `incarnation` (None: not known),
        `reported` None: an older seqd's, naming its cluster's `members` (None: an older seqd's).
        The late first copy of the node_start of a start up to `remembered` ids before the one
        that last reported (ids go up by one a start; rules 1 take it for new: they ignore
        `previous`) reports nothing: it would erase the node's newer report, and the cluster
        would stay on the old rules. Ids further apart are not ordered (a data directory wiped
        takes one from the clock): the later report wins."""
        last = self.reported_by.get(number)
        if incarnation is not None and last is not None and incarnation_behind(incarnation, last, remembered):
            return  # an earlier start's
        if incarnation is not None:
            self.reported_by[number] = incarnation
        reported = RULES_VERSION_UNREPORTED if reported is None else reported
        if reported > RULES_VERSION_UNREPORTED:
            self.known[number] = reported
        else:
            self.known.pop(number, None)
        if members:
            self.members = tuple(members)
        self._update_due()

    def _update_due(self) -> None:
        floor = min((self.known.get(member, RULES_VERSION_UNREPORTED) for member in self.members), default=0)
        self.due = floor if floor > self.active else 0

    def switch(self, version: int, index: int) -> bool:
        """An ADMIN rules_version record at `index`: `version` is active from it on (True), or the
        active one is that or newer already (False, nothing changes).

        Raises:
            RulesVersionError: it made a version active that this node's code does not know.
        """
        if version <= self.active:
            return False
        self.active = version
        self._update_due()
        self.check(f"the log makes session rules version {version} active at index {index}")
        return True

    def check(self, how: str) -> None:
        """Raises RulesVersionError (saying `how` the version became active) when this node's
        code does not know the active version."""
        if self.active > self.code_version:
            raise RulesVersionError(
                f"{how}, but this node's seqd applies session rules only up to version {self.code_version}: "
                "it would read the records that follow differently from the other nodes. Install the seqd "
                "the cluster was upgraded to on this node, then start it again"
            )

    def restore(self, active: int, index: int) -> None:
        """The active version a snapshot at `index` holds.

        Raises:
            RulesVersionError: this node's code does not know the snapshot's active version.
        """
        self.active = active
        self._update_due()
        self.check(f"the snapshot at index {index} was taken under session rules version {active}")


class RulesAsks:
    """When a node's sequencer asks the log to make the `due` rules version active: as soon as it
    is due (or another is), then again every `again_s` while it stays due, since the record it
    sequenced may have been cut with its leader's term (a second one changes nothing).

    Args:
        again_s: the time between two asks for the same version (RULES_ASK_AGAIN_S).
    """

    __slots__ = ("again_s", "asked", "asked_at_s")

    def __init__(self, again_s: float) -> None:
        assert again_s > 0, again_s
        self.again_s = again_s
        self.asked = 0  # the version last asked for (0: none)
        self.asked_at_s = 0.0  # when (monotonic clock)

    def should_ask(self, due: int, now_s: float) -> bool:
        """Whether to ask for `due` (0: none due) at monotonic time `now_s`."""
        return bool(due) and (due != self.asked or now_s - self.asked_at_s > self.again_s)

    def asked_for(self, due: int, now_s: float) -> None:
        """The ask for `due` was sequenced at `now_s`."""
        self.asked, self.asked_at_s = due, now_s
