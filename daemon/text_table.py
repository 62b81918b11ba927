"""Plain-text tables for the terminal (`seqd status`): cells and aligned columns."""

from __future__ import annotations

__all__ = ["cell", "si", "table"]


def cell(value: object) -> str:
    """A value as a table cell: '-' for unknown (never 0), yes/NO, floats in SI units."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return si(value)
    return str(value)


def si(value: float) -> str:
    """1234567.0 -> '1.23M': rates fit a column."""
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.1f}"


def table(rows: list[list[str]]) -> list[str]:
    """The rows with their columns aligned (two spaces apart, no trailing blanks)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
