"""The report's charts as SVG, drawn with matplotlib.

matplotlib is imported inside the functions, so importing the report stays cheap. The same data
gives the same bytes: a fixed figure size, no date in the metadata, element ids hashed from a fixed
salt (the chart's title, so that charts inlined in one HTML page do not share ids), the DejaVu Sans
bundled with matplotlib for text layout, and no pyplot (no backend or global figure state).
Text is kept as SVG ``<text>`` rather than glyph outlines, so labels stay searchable and a viewer's
own fonts draw what DejaVu Sans lacks (Chinese dataset names).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
DPI = 96  # sizes are given in CSS pixels


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def _rc(title: str) -> dict[str, Any]:
    return {
        "svg.hashsalt": f"chatuie-report {title}",
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans"],
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "axes.grid.axis": "y",
        "axes.axisbelow": True,
        "grid.color": "#e4e4e4",
    }


def _draw(title: str, width: int, height: int, plot: Any) -> str:
    """A figure of ``width`` x ``height`` pixels with ``plot(ax)`` drawn on it, as an ``<svg>``
    element (no XML prolog, so that it also inlines in HTML)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_rc(title)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # CJK: text, not paths
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        fig.suptitle(title, fontsize=11, fontweight="bold", parse_math=False)
        handles = plot(ax)
        if handles:
            legend = fig.legend(handles=handles, loc="outside right upper", frameon=False)
            for text in legend.get_texts():
                text.set_parse_math(False)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :].rstrip("\n")


def bar_chart(
    title: str,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    y_label: str,
    *,
    y_max: float | None = None,
    min_top: float = 1.0,
    width: int = 720,
    height: int = 340,
) -> str:
    """A grouped bar chart (a group per x position, a colour per series) with each value above its
    bar; ``None`` values are drawn as "n/a". The y axis runs from 0 to ``y_max``, or to a round
    number no lower than the largest value nor ``min_top``."""
    values = [v for _, vs in series for v in vs if v is not None]
    top_value = y_max or _nice_max(max([*values, min_top]))

    def plot(ax: Any) -> list[Any]:
        from matplotlib.patches import Patch

        n, bar_w = len(groups), 0.8 / max(len(series), 1)
        handles = []
        for s, (name, vs) in enumerate(series):
            colour = PALETTE[s % len(PALETTE)]
            points = [(g - 0.4 + bar_w * (s + 0.5), vs[g] if g < len(vs) else None) for g in range(n)]
            drawn = [(x, v) for x, v in points if v is not None]
            if drawn:
                bars = ax.bar(
                    [x for x, _ in drawn], [min(v, top_value) for _, v in drawn], bar_w * 0.92, color=colour
                )
                ax.bar_label(bars, [f"{v:g}" for _, v in drawn], padding=2, fontsize=7)
            for x, v in points:
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", color="#999999", fontsize=7)
            handles.append(Patch(facecolor=colour, label=name))
        ax.set_xticks(range(n), list(groups), fontsize=10, parse_math=False)
        ax.tick_params(axis="x", length=0)
        ax.set_xlim(-0.5, max(n, 1) - 0.5)
        ax.set_ylim(0, top_value)
        ax.set_ylabel(y_label)
        return handles

    return _draw(title, width, height, plot)


def line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    *,
    width: int = 720,
    height: int = 320,
) -> str:
    """Lines of (x, y) points over x from 0; y from 0, or down to a round negative minimum
    (rewards may be negative), up to a round maximum."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x_max = max(xs, default=1.0) or 1.0
    y_min = -_nice_max(-min(ys)) if ys and min(ys) < 0 else 0.0
    y_max = _nice_max(max(ys, default=1.0)) if ys and max(ys) > 0 else 0.0
    if y_max == y_min:
        y_max = y_min + 1.0

    def plot(ax: Any) -> list[Any]:
        handles = []
        for i, (name, pts) in enumerate(series):
            (line,) = ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                color=PALETTE[i % len(PALETTE)],
                linewidth=2,
                marker="o" if len(pts) == 1 else None,
                label=name,
            )
            handles.append(line)
        ax.set_xlim(0, x_max)
        ax.set_ylim(y_min, y_max)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        return handles

    return _draw(title, width, height, plot)
