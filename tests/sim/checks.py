"""Invariant checks the simulator runs after every step (Raft paper, Figure 3, and more).

Each check raises `SafetyViolation` with what it saw. The checks are incremental, so they cost
O(entries touched) per step rather than O(log):

- Election Safety: a table term -> leader; a second leader in a term fails.
- Log Matching: every entry any node ever writes is recorded as (index, term) -> (payload, term of
  the entry before it). Two writes of the same (index, term) must agree on both; by induction on
  the index, two logs holding one (index, term) are then identical up to it.
- Leader Completeness: when a node becomes leader of term T, its log must hold every entry
  committed in a term before T. The term an entry was committed in is the term of the leader whose
  commit index first covered it; a late leader of an old term (its votes were delayed) need not
  hold entries committed after its term.
- State Machine Safety: a table index -> (term, payload) of applied entries; a node applying a
  different entry at an index fails, and so does one payload committed at two indices (the
  simulated clients never resend, so that would be a double application).
- commit_index never goes backwards within one incarnation of a node.
- Persist before send: every message is backed by the sender's durable state (see
  `check_persisted_before_send`): the term and vote, and for a follower's acknowledgement the
  entries themselves, while a leader's own entry writes may still be in progress (thesis 10.2.1).
"""

from __future__ import annotations

from collections.abc import Callable

from sequencer.raft import (
    AppendEntries,
    AppendEntriesResponse,
    Entries,
    Message,
    RaftCore,
    RequestVote,
    RequestVoteResponse,
)

__all__ = ["Checker", "NoticeAnswers", "SafetyViolation", "check_nothing_ready", "check_persisted_before_send"]


class SafetyViolation(AssertionError):
    """A Raft safety property or the core's contract does not hold."""


class Checker:
    def __init__(self, *, unique_payloads: bool = True) -> None:
        # With unique payloads (the simulator's clients never resend), a payload committed twice
        # is a double application.
        self.unique_payloads = unique_payloads
        self.leader_of_term: dict[int, int] = {}
        self.written: dict[tuple[int, int], tuple[bytes, int | None]] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        # index -> (term of the leader that committed it, term of the entry)
        self.commit_terms: dict[int, tuple[int, int]] = {}
        self.committed_index_of_payload: dict[bytes, int] = {}
        self.commit_index_max = 0

    def check_leader(self, node_id: int, term: int) -> None:
        leader = self.leader_of_term.setdefault(term, node_id)
        if leader != node_id:
            raise SafetyViolation(
                f"Election Safety: nodes {leader} and {node_id} are both leader in term {term}"
            )

    def record_leader_commit(self, core: RaftCore, before: int, after: int) -> None:
        """A leader's commit index moved from `before` to `after`: those entries were committed
        in its term (unless an earlier leader already had)."""
        commit_terms = self.commit_terms
        for index in range(before + 1, after + 1):
            if index not in commit_terms:
                entry_term = core.log.term_at(index)
                assert entry_term is not None, (core.id, index)
                commit_terms[index] = (core.term, entry_term)

    def check_new_leader_log(self, core: RaftCore) -> None:
        log = core.log
        for index, (commit_term, entry_term) in self.commit_terms.items():
            if commit_term >= core.term or index < log.snapshot_index:
                continue
            held = log.term_at(index)
            if held != entry_term:
                raise SafetyViolation(
                    f"Leader Completeness: node {core.id}, leader of term {core.term}, holds term "
                    f"{held} at index {index} where term {entry_term} was committed in term "
                    f"{commit_term}"
                )

    def check_written(self, node_id: int, previous_term: int | None, entries: Entries) -> None:
        written = self.written
        index = entries.first_index
        for term, payload in zip(entries.terms, entries.payloads, strict=True):
            key = (index, term)
            seen = written.get(key)
            if seen is None:
                written[key] = (payload, previous_term)
            elif seen[0] != payload or (
                seen[1] is not None and previous_term is not None and seen[1] != previous_term
            ):
                raise SafetyViolation(
                    f"Log Matching: node {node_id} wrote index {index} term {term} as "
                    f"{payload!r} after term {previous_term}; earlier: {seen[0]!r} after term "
                    f"{seen[1]}"
                )
            previous_term = term
            index += 1

    def check_applied(self, node_id: int, index: int, term: int, payload: bytes) -> None:
        seen = self.committed.get(index)
        if seen is None:
            self.committed[index] = (term, payload)
            if payload and self.unique_payloads:
                other = self.committed_index_of_payload.setdefault(payload, index)
                if other != index:
                    raise SafetyViolation(
                        f"exactly-once: payload {payload!r} committed at indexes {other} and "
                        f"{index}"
                    )
        elif seen != (term, payload):
            raise SafetyViolation(
                f"State Machine Safety: node {node_id} applies term {term} {payload!r} at index "
                f"{index}; another node applied term {seen[0]} {seen[1]!r}"
            )

    def check_commit(self, node_id: int, before: int, after: int) -> None:
        if after < before:
            raise SafetyViolation(
                f"node {node_id}: commit_index went backwards from {before} to {after}"
            )
        if after > self.commit_index_max:
            self.commit_index_max = after


