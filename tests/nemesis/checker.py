"""Moved to `sequencer.history.checker` (so `seqd demo --cluster` can check a run too)."""

from sequencer.history.checker import *  # noqa: F403
from sequencer.history.checker import __all__ as __all__
