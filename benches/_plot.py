"""A minimal SVG line chart, so the benchmarks can draw plots without a plotting library."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["line_chart"]

WIDTH, HEIGHT, MARGIN = 640, 400, 60
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def line_chart(
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    series: dict[str, list[tuple[float, float]]],
    log_x: bool = False,
    log_y: bool = False,
) -> Path:
    points = [point for values in series.values() for point in values]
    if not points:
        raise ValueError("nothing to plot")

    def tx(value: float) -> float:
        return math.log10(value) if log_x else value

    def ty(value: float) -> float:
        return math.log10(value) if log_y else value

    xs = [tx(x) for x, _ in points]
    ys = [ty(y) for _, y in points]
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = min(0.0 if not log_y else min(ys), min(ys)), max(ys)
    x_span = (x_max - x_min) or 1.0
    y_span = (y_max - y_min) or 1.0

    def sx(value: float) -> float:
        return MARGIN + (tx(value) - x_min) / x_span * (WIDTH - 2 * MARGIN)

    def sy(value: float) -> float:
        return HEIGHT - MARGIN - (ty(value) - y_min) / y_span * (HEIGHT - 2 * MARGIN)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">{x_label}</text>',
        f'<text x="15" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 15 {HEIGHT / 2})">{y_label}</text>',
    ]
    for tick in range(5):
        fraction = tick / 4
        y_value = y_min + fraction * y_span
        label = 10**y_value if log_y else y_value
        y_pos = HEIGHT - MARGIN - fraction * (HEIGHT - 2 * MARGIN)
        parts.append(f'<text x="{MARGIN - 5}" y="{y_pos + 4}" text-anchor="end">{label:,.0f}</text>')
        x_value = x_min + fraction * x_span
        x_label_value = 10**x_value if log_x else x_value
        x_pos = MARGIN + fraction * (WIDTH - 2 * MARGIN)
        parts.append(f'<text x="{x_pos}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{x_label_value:,.3g}</text>')
    for number, (name, values) in enumerate(series.items()):
        colour = COLOURS[number % len(COLOURS)]
        coordinates = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coordinates}"/>')
        for x, y in values:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{WIDTH - MARGIN - 150}" y="{MARGIN + 15 * number}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
