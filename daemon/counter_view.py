"""Attaching a node's counters segment: `create_counters`, `attach_counters` and `CounterView`,
which binds the table of daemon/layout.py to one owner (one writer per counter)."""

from __future__ import annotations

from daemon.layout import (
    COUNTER_NAMES,
    COUNTERS,
    COUNTERS_LAYOUT_VERSION,
    CounterSpec,
    Owner,
    counters_name,
)
from ipc.counters import Counter, Counters
from ipc.segment import SegmentError


def create_counters(node: str, epoch: int | None = None) -> Counters:
    """Create node `node`'s counters segment, every counter of `COUNTERS` at zero (the
    supervisor, once per incarnation). Raises as `Counters.create`."""
    return Counters.create(
        counters_name(node), COUNTER_NAMES, epoch=epoch, layout_version=COUNTERS_LAYOUT_VERSION
    )


def attach_counters(node: str, epoch: int | None = None, stale_ok: bool = False) -> Counters:
    """Attach node `node`'s counters segment, refusing one of another layout version.

    Raises:
        SegmentVersionError: the segment was made by a release with another counter table.
        SegmentError: as `Counters.attach`.
    """
    return Counters.attach(
        counters_name(node), epoch=epoch, stale_ok=stale_ok, layout_version=COUNTERS_LAYOUT_VERSION
    )


class CounterView:
    """The node's counters as one process may use them.

    `view[SPEC]` is a plain `Counter` when the view's owner owns SPEC and a read-only one
    otherwise (its `set` and `add` raise `CounterWriteError` naming the owner). Every handle is
    made here, once; a process takes the handles it needs at start and keeps them.

    Args:
        counters: the attached segment (`attach_counters` or `create_counters`).
        owner: the process this view is for; None for a reader that owns nothing (status, tools).
        clustered: the node runs in cluster mode (a few counters have another writer there:
            `CounterSpec.cluster_owner`).

    Raises:
        SegmentError: the segment's names are not this release's table (a layout changed without
            a new `COUNTERS_LAYOUT_VERSION`).
    """

    def __init__(self, counters: Counters, owner: Owner | None, clustered: bool = False) -> None:
        if counters.names != COUNTER_NAMES:
            raise SegmentError(
                f"{counters.name} names other counters than this seqd's table (layout version "
                f"{COUNTERS_LAYOUT_VERSION}): the table changed without a new layout version"
            )
        self.counters = counters
        self.owner = owner
        writer = "a reader" if owner is None else f"the {owner}"
        self._handles: tuple[Counter, ...] = tuple(
            counters[spec.name]
            if spec.writer(clustered) == owner
            else counters[spec.name].read_only(
                f"{writer} may not write {spec.name}: its one writer is the {spec.writer(clustered)} "
                "(daemon/layout.py). A counter with two writers loses updates; read it here, "
                "or move the write to its owner"
            )
            for spec in COUNTERS
        )

    def __getitem__(self, spec: CounterSpec) -> Counter:
        return self._handles[spec.id]

    def snapshot(self) -> dict[str, int]:
        return self.counters.snapshot()

    def close(self) -> None:
        self.counters.close()
