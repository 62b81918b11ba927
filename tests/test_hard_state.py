"""The Raft hard state file: durable and atomic before `save` returns, checked when read, never
going backwards (sequencer/hard_state.py).

"Persistent state on all servers (Updated on stable storage before responding to RPCs):
currentTerm, votedFor" (Raft paper, Figure 2). A crash at any step of a save leaves the old state
or the new one; a child process `os._exit`s after each step to show it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sequencer.hard_state import (
    HARD_STATE_NAME,
    HARD_STATE_STEPS,
    HARD_STATE_TEMP_NAME,
    HardStateError,
    HardStateFile,
    encode_hard_state,
)
from sequencer.raft.messages import HardState

ROOT = Path(__file__).resolve().parent.parent
CRASH_EXIT = 77
CHILD_TIMEOUT_S = 60.0

OLD = HardState(term=3, vote=2, commit_index=40)
NEW = HardState(term=4, vote=1, commit_index=41)

CHILD = f"""
import os, sys
from sequencer.hard_state import HardStateFile
from sequencer.raft.messages import HardState

state = HardStateFile.open(sys.argv[1])
def hook(step):
    if step == sys.argv[2]:
        os._exit({CRASH_EXIT})
state.step_hook = hook
state.save(HardState(term={NEW.term}, vote={NEW.vote}, commit_index={NEW.commit_index}))
sys.exit(3)
"""


def test_a_new_node_starts_at_term_zero_with_no_vote(tmp_dir):
    state = HardStateFile.open(tmp_dir / "data")
    assert state.hard_state == HardState(term=0, vote=0, commit_index=0)
    assert not (tmp_dir / "data" / HARD_STATE_NAME).exists()


def test_a_saved_state_is_read_back_after_reopen(tmp_dir):
    state = HardStateFile.open(tmp_dir)
    state.save(OLD)
    state.save(NEW)
    assert HardStateFile.open(tmp_dir).hard_state == NEW
    assert not (tmp_dir / HARD_STATE_TEMP_NAME).exists()


@pytest.mark.parametrize("step", HARD_STATE_STEPS)
def test_a_crash_at_any_step_of_a_save_leaves_the_old_state_or_the_new_one(tmp_dir, step):
    HardStateFile.open(tmp_dir).save(OLD)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_dir), step],
        cwd=ROOT, timeout=CHILD_TIMEOUT_S, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == CRASH_EXIT, result.stderr
    state = HardStateFile.open(tmp_dir)
    # Before the rename the old file stands; from the rename on, the new one.
    assert state.hard_state == (OLD if step == "temp_written" else NEW)
    assert not (tmp_dir / HARD_STATE_TEMP_NAME).exists()
    state.save(HardState(term=5, vote=0, commit_index=41))  # and the node carries on


def test_a_crash_before_the_first_rename_is_a_new_node(tmp_dir):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_dir), "temp_written"],
        cwd=ROOT, timeout=CHILD_TIMEOUT_S, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == CRASH_EXIT, result.stderr
    assert (tmp_dir / HARD_STATE_TEMP_NAME).exists()
    assert HardStateFile.open(tmp_dir).hard_state == HardState(term=0, vote=0, commit_index=0)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda data: data[:-1], "39 bytes, expected 40"),
        (lambda data: b"NOTRAFT!" + data[8:], "not a seqd hard state file"),
        (lambda data: data[:24] + bytes([data[24] ^ 1]) + data[25:], "CRC-32C mismatch"),
        (lambda data: data[:8] + b"\x02" + data[9:], "layout version 2"),
    ],
    ids=["short", "magic", "flipped-bit", "version"],
)
def test_a_damaged_file_refuses_to_start_naming_it(tmp_dir, damage, match):
    HardStateFile.open(tmp_dir).save(OLD)
    path = tmp_dir / HARD_STATE_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(HardStateError, match=match) as caught:
        HardStateFile.open(tmp_dir)
    assert str(path) in str(caught.value)


def test_the_file_is_forty_bytes_with_magic_version_and_crc(tmp_dir):
    HardStateFile.open(tmp_dir).save(OLD)
    data = (tmp_dir / HARD_STATE_NAME).read_bytes()
    assert data == encode_hard_state(OLD)
    assert data[:8] == b"SQDRAFTS" and len(data) == 40


@pytest.mark.parametrize(
    "backwards",
    [
        HardState(term=2, vote=0, commit_index=40),  # term decreases
        HardState(term=3, vote=1, commit_index=40),  # a second vote in one term
        HardState(term=3, vote=0, commit_index=40),  # a vote forgotten within its term
        HardState(term=3, vote=2, commit_index=39),  # commit index decreases
    ],
    ids=["term", "second-vote", "vote-forgotten", "commit"],
)
def test_the_hard_state_never_goes_backwards(tmp_dir, backwards):
    state = HardStateFile.open(tmp_dir)
    state.save(OLD)
    with pytest.raises(AssertionError):
        state.save(backwards)
    assert HardStateFile.open(tmp_dir).hard_state == OLD


def test_a_vote_may_be_cast_once_in_a_term_already_entered(tmp_dir):
    state = HardStateFile.open(tmp_dir)
    state.save(HardState(term=7, vote=0, commit_index=0))  # heard of term 7, no vote yet
    state.save(HardState(term=7, vote=3, commit_index=0))
    assert HardStateFile.open(tmp_dir).hard_state.vote == 3


def test_a_failed_write_stops_the_file_for_good(tmp_dir):
    state = HardStateFile.open(tmp_dir)
    state.save(OLD)
    (tmp_dir / HARD_STATE_TEMP_NAME).mkdir()  # the temp file cannot be opened for writing
    with pytest.raises(HardStateError, match="restart"):
        state.save(NEW)
    (tmp_dir / HARD_STATE_TEMP_NAME).rmdir()
    with pytest.raises(HardStateError, match="earlier failure"):
        state.save(NEW)
    assert HardStateFile.open(tmp_dir).hard_state == OLD


def test_reading_the_state_of_a_running_node_leaves_its_save_in_progress_alone(tmp_dir):
    state = HardStateFile.open(tmp_dir)
    state.save(OLD)
    seen: list[HardState] = []

    def observe(step: str) -> None:  # an observer reads between the temp file and the rename
        if step == "temp_written":
            seen.append(HardStateFile.read(tmp_dir))

    state.step_hook = observe
    state.save(NEW)  # raised HardStateError when the read removed the temp file
    assert seen == [OLD]
    assert HardStateFile.read(tmp_dir) == NEW
    assert HardStateFile.read(tmp_dir / "none") == HardState(term=0, vote=0, commit_index=0)
