"""A replicator's start on a journal its blp has replayed up to the recovered commit
(daemon/roles/replicator.py, `_load`): the core is loaded from after that commit and told it is
applied (`DurableState.applied_index`), so the start reads nothing of the journal back. It re-read
every committed entry from the journal's first index, in reads of 1 MiB, all in `serve`'s first
pass, before the node said RUNNING or answered a peer (~2-3.6 us a record: a 10M-record journal held a
start for tens of seconds). The journal's tail after the commit still goes to the ring and, once
committed, to the blp.

On a replicator driven in this process (tests/replicator_driven.py), the test playing the
supervisor and the blp that recovered before it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config
from daemon.layout import (
    JOURNAL_DURABLE_INDEX,
    RECOVERY_COMMIT_INDEX,
    RECOVERY_LAST_INDEX,
)
from ipc.counters import Counters
from sequencer.hard_state import HardStateFile
from sequencer.journal import Journal
from sequencer.raft.messages import HardState, Heartbeat
from sequencer.record import RecordType, encode_record
from tests.replicator_driven import CLUSTER_ID, driven_replicator

pytestmark = pytest.mark.timeout(60)
RECORDS = 3000  # in the journal, all of term 1
COMMITTED = 2000  # the recovered commit: what the blp replayed
LEADER_ID = 1


def recovered(config: Config, counters: Counters) -> None:
    """The journal as the supervisor recovered it and the blp replayed it up to COMMITTED."""
    with Journal.open(config.journal_dir, preallocate=False) as journal:
        journal.append(b"".join(encode_record(RecordType.COMMAND, 1, index, 1, 500, 99, index, b"x" * 16)
                                for index in range(1, RECORDS + 1)))  # fmt: skip
        journal.sync()
    HardStateFile.open(config.node.data_dir).save(HardState(term=1, vote=LEADER_ID, commit_index=COMMITTED))
    counters[RECOVERY_COMMIT_INDEX.name].set(COMMITTED)
    counters[RECOVERY_LAST_INDEX.name].set(RECORDS)
    counters[JOURNAL_DURABLE_INDEX.name].set(RECORDS)


def test_a_start_reads_nothing_of_the_journal_back_and_hands_the_tail_on_once_committed(
    tmp_dir: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with driven_replicator(tmp_dir, unique, 2, recovered=recovered) as driven:
        replicator = driven.replicator
        storage = replicator.storage
        reads: list[tuple[int, int]] = []
        read = storage.entries

        def counted(first_index: int, last_index: int, bytes_max: int) -> tuple[list[int], list[bytes]]:
            reads.append((first_index, last_index))
            return read(first_index, last_index, bytes_max)

        monkeypatch.setattr(storage, "entries", counted)  # the core's log storage is this one
        assert replicator.core.log.storage is storage
        replicator._process()  # `serve`'s first pass, before RUNNING
        driven.raise_failure()
        assert reads == []
        core = replicator.core
        assert (core.commit_index, core.applied_index, core.log.last_index) == (COMMITTED, COMMITTED, RECORDS)
        for _ in range(10):  # the tail after the commit, into the ring, a run of 512 a pass
            driven.run_scheduled()
        assert driven.written_index() == RECORDS
        # The leader commits the tail: handed on from memory, and published for the blp.
        driven.step(LEADER_ID, Heartbeat(CLUSTER_ID, LEADER_ID, 2, 1, RECORDS, 0))
        driven.run_scheduled()
        assert reads == []
        assert core.applied_index == RECORDS
        assert replicator.commit_index_counter.get() == RECORDS