def check_persisted_before_send(
    message: Message,
    durable_term: int,
    durable_vote: int,
    durable_last_index: int,
    durable_term_at: Callable[[int], int | None] | None = None,
    log_term_at: Callable[[int], int | None] | None = None,
) -> None:
    """A message may promise only what the sender's disk already holds.

    - A message of term T goes out only once T is durable (a pre-vote asks about term + 1 without
      adopting it, so it and a granted pre-vote are exempt).
    - A granted vote is durable as the vote of that term.
    - A successful AppendEntriesResponse acknowledges only entries on disk; given the disk's and
      the log's terms, the disk holds the very entry the log does at the acknowledged index (not
      an older one at that index that a write in progress will replace).
    """
    kind = type(message)
    exempt = (kind is RequestVote and message.pre_vote) or (  # type: ignore[attr-defined]
        kind is RequestVoteResponse and message.pre_vote  # type: ignore[attr-defined]
    )
    if not exempt and message.term > durable_term:
        raise SafetyViolation(
            f"persist before send: node {message.source} sends {kind.__name__} of term "
            f"{message.term} while its durable term is {durable_term}"
        )
    if isinstance(message, RequestVoteResponse) and message.granted and not message.pre_vote:
        if durable_vote != message.target:
            raise SafetyViolation(
                f"persist before send: node {message.source} grants its term {message.term} vote "
                f"to {message.target} while its durable vote is {durable_vote}"
            )
    if isinstance(message, AppendEntriesResponse) and message.success:
        if message.index > durable_last_index:
            raise SafetyViolation(
                f"persist before send: node {message.source} acknowledges index {message.index} "
                f"while its durable log ends at {durable_last_index}"
            )
        if durable_term_at is not None and log_term_at is not None:
            on_disk = durable_term_at(message.index)
            if on_disk is not None and on_disk != log_term_at(message.index):
                raise SafetyViolation(
                    f"persist before send: node {message.source} acknowledges index "
                    f"{message.index} of term {log_term_at(message.index)} while its disk holds "
                    f"term {on_disk} there"
                )


def check_nothing_ready(core: RaftCore) -> None:
    """After `has_ready()` said no, a ready must be empty: the query agrees with `ready()`.

    `has_ready()` only predicts (the leader builds its messages in `ready()`), so a prediction
    that misses work would leave messages unsent until some later event. Taking and advancing an
    empty ready changes nothing in the core.
    """
    assert not core.has_ready(), core.id
    ready = core.ready()
    work = [
        name
        for name, present in (
            ("messages", bool(ready.messages)),
            ("snapshot", ready.snapshot is not None),
            ("entries", ready.entries is not None),
            ("hard_state", ready.hard_state is not None),
            ("committed", ready.committed is not None),
            ("reads", bool(ready.reads)),
        )
        if present
    ]
    core.advance(ready)
    if work:
        raise SafetyViolation(
            f"ready contract: node {core.id} said has_ready() is False, but ready() holds "
            f"{', '.join(work)}"
        )


class NoticeAnswers:
    """A follower answers a commit notice it has not acknowledged (`AppendEntries.notice`).

    A follower may leave a notice unanswered only when an answer it sent in this start and term
    already reported as much; one that holds the notice's previous entry durably (its core told
    so) and has reported less in this start and term must answer at once. Judged from the wire
    and the disk, not from the follower's own bookkeeping: the answers the node sent (a lost one
    counts, as the follower cannot know) and the entries on its disk. This catches a follower
    that never answers notices, which the safety checks and convergence do not (a heartbeat's
    round trip later repairs the leader's view).
    """

    def __init__(self) -> None:
        # node -> (incarnation, term, the highest index its successful answers reported)
        self.reported: dict[int, tuple[int, int, int]] = {}
        self.owed_answered = 0  # notices that found the follower owing an answer, answered

    def sent(self, message: Message, incarnation: int) -> None:
        if isinstance(message, AppendEntriesResponse) and message.success:
            key = (incarnation, message.term)
            held = self.reported.get(message.source)
            index = max(held[2], message.index) if held is not None and held[:2] == key else message.index
            self.reported[message.source] = (*key, index)

    def reported_through(self, node_id: int, incarnation: int, term: int) -> int:
        """The highest index node `node_id` reported in that start and term (0: none)."""
        held = self.reported.get(node_id)
        return held[2] if held is not None and held[:2] == (incarnation, term) else 0

    def delivered(self, message: Message, core: RaftCore, incarnation: int, durable_term: int | None,
                  reported_before: int) -> None:  # fmt: skip
        """After the follower stepped `message` and drained its readies. `durable_term`: the term
        of its durable entry at the notice's previous index as its core knows it (None: none);
        `reported_before`: `reported_through` before the step."""
        if not isinstance(message, AppendEntries) or not message.notice:
            return
        if core.term != message.term or durable_term != message.previous_term:
            return  # another term now, or the entry is not (yet, or known) durable here
        reported = self.reported_through(core.id, incarnation, message.term)
        if reported >= message.previous_index:
            if reported_before < message.previous_index:
                self.owed_answered += 1
            return  # answered now, or it said so already: silence is allowed
        raise SafetyViolation(
            f"commit notices: node {core.id} (start {incarnation}, term {core.term}) holds entry "
            f"{message.previous_index} durably but left node {message.source}'s notice unanswered, "
            f"having reported {reported} in this start and term"
        )
