"""The errors of a copy-and-transform of the journal (`sequencer.migrate`)."""

from __future__ import annotations

__all__ = ["MigrationError", "TransformError", "TransformLoadError"]


class MigrationError(Exception):
    """The old journal cannot be migrated as it is; the message says why and what to do."""


class TransformError(MigrationError):
    """The transform raised, or returned something that is not commands of the target app.

    Attributes:
        index: the old index of the record being transformed (0: in `finish`).
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class TransformLoadError(Exception):
    """The transform named on the command line cannot be loaded."""
