"""A migration drops exactly the commands the old node's processor did not apply, under the session
rules the old log had active at each index (sequencer/dedup.py's rules 2, sequencer/dedup_rules1.py's
rules 1, switched by an ADMIN rules_version record: sequencer/rules_versions.py).

The migration tells resends and commands without a session from new requests by following the
processor's session and dedup bookkeeping without the app (`sequencer.migrate.dedup_mirror`). The
logs here are made of the orderings where the two rules versions differ (sequencer/dedup.py's
docstring): node_starts with incarnations, late ones (a lost forward resent behind its start's
first opens, or a stopped start's forward arriving after its node's next start), copies of opens,
closes and node_starts (a follower's resend to a new leader), commands resent on new sessions,
and clients idle past the expiry. A mirror that decides one of them otherwise carries a command
over that the old node never applied, or drops one it did.

The logs also hold migrated requests (COMMAND_PART records: a journal migrated before), whose
parts stop at the first one refused (`sequencer.processor`, "Migrated requests"): refused by the
app (a negative note), which the migration cannot know and carries, so the new node refuses it
again and skips the same parts; or undecodable, which the migration can tell as the old node did
and writes as a part without command bytes, so it drops the parts after it (the new node would
have applied them: a part without a command refuses nothing).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import pytest

from sequencer.migrate import MIGRATION_CLIENT_ID, MIGRATION_SESSION_ID, Migration, MigrationError
from sequencer.migrate.migration import MIGRATION_SESSIONS_MAX
from sequencer.processor import Processor
from sequencer.record import ADMIN_NODE_START, RecordType, encode_admin, encode_command
from sequencer.rules_versions import RULES_VERSION
from tests.fixtures.feeder import Feeder
from tests.test_duplicates_orderings import copy_of
from tests.test_migrate import EXPIRY_NS, NOTES_SCHEMA, MergePairs, Note, Notes, SameNotes
from tests.test_processor_duplicates import node_start, session
from tests.test_rules_versions import rules_version_record

# Seeds per rules set: a log is ~120 records and takes ~3 ms to replay, migrate and replay again,
# so the three sets' 600 logs and the coverage check cost about 3 s of CPU (quiet machine).
# SEQD_MIGRATE_RULES_SEEDS raises it for a longer search.
SEEDS = int(os.environ.get("SEQD_MIGRATE_RULES_SEEDS", "200"))
STEPS_MAX = 120  # steps per log: each a record (a copy included), but an idle gap or a delay
NODES = (1, 2)
FIRST_START = {1: 0x000110, 2: 0x000990}  # each node's first incarnation; ids go up by one a start
CLIENTS = 5
DELAY_STEPS_MAX = 12  # how far behind its place a lost forward is resent
PARTS_MAX = 4  # the parts of a migrated request drawn
# What each part of a migrated request holds: a note, one the app refuses, bytes no schema
# version decodes (msgpack's never-used byte), or no command.
PART_KINDS = ("note", "note", "negative", "undecodable", "none")
UNDECODABLE = b"\xc1"


class RandomLog:
    """A cluster's log drawn at random, record by record (see the module docstring): every start
    of a node is its previous plus one and names it (or, as an older seqd's, does not), and each
    record may reach the log late or twice."""

    def __init__(self, rng: random.Random, switch: str) -> None:
        self.rng = rng
        self.switch = switch  # "never": rules 1 throughout; "first": rules 2; "random": one switch
        self.feeder = Feeder(NOTES_SCHEMA)
        self.starts = {number: 0 for number in NODES}  # how many times each node restarted
        self.counters: dict[tuple[int, int], int] = {}  # (node, incarnation) -> last counter
        self.opened: list[tuple[int, int]] = []  # (session id, client id) of every open drawn
        self.sent: list[tuple[Any, ...]] = []  # every open, close and node_start drawn: copies
        self.delayed: list[tuple[int, tuple[Any, ...]]] = []  # (release step, event)
        self.next_request = dict.fromkeys(range(1, CLIENTS + 1), 1)

    def incarnation(self, number: int, starts_back: int = 0) -> int:
        return FIRST_START[number] + max(self.starts[number] - starts_back, 0)

    def draw(self) -> list[bytes]:
        rng = self.rng
        if self.switch == "first":
            self.emit(("rules",))
        switch_at = rng.randrange(STEPS_MAX) if self.switch == "random" else -1
        for number in NODES:
            self.emit(self.start_event(number))
        for step in range(STEPS_MAX):
            for release, event in [item for item in self.delayed if item[0] <= step]:
                self.delayed.remove((release, event))
                self.emit(event)
            if step == switch_at:
                self.emit(("rules",))
            event = self.next_event()
            if event is None:
                continue
            if event[0] in ("start", "open") and rng.random() < 0.15:
                self.delayed.append((step + rng.randint(1, DELAY_STEPS_MAX), event))  # a lost forward
            else:
                self.emit(event)
            if event[0] in ("start", "open", "close"):
                self.sent.append(event)
        for _, event in self.delayed:
            self.emit(event)
        return self.feeder.records

    def start_event(self, number: int) -> tuple[Any, ...]:
        rng = self.rng
        incarnation = self.incarnation(number)
        previous = self.incarnation(number, 1) if self.starts[number] else None
        if rng.random() < 0.1:
            return ("start", number, None, None, None)  # a seqd's from before incarnations
        if rng.random() < 0.3:
            return ("start", number, incarnation, None, None)  # from before rules versions
        return ("start", number, incarnation, previous, RULES_VERSION)

    def next_event(self) -> tuple[Any, ...] | None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.06:
            number = rng.choice(NODES)
            self.starts[number] += 1
            return self.start_event(number)
        if roll < 0.25 or not self.opened:
            number = rng.choice(NODES)
            # Mostly the running start's; now and then a start before it (its forward in flight).
            incarnation = self.incarnation(number, 0 if rng.random() < 0.85 else rng.randint(1, 2))
            key = (number, incarnation)
            self.counters[key] = self.counters.get(key, 0) + 1
            session_id = session(number, incarnation, self.counters[key])
            client_id = rng.randint(1, CLIENTS)
            self.opened.append((session_id, client_id))
            return ("open", session_id, client_id, f"n{number}")
        if roll < 0.35:
            return ("close", rng.choice(self.opened)[0])
        if roll < 0.45 and self.sent:
            return rng.choice(self.sent)  # a copy, resent to a new leader
        if roll < 0.48:
            self.feeder.advance(rng.choice([EXPIRY_NS // 2, EXPIRY_NS, 2 * EXPIRY_NS]))
            return None
        session_id, client_id = rng.choice(self.opened[-8:])
        request_id = self.next_request[client_id]
        if rng.random() < 0.25 and request_id > 1:
            request_id = rng.randint(1, request_id - 1)  # resent, on this session or a new one
        else:
            self.next_request[client_id] += 1
        if rng.random() < 0.15:  # a request of a journal migrated before
            kinds = tuple(rng.choice(PART_KINDS) for _ in range(rng.randint(1, PARTS_MAX)))
            return ("parts", session_id, request_id, kinds)
        return ("command", session_id, request_id)

    def emit(self, event: tuple[Any, ...]) -> None:
        feeder = self.feeder
        kind = event[0]
        if kind == "open":
            feeder.open_session(event[1], client_id=event[2], node=event[3])
        elif kind == "close":
            feeder.close_session(event[1])
        elif kind == "command":
            feeder.command(event[1], event[2], Note(feeder.index + 1))  # the value: its index
        elif kind == "parts":
            for part in event[3]:
                value = feeder.index + 1
                data = {"note": Note(value), "negative": Note(-value), "none": None}.get(part, UNDECODABLE)
                if data is not None and not isinstance(data, bytes):
                    data = NOTES_SCHEMA.encode_command(data)[1]
                feeder._record(RecordType.COMMAND_PART, NOTES_SCHEMA.version, event[1], event[2],
                               encode_command(0, data or b""))  # fmt: skip
        elif kind == "rules":
            rules_version_record(feeder, RULES_VERSION)
        else:
            _, number, incarnation, previous, rules_version = event
            if incarnation is None:
                feeder._record(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_NODE_START, node=f"n{number}"))
            else:
                node_start(feeder, incarnation, node=f"n{number}", number=number, previous=previous,
                           rules_version=rules_version, members=list(NODES))  # fmt: skip


def command_indexes(records: list[bytes], record_type: int = RecordType.COMMAND) -> list[int]:
    return [int.from_bytes(record[8:16], "little") for record in records
            if int.from_bytes(record[4:6], "little") == record_type]  # fmt: skip


def assert_migration_decides_as_the_processor(records: list[bytes], log: str) -> Processor[Notes]:
    """Migrates `records` (described by `log` in a failure) as they are; returns the processor
    that applied them."""
    run = b"".join(records)
    old = Processor(Notes, client_expiry_ns=EXPIRY_NS)
    old.apply_records(run)
    commands = command_indexes(records)
    applied = sorted(value for _, value in old.app.applied if value in set(commands))  # of COMMANDs
    migration = Migration(SameNotes(), client_expiry_ns=EXPIRY_NS)
    new_run = migration.feed(run) + migration.finish()
    index_map = migration.index_map()
    carried = [index for index in commands if len(index_map.targets(index))]
    read, written = migration.counts()
    without_session = read.get("COMMAND (no session: dropped)", 0)
    resent = len(commands) - len(applied) - without_session
    where = f"{log}, {len(records)} records, rules {old.rules_versions.active} at the end"
    assert carried == applied, f"{where}: carried over {sorted(set(carried) - set(applied))} the old node did not " \
                               f"apply; dropped {sorted(set(applied) - set(carried))} it applied"  # fmt: skip
    assert read.get("COMMAND (resent: dropped)", 0) == resent, where
    assert without_session + read.get("COMMAND_PART (no session: dropped)", 0) == old.commands_without_session, where
    assert written.get("SESSION_CLOSE (open at the end)", 0) == len(old.session_ids()), where
    new = Processor(Notes, client_expiry_ns=EXPIRY_NS)
    new.apply_records(new_run)
    assert new.app.applied == old.app.applied, where
    assert new.commands_without_session == 0, where
    assert new.rules_versions.active == old.rules_versions.active, where
    return old


@pytest.mark.parametrize("switch", ["never", "first", "random"])
def test_a_migration_carries_over_exactly_the_commands_the_processor_applied(switch: str) -> None:
    """Under rules 1 ("never": no rules_version record), rules 2 (switched on by the first record)
    and across the switch (at a random index): per log, the commands carried over are those the
    processor applied, the ones dropped as resends and as without a session are as many as it
    answered and dropped, and the sessions closed at the end are the ones it left open."""
    outcomes: Counter[str] = Counter()
    for seed in range(SEEDS):
        records = RandomLog(random.Random(seed), switch).draw()
        old = assert_migration_decides_as_the_processor(records, f"seed {seed} ({switch})")
        outcomes["duplicate records"] += old.duplicate_records
        outcomes["without session"] += old.commands_without_session
        outcomes["parts skipped"] += old.command_parts_skipped
        outcomes["parts applied"] += len(set(value for _, value in old.app.applied)
                                         & set(command_indexes(records, RecordType.COMMAND_PART)))  # fmt: skip
        outcomes[f"rules {old.rules_versions.active}"] += 1
    # The logs reach the orderings: second copies (no-ops), commands left without a session, and
    # the parts of migrated requests applied and skipped (after a refused part, or stale).
    assert outcomes["duplicate records"] > SEEDS, outcomes
    assert outcomes["without session"] > SEEDS, outcomes
    assert outcomes["parts applied"] > SEEDS, outcomes
    assert outcomes["parts skipped"] > SEEDS, outcomes
    assert outcomes[f"rules {1 if switch == 'never' else RULES_VERSION}"] == SEEDS, outcomes


def test_the_random_logs_reach_the_orderings_where_the_two_rules_decide_differently() -> None:
    """The same log applied under rules 1 and under rules 2 ("first" is "never" with the switch
    in front, every index one later) applies other commands, or leaves other sessions open, in
    most seeds: the property above is tested where the rules matter."""
    differ = 0
    for seed in range(SEEDS):
        decided = []
        for switch, shift in (("never", 0), ("first", 1)):
            processor = Processor(Notes, client_expiry_ns=EXPIRY_NS)
            processor.apply_records(b"".join(RandomLog(random.Random(seed), switch).draw()))
            decided.append(([value - shift for _, value in processor.app.applied], processor.session_ids()))
        differ += decided[0] != decided[1]
    assert differ > SEEDS // 2, differ


def test_a_copy_of_an_open_after_its_close_is_no_session_for_the_migration_either() -> None:
    # Rules 2: the copy changes nothing, so the command after it has no session and the old node
    # dropped it. A mirror that reopened the session carried it over (and its session's close).
    feeder = Feeder(NOTES_SCHEMA)
    node_start(feeder, FIRST_START[1])
    rules_version_record(feeder, RULES_VERSION)
    s1 = session(1, FIRST_START[1], 1)
    opening = feeder.open_session(s1, client_id=7)
    feeder.command(s1, 1, Note(feeder.index + 1))
    feeder.close_session(s1)
    copy_of(feeder, opening, s1)  # resent to a new leader
    feeder.command(s1, 2, Note(feeder.index + 1))
    old = assert_migration_decides_as_the_processor(feeder.records, "the example")
    assert old.commands_without_session == 1


def test_a_copy_of_an_open_leaves_its_client_to_expire_as_the_old_node_did() -> None:
    # Under either rules the copy of a session still open changes nothing: its client is idle
    # once the session closes, and forgotten after the expiry (which runs at the next open or
    # close), so request 1 again on a new session is a new request the old node applied. A mirror that counted the copy as a second
    # session never let the client expire, and dropped that request as a resend.
    for rules_2 in (False, True):
        feeder = Feeder(NOTES_SCHEMA)
        node_start(feeder, FIRST_START[1])
        if rules_2:
            rules_version_record(feeder, RULES_VERSION)
        s1, s2 = session(1, FIRST_START[1], 1), session(1, FIRST_START[1], 4)
        opening = feeder.open_session(s1, client_id=7)
        copy_of(feeder, opening, s1)
        feeder.command(s1, 1, Note(feeder.index + 1))
        feeder.close_session(s1)
        feeder.advance(2 * EXPIRY_NS)
        feeder.open_session(session(1, FIRST_START[1], 3), client_id=8)  # the expiry runs here
        feeder.open_session(s2, client_id=7)
        feeder.command(s2, 1, Note(feeder.index + 1))
        old = assert_migration_decides_as_the_processor(feeder.records, f"the example, rules 2: {rules_2}")
        assert len(old.app.applied) == 2, rules_2


def test_the_parts_after_a_part_the_old_node_could_not_decode_are_dropped_as_it_skipped_them() -> None:
    # The old node refused part 2 (bad_command) and skipped part 3. Part 2 becomes a part without
    # a command, which refuses nothing: part 3 carried behind it was applied by the new node.
    # Part 5, after a part the app refused, is carried: the new node refuses part 4 and skips it.
    feeder = Feeder(NOTES_SCHEMA)
    node_start(feeder, FIRST_START[1])
    s1 = session(1, FIRST_START[1], 1)
    feeder.open_session(s1, client_id=7)
    for request_id, parts in ((1, [Note(10), UNDECODABLE, Note(30)]), (2, [Note(-40), Note(50)])):
        for part in parts:
            data = part if isinstance(part, bytes) else NOTES_SCHEMA.encode_command(part)[1]
            feeder._record(RecordType.COMMAND_PART, NOTES_SCHEMA.version, s1, request_id, encode_command(0, data))
    old = assert_migration_decides_as_the_processor(feeder.records, "the example")
    assert (old.app.applied, old.command_parts_skipped) == ([(7, 10)], 2)
    migration = Migration(SameNotes(), client_expiry_ns=EXPIRY_NS)
    migration.feed(b"".join(feeder.records))
    assert migration.counts()[0]["COMMAND_PART (after a refused part: dropped)"] == 1


def test_a_journal_under_rules_this_seqd_does_not_know_is_refused_naming_the_record() -> None:
    feeder = Feeder(NOTES_SCHEMA)
    node_start(feeder, FIRST_START[1])
    rules_version_record(feeder, RULES_VERSION + 1)
    with pytest.raises(MigrationError, match=f"record 2 makes session rules version {RULES_VERSION + 1} active"):
        Migration(SameNotes(), client_expiry_ns=EXPIRY_NS).feed(b"".join(feeder.records))


def journal_with_a_held_note(feeder: Feeder, rules_2: bool = True) -> list[bytes]:
    """Under rules 2 (or 1), one note on a session of node 1: MergePairs holds it until finish()."""
    if rules_2:
        rules_version_record(feeder, RULES_VERSION)
    s1 = session(1, FIRST_START[1], 1)
    feeder.open_session(s1, client_id=8)
    feeder.command(s1, 1, Note(5))
    return feeder.records


@pytest.mark.parametrize("rules_2", [False, True], ids=["rules 1", "rules 2"])
def test_a_journal_migrated_twice_applies_the_second_migrations_held_commands(rules_2: bool) -> None:
    # The first migration's session (id 1, opened and closed in the migrated journal) opened again
    # is a second copy to rules 2: the new node applied no command on it, and the note the second
    # migration held was lost. The second migration takes the next id under rules 2, id 1 again
    # under rules 1 (which take it as new); the request ids go on above the first's either way.
    feeder = Feeder(NOTES_SCHEMA)
    node_start(feeder, FIRST_START[1])
    run = b"".join(journal_with_a_held_note(feeder, rules_2))
    for _ in range(3):
        migration = Migration(MergePairs(), client_expiry_ns=EXPIRY_NS)
        run = migration.feed(run) + migration.finish()
        new = Processor(Notes, client_expiry_ns=EXPIRY_NS)
        new.apply_records(run)
        assert new.app.applied == [(MIGRATION_CLIENT_ID, 5)]
        assert new.commands_without_session == 0
        assert new.duplicate_records == 0


def test_a_journal_where_no_migration_session_opens_is_refused() -> None:
    # A node number 0 (no node's: the migrations') whose start ended incarnation 0: every open of
    # the migrations' session ids is refused, up to MIGRATION_SESSIONS_MAX of them.
    feeder = Feeder(NOTES_SCHEMA)
    node_start(feeder, FIRST_START[1])
    node_start(feeder, 1, node="n0", number=0, previous=0)
    migration = Migration(MergePairs(), client_expiry_ns=EXPIRY_NS)
    migration.feed(b"".join(journal_with_a_held_note(feeder)))
    last = MIGRATION_SESSION_ID + MIGRATION_SESSIONS_MAX - 1
    with pytest.raises(MigrationError, match=f"no session id from {MIGRATION_SESSION_ID} to {last} .* is free"):
        migration.finish()
