"""Inline SVG plots with axes, tick labels, legends and threshold lines.

Every colour is set with a ``style`` attribute, which a page's CSS rules for
``svg`` elements cannot override (presentation attributes such as ``fill=``
lose to any CSS rule), so legends keep the colours of their series.
"""

from __future__ import annotations

import html
import math
from typing import Optional, Sequence

import numpy as np

from .groups import num

SERIES_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"]  # red, blue, green, orange
AXIS_COLOR = "#444444"
GRID_COLOR = "#e4e4e4"
THRESHOLD_COLOR = "#111111"
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 34, 44  # plot margins in px; the legend sits in the top one


def nice_ticks(top: float, count: int = 5, whole: bool = False) -> list[float]:
    """Ticks from 0 to at least ``top`` at a round step (1, 2, 2.5 or 5 times a power of ten;
    with ``whole``, a whole number: counts of images)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw - 1e-12
                and (not whole or float(m * power).is_integer()))
    n = int(math.ceil(top / step - 1e-9))
    return [round(i * step, 10) for i in range(n + 1)]


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


CHAR_PX = 7.0  # a generous width of one character of 12 px text, for placing labels
HALO = ";paint-order:stroke;stroke:#ffffff;stroke-width:3px;stroke-linejoin:round"  # lines never strike a label


def _text(x: float, y: float, label: str, anchor: str = "middle", css: str = "", color: str = AXIS_COLOR,
          rotate: bool = False, halo: bool = False) -> str:
    transform = f" transform='rotate(-90 {x:.1f} {y:.1f})'" if rotate else ""
    return (f"<text x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' class='{css}' style='fill:{color}"
            f"{HALO if halo else ''}'{transform}>{html.escape(label)}</text>")


def _beside(x: float, label: str, low: float, high: float) -> tuple[float, str]:
    """(x, anchor) of a label next to a mark at x: on its right, or on its left when it would pass ``high``."""
    if x + 4 + CHAR_PX * len(label) <= high or x - 4 - CHAR_PX * len(label) < low:
        return x + 4, "start"
    return x - 4, "end"


class _Frame:
    """Pixel coordinates of a plot area: x in [x0, x1] data units, y in [0, y_top]."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_top: float):
        self.width, self.height = width, height
        self.x0, self.x1 = x_range
        self.y_top = y_top
        self.left, self.right = LEFT, width - RIGHT
        self.top, self.bottom = TOP, height - BOTTOM

    def px(self, x: float) -> float:
        return self.left + (self.right - self.left) * (x - self.x0) / max(self.x1 - self.x0, 1e-12)

    def py(self, y: float) -> float:
        return self.bottom - (self.bottom - self.top) * y / max(self.y_top, 1e-12)

    def grid(self, y_ticks: Sequence[float]) -> str:
        """Light horizontal lines at the y ticks, drawn under the data."""
        return "<g class='grid'>" + "".join(
            f"<line x1='{self.left}' y1='{self.py(v):.1f}' x2='{self.right}' y2='{self.py(v):.1f}' "
            f"style='stroke:{GRID_COLOR}'/>" for v in y_ticks) + "</g>"

    def axes(self, x_ticks: Sequence[tuple[float, str]], y_ticks: Sequence[float], x_label: str,
             y_label: str) -> str:
        """Both axes with ticks, tick labels and titles, drawn over the data."""
        parts = ["<g class='axis y-axis'>"]
        for value in y_ticks:
            y = self.py(value)
            parts.append(f"<line x1='{self.left - 4}' y1='{y:.1f}' x2='{self.left}' y2='{y:.1f}' "
                         f"style='stroke:{AXIS_COLOR}'/>")
            parts.append(_text(self.left - 6, y + 4, _fmt(value), "end", "tick"))
        parts.append(f"<line x1='{self.left}' y1='{self.top}' x2='{self.left}' y2='{self.bottom}' "
                     f"style='stroke:{AXIS_COLOR};stroke-width:1.5'/>")
        parts.append(_text(14, (self.top + self.bottom) / 2, y_label, "middle", "axis-title", rotate=True))
        parts.append("</g><g class='axis x-axis'>")
        for value, label in x_ticks:
            x = self.px(value)
            parts.append(f"<line x1='{x:.1f}' y1='{self.bottom}' x2='{x:.1f}' y2='{self.bottom + 4}' "
                         f"style='stroke:{AXIS_COLOR}'/>")
            room = 3.5 * len(label)  # half a label's width: labels at the ends stay inside the picture
            anchor = "start" if x - room < 2 else "end" if x + room > self.width - 2 else "middle"
            parts.append(_text(x - 4 if anchor == "start" else x + 4 if anchor == "end" else x,
                               self.bottom + 20, label, anchor, "tick"))
        parts.append(f"<line x1='{self.left}' y1='{self.bottom}' x2='{self.right}' y2='{self.bottom}' "
                     f"style='stroke:{AXIS_COLOR};stroke-width:1.5'/>")
        parts.append(_text((self.left + self.right) / 2, self.height - 6, x_label, "middle", "axis-title"))
        parts.append("</g>")
        return "".join(parts)

    def vline(self, x: float, label: str) -> str:
        """A dashed vertical threshold line at data x, labelled at its top."""
        px = self.px(x)
        tx, anchor = _beside(px, label, 2, self.width - 2)
        return (f"<g class='threshold'><line x1='{px:.1f}' y1='{self.top}' x2='{px:.1f}' y2='{self.bottom}' "
                f"style='stroke:{THRESHOLD_COLOR};stroke-width:1.5;stroke-dasharray:5,3'/>"
                + _text(tx, self.top + 10, label, anchor, "threshold-label", THRESHOLD_COLOR, halo=True) + "</g>")

    def hline(self, y: float, label: str, color: str, at_left: bool = False) -> str:
        """A dashed horizontal reference line at data y, labelled above its right (or left) end."""
        py = self.py(y)
        x, anchor = (self.left + 6, "start") if at_left else (self.right - 4, "end")
        return (f"<g class='threshold'><line x1='{self.left}' y1='{py:.1f}' x2='{self.right}' y2='{py:.1f}' "
                f"style='stroke:{color};stroke-width:1.5;stroke-dasharray:5,3'/>"
                + _text(x, py - 4, label, anchor, "threshold-label", color, halo=True) + "</g>")


