"""A new leader refills a lagging follower from its journal, beyond what it kept in memory: three
real nodes on this machine, as the fault tests run them (`tests/test_cluster_faults.py`'s
`Scenario`: a fault proxy on every link, a recording ledger client on every node, and its end's
checks).

A node that does not lead keeps only `cluster.follower_log_retention_entries` applied entries in
memory (sequencer/raft/readies.py, `_release_memory`); once it leads, what a follower lacks below
that is read back from its journal (`Leader._send_append`, `JournalLogStorage.entries`). Unit
tests drive that path in one process (tests/test_raft_async.py); here the daemon's replicator,
journal and peer transport do it. The scenario that forces it: follower C is killed; leader A
commits with B far past B's window (made small, so the test takes seconds); A is killed; C
restarts. B's log is longer, so B wins, and it commits nothing of its term until C holds its whole
log (B and C are the majority): every entry C missed below B's window comes from B's journal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cluster_harness import Cluster
from daemon.layout import BLP_APPLIED_INDEX, RAFT_STORED_ENTRIES_SENT
from sequencer import logtools
from tests.test_cluster_faults import ACKS, TIMEOUTS, Scenario

# B keeps this many applied entries in memory while it follows (and drops them in chunks of as
# many: it holds between one and two windows below its applied index).
FOLLOWER_WINDOW = 64
# How far past C's last entry B applies before A dies: far past B's two windows, so most of what
# C misses can only come from B's journal.
BEHIND_ENTRIES = 8 * FOLLOWER_WINDOW
BACKLOG_TIMEOUT_S = 60.0
REFILL_TIMEOUT_S = 60.0  # a few hundred records: well under a second; 60 s bounds a hang
PUBLISHED_TIMEOUT_S = 10.0  # `raft.stored_entries_sent` is copied every tick (10 ms) on a leader

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def scenario(tmp_dir: Path, unique: str) -> Iterator[Scenario]:
    cluster = Cluster(tmp_dir, unique, cluster={**TIMEOUTS, "follower_log_retention_entries": FOLLOWER_WINDOW})
    made = Scenario(cluster, tmp_dir)
    try:
        yield made
    finally:
        if made.workload is not None:
            made.workload.kill()
        cluster.close()


def test_a_new_leader_refills_a_lagging_follower_from_its_journal_beyond_its_memory(scenario: Scenario) -> None:
    """Raft paper 5.3: "the leader [...] sends AppendEntries RPCs with the missing entries" to a
    follower behind, whether or not it still holds them in memory. B, leading, must bring C to
    its whole log before anything of its term commits; C missed `BEHIND_ENTRIES` entries, and B
    held at most two windows of them in memory, so B sent at least the rest from its journal
    (`raft.stored_entries_sent`). Then, as every fault scenario ends: every acknowledged command
    applied exactly once, the three blps at one index with one rolling hash, the journals equal
    record by record, `seqd log check` clean."""
    cluster = scenario.cluster
    a = scenario.begin()
    b, c = (n for n in cluster.nodes if n != a)
    cluster.kill(c)
    c_last = logtools.last_index(cluster[c].config.journal_dir)  # C's log, as it restarts with it

    deadline = time.monotonic() + BACKLOG_TIMEOUT_S
    standing = scenario.leader(among=[a, b])  # an election on a loaded machine may move it
    while True:
        a, term = standing
        b = next(n for n in cluster.nodes if n not in (a, c))
        applied = cluster[b].read_counters()[BLP_APPLIED_INDEX.name]
        scenario.progress(ACKS, [a, b])
        standing = scenario.leader(among=[a, b])
        now_applied = cluster[b].read_counters()[BLP_APPLIED_INDEX.name]
        # Counted only after a call one leader led throughout (one term) while B applied: B may
        # have led before, and a node keeps the leader's window (65,536 entries) until it next
        # applies while following; that B would refill C from memory.
        if standing == (a, term) and now_applied > applied and now_applied >= c_last + BEHIND_ENTRIES:
            break
        assert time.monotonic() < deadline, f"no backlog of {BEHIND_ENTRIES} past {c_last}; {cluster.describe()}"
    cluster.kill(a)
    sent_before = cluster[b].read_counters()[RAFT_STORED_ENTRIES_SENT.name]

    cluster.start([c])
    leader, _term = scenario.leader(among=[b, c], term_above=term)
    assert leader == b, f"node {leader} won with the shorter log; {cluster.describe()}"
    scenario.progress(ACKS, [b, c], timeout_s=REFILL_TIMEOUT_S)  # B's term commits: C holds B's log
    # B's memory began above its applied index less two windows (it drops in chunks of one), so
    # at least the rest of the gap was read back; the count is published at a tick's pass.
    least = BEHIND_ENTRIES - 2 * FOLLOWER_WINDOW
    deadline = time.monotonic() + PUBLISHED_TIMEOUT_S
    while (sent := cluster[b].read_counters()[RAFT_STORED_ENTRIES_SENT.name] - sent_before) < least:
        assert time.monotonic() < deadline, (f"node {b} sent {sent} entries from its journal, not {least}: "
                                             f"C ended at {c_last}; {cluster.describe()}")  # fmt: skip
        time.sleep(0.02)
    workload = scenario.workload
    assert workload is not None
    with workload.paused():  # B and C at one index with one rolling hash
        assert cluster.wait_converged([b, c]) > c_last + BEHIND_ENTRIES

    cluster.start([a])  # back as a follower (its uncommitted tail, if any, cut), for the end's checks
    scenario.finish()

