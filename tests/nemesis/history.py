"""Moved to `sequencer.history.recorder` (so `seqd demo --cluster` can record histories too)."""

from sequencer.history.recorder import *  # noqa: F403
from sequencer.history.recorder import __all__ as __all__
