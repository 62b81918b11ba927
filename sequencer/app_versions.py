"""The active app version of a replicated log: which schema version is in effect at each index
(issue 16, rolling upgrades; docs/evolution.md, "Rolling upgrades of a cluster"). Sans-I/O.

A cluster upgraded node by node runs two builds of the app at once. Replicas stay identical only
if every node decides the same from the same records, so what a new build may do is switched on
at one log index on every node, by a record, never by a node's restart:

- each node's ADMIN `node_start` reports `app_version`, the newest schema version its code knows,
  and `members`, its cluster's node numbers; the processor keeps the last report per node
  (`known`). The first report of a log sets the active version; on a single node (`members` is
  the node alone) each start raises it to its code's version: the one node is every node.
- an ADMIN `raise_version` record (`seqd cluster raise-version`) makes `version` active if it is
  above the active one and every member it names last reported code that knows it; otherwise it
  is refused, the same way on every replica (counted, and the reason kept for the log).
- until then a node's gateway admits commands only up to the active version, and its processor
  stamps replies and events with it (`output_version`): a new build must answer every old
  command with the same bytes as the old build (an additive change: new command or event types),
  so the rolling hashes and the saved replies of old and new nodes agree during the upgrade.
- a node whose code does not know a version that a raise makes active stops (`AppVersionError`)
  rather than apply records it would read differently. A raise is accepted only after every
  member reported the version, so this happens only to a node started with old code again after
  it reported the new one, or to a copy of the log replayed by an old build.

The active version and the reports are part of the processor's state (snapshots).
"""

from __future__ import annotations

from collections.abc import Iterable

from sequencer.schema import VersionError

__all__ = ["AppVersionError", "AppVersions"]


class AppVersionError(VersionError):
    """The log made a version active that this node's code does not know: stop, do not diverge."""


class AppVersions:
    """The active version and each node's last reported version; see the module docstring.

    Invariant: `active` never decreases; 0 means no node_start has reported a version yet.
    """

    __slots__ = ("active", "known", "last_refusal", "raises_refused")

    def __init__(self) -> None:
        self.active = 0
        self.known: dict[int, int] = {}  # node number -> newest version its code knows
        self.raises_refused = 0  # not state: what this replica saw since it started
        self.last_refusal = ""

    def output_version(self, code_version: int) -> int:
        """The version replies and events are stamped with: the active one, never above the code's."""
        active = self.active
        return code_version if not active or active > code_version else active

    def node_started(self, number: int | None, app_version: int | None, members: Iterable[int] | None) -> None:
        """A node_start's report (an older seqd's carries none: nothing changes)."""
        if number is None or app_version is None:
            return
        self.known[number] = app_version
        alone = members is not None and list(members) == [number]
        if self.active == 0 or (alone and app_version > self.active):
            self.active = app_version

    def raise_to(self, version: int, members: Iterable[int], code_version: int, index: int) -> bool:
        """Apply a raise_version record at `index`; True if it made `version` active.

        Raises:
            AppVersionError: it did, and this node's code knows only up to `code_version`.
        """
        if version <= self.active:
            self.raises_refused += 1
            self.last_refusal = f"raise to version {version} at index {index}: version {self.active} is already active"
            return False
        behind = {member: self.known.get(member, 0) for member in members if self.known.get(member, 0) < version}
        if behind:
            self.raises_refused += 1
            lacking = ", ".join(f"node {m} ({f'knows up to {v}' if v else 'no report'})" for m, v in sorted(behind.items()))
            self.last_refusal = (f"raise to version {version} at index {index} refused: {lacking}; upgrade "
                                 "those nodes (and restart them) first, then raise again")
            return False
        self.active = version
        if version > code_version:
            raise AppVersionError(
                f"the log makes app schema version {version} active at index {index}, but this node's "
                f"code knows only up to version {code_version}: it cannot apply what follows the same "
                "way as the other nodes. Install the app version the cluster was upgraded to on this "
                "node, then start it again"
            )
        return True

    def restore(self, active: int, known: Iterable[tuple[int, int]]) -> None:
        self.active = active
        self.known = dict(known)
