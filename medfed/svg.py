"""Small inline SVG charts for medfed's HTML reports: no script, nothing fetched."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from html import escape

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
Point = tuple[float, float | None]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round numbers spanning [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_chart(
    title: str,
    series: Mapping[str, Sequence[Point]],
    *,
    x_label: str = "round",
    y_label: str = "",
    width: int = 640,
    height: int = 300,
    integer_x: bool = True,
    x_format: Callable[[float], str] | None = None,
    y_from_zero: bool = False,
    reference: tuple[str, float] | None = None,
    wide: Collection[str] = (),
) -> str:
    """A line chart of `series` (name to (x, y) points; a None y breaks the line).

    With `integer_x` (rounds) only whole numbers are marked on the x axis; `x_format`
    writes an x tick's label (e.g. a time); `y_from_zero` starts the y axis at 0;
    `reference` draws a dashed horizontal line with its label (a cap); series named in
    `wide` are drawn wide and pale, so a line lying on them stays visible.
    """
    values = [(x, y) for points in series.values() for x, y in points if y is not None]
    if values and reference is not None:
        values.append((values[0][0], reference[1]))
    if values and y_from_zero:
        values.append((values[0][0], 0.0))
    left, right, top, bottom = 60, 150, 30, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    if not values:
        parts.append(f'<text x="{left}" y="{height / 2}">no data yet</text></svg>')
        return "".join(parts)
    x_low, x_high = min(x for x, _ in values), max(x for x, _ in values)
    y_low, y_high = min(y for _, y in values), max(y for _, y in values)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        y_low, y_high = y_low - 0.5 * (abs(y_low) or 1), y_high + 0.5 * (abs(y_high) or 1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    parts.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>'
    )
    for tick in _ticks(y_low, y_high):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}"'
            f' stroke="#eee"/><text x="{left - 6}" y="{py(tick) + 4:.1f}"'
            f' text-anchor="end">{tick:.4g}</text>'
        )
    x_ticks = _ticks(x_low, x_high) if x_format is None else [x_low, x_high]
    for tick in x_ticks:
        if integer_x and x_format is None and tick != int(tick):
            continue
        label = f"{tick:.4g}" if x_format is None else x_format(tick)
        parts.append(
            f'<text x="{px(tick):.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    if reference is not None:
        name, level = reference
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(level):.1f}" y2="{py(level):.1f}"'
            f' stroke="#d00" stroke-dasharray="6 4"/><text x="{left + plot_w}"'
            f' y="{py(level) - 4:.1f}" text-anchor="end" fill="#d00">{escape(name)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle"'
        f' transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>'
    )
    for index, (name, points) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        segment: list[str] = []
        for x, y in [*points, (math.nan, None)]:
            if y is None:
                if len(segment) > 1:
                    style = (
                        'stroke-width="5" stroke-opacity="0.45"'
                        if name in wide
                        else 'stroke-width="2"'
                    )
                    parts.append(
                        f'<polyline fill="none" stroke="{color}" {style}'
                        f' points="{" ".join(segment)}"/>'
                    )
                segment = []
                continue
            segment.append(f"{px(x):.1f},{py(y):.1f}")
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        legend_y = top + 14 * index + 8
        parts.append(
            f'<rect x="{left + plot_w + 12}" y="{legend_y - 8}" width="10" height="10"'
            f' fill="{color}"/><text x="{left + plot_w + 26}" y="{legend_y + 1}">'
            f"{escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
