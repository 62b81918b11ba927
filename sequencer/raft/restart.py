"""A node's state at restart, from what its caller persisted (`DurableState`).

The log is loaded after the snapshot, or, with a `LogStorage`, only its tail (a bounded restart:
the committed entries before `DurableState.first_index` stay in storage and are read back when
needed). A crash between writing a ready's entries and its hard state (a caller that writes the
entries first) can leave entries of a term the hard state has not reached: the node adopts that
term with no vote, which is what it had done in memory; it had sent nothing from that ready, so
it promised nothing. The persisted commit index never passes the durable log (the core's `ready`
keeps it so). A caller whose state machine holds more than the snapshot (`DurableState.applied_index`)
is handed the committed entries only after it: a restart that loads the tail after what was
applied reads nothing back.
"""

from __future__ import annotations

from sequencer.raft.config import NO_NODE
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import DurableState, Snapshot

__all__ = ["restore"]


def restore(log: RaftLog, durable: DurableState) -> tuple[int, int, int, int, Snapshot | None]:
    """Load `durable` into the empty `log`; returns the term, vote, commit index, applied index
    and snapshot.

    Raises:
        ValueError: `durable.first_index` leaves entries in storage that the log cannot read
            back (no LogStorage) or that are not committed, or `durable.applied_index` is past
            the commit index.
    """
    snapshot = durable.snapshot
    if snapshot is not None:
        log.restore(snapshot.index, snapshot.term)
    hard = durable.hard_state
    first_index = durable.first_index or log.snapshot_index + 1
    if first_index != log.snapshot_index + 1:
        # A bounded restart: the committed entries before `first_index` stay in storage.
        if log.storage is None or not log.snapshot_index < first_index - 1 <= hard.commit_index:
            raise ValueError(
                f"DurableState.first_index={first_index} leaves entries in storage, which "
                f"needs a LogStorage and committed entries only: snapshot index "
                f"{log.snapshot_index}, commit index {hard.commit_index}, storage "
                f"{log.storage!r}; load the log from snapshot_index + 1 instead"
            )
        term = log.storage.term(first_index - 1)
        assert term is not None, ("storage lacks a committed entry", first_index - 1)
        log.start_after(first_index - 1, term)
    log.append(list(durable.terms), list(durable.payloads))
    if log.last_term > hard.term:
        term, vote = log.last_term, NO_NODE
    else:
        term, vote = hard.term, hard.vote
    commit_index = max(hard.commit_index, log.snapshot_index)
    assert commit_index <= log.last_index, (commit_index, log.last_index)
    # Invariant: log.snapshot_index <= applied index <= commit index.
    applied_index = max(durable.applied_index, log.snapshot_index)
    if applied_index > commit_index:
        raise ValueError(
            f"DurableState.applied_index={durable.applied_index} is past the commit index "
            f"{commit_index}: only committed entries are applied"
        )
    return term, vote, commit_index, applied_index, snapshot
