"""The replicator's hard state saves, off its event loop: one worker thread owns every write of
the hard state file (`sequencer/hard_state.py`).

Theory of operation
-------------------
A save is two fsyncs (the temp file, then the directory). A change of term or vote must be
durable before any message of its ready leaves (persist before send), so `save` still blocks the
loop until it is. A commit index alone is a hint (it only spares a restart some replay): it is
noted (`note`) and handed to the worker at most every HARD_STATE_COMMIT_SAVE_S (`look`, at a
tick's pass), and the loop does not wait for it; before, its two fsyncs held the loop (no append
sent, no answer read) about once a second on every node.

    loop thread                         worker thread (the only caller of HardStateFile.save)
    note(state)      -> unsaved         takes `slot`, saves it, marks its number saved
    look(now)        -> slot (hint)     a failure: kept in `failure`, the worker exits
    save(state)      -> slot, waits     (fsyncgate: never retried)
    stop()           -> slot, waits

One slot, numbered: a submission replaces a state still waiting in it (the newer state carries
the older's commit index or a higher one, and the same or a newer term), so at most one save
runs and one waits; nothing queues without bound. The worker saves in submission order, so an
older hint's rename never lands after a newer term's, and the file's commit index never
decreases. `save` waits until the worker has saved its number: everything submitted before it is
then on disk too (saved before it, or replaced by it).

A failed save is never retried (the state on disk is unknown: `HardStateFile` refuses every
later call); it is raised on the loop at its next look (`look`, `save` or `stop`), which stops
the role as a failed save on the loop did.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from sequencer.hard_state import HardStateFile
from sequencer.raft.config import NO_NODE
from sequencer.raft.messages import HardState

__all__ = ["HARD_STATE_COMMIT_SAVE_S", "HARD_STATE_STOP_WAIT_S", "HARD_STATE_THREAD_NAME", "HardStateSaver"]

log = logging.getLogger("seqd.replicator")

# A commit index alone is a hint (Raft keeps it only to save a restart some replay), so it is
# saved at most this often; a change of term or vote is saved (fsync) before any message leaves.
HARD_STATE_COMMIT_SAVE_S = 1.0
# How long `stop` waits for a save in progress (a disk that hangs in fsync): past it the role
# exits without it, which is safe (the rename is atomic: the old state or the new one).
HARD_STATE_STOP_WAIT_S = 10.0
# The worker's name, in Python and in the kernel (`/proc/<pid>/task/<tid>/comm`, 15 bytes at
# most): a test tells it from a thread that would hand the loop's wakes over (issue 13).
HARD_STATE_THREAD_NAME = "seqd-hard-state"


class HardStateSaver:
    """The hard state file's one writer, a thread; every method is called from the loop's thread.

    Invariant: states are submitted in order (term never decreases, one vote per term, commit
    index never decreases: asserted here, on the caller's thread, as `HardStateFile` asserts on
    the worker's); `saved_number <= submitted_number`.
    """

    def __init__(self, file: HardStateFile) -> None:
        self.file = file
        self.unsaved: HardState | None = None  # the newest state the core handed, not submitted
        self.saved_s = time.monotonic()  # when a state was last submitted
        self.submitted = file.hard_state  # the last state submitted (or on disk at the start)
        self.submitted_number = 0
        self.saved_number = 0  # the newest submission the worker made durable
        self.slot: tuple[int, HardState] | None = None  # the submission waiting for the worker
        self.failure: BaseException | None = None  # the worker's save that failed (it exited)
        self.stopping = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=HARD_STATE_THREAD_NAME, daemon=True)
        self.thread.start()

    def note(self, state: HardState) -> None:
        """A hard state whose term and vote are saved already (only the commit index moved)."""
        self.unsaved = state

    def look(self, now_s: float) -> None:
        """At a tick's pass: raise a failed background save; hand the noted state to the worker,
        without waiting, once HARD_STATE_COMMIT_SAVE_S passed since the last submission.

        Raises:
            HardStateError: a background save failed (not retried): the role stops.
        """
        if self.failure is not None:
            raise self.failure
        unsaved = self.unsaved
        if unsaved is not None and now_s - self.saved_s >= HARD_STATE_COMMIT_SAVE_S:
            self._submit(unsaved)
            self.saved_s = now_s

    def save(self, state: HardState) -> None:
        """Make `state` (a new term or vote) durable before returning, after every state
        submitted before it.

        Raises:
            HardStateError: this save or an earlier one failed (not retried): the role stops.
        """
        number = self._submit(state)
        self.saved_s = time.monotonic()
        with self.changed:
            while self.saved_number < number and self.failure is None:
                self.changed.wait()
        if self.saved_number < number:
            assert self.failure is not None
            raise self.failure

    def stop(self) -> None:
        """Submit the noted state, wait for the worker to save it (at most
        HARD_STATE_STOP_WAIT_S) and end the worker. Idempotent.

        Raises:
            HardStateError: a save failed (not retried).
        """
        if self.failure is None and self.unsaved is not None and not self.stopping:
            self._submit(self.unsaved)
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.thread.join(HARD_STATE_STOP_WAIT_S)
        if self.thread.is_alive():
            log.warning("the hard state save of %s still runs after %.0f s (the disk hangs in fsync?): "
                        "the loop stops waiting for it (the process ends once the kernel returns from the fsync; "
                        "the supervisor kills it after its stop timeout); the file holds the previous state "
                        "or this one (the rename is atomic)", self.file.path, HARD_STATE_STOP_WAIT_S)  # fmt: skip
        elif self.failure is not None:
            raise self.failure

    def _submit(self, state: HardState) -> int:
        """Put `state` in the slot (replacing a waiting one, which it supersedes): its number."""
        if self.failure is not None:
            raise self.failure
        assert not self.stopping, state
        old = self.submitted
        assert state.term >= old.term, (old, state)
        assert state.commit_index >= old.commit_index, (old, state)
        if state.term == old.term:
            assert old.vote in (NO_NODE, state.vote), (old, state)  # one vote per term
        self.submitted = state
        self.unsaved = None
        with self.changed:
            self.submitted_number += 1
            self.slot = (self.submitted_number, state)
            self.changed.notify_all()
            return self.submitted_number

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # Linux only: the name is for observers, not needed
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(HARD_STATE_THREAD_NAME)
        changed = self.changed
        while True:
            with changed:
                while self.slot is None and not self.stopping:
                    changed.wait()
                if self.slot is None:
                    return  # stopping, everything saved
                number, state = self.slot
                self.slot = None
            try:
                self.file.save(state)
            except BaseException as error:  # any failure stops the role, on its loop
                with changed:
                    self.failure = error
                    changed.notify_all()
                return
            with changed:
                self.saved_number = number
                changed.notify_all()
