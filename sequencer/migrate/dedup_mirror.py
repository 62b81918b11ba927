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
as the old node did (sequencer/rules_versions.py). The saved replies stay empty (they answer
resends, and a resend is dropped here) but for one kind: a request the old node refused that the
migration can tell refused, because its command did not decode (`refuse`). Its later parts were
skipped by the old node, so they are dropped (`refused`); written after the part without command
bytes that an undecodable first part becomes, the new node would apply them (a later undecodable
part is written as nothing). A refusal by the app is not known here (it would take running the
app): its part is carried, so the new node refuses it again and skips the same later parts,
unless the transform changes or drops the refused part.
"""

from __future__ import annotations

from typing import Any

from sequencer.dedup import ClientEntry, ClientTable, SessionEntry
from sequencer.egress import ReplyStatus
from sequencer.migrate.errors import MigrationError
from sequencer.rules_versions import RulesVersionError

__all__ = ["DedupMirror"]

_OK = int(ReplyStatus.OK)
# The saved reply of a refused request, as the processor keeps its status (the rest unused).
_REFUSED = (0, int(ReplyStatus.REJECTED), 0, b"")


class DedupMirror:
    """The processor's session and dedup bookkeeping, without the app and the saved replies (but
    the refusals a migration can tell: `refuse`).

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

    def refuse(self, client: ClientEntry, request_id: int) -> None:
        """The old node refused request `request_id` of `client` (a command of it did not
        decode): its later parts were skipped. One request held per client, the newest: parts
        come back to back, so only the last request can have more."""
        replies = client.replies
        replies.clear()
        replies[request_id] = _REFUSED

    @staticmethod
    def refused(client: ClientEntry, request_id: int) -> bool:
        """Whether a later part of request `request_id` of `client` comes after a part the old
        node refused (`refuse`), as the processor's later-part rule reads its saved reply."""
        saved = client.replies.get(request_id)
        return saved is not None and saved[1] != _OK

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
