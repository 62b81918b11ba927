"""Elections, from both sides: a node campaigning for a term (thesis 9.6's pre-vote first), and
a voter answering a (pre-)candidate (Raft paper 5.2 and 5.4.1).

`Elections` is a part of `RaftCore`, kept apart so each module has one job: the core inherits
these methods unchanged. The voting rule itself is the pure `election.vote_granted`; the tally is
`election.VoteTally`. Becoming leader (a new `Leader`, the term's first entry) and stepping down
stay in the core, which owns the node's standing.
"""

from __future__ import annotations

from collections.abc import Callable

from sequencer.raft.config import NO_NODE, RaftConfig
from sequencer.raft.election import ElectionTimer, VoteResult, VoteTally, vote_granted
from sequencer.raft.follower import Follower
from sequencer.raft.log import RaftLog
from sequencer.raft.messages import Message, RequestVote, RequestVoteResponse
from sequencer.raft.raft_role import CANDIDATE, PRE_CANDIDATE, RaftRole

__all__ = ["Elections"]


class Elections:
    """The campaign and vote handling of `RaftCore` (which sets every attribute named here)."""

    config: RaftConfig
    id: int
    cluster_id: int
    peers: tuple[int, ...]
    quorum: int
    log: RaftLog
    term: int
    vote: int
    leader_id: int
    raft_role: RaftRole
    _votes: VoteTally
    _election_timer: ElectionTimer
    _follower: Follower
    _send: Callable[[Message], None]
    _become_leader: Callable[[], None]
    _become_follower: Callable[[int, int], None]

    def _campaign(self, *, pre_vote: bool, transfer: bool = False) -> None:
        self._election_timer.reset()
        self.leader_id = NO_NODE
        if pre_vote:
            # Thesis 9.6: ask first whether an election could be won, without raising the term.
            self.raft_role = PRE_CANDIDATE
            term = self.term + 1
        else:
            self.raft_role = CANDIDATE
            self._new_term(self.term + 1)
            self.vote = self.id
            term = self.term
        self._votes = VoteTally(self.id, self.quorum)
        if self._votes.result() is VoteResult.WON:
            self._won_votes(pre_vote)
            return
        last_index, last_term = self.log.last_index, self.log.last_term
        for peer in self.peers:
            self._send(RequestVote(self.cluster_id, self.id, peer, term, last_index, last_term,
                                   pre_vote, transfer))

    def _new_term(self, term: int) -> None:
        """Enter `term`: acknowledgements owed to the last term's leader are void."""
        self.term = term
        self._follower.new_term()

    def _won_votes(self, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False)
        else:
            self._become_leader()

    def _handle_vote_request(self, message: RequestVote) -> None:
        log = self.log
        if vote_granted(message, self.vote, self.leader_id, self.term, log.last_index,
                        log.last_term):
            self._send(RequestVoteResponse(self.cluster_id, self.id, message.source,
                                           message.term, True, message.pre_vote))
            if not message.pre_vote:
                self.vote = message.source
                self._election_timer.elapsed_ticks = 0
        else:
            self._send(RequestVoteResponse(self.cluster_id, self.id, message.source,
                                           self.term, False, message.pre_vote))

    def _handle_vote_response(self, message: RequestVoteResponse) -> None:
        if message.pre_vote:
            if self.raft_role is not PRE_CANDIDATE:
                return
            if message.granted and message.term != self.term + 1:
                return
        elif self.raft_role is not CANDIDATE or message.term != self.term:
            return
        result = self._votes.record(message.source, message.granted)
        if result is VoteResult.WON:
            self._won_votes(message.pre_vote)
        elif result is VoteResult.LOST:
            self._become_follower(self.term, NO_NODE)
