"""Session rules version 1 (sequencer/rules_versions.py): what every seqd before rules versions did
with SESSION_OPEN and node_start records, kept as it was (sans-I/O).

A log is applied under these rules until every member of its cluster reports code that applies
version 2, so that a replica of an older build and one of this build compute the same state
during a rolling upgrade, and a journal an older seqd wrote replays to the state it computed.
They differ from version 2 (sequencer/dedup.py) in the orderings version 2 was made for: an open
before its incarnation's node_start is not tracked (a copy of it, resent after its session
closed, opens it again), a node_start closes every session of its node that another start
opened (a later start's too), and an earlier start's late node_start or open is taken as new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sequencer.record import SESSION_ID_COUNTER_BITS, session_incarnation, session_node_number

if TYPE_CHECKING:
    from sequencer.dedup import ClientTable

__all__ = ["node_start_rules1", "open_is_new_rules1"]

_COUNTER_MASK = (1 << SESSION_ID_COUNTER_BITS) - 1
_COUNTER_HALF = 1 << (SESSION_ID_COUNTER_BITS - 1)  # serial-number arithmetic's "behind"


def open_is_new_rules1(table: ClientTable, session_id: int) -> bool:
    """Whether a SESSION_OPEN of `session_id`, not open now, opens it (False: a second copy: its
    started incarnation opened it, or a later one, before); tracks its incarnation's highest."""
    started = table.node_starts.get(session_node_number(session_id))
    if started is not None:
        incarnation = session_incarnation(session_id)
        highest = started.get(incarnation)
        if highest is not None:
            counter = session_id & _COUNTER_MASK
            if highest >= 0 and (highest - counter) & _COUNTER_MASK < _COUNTER_HALF:
                return False  # at or behind the highest opened: a second copy
            started[incarnation] = counter
    return True


def node_start_rules1(table: ClientTable, node_number: int, incarnation: int, remembered: int) -> list[int] | None:
    """An ADMIN node_start of node `node_number`'s incarnation `incarnation`: the ids of the
    sessions it closes (every session of that node that another start opened, in opening order),
    or None when that incarnation started already (a second copy: the sessions it has opened
    since stay open). `remembered`: the starts kept per node (NODE_STARTS_REMEMBERED)."""
    started = table.node_starts.setdefault(node_number, {})
    if incarnation in started:
        return None
    closing: list[int] = []
    highest = -1  # the counter of the last session this incarnation opened before its start
    for sid in table.sessions:
        if session_node_number(sid) == node_number:
            if session_incarnation(sid) == incarnation:
                highest = sid & _COUNTER_MASK  # opening order: the last one is the highest
            else:
                closing.append(sid)
    started[incarnation] = highest
    if len(started) > remembered:
        del started[next(iter(started))]
    return closing
