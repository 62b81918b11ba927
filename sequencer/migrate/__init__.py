"""Copy-and-transform of the journal: a new journal from an old one, through a transform.

Theory of operation. Upcasting (`sequencer.schema`) turns one old message into one new message
on replay. What it cannot do (rename a command into several, merge several into one, drop one)
needs a new journal: every record of the old one is read in index order, each client request's
command is handed to a `Transform`, and what it returns is written as the new journal's records,
with new indexes dense from 1. Everything else is carried over so that exactly-once and time
still hold after the migration (docs/evolution.md has the long form):

- Sessions and client ids: SESSION_OPEN, SESSION_CLOSE and ADMIN records are copied, so every
  command keeps its session, and through it its client id.
- Request ids: every command the transform returns for a request carries that request's session,
  request id and acked request id. One command is written as a COMMAND; zero or several as
  COMMAND_PART records back to back (`sequencer.processor`, "Migrated requests"): the request is
  deduplicated as one request on a resend, its parts stop at the first rejected one, and its
  saved reply is the last part's (or the rejection). A request that became no command is a part
  without command bytes: it records the request id, so a resend gets DUPLICATE, never a second
  application. A part the old node refused as undecodable becomes such a part too (a first
  part; a later one is written as nothing), and the request's later parts, which the old node skipped, are dropped (`DedupMirror.refuse`); one the
  old app refused is carried, and refused again by the new node, which skips the same parts.
- Resends: a command the old node deduplicated (its request id was not above the client's last)
  changed nothing, and is dropped. To know which those are, `DedupMirror` follows the processor's
  dedup decisions (sessions, last request id per client, client expiry) without running the app,
  with the processor's own client table, so under the session rules version the old log had
  active at each index (sequencer/rules_versions.py).
  A command without a session (the processor drops those) is dropped too.
- Time: each new record has the timestamp and term of the old record it came from, so time never
  goes backwards. TIMER_FIRED records are copied (or changed by `Transform.timer_fired`): their
  timer id and deadline must match what the new app scheduled, which the verification checks.
- SNAPSHOT records are dropped: a snapshot of the old app is no state of the new one, and the
  new journal's indexes differ. The new node starts from the new journal alone.
- At the end, the transform's `finish()` commands (a merge still open) are written on a session
  of the migration itself (client id 0, as a timer has; a journal migrated before holds the
  earlier migration's: the first session id the log's rules take as new (rules 2: the next one;
  rules 1: id 1 again) and request ids above its are taken, or the new node would answer them
  as a resent copy and resends), and every session still open is closed, as
  the old node's next start would have done with its `node_start` record.

`Migration` is the sans-I/O core: `feed(run)` takes a run of whole old records (a journal batch)
and returns the new records' bytes, `finish()` the last ones; `index_map()` then says where each
old index went. Reading, writing, locking and verifying are in `daemon/migrate.py`.

The package, one concept per module (every name is importable from `sequencer.migrate`):
`transform` (the Transform API, Origin, loading a transform by name), `errors`, `dedup_mirror`
(resends told from new requests), `index_map` (old index -> new indexes, its file) and
`migration` (the loop).
"""

from __future__ import annotations

from sequencer.migrate.errors import MigrationError, TransformError, TransformLoadError
from sequencer.migrate.index_map import INDEX_MAP_FILE, IndexMap
from sequencer.migrate.migration import (
    COMMANDS_PER_REQUEST_MAX,
    MIGRATION_CLIENT_ID,
    MIGRATION_NODE,
    MIGRATION_SESSION_ID,
    Migration,
)
from sequencer.migrate.transform import (
    Origin,
    Transform,
    check_transform,
    load_transform,
    transform_name,
)

__all__ = [
    "COMMANDS_PER_REQUEST_MAX",
    "INDEX_MAP_FILE",
    "MIGRATION_CLIENT_ID",
    "MIGRATION_NODE",
    "MIGRATION_SESSION_ID",
    "IndexMap",
    "Migration",
    "MigrationError",
    "Origin",
    "Transform",
    "TransformError",
    "TransformLoadError",
    "check_transform",
    "load_transform",
    "transform_name",
]