def legend(entries: Sequence[tuple[str, str]], x: float, y: float) -> str:
    """A legend in one row from (x, y): a 12 px colour swatch and a label per (label, colour)."""
    parts = ["<g class='legend'>"]
    for label, color in entries:
        parts.append(f"<rect class='swatch' x='{x:.1f}' y='{y:.1f}' width='12' height='12' "
                     f"style='fill:{color};stroke:none'/>")
        parts.append(_text(x + 18, y + 10, label, "start", "legend-label", color))
        x += 18 + 7 * len(label) + 18
    parts.append("</g>")
    return "".join(parts)


def _svg(css_class: str, width: int, height: int, label: str, body: str, group: Optional[str] = None) -> str:
    data = f" data-group='{html.escape(group)}'" if group is not None else ""
    return (f"<svg class='{css_class}' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' role='img' aria-label='{html.escape(label)}'{data}>{body}</svg>")


def histogram_svg(series: dict[str, Sequence[float]], threshold: Optional[float] = None, bins: int = 20,
                  width: int = 600, height: int = 260, css_class: str = "histogram",
                  group: Optional[str] = None) -> str:
    """Histograms of scores in [0, 1], one colour per series, with the image threshold marked.

    One series is drawn as image counts; several (of different sizes, e.g. a
    day against its baseline) as the share of each series' images per bin.
    ``group``: the threshold group the plot shows, named in its legend and ``data-group``.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = {name: np.histogram(np.clip(np.asarray(v, float), 0, 1), bins=edges)[0] for name, v in series.items()}
    shares = len(series) > 1
    heights = {name: (c / max(1, c.sum()) * 100 if shares else c.astype(float)) for name, c in counts.items()}
    top = max([float(h.max()) for h in heights.values() if h.size] + [1.0])
    ticks = nice_ticks(top, whole=not shares)
    frame = _Frame(width, height, (0.0, 1.0), ticks[-1])
    x_ticks = [(v, f"{v:.1f}") for v in np.linspace(0, 1, 6)]
    parts = [frame.grid(ticks)]
    bar = (frame.right - frame.left) / bins
    entries = []
    for k, (name, values) in enumerate(heights.items()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        parts.append(f"<g class='series' data-series='{html.escape(name)}'>")
        for i, value in enumerate(values):
            if value <= 0:
                continue
            y = frame.py(value)
            parts.append(f"<rect x='{frame.left + i * bar:.1f}' y='{y:.1f}' width='{bar:.1f}' "
                         f"height='{frame.bottom - y:.1f}' style='fill:{color};fill-opacity:0.5'>"
                         f"<title>{html.escape(name)}: {edges[i]:.2f}-{edges[i + 1]:.2f}: {values[i]:.4g}"
                         f"</title></rect>")
        parts.append("</g>")
        entries.append((f"{name} (n={len(series[name])})", color))
    parts.append(frame.axes(x_ticks, ticks, "score", "share of images (%)" if shares else "images"))
    if threshold is not None:
        parts.append(frame.vline(threshold, f"threshold {num(threshold)}"))
    parts.append(legend(entries, frame.left, 8))
    label = "score histogram" + (f" of {group}" if group is not None else "")
    return _svg(css_class, width, height, label, "".join(parts), group)


def line_svg(points: Sequence[tuple[str, float]], references: Sequence[tuple[str, float, str]] = (),
             y_label: str = "anomaly rate", x_label: str = "date", width: int = 600, height: int = 260,
             css_class: str = "trend") -> str:
    """A line of (label, value) points, e.g. the anomaly rate per day, with reference lines.

    references: (label, value, colour) drawn as dashed horizontal lines, e.g.
    the baseline rate and the rate that raises an alert. Values are shares in
    [0, 1]; the y axis runs from 0 to a round value no higher than 1.
    """
    values = [v for _, v in points] + [v for _, v, _ in references]
    if not points:
        return _svg(css_class, width, 40, "trend", _text(8, 24, "no days with scores yet", "start"))
    ticks = [t for t in nice_ticks(max(values + [0.01]) * 1.05) if t <= 1.0]
    if ticks[-1] < max(values):
        ticks.append(1.0)
    n = len(points)
    frame = _Frame(width, height, (0, max(1, n - 1)), ticks[-1])
    step = max(1, math.ceil(n / 6))
    x_ticks = [(i, points[i][0]) for i in range(0, n, step)]
    if x_ticks[-1][0] != n - 1:
        x_ticks.append((n - 1, points[-1][0]))
    parts = [frame.grid(ticks)]
    for k, (label, value, color) in enumerate(references):  # labels alternate ends, so close lines stay legible
        parts.append(frame.hline(value, f"{label} {num(value)}", color, at_left=k % 2 == 1))
    path = " ".join(f"{frame.px(i):.1f},{frame.py(v):.1f}" for i, (_, v) in enumerate(points))
    parts.append(f"<polyline points='{path}' style='fill:none;stroke:{SERIES_COLORS[1]};stroke-width:2'/>")
    for i, (label, value) in enumerate(points):
        last = i == n - 1
        color = SERIES_COLORS[0] if last else SERIES_COLORS[1]
        parts.append(f"<circle cx='{frame.px(i):.1f}' cy='{frame.py(value):.1f}' r='{4.5 if last else 3}' "
                     f"style='fill:{color}'><title>{html.escape(label)}: {num(value)}</title></circle>")
    parts.append(frame.axes(x_ticks, ticks, x_label, y_label))
    parts.append(legend([(y_label, SERIES_COLORS[1]), ("this day", SERIES_COLORS[0])], frame.left, 8))
    return _svg(css_class, width, height, "trend", "".join(parts))


def colorbar_svg(colors: Sequence[str], markers: Sequence[tuple[str, float]] = (), width: int = 600,
                 label: str = "heat map: anomaly probability") -> str:
    """The heat map's colour scale from 0 to 1 as an axis, and below it one row per (group, mask threshold)
    with the group's name on the left and its threshold marked and labelled on the same axis."""
    names = [name for name, _ in markers]
    left = min(220, max(LEFT, 10 + int(CHAR_PX * max([len(n) for n in names] + [0]))))
    height = 60 + 20 * len(markers)
    frame = _Frame(width, height, (0.0, 1.0), 1.0)
    frame.left, frame.top, frame.bottom = left, 4, 22
    stops = "".join(f"<stop offset='{i / (len(colors) - 1):.3f}' style='stop-color:{c}'/>"
                    for i, c in enumerate(colors))
    parts = [f"<defs><linearGradient id='heat-scale'>{stops}</linearGradient></defs>",
             f"<rect x='{frame.left}' y='{frame.top}' width='{frame.right - frame.left}' "
             f"height='{frame.bottom - frame.top}' style='fill:url(#heat-scale)'/>",
             "<g class='axis x-axis'>"]
    for value in np.linspace(0, 1, 6):
        x = frame.px(value)
        parts.append(f"<line x1='{x:.1f}' y1='{frame.bottom}' x2='{x:.1f}' y2='{frame.bottom + 4}' "
                     f"style='stroke:{AXIS_COLOR}'/>")
        parts.append(_text(x, frame.bottom + 16, f"{value:.1f}", "middle", "tick"))
    parts.append(_text((frame.left + frame.right) / 2, 54, label, "middle", "axis-title"))
    parts.append("</g>")
    for k, (name, value) in enumerate(markers):
        top = 60 + 20 * k
        x = frame.px(value)
        text = f"mask threshold {num(value)}"
        tx, anchor = _beside(x, text, frame.left, width - 2)
        parts.append(f"<g class='threshold' data-group='{html.escape(name)}'>"
                     f"<line x1='{frame.left}' y1='{top + 10}' x2='{frame.right}' y2='{top + 10}' "
                     f"style='stroke:{GRID_COLOR}'/>"
                     + _text(frame.left - 6, top + 14, name, "end", "group-label")
                     + f"<line x1='{x:.1f}' y1='{top + 2}' x2='{x:.1f}' y2='{top + 18}' "
                       f"style='stroke:{THRESHOLD_COLOR};stroke-width:2'/>"
                     + _text(tx, top + 14, text, anchor, "threshold-label", THRESHOLD_COLOR, halo=True) + "</g>")
    return _svg("colorbar", width, height, label, "".join(parts))
