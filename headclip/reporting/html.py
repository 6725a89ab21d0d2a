"""HTML reports a person reads in a minute: figures, plots and the worst images.

One self-contained file: plots are inline SVG and gallery pictures are PNG
data URIs, so the report opens from anywhere (a bucket, a mail, a laptop).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..storage.schema import STATUS_OK
from .overlay import png_bytes, row_overlay

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table.figures td, table.figures th { padding: 2px 12px; text-align: left; }
.alert { background: #fde2e1; border-left: 5px solid #d33; padding: 0.6em 1em; }
.ok { background: #e3f6e5; border-left: 5px solid #2a2; padding: 0.6em 1em; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
.gallery figure { margin: 0; width: 260px; font-size: 0.8em; word-break: break-all; }
.gallery img { max-width: 260px; border: 1px solid #ccc; }
svg text { font-size: 11px; fill: #333; }
"""

# Marks the page once every picture has loaded (or failed), for people and headless checks.
LOAD_CHECK = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>
"""


@dataclass
class Section:
    title: str
    body: str


@dataclass
class Report:
    title: str
    banner: Optional[tuple[str, str]] = None  # (css class, text)
    figures: dict[str, str] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)

    def html(self) -> str:
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        if self.banner:
            parts.append(f"<div class='{self.banner[0]}' id='verdict'>{html.escape(self.banner[1])}</div>")
        if self.figures:
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                           for k, v in self.figures.items())
            parts.append(f"<table class='figures'>{rows}</table>")
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>{section.body}")
        parts.append(LOAD_CHECK + "</body></html>")
        return "\n".join(parts)


def histogram_svg(series: dict[str, Sequence[float]], bins: int = 20, width: int = 560, height: int = 220,
                  css_class: str = "histogram") -> str:
    """Overlaid density histograms of scores in [0, 1], one colour per series."""
    colors = ["#d33", "#36c", "#2a2", "#c80"]
    pad = 30
    edges = np.linspace(0.0, 1.0, bins + 1)
    densities = {name: np.histogram(np.asarray(v, float), bins=edges)[0] / max(1, len(v)) for name, v in series.items()}
    top = max([float(d.max()) for d in densities.values() if d.size] + [1e-9])
    bar_w = (width - 2 * pad) / bins
    shapes = [f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#888'/>"]
    for k, (name, density) in enumerate(densities.items()):
        color = colors[k % len(colors)]
        for i, value in enumerate(density):
            h = (height - 2 * pad) * value / top
            shapes.append(f"<rect x='{pad + i * bar_w:.1f}' y='{height - pad - h:.1f}' width='{bar_w:.1f}' "
                          f"height='{h:.1f}' fill='{color}' fill-opacity='0.45'/>")
        shapes.append(f"<text x='{width - pad - 150}' y='{pad + 14 * k}' fill='{color}'>"
                      f"{html.escape(name)} (n={len(series[name])})</text>")
    for tick in (0.0, 0.5, 1.0):
        shapes.append(f"<text x='{pad + tick * (width - 2 * pad) - 8:.1f}' y='{height - 10}'>{tick:.1f}</text>")
    return (f"<svg class='{css_class}' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"role='img' aria-label='score histogram'>{''.join(shapes)}</svg>")


def line_svg(points: Sequence[tuple[str, float]], width: int = 560, height: int = 220,
             css_class: str = "trend", highlight_last: bool = True) -> str:
    """A line chart of (label, value in [0, 1]) points, e.g. the anomaly rate per day."""
    pad = 34
    n = len(points)
    if n == 0:
        return f"<svg class='{css_class}' xmlns='http://www.w3.org/2000/svg' width='{width}' height='40'></svg>"
    top = max(max(v for _, v in points) * 1.15, 0.05)
    xs = [pad + (width - 2 * pad) * (i / max(1, n - 1)) for i in range(n)]
    ys = [height - pad - (height - 2 * pad) * (v / top) for _, v in points]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    shapes = [f"<polyline points='{path}' fill='none' stroke='#36c' stroke-width='2'/>",
              f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#888'/>",
              f"<text x='4' y='{pad}'>{top:.2f}</text>", f"<text x='4' y='{height - pad}'>0</text>"]
    for i, ((label, value), x, y) in enumerate(zip(points, xs, ys)):
        last = highlight_last and i == n - 1
        shapes.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{4 if last else 2.5}' fill='{'#d33' if last else '#36c'}'>"
                      f"<title>{html.escape(label)}: {value:.3f}</title></circle>")
    shapes.append(f"<text x='{pad}' y='{height - 10}'>{html.escape(points[0][0])}</text>")
    shapes.append(f"<text x='{width - pad - 70}' y='{height - 10}'>{html.escape(points[-1][0])}</text>")
    return (f"<svg class='{css_class}' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"role='img' aria-label='trend'>{''.join(shapes)}</svg>")


def gallery_html(rows: pd.DataFrame, storage_options: Optional[dict] = None) -> str:
    """Figures of the given rows: overlay picture, score and URI."""
    figures = []
    for _, row in rows.iterrows():
        record = row.to_dict()
        data = base64.b64encode(png_bytes(row_overlay(record, storage_options, max_side=256))).decode()
        figures.append(
            f"<figure class='anomaly'><img src='data:image/png;base64,{data}' "
            f"alt='{html.escape(str(record['image_id']))}'/>"
            f"<figcaption><b>score {record['score']:.3f}</b> (global {record['global_score']:.3f})<br/>"
            f"{html.escape(str(record['image_uri']))}</figcaption></figure>")
    if not figures:
        return "<p>No scored images.</p>"
    return f"<div class='gallery'>{''.join(figures)}</div>"


def score_figures(rows: pd.DataFrame) -> dict[str, str]:
    """The headline numbers of a set of output rows."""
    ok = rows[rows["status"] == STATUS_OK]
    figures = {"images": str(len(rows)), "errors": str(int((rows["status"] != STATUS_OK).sum()))}
    if len(ok):
        q = ok["score"].quantile([0.5, 0.9, 0.99])
        figures.update({
            "anomaly rate": f"{ok['is_anomalous'].mean():.3f} ({int(ok['is_anomalous'].sum())} of {len(ok)})",
            "score p50 / p90 / p99": f"{q.iloc[0]:.3f} / {q.iloc[1]:.3f} / {q.iloc[2]:.3f}",
        })
    if len(rows) and {"threshold", "mask_threshold"} <= set(rows.columns):
        figures["thresholds"] = threshold_figure(rows)
    return figures


def threshold_figure(rows: pd.DataFrame, listed: int = 6) -> str:
    """The image and mask thresholds the rows record: one pair, or each pair with its image count."""
    pairs = rows.groupby(["threshold", "mask_threshold"]).size().sort_index()
    if len(pairs) == 1:
        (threshold, mask_threshold), = pairs.index
        return f"image score > {threshold:.4g}, mask pixels > {mask_threshold:.4g}"
    shown = "; ".join(f"> {t:.4g} / > {m:.4g} ({n} images)" for (t, m), n in list(pairs.items())[:listed])
    more = f"; {len(pairs) - listed} more" if len(pairs) > listed else ""
    return f"{len(pairs)} calibrated pairs (image score / mask pixels): {shown}{more}"


def run_report(rows: pd.DataFrame, title: str, top_n: int = 12, storage_options: Optional[dict] = None) -> Report:
    """A report of one scoring run: figures, score histogram, worst images, errors."""
    ok = rows[rows["status"] == STATUS_OK]
    report = Report(title=title, figures=score_figures(rows))
    report.sections.append(Section("Score distribution", histogram_svg({"scores": ok["score"].tolist()})))
    top = ok.sort_values("score", ascending=False).head(top_n)
    report.sections.append(Section(f"Top {len(top)} anomalous images", gallery_html(top, storage_options)))
    report.sections.append(Section("Errors", errors_html(rows)))
    return report


def errors_html(rows: pd.DataFrame, limit: int = 50) -> str:
    errors = rows[rows["status"] != STATUS_OK].head(limit)
    if errors.empty:
        return "<p>No errors.</p>"
    items = "".join(f"<tr><td>{html.escape(str(r.image_uri))}</td><td>{html.escape(str(r.error))}</td></tr>"
                    for r in errors.itertuples())
    return f"<table class='errors'><tr><th>image</th><th>error</th></tr>{items}</table>"
