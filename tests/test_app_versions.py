"""The active app version of a log (issue 16 part 3, sequencer/app_versions.py), on the processor:
a raise takes effect at its index only once every member reported code that knows the version;
until then a new build answers like the old one; an old build stops at an accepted raise."""

from __future__ import annotations

from typing import Any

import pytest

from sequencer.app_versions import AppVersionError
from sequencer.apps.ledger import LEDGER_SCHEMA, Deposit, Ledger, OpenAccount
from sequencer.egress import Reply
from sequencer.processor import Processor
from sequencer.record import ADMIN_NODE_START, ADMIN_RAISE_VERSION, RecordType, encode_admin
from tests.fixtures.feeder import Feeder, feed
from tests.fixtures.ledger_v2_additive import LEDGER_V2_SCHEMA, LedgerV2, TransferAll

MEMBERS = [1, 2, 3]


def node_start(feeder: Feeder, number: int, app_version: int, members: list[int] = MEMBERS) -> bytes:
    payload = encode_admin(ADMIN_NODE_START, node=f"n{number}", number=number, incarnation=number,
                           app_version=app_version, members=members)  # fmt: skip
    return feeder._record(RecordType.ADMIN, 1, 0, 0, payload)


def raise_version(feeder: Feeder, version: int, members: list[int] = MEMBERS) -> bytes:
    return feeder._record(RecordType.ADMIN, 1, 0, 0, encode_admin(ADMIN_RAISE_VERSION, version=version, members=members))


def replies(outputs: list[Any]) -> list[Reply]:
    return [output for output in outputs if isinstance(output, Reply)]


def upgrade_history(feeder: Feeder) -> list[bytes]:
    """Three v1 nodes start; node 1 and 2 come back with v2 code; a raise before node 3 is."""
    session = 3 << 56 | 1
    return [
        node_start(feeder, 1, 1), node_start(feeder, 2, 1), node_start(feeder, 3, 1),
        feeder.open_session(session, client_id=9, node="n3"),
        feeder.command(session, 1, OpenAccount("alice")),
        node_start(feeder, 1, 2), node_start(feeder, 2, 2),
        raise_version(feeder, 2),  # refused: node 3 still reports 1
        feeder.command(session, 2, Deposit("alice", 5)),
    ]  # fmt: skip


def test_a_raise_is_refused_until_every_member_reports_code_that_knows_the_version() -> None:
    processor = Processor(LedgerV2)
    feeder = Feeder(LEDGER_SCHEMA)
    for record in upgrade_history(feeder):
        feed(processor, record)
    versions = processor.app_versions
    assert (versions.active, versions.known, versions.raises_refused) == (1, {1: 2, 2: 2, 3: 1}, 1)
    assert "node 3 (knows up to 1)" in versions.last_refusal, versions.last_refusal
    feed(processor, node_start(feeder, 3, 2))
    feed(processor, raise_version(feeder, 2))
    assert versions.active == 2 and processor._context.app_version == 2
    # The active version is state: a snapshot carries it.
    restored = Processor.restore(LedgerV2, processor.snapshot_bytes())
    assert (restored.app_versions.active, restored.app_versions.known) == (2, {1: 2, 2: 2, 3: 2})
    assert restored.state_hash() == processor.state_hash()


def test_before_the_raise_a_new_build_answers_old_commands_with_the_old_builds_bytes() -> None:
    """The rolling hash and every reply (version included) of a v2 node equal a v1 node's over
    the same records until the raise, so replicas of both builds agree during the upgrade."""
    old, new = Processor(Ledger), Processor(LedgerV2)
    for processor in (old, new):
        processor.emit_for(3, cluster=True)
    feeder = Feeder(LEDGER_SCHEMA)
    outputs: dict[str, list[Reply]] = {"old": [], "new": []}
    for record in upgrade_history(feeder):
        outputs["old"] += replies(feed(old, record))
        outputs["new"] += replies(feed(new, record))
    assert outputs["old"] == outputs["new"] and len(outputs["new"]) == 2
    assert {reply.version for reply in outputs["new"]} == {1}
    assert old.rolling_hash == new.rolling_hash
    assert old._table.clients[9].replies == new._table.clients[9].replies  # the dedup table too


def test_after_the_raise_new_commands_apply_and_replies_carry_the_new_version() -> None:
    processor = Processor(LedgerV2)
    processor.emit_for(3, cluster=True)
    feeder = Feeder(LEDGER_SCHEMA)
    for record in upgrade_history(feeder):
        feed(processor, record)
    feed(processor, node_start(feeder, 3, 2))
    feed(processor, raise_version(feeder, 2))
    session = 3 << 56 | 1
    feed(processor, feeder.command(session, 3, OpenAccount("bob")))
    feeder.schema = LEDGER_V2_SCHEMA  # a v2 client from here on
    (reply,) = replies(feed(processor, feeder.command(session, 4, TransferAll("alice", "bob"))))
    assert reply.version == 2 and reply.index == processor.applied_index
    assert processor.app.accounts["bob"].balance == 5


def test_an_old_build_stops_at_an_accepted_raise_with_a_clear_error() -> None:
    """A v1 node that reported v2 before (then came back with v1 code) refuses to go past the
    raise rather than apply what follows differently."""
    processor = Processor(Ledger)
    feeder = Feeder(LEDGER_SCHEMA)
    for record in upgrade_history(feeder):
        feed(processor, record)
    feed(processor, node_start(feeder, 3, 2))
    index = processor.applied_index + 1
    with pytest.raises(AppVersionError, match=f"version 2 active at index {index}, but this node's code knows only up to version 1"):
        feed(processor, raise_version(feeder, 2))


def test_a_single_node_activates_its_own_version_at_each_start() -> None:
    """A single node is every node: its node_start (members: itself) makes its code's version
    active, so a restart with new code needs no raise; an older seqd's node_start changes nothing."""
    processor = Processor(LedgerV2)
    feeder = Feeder(LEDGER_SCHEMA)
    feed(processor, feeder.node_start("n1"))  # an older seqd's: no version reported
    assert processor.app_versions.active == 0 and processor._context.app_version == 2
    feed(processor, node_start(feeder, 1, 1, members=[1]))
    assert processor.app_versions.active == 1
    feed(processor, node_start(feeder, 1, 2, members=[1]))
    assert processor.app_versions.active == 2
