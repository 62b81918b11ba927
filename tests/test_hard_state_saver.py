"""The replicator's hard state saves off its loop (daemon/roles/hard_state_saver.py): a commit
hint is handed to the worker thread and not waited for; a term or vote save waits for everything
before it; at most one save waits; a failed save is never retried and is raised at the next look.

The worker is held inside a save by the file's step hook (after the temp file's fsync, before its
rename): what a slow disk does. Waits here are bounds on a hang, never timed assertions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.roles.hard_state_saver import HARD_STATE_COMMIT_SAVE_S, HardStateSaver
from sequencer.hard_state import HardStateError, HardStateFile
from sequencer.raft.messages import HardState

pytestmark = pytest.mark.timeout(60)
HANG_S = 5.0  # how long a held save waits for the test before going on: a bound, not a timing

START = HardState(term=1, vote=1, commit_index=0)


class HeldFile:
    """A hard state file whose saves the test holds after the temp file's fsync, noting the
    states that took effect (renamed) in order."""

    def __init__(self, directory: Path) -> None:
        self.file = HardStateFile.open(directory)
        self.file.save(START)
        self.file.step_hook = self._step
        self.held = threading.Event()  # a save waits in the hook
        self.release = threading.Event()
        self.renamed: list[HardState] = []
        self.fail = False
        self.attempts = 0

    def _step(self, step: str) -> None:
        if step == "temp_written":
            self.attempts += 1
            if self.fail:
                raise OSError(5, "Input/output error (planted)")
            self.held.set()
            self.release.wait(HANG_S)
            self.held.clear()
        elif step == "renamed":
            self.renamed.append(HardStateFile.read(self.file.directory))


@pytest.fixture
def held(tmp_dir: Path) -> Iterator[HeldFile]:
    yield HeldFile(tmp_dir)


def hint(saver: HardStateSaver, state: HardState) -> None:
    """The loop at a tick's pass with `state` noted and the save due."""
    saver.note(state)
    saver.look(saver.saved_s + HARD_STATE_COMMIT_SAVE_S)


def test_a_commit_hint_does_not_wait_for_its_save(held: HeldFile) -> None:
    saver = HardStateSaver(held.file)
    hint(saver, HardState(term=1, vote=1, commit_index=5))
    # The save is held in the worker and the loop goes on: were it saved on the caller's thread,
    # `look` would return only once the hook let go (HANG_S), after the rename.
    assert held.held.wait(HANG_S)
    assert held.renamed == []
    held.release.set()
    saver.stop()
    assert held.renamed == [HardState(term=1, vote=1, commit_index=5)]
    assert HardStateFile.read(held.file.directory).commit_index == 5


def test_a_term_save_after_a_hint_lands_after_it(held: HeldFile) -> None:
    saver = HardStateSaver(held.file)
    hint(saver, HardState(term=1, vote=1, commit_index=5))
    assert held.held.wait(HANG_S)  # the hint's save in progress, its temp file fsynced
    releaser = threading.Timer(0.2, held.release.set)
    releaser.start()
    newer = HardState(term=2, vote=3, commit_index=5)
    saver.save(newer)  # waits for the hint's save, then its own
    releaser.join()
    assert held.renamed == [HardState(term=1, vote=1, commit_index=5), newer]
    assert HardStateFile.read(held.file.directory) == newer
    saver.stop()
    assert HardStateFile.read(held.file.directory) == newer


def test_a_hint_while_one_is_saved_and_one_waits_replaces_the_waiting_one(held: HeldFile) -> None:
    saver = HardStateSaver(held.file)
    hints = [HardState(term=1, vote=1, commit_index=commit) for commit in (5, 6, 7)]
    hint(saver, hints[0])
    assert held.held.wait(HANG_S)
    hint(saver, hints[1])  # waits for the worker
    hint(saver, hints[2])  # replaces it: nothing queues behind the save in progress but one
    assert saver.slot == (3, hints[2])
    held.release.set()
    saver.stop()
    assert held.renamed == [hints[0], hints[2]]


def test_a_hint_is_saved_at_most_once_a_period(held: HeldFile) -> None:
    held.release.set()
    saver = HardStateSaver(held.file)
    hint(saver, HardState(term=1, vote=1, commit_index=5))
    saver.note(HardState(term=1, vote=1, commit_index=6))
    saver.look(saver.saved_s + HARD_STATE_COMMIT_SAVE_S / 2)  # not due: stays noted
    assert saver.unsaved == HardState(term=1, vote=1, commit_index=6)
    assert saver.submitted_number == 1
    saver.stop()  # the noted one, saved at the stop
    assert saver.submitted_number == 2
    assert HardStateFile.read(held.file.directory) == HardState(term=1, vote=1, commit_index=6)


def test_a_failed_hint_save_is_raised_at_the_next_look_and_never_retried(held: HeldFile) -> None:
    held.fail = True
    saver = HardStateSaver(held.file)
    hint(saver, HardState(term=1, vote=1, commit_index=5))  # returns: the save fails in the worker
    saver.thread.join(HANG_S)  # a failed worker ends: it retries nothing
    assert not saver.thread.is_alive()
    with pytest.raises(HardStateError, match="Input/output error"):
        hint(saver, HardState(term=1, vote=1, commit_index=6))
    with pytest.raises(HardStateError, match="Input/output error"):
        saver.save(HardState(term=2, vote=2, commit_index=6))  # not even a term: fail-stop
    assert held.attempts == 1
    assert HardStateFile.read(held.file.directory) == START
    with pytest.raises(HardStateError, match="Input/output error"):
        saver.stop()  # a role whose save failed does not report a clean stop


def test_a_state_that_goes_backwards_is_refused_on_the_callers_thread(held: HeldFile) -> None:
    held.release.set()
    saver = HardStateSaver(held.file)
    saver.save(HardState(term=2, vote=2, commit_index=5))
    with pytest.raises(AssertionError):
        saver.note(HardState(term=2, vote=2, commit_index=4))
        saver.look(saver.saved_s + HARD_STATE_COMMIT_SAVE_S)
    with pytest.raises(AssertionError):
        saver.save(HardState(term=2, vote=3, commit_index=5))  # a second vote in term 2
    saver.unsaved = None  # the role stopped at the assertion: nothing more to save
    saver.stop()
    assert HardStateFile.read(held.file.directory) == HardState(term=2, vote=2, commit_index=5)
