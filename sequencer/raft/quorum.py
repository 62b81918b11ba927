"""Majority arithmetic for a static voter set.

A cluster of `n` voters needs `n // 2 + 1` of them to agree: two majorities always share a voter,
which is what makes a committed entry survive into every later leader's log (Raft paper, 5.4).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["VOTERS_ALLOWED", "quorum_index", "quorum_size"]

# Static membership (DESIGN.md, "Cluster"): 1 for a single node, 3 or 5 for a cluster. An even
# count tolerates no more failures than the odd count below it, and more than 5 slows every commit.
VOTERS_ALLOWED = (1, 3, 5)


def quorum_size(voters: int) -> int:
    """How many of `voters` make a majority."""
    assert voters > 0, voters
    return voters // 2 + 1


def quorum_index(values: Sequence[int], quorum: int) -> int:
    """The largest value that at least `quorum` of `values` have reached.

    With one value per voter (a match index, an acknowledged read sequence) this is the value a
    majority agrees has been reached: the `quorum`-th largest.
    """
    assert 0 < quorum <= len(values), (quorum, len(values))
    return sorted(values, reverse=True)[quorum - 1]
