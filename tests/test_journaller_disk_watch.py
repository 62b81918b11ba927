"""`journaller.DiskWatch`: the disk state a journaller publishes after each append, SHORT while
the journal cannot reserve room ahead and ROOM again as soon as it can (its fast path: an append
that finds room while the state is ROOM publishes nothing)."""

from __future__ import annotations

from daemon.layout import DiskState
from daemon.roles.journaller import DiskWatch
from ipc.counters import Counter


class _Journal:
    def __init__(self) -> None:
        self.shortage: str | None = None

    def reserve_space(self) -> str | None:
        return self.shortage

    def free_bytes(self) -> int:
        return 1234


def test_disk_state_goes_short_and_back_to_room_as_reservations_fail_and_succeed():
    view = memoryview(bytearray(16)).cast("q")
    state, free = Counter("journal.disk_full", view, 0), Counter("journal.free_bytes", view, 1)
    journal = _Journal()
    watch = DiskWatch(journal, state, free)  # type: ignore[arg-type]
    watch.check(1.0)
    assert (watch.state, state.get()) == (DiskState.ROOM, 0)
    journal.shortage = "no room for the next segment"
    watch.check(2.0)
    assert (watch.state, state.get(), free.get()) == (DiskState.SHORT, int(DiskState.SHORT), 1234)
    assert watch.due(2.0 + 1.0) and not watch.due(2.0)
    journal.shortage = None
    watch.check(3.0)  # room again: published at once
    assert (watch.state, state.get()) == (DiskState.ROOM, int(DiskState.ROOM))
    assert not watch.due(10.0)
