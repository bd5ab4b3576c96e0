"""Small line charts as inline SVG, for the dashboard page: no JavaScript library, no network.

:func:`line_chart` draws series of ``(t, value)`` points against time (the last point at the
right edge, labelled in seconds before now); a missing value (None) breaks the line.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass(frozen=True)
class Line:
    """One series of a chart."""

    label: str
    t: Sequence[float]
    values: Sequence[float | None]
    color: str = PALETTE[0]
    width: float = 1.5


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``x`` (1 for nothing to show)."""
    if not x > 0 or math.isinf(x):
        return 1.0
    base = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * base >= x * (1 - 1e-9):
            return m * base
    return 10 * base


def format_value(v: float) -> str:
    """A short axis label: 12k, 1.5M, 0.25, 3."""
    a = abs(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _segments(xs: list[float], ys: list[float | None]) -> list[list[tuple[float, float]]]:
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        if y is None or (isinstance(y, float) and math.isnan(y)):
            if out[-1]:
                out.append([])
            continue
        out[-1].append((x, y))
    return [s for s in out if s]


def line_chart(
    title: str,
    lines: Sequence[Line],
    *,
    unit: str = "",
    width: int = 440,
    height: int = 190,
    now: float | None = None,
    span: float | None = None,
) -> str:
    """An SVG line chart of ``lines`` against time.

    Parameters
    ----------
    title : str
        Shown above the plot.
    lines : sequence of Line
        The series; a legend names each.
    unit : str
        Appended to the largest y label.
    now : float, optional
        The time at the right edge (default: the latest point).
    span : float, optional
        Seconds shown (default: from the earliest point).
    """
    left, right, top, bottom = 46, 10, 24, 34
    pw, ph = width - left - right, height - top - bottom
    times = [t for line in lines for t in line.t]
    values = [v for line in lines for v in line.values if v is not None and not math.isnan(v)]
    end = now if now is not None else (max(times) if times else 0.0)
    span = span if span is not None else (end - min(times) if times else 60.0)
    span = max(span, 1.0)
    ymax = nice_ceiling(max(values) if values else 0.0)

    def x_of(t: float) -> float:
        return left + pw * (1 - (end - t) / span)

    def y_of(v: float) -> float:
        return top + ph * (1 - min(v / ymax, 1.0))

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="15" class="title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>',
    ]
    for i in range(5):
        v = ymax * i / 4
        y = y_of(v)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        label = format_value(v) + (f" {unit}" if unit and i == 4 else "")
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" class="ylabel">{html.escape(label)}</text>')
    for i in range(5):
        ago = span * (4 - i) / 4
        x = left + pw * i / 4
        parts.append(
            f'<text x="{x:.1f}" y="{top + ph + 14}" class="xlabel">{"now" if ago == 0 else f"-{ago:.0f}s"}</text>'
        )
    for line in lines:
        for seg in _segments([x_of(t) for t in line.t], list(line.values)):
            if len(seg) == 1:
                x, v = seg[0]
                parts.append(f'<circle cx="{x:.1f}" cy="{y_of(v):.1f}" r="2" fill="{line.color}"/>')
                continue
            pts = " ".join(f"{x:.1f},{y_of(v):.1f}" for x, v in seg)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{line.color}" stroke-width="{line.width}"/>')
    lx = left
    for line in lines:
        label = html.escape(line.label)
        parts.append(
            f'<rect x="{lx}" y="{height - 10}" width="10" height="3" fill="{line.color}"/>'
            f'<text x="{lx + 13}" y="{height - 6}" class="legend">{label}</text>'
        )
        lx += 22 + 6 * len(line.label)
    parts.append("</svg>")
    return "".join(parts)
