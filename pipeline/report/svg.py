"""Pure: charts as inline SVG text, drawn in Python (no script, nothing fetched).

Each chart is one ``<svg class="chart">`` element that says what it draws in
``data-chart`` and how many marks it has in ``data-marks`` (0 for an empty chart, which
still draws its frame and says that there is nothing to show). Every text is escaped.
Hovering a point, bar or marker shows its value (an SVG ``<title>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from pipeline.report.figures import Histogram, nice_step

WIDTH = 720
HEIGHT = 240
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 30, 40
"""Margins around the plot area."""
INK = "#3b4252"
GRID = "#e5e7eb"
RED = "#d62728"
BLUE = "#1f77b4"
GREEN = "#2ca02c"
ORANGE = "#ff7f0e"
PURPLE = "#9467bd"
GREY = "#7f7f7f"


@dataclass(frozen=True, slots=True)
class Series:
    """A line: ``points`` are (x, y) pairs, y None for a gap."""

    name: str
    color: str
    points: Sequence[tuple[float, float | None]]
    dashed: bool = False
    step: bool = False
    """Drawn as steps (a value that holds until the next one)."""


@dataclass(frozen=True, slots=True)
class Marker:
    """A mark on the x axis (a 429), with what hovering it says."""

    x: float
    label: str


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    text: str
    """What the bar's end says (its value, formatted)."""
    color: str = BLUE


@dataclass(frozen=True, slots=True)
class Column:
    """A stacked column: ``parts`` are (value, color, name) from the bottom up."""

    label: str
    parts: Sequence[tuple[float, str, str]]
    title: str


def nice_ticks(low: float, high: float, count: int = 5, *, integers: bool = False) -> list[float]:
    """Round tick values from at or below ``low`` to at or above ``high``; ``integers``
    keeps them whole numbers (counts of rows)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + 1
    step = nice_step((high - low) / count)
    if integers and step != int(step):
        step = 5.0 if step == 2.5 else 1.0
    start = math.floor(low / step + 1e-9) * step
    ticks = []
    value = start
    while value < high + step * 1e-6:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high - step * 1e-6:  # pragma: no cover - float rounding
        ticks.append(ticks[-1] + step)
    return ticks


def number(value: float) -> str:
    """A compact number for axes and labels: 950, 1.2k, 3.4M, 0.25."""
    size = abs(value)
    if size >= 1e9:
        return f"{value / 1e9:.3g}G"
    if size >= 1e6:
        return f"{value / 1e6:.3g}M"
    if size >= 1e4:
        return f"{value / 1e3:.3g}k"
    if size >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}"


def clock(seconds: float) -> str:
    """Seconds since a run's start as m:ss or h:mm:ss."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _open(chart: str, label: str, marks: int, height: int = HEIGHT) -> list[str]:
    return [
        f'<svg class="chart" data-chart="{escape(chart)}" data-marks="{marks}" '
        f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" role="img" aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#fff"/>',
    ]


