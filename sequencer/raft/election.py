"""Who may lead: the election timer, the vote tally and the rule a voter applies.

The core sends the messages and changes its standing; this module holds the state and rules that
decide when: how long a node waits before campaigning (randomized, 5.2), whether a voter grants a
vote (one per term, only to a candidate whose log is at least as up-to-date, 5.4.1; pre-votes,
thesis 9.6), and when a campaign is won or lost.
"""

from __future__ import annotations

import enum
import random

from sequencer.raft.config import NO_NODE
from sequencer.raft.messages import RequestVote

__all__ = ["ElectionTimer", "VoteResult", "VoteTally", "vote_granted"]


class ElectionTimer:
    """Ticks since the node last heard from a leader (or voted, or started campaigning).

    A follower or candidate campaigns when `elapsed_ticks` reaches `timeout_ticks`, drawn anew
    from `election_ticks .. 2 x election_ticks - 1` on each `reset` so that split votes resolve
    (5.2). Randomness comes only from the caller's `random.Random`, so a seeded caller replays.
    """

    __slots__ = ("_election_ticks", "_rng", "elapsed_ticks", "timeout_ticks")

    def __init__(self, election_ticks: int, rng: random.Random) -> None:
        self._election_ticks = election_ticks
        self._rng = rng
        self.elapsed_ticks = 0
        self.timeout_ticks = 0
        self.reset()

    def reset(self) -> None:
        """Restart the count with a new random timeout (a change of term or standing)."""
        self.elapsed_ticks = 0
        election_ticks = self._election_ticks
        self.timeout_ticks = election_ticks + self._rng.randrange(election_ticks)

    def expired(self) -> bool:
        return self.elapsed_ticks >= self.timeout_ticks


class VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


class VoteTally:
    """The answers to one campaign (a pre-vote or a vote), the candidate's own vote included."""

    __slots__ = ("_granted", "_quorum", "_rejected")

    def __init__(self, own_id: int, quorum: int) -> None:
        self._quorum = quorum
        self._granted = {own_id}
        self._rejected: set[int] = set()

    def result(self) -> VoteResult:
        if len(self._granted) >= self._quorum:
            return VoteResult.WON
        if len(self._rejected) >= self._quorum:
            return VoteResult.LOST
        return VoteResult.PENDING

    def record(self, voter: int, granted: bool) -> VoteResult:
        """Count `voter`'s answer (a duplicate counts once); returns the campaign's result."""
        if granted:
            self._granted.add(voter)
            if len(self._granted) >= self._quorum:
                return VoteResult.WON
        else:
            self._rejected.add(voter)
            if len(self._rejected) >= self._quorum:
                return VoteResult.LOST
        return VoteResult.PENDING


def vote_granted(
    request: RequestVote, vote: int, leader_id: int, term: int, last_index: int, last_term: int
) -> bool:
    """Whether a voter in `term` that voted for `vote` and follows `leader_id`, with a log ending
    at (`last_index`, `last_term`), grants `request`.

    Pre-votes are asked for term + 1 and bind nothing, so a voter grants one to any candidate with
    an up-to-date log and a higher term; real votes arrive with `request.term == term`.
    """
    can_vote = (
        vote == request.source
        or (vote == NO_NODE and leader_id == NO_NODE)
        or (request.pre_vote and request.term > term)
    )
    # 5.4.1: "the voter denies its vote if its own log is more up-to-date than that of the
    # candidate."
    up_to_date = request.last_term > last_term or (
        request.last_term == last_term and request.last_index >= last_index
    )
    return can_vote and up_to_date
