"""Following the old node's dedup decisions during a migration: which commands were new requests
and which were resends (`DedupMirror`).

A command the old node deduplicated (its request id was not above the client's last) changed
nothing, so a migration drops it; one without a session (the processor drops those) too. To
tell them apart without running the app, the mirror keeps the processor's own client table
(`sequencer.dedup.ClientTable`: open sessions, last request id per client, client expiry, the
node starts and early opens the session rules track, the active rules version), fed the old
journal's session and ADMIN records in log order through the same calls the processor makes. So
it decides under the session rules the old log had active at each index: rules 1
(sequencer/dedup_rules1.py) until an ADMIN rules_version record, then rules 2 (sequencer/dedup.py),
as the old node did (sequencer/rules_versions.py). Only the saved replies stay empty: they answer
resends, and a resend is dropped here.
"""

from __future__ import annotations

from typing import Any

from sequencer.dedup import ClientTable, SessionEntry
from sequencer.migrate.errors import MigrationError
from sequencer.rules_versions import RulesVersionError

__all__ = ["DedupMirror"]


class DedupMirror:
    """The processor's session and dedup bookkeeping, without the app and the saved replies.

    It must decide exactly as `sequencer.processor.Processor` did which commands were applied,
    so it keeps the processor's `ClientTable` and calls it as the processor does (`open`,
    `close`, `admin_record`): the same sessions (second copies of opens and
    node_starts, node_starts closing a node's earlier starts' sessions, late records of ended
    starts), the same last request id per client, the same client expiry in log time, under the
    same session rules version at each index. tests/test_migrate_rules.py checks the two against
    each other on random logs under rules 1, rules 2 and across the switch.

    Args:
        client_expiry_ns: the old node's client expiry (`node.client_expiry_s`), in ns.

    Invariant: `sessions` is the table's, never rebound (the migration's hot path holds it).
    """

    __slots__ = ("sessions", "table")

    def __init__(self, client_expiry_ns: int) -> None:
        # node None: every session local, as in a replay; it changes where replies go, not state.
        self.table = ClientTable(None, client_expiry_ns)
        self.sessions: dict[int, SessionEntry] = self.table.sessions

    def open(self, session_id: int, client_id: int, node: str, timestamp_ns: int) -> bool:
        """A SESSION_OPEN; False when the processor took it for a second copy (nothing opened)."""
        return self.table.open(session_id, client_id, node, timestamp_ns)

    def close(self, session_id: int, timestamp_ns: int) -> None:
        """A SESSION_CLOSE (of a session not open: nothing)."""
        self.table.close(session_id, timestamp_ns)

    def admin(self, admin: dict[str, Any], index: int, timestamp_ns: int) -> None:
        """An ADMIN record at old index `index`: what `ClientTable.admin_record` says it does to
        the sessions (a node_start closes what the active rules say; a rules_version switches
        them), as the processor applies it.

        Raises:
            MigrationError: the record makes session rules active that this seqd does not know.
        """
        try:
            closing = self.table.admin_record(admin, index)
        except RulesVersionError as error:
            raise MigrationError(
                f"record {index} makes session rules version {admin['version']} active, but this seqd "
                f"applies them only up to version {self.table.rules.code_version}, and a migration tells "
                "resends from new requests by them: migrate this journal with a seqd that knows them"
            ) from error
        for session_id in closing or ():
            self.table.close(session_id, timestamp_ns)