def empty_chart(chart: str, label: str, message: str) -> str:
    """A frame that says there is nothing to draw."""
    parts = _open(chart, label, 0, HEIGHT // 2)
    parts.append(
        f'<rect x="{LEFT}" y="10" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT // 2 - 20}" '
        f'fill="#fafafa" stroke="{GRID}"/>'
    )
    parts.append(
        f'<text x="{WIDTH / 2}" y="{HEIGHT / 4 + 4}" text-anchor="middle" fill="{GREY}" '
        f'font-size="13">{escape(message)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


class _Frame:
    """The plot area of a chart and its two scales."""

    def __init__(self, x_ticks: list[float], y_ticks: list[float], height: int = HEIGHT) -> None:
        self.height = height
        self.x0, self.x1 = x_ticks[0], x_ticks[-1]
        self.y0, self.y1 = y_ticks[0], y_ticks[-1]
        self.x_ticks, self.y_ticks = x_ticks, y_ticks
        self.left, self.right = LEFT, WIDTH - RIGHT
        self.top, self.bottom = TOP, height - BOTTOM

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1
        return round(self.left + (value - self.x0) / span * (self.right - self.left), 1)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1
        return round(self.bottom - (value - self.y0) / span * (self.bottom - self.top), 1)

    def axes(
        self, x_label: str, y_label: str, x_text: Callable[[float], str] = number
    ) -> list[str]:
        parts = []
        for tick in self.y_ticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{self.left}" x2="{self.right}" y1="{y}" y2="{y}" stroke="{GRID}"/>'
                f'<text x="{self.left - 6}" y="{y + 4}" text-anchor="end" font-size="11" '
                f'fill="{INK}">{escape(number(tick))}</text>'
            )
        for tick in self.x_ticks:
            x = self.x(tick)
            parts.append(
                f'<line x1="{x}" x2="{x}" y1="{self.bottom}" y2="{self.bottom + 4}" '
                f'stroke="{INK}"/><text x="{x}" y="{self.bottom + 16}" text-anchor="middle" '
                f'font-size="11" fill="{INK}">{escape(x_text(tick))}</text>'
            )
        middle = (self.top + self.bottom) / 2
        parts.append(
            f'<line x1="{self.left}" x2="{self.right}" y1="{self.bottom}" y2="{self.bottom}" '
            f'stroke="{INK}"/>'
            f'<text x="{(self.left + self.right) / 2}" y="{self.height - 6}" '
            f'text-anchor="middle" font-size="11" fill="{INK}">{escape(x_label)}</text>'
            f'<text x="12" y="{middle}" text-anchor="middle" font-size="11" fill="{INK}" '
            f'transform="rotate(-90 12 {middle})">{escape(y_label)}</text>'
        )
        return parts


def _legend(items: Sequence[tuple[str, str, bool]]) -> list[str]:
    """Swatches and names along the top: (name, color, dashed)."""
    parts = []
    x = LEFT
    for name, color, dashed in items:
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(
            f'<line x1="{x}" x2="{x + 18}" y1="12" y2="12" stroke="{color}" '
            f'stroke-width="2.5"{dash}/><text x="{x + 23}" y="16" font-size="12" '
            f'fill="{INK}">{escape(name)}</text>'
        )
        x += 40 + 7 * len(name)
    return parts


def _path(frame: _Frame, series: Series) -> tuple[str, int]:
    """The SVG path of a series, broken at gaps; and how many points it drew."""
    commands: list[str] = []
    drawn = 0
    pen_up = True
    last_y: float | None = None
    for x_value, y_value in series.points:
        if y_value is None:
            pen_up = True
            continue
        x, y = frame.x(x_value), frame.y(y_value)
        if pen_up:
            commands.append(f"M{x} {y}")
        elif series.step and last_y is not None:
            commands.append(f"H{x}V{y}")
        else:
            commands.append(f"L{x} {y}")
        pen_up = False
        last_y = y
        drawn += 1
    return "".join(commands), drawn


def line_chart(
    chart: str,
    label: str,
    *,
    series: Sequence[Series],
    x_max: float,
    x_label: str,
    y_label: str,
    markers: Sequence[Marker] = (),
    x_text: Callable[[float], str] = clock,
) -> str:
    """Lines over x from 0 to ``x_max``; ``markers`` are drawn as red ticks under the top."""
    values = [y for s in series for _, y in s.points if y is not None]
    if not values:
        return empty_chart(chart, label, "no data to draw")
    frame = _Frame(nice_ticks(0, max(x_max, 1e-9)), nice_ticks(0, max(*values, 1e-9)))
    marks = 0
    body = _open(chart, label, 0)
    body += frame.axes(x_label, y_label, x_text)
    for line in series:
        path, drawn = _path(frame, line)
        if drawn == 0:
            continue
        marks += drawn
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        body.append(
            f'<path d="{path}" fill="none" stroke="{line.color}" stroke-width="1.8"'
            f'{dash} stroke-linejoin="round"><title>{escape(line.name)}</title></path>'
        )
        if drawn == 1:  # a single point: a dot, so that it shows
            x_value, y_value = next((x, y) for x, y in line.points if y is not None)
            body.append(
                f'<circle cx="{frame.x(x_value)}" cy="{frame.y(y_value)}" r="3" '
                f'fill="{line.color}"/>'
            )
    for marker in markers:
        x = frame.x(marker.x)
        body.append(
            f'<path d="M{x - 4} {frame.top - 2}L{x + 4} {frame.top - 2}L{x} {frame.top + 6}Z" '
            f'fill="{RED}"><title>{escape(marker.label)}</title></path>'
        )
        marks += 1
    legend = [(s.name, s.color, s.dashed) for s in series]
    if markers:
        legend.append(("429 answers", RED, False))
    body += _legend(legend)
    body.append("</svg>")
    body[0] = body[0].replace('data-marks="0"', f'data-marks="{marks}"', 1)
    return "".join(body)


def histogram_chart(
    chart: str, label: str, hist: Histogram, *, x_label: str, x_text: Callable[[float], str]
) -> str:
    """Bars of a histogram; hovering a bar gives its range and count."""
    if not hist.counts:
        return empty_chart(chart, label, "no rows to count")
    frame = _Frame(
        [hist.edges[0], hist.edges[-1]],
        nice_ticks(0, max(hist.counts), integers=True),
        height=HEIGHT,
    )
    frame.x_ticks = _some(list(hist.edges), 8)
    body = _open(chart, label, sum(1 for c in hist.counts if c))
    body += frame.axes(x_label, "rows", x_text)
    for index, count in enumerate(hist.counts):
        if not count:
            continue
        low, high = hist.edges[index], hist.edges[index + 1]
        x0, x1 = frame.x(low), frame.x(high)
        y = frame.y(count)
        body.append(
            f'<rect x="{x0 + 0.5}" y="{y}" width="{max(1.0, x1 - x0 - 1)}" '
            f'height="{round(frame.bottom - y, 1)}" fill="{BLUE}"><title>'
            f"{escape(x_text(low))} to {escape(x_text(high))}: {count:,} rows</title></rect>"
        )
    body.append("</svg>")
    return "".join(body)


def _some(edges: list[float], most: int) -> list[float]:
    """At most about ``most`` of the edges, evenly picked, the first and last kept."""
    if len(edges) <= most:
        return edges
    every = math.ceil((len(edges) - 1) / (most - 1))
    picked = edges[::every]
    if picked[-1] != edges[-1]:
        picked.append(edges[-1])
    return picked


def bar_chart(chart: str, label: str, bars: Sequence[Bar]) -> str:
    """Horizontal bars, one per label, longest scaled to the width."""
    if not bars:
        return empty_chart(chart, label, "nothing to count")
    row = 26
    height = TOP + row * len(bars) + 14
    label_width = 190
    widest = max(bar.value for bar in bars) or 1.0
    body = _open(chart, label, sum(1 for bar in bars if bar.value > 0), height)
    room = WIDTH - label_width - 240
    for index, bar in enumerate(bars):
        y = TOP - 14 + index * row
        length = round(max(0.0, bar.value) / widest * room, 1)
        body.append(
            f'<text x="{label_width - 8}" y="{y + 15}" text-anchor="end" font-size="12" '
            f'fill="{INK}">{escape(bar.label)}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{max(length, 1.0)}" height="{row - 8}" '
            f'fill="{bar.color}"><title>{escape(bar.label)}: {escape(bar.text)}</title></rect>'
            f'<text x="{label_width + max(length, 1.0) + 6}" y="{y + 15}" font-size="12" '
            f'fill="{INK}">{escape(bar.text)}</text>'
        )
    body.append("</svg>")
    return "".join(body)


def column_chart(
    chart: str, label: str, columns: Sequence[Column], *, y_label: str, legend: Sequence[str]
) -> str:
    """Stacked columns, one per label (runs, oldest first); ``legend`` names the parts'
    colors in the order of the first column's parts."""
    totals = [sum(value for value, _, _ in column.parts) for column in columns]
    if not columns or not any(totals):
        return empty_chart(chart, label, "nothing to count")
    frame = _Frame([0.0, float(len(columns))], nice_ticks(0, max(totals), integers=True))
    frame.x_ticks = []
    body = _open(chart, label, 0)
    body += frame.axes("", y_label)
    slot = (frame.right - frame.left) / len(columns)
    width = min(48.0, slot * 0.7)
    marks = 0
    for index, column in enumerate(columns):
        x = round(frame.left + slot * index + (slot - width) / 2, 1)
        base = 0.0
        for value, color, name in column.parts:
            if value <= 0:
                continue
            top, bottom = frame.y(base + value), frame.y(base)
            body.append(
                f'<rect x="{x}" y="{top}" width="{round(width, 1)}" '
                f'height="{max(0.5, round(bottom - top, 1))}" fill="{color}"><title>'
                f"{escape(column.title)}: {value:,.0f} {escape(name)}</title></rect>"
            )
            base += value
            marks += 1
        if len(columns) <= 30 or index % math.ceil(len(columns) / 30) == 0:
            body.append(
                f'<text x="{round(x + width / 2, 1)}" y="{frame.bottom + 16}" '
                f'text-anchor="middle" font-size="11" fill="{INK}">{escape(column.label)}</text>'
            )
    colors = [(name, color, False) for (_, color, name) in columns[0].parts]
    body += _legend([item for item in colors if item[0] in legend])
    body.append("</svg>")
    body[0] = body[0].replace('data-marks="0"', f'data-marks="{marks}"', 1)
    return "".join(body)
