"""The active version of seqd's own session rules in a replicated log: which rules the processor's
client table (sequencer/dedup.py) applies at each index (sans-I/O).

Why. Replicas stay identical only if every one applies the same rules to the same records, and a
replay of a journal gives the state its writer computed only if it applies the rules its writer
did. The rules that decide what an ADMIN node_start closes and which SESSION_OPEN is a second copy
changed (version 2); in a rolling upgrade builds of both run side by side, and a journal written
under the old rules is replayed by the new build. So the rules, like the app's schema version
(sequencer/app_versions.py), change at one log index on every node, by records, never by a
node's restart:

- every node_start reports `rules_version`, the newest rules its code applies (none: an older
  seqd's, which means 1). The state keeps each node's last report (`known`), taken from the first
  copy of a start only (a copy of a start already seen, or ended, changes nothing, its report
  included).
- version v is active from the first node_start at which every member that node_start names has
  last reported code that knows v: every replica decides it at the same record, from records
  alone. That node_start is itself applied under v. On a single node (its members: itself) its
  own node_start switches it. A member that never started since it was upgraded holds the whole
  log on the older rules, which is safe (both builds apply them), only without the newer
  rules' fixes.
- no operator command (unlike the app's `raise_version`): the rules change nothing a client sees
  or sends (no schema, no reply bytes), so nothing needs timing against clients, and every
  member's code applies the new rules by then. What a command would add is a window in which a
  rollback to the previous build stays safe; it closes when the last member is upgraded instead.
- a node whose code does not know the active version stops (`RulesVersionError`) rather than
  apply records it would read differently: only a node started with older (version-aware) code
  after it reported the newer, or an older build replaying another node's journal. A build from
  before rules versions cannot tell: it applies rules 1 whatever the log says (docs/evolution.md).

The active version and the reports are part of the processor's state (its snapshots). A report of
1 is kept as no report (the two decide the same), so the state of a log written under rules 1
alone is byte for byte what the previous seqd's was.

Versions:
1. what every seqd before rules versions did (sequencer/dedup_rules1.py): per started incarnation
   the highest session counter opened, from its node_start on; a node_start closes every session of
   its node that another start opened.
2. the highest counter kept from an incarnation's first open, before its node_start too
   (`opened_early`); a node_start ends the start it names as the one before it (`previous`); an
   open or node_start of an ended start changes nothing; a node_start closes no session of a start
   up to NODE_STARTS_REMEMBERED ids after its own (sequencer/dedup.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from sequencer.schema import VersionError

__all__ = ["RULES_VERSION", "RULES_VERSION_UNREPORTED", "RulesVersionError", "RulesVersions"]

RULES_VERSION = 2  # the newest rules this code applies; a node_start reports it
RULES_VERSION_UNREPORTED = 1  # what a node_start without `rules_version` (an older seqd's) means


class RulesVersionError(VersionError):
    """The log made a rules version active that this node's code does not know: stop, do not
    diverge."""


class RulesVersions:
    """The active rules version and each node's last report; see the module docstring.

    Args:
        code_version: the newest rules this node's code applies (RULES_VERSION; a test stands in
            for an older build with a lower one).

    Invariants: `active` never decreases and is never above `code_version` once a call returned;
    every value in `known` is above RULES_VERSION_UNREPORTED.
    """

    __slots__ = ("active", "code_version", "known")

    def __init__(self, code_version: int = RULES_VERSION) -> None:
        assert RULES_VERSION_UNREPORTED <= code_version <= RULES_VERSION, code_version
        self.code_version = code_version
        self.active = RULES_VERSION_UNREPORTED
        self.known: dict[int, int] = {}  # node number -> the rules its last start's code applies

    def node_started(self, number: int, reported: int | None, members: Iterable[int] | None, index: int) -> None:
        """The report of a first copy of node `number`'s node_start at `index` (`reported` None:
        an older seqd's), naming its cluster's `members` (None: an older seqd's).

        Raises:
            RulesVersionError: it made a version active that this node's code does not know.
        """
        reported = RULES_VERSION_UNREPORTED if reported is None else reported
        if reported > RULES_VERSION_UNREPORTED:
            self.known[number] = reported
        else:
            self.known.pop(number, None)
        if not members:
            return
        floor = min(self.known.get(member, RULES_VERSION_UNREPORTED) for member in members)
        if floor <= self.active:
            return
        self.active = floor
        self.check(f"the node_start at index {index} made every member's rules version {floor} active")

    def check(self, how: str) -> None:
        """Raises RulesVersionError (saying `how` the version became active) when this node's
        code does not know the active version."""
        if self.active > self.code_version:
            raise RulesVersionError(
                f"{how}, but this node's seqd applies session rules only up to version {self.code_version}: "
                "it would read the records that follow differently from the other nodes. Install the seqd "
                "the cluster was upgraded to on this node, then start it again"
            )

    def restore(self, active: int, known: Iterable[tuple[int, int]], index: int) -> None:
        """The active version and reports a snapshot at `index` holds.

        Raises:
            RulesVersionError: this node's code does not know the snapshot's active version.
        """
        self.active = active
        self.known = dict(known)
        self.check(f"the snapshot at index {index} was taken under session rules version {active}")
