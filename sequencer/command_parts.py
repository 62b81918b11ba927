"""Migrated requests: the rules of a COMMAND_PART record, which `sequencer.processor` applies.

A copy-and-transform of the journal (`sequencer.migrate`) can turn one client request into zero
or several commands. They are written back to back as COMMAND_PART records,
all with the request's session and request id. The first (request id above the client's last)
starts the request like a COMMAND; each later one (request id equal to the client's last) is
applied too and its reply replaces the saved one, unless a part before it was rejected: then it
is skipped (counted in `command_parts_skipped`), so a request stops at its first rejection, as
the original command was refused whole. A part without command bytes applies nothing; as the
first part it records the request id as applied with no saved reply, so a resend of a request
that became no command gets DUPLICATE. No live node sequences this type.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from sequencer.egress import ReplyStatus

if TYPE_CHECKING:
    from sequencer.dedup import ClientEntry

__all__ = ["PartVerdict", "command_part_verdict"]

_OK = int(ReplyStatus.OK)


class PartVerdict(enum.Enum):
    APPLY = "apply"  # the COMMAND path applies it, records the request id and saves the reply
    RECORDED = "recorded"  # nothing to apply: no command bytes
    SKIPPED = "skipped"  # after a rejected part of its request (`command_parts_skipped`)


def command_part_verdict(client: ClientEntry, request_id: int, has_command: bool) -> PartVerdict:
    """What to do with a COMMAND_PART of `client`'s request `request_id`; updates the client's
    last request id where the rules say so."""
    last_request_id = client.last_request_id
    if request_id > last_request_id:  # the request's first part
        if has_command:
            return PartVerdict.APPLY
        client.last_request_id = request_id  # no command: only the request id is recorded
        return PartVerdict.RECORDED
    saved = client.replies.get(request_id)
    if request_id < last_request_id or (saved is not None and saved[1] != _OK):
        return PartVerdict.SKIPPED
    if not has_command:
        return PartVerdict.RECORDED
    # A later part: let the COMMAND path's dedup test pass for this one record.
    client.last_request_id = request_id - 1
    return PartVerdict.APPLY
