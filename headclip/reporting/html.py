"""HTML reports a person reads in a minute: figures, plots, a sortable table and image strips.

One self-contained file: plots are inline SVG (:mod:`.plots`) and pictures are
PNG data URIs, so the report opens from anywhere (a bucket, a mail, a laptop).
Each image the model flags gets a strip: the image, its heat map, its predicted
mask (one box per connected region) and its ground truth when the rows carry
one (``mask_uri``, or ``label`` 0 for a known normal image).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pandas as pd

from ..storage.schema import STATUS_OK
from .overlay import HEAT_COLORS, jpeg_bytes, panels, region_boxes, row_mask
from .plots import SERIES_COLORS, colorbar_svg, histogram_svg, line_svg

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1280px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table.figures td, table.figures th { padding: 2px 12px; text-align: left; }
.alert { background: #fde2e1; border-left: 5px solid #d33; padding: 0.6em 1em; }
.ok { background: #e3f6e5; border-left: 5px solid #2a2; padding: 0.6em 1em; }
svg[role=img] { display: block; margin: 0.4em 0; }
svg .tick, svg .legend-label, svg .axis-title, svg .threshold-label { font-size: 12px; }
table.top { border-collapse: collapse; font-size: 0.9em; }
table.top th, table.top td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; }
table.top th { cursor: pointer; background: #f3f3f3; user-select: none; }
table.top th[aria-sort=ascending]::after { content: " \\25B2"; }
table.top th[aria-sort=descending]::after { content: " \\25BC"; }
table.top td.num { text-align: right; font-variant-numeric: tabular-nums; }
.strip { margin: 0 0 1.2em 0; padding: 0.5em; border: 1px solid #ddd; }
.strip .panels { display: flex; gap: 8px; flex-wrap: wrap; }
.strip .panel { margin: 0; font-size: 0.8em; color: #555; text-align: center; }
.strip .panel img { display: block; border: 1px solid #ccc; }
.strip figcaption { font-size: 0.85em; margin-top: 0.3em; word-break: break-all; }
.anomalous { color: #b00; font-weight: bold; } .normal { color: #070; font-weight: bold; }
"""

# Marks the page once every picture has loaded (or failed), for people and headless checks,
# and sorts a table.top by the column whose header is clicked (numbers by data-value).
SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
document.querySelectorAll('table.top').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute('aria-sort') === 'descending' ? 1 : -1;
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
      function key(row) {
        var cell = row.cells[col], v = cell.getAttribute('data-value');
        return v !== null ? parseFloat(v) : cell.textContent;
      }
      rows.sort(function (a, b) { var x = key(a), y = key(b); return x < y ? -dir : x > y ? dir : 0; });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
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
        parts.append(SCRIPT + "</body></html>")
        return "\n".join(parts)


def image_threshold(rows: pd.DataFrame) -> Optional[float]:
    """The image threshold of the rows (the most common one when runs differ), or None."""
    if "threshold" not in rows or rows["threshold"].dropna().empty:
        return None
    return float(rows["threshold"].dropna().mode().iloc[0])


def _mask_threshold(rows: pd.DataFrame) -> Optional[float]:
    if "mask_threshold" not in rows or rows["mask_threshold"].dropna().empty:
        return None
    return float(rows["mask_threshold"].dropna().mode().iloc[0])


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def _label(record: dict) -> str:
    return "anomalous" if bool(record.get("is_anomalous")) else "normal"


def _truth(record: dict) -> Optional[str]:
    """The ground-truth label of a row that carries one (``label`` 1/0), else None."""
    value = record.get("label")
    if not _known(value):
        return None
    return "anomalous" if int(value) == 1 else "normal"


def _data_uri(picture) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(picture)).decode()


def strips_html(rows: pd.DataFrame, storage_options: Optional[dict] = None, max_side: int = 200) -> str:
    """One strip per row: image, heat map, predicted mask, ground truth (when known), and a caption
    with rank, score, label, ground truth and URI."""
    strips = []
    for rank, (_, row) in enumerate(rows.iterrows(), start=1):
        record = row.to_dict()
        pictures = panels(record, storage_options, max_side)
        cells = "".join(f"<figure class='panel' data-panel='{html.escape(name)}'>"
                        f"<img src='{_data_uri(picture)}' alt='{html.escape(name)} of "
                        f"{html.escape(str(record['image_id']))}'/>{html.escape(name)}</figure>"
                        for name, picture in pictures.items())
        label = _label(record)
        truth = _truth(record)
        mask = row_mask(record)
        regions = 0 if mask is None else len(region_boxes(mask))
        share = 0.0 if mask is None else float(mask.mean()) * 100
        caption = (f"<b>#{rank}</b> · score <b>{record['score']:.3f}</b> (global {record['global_score']:.3f}, "
                   f"map max {record['pixel_max']:.3f}) · <span class='{label}'>{label}</span>"
                   + (f" · ground truth: <span class='{truth}'>{truth}</span>" if truth else "")
                   + f" · mask {share:.1f}% of the image in {regions} region{'s' if regions != 1 else ''}"
                   + f"<br/>{html.escape(str(record['image_uri']))}")
        strips.append(f"<figure class='strip' data-image-id='{html.escape(str(record['image_id']))}' "
                      f"data-score='{record['score']:.6f}'><div class='panels'>{cells}</div>"
                      f"<figcaption>{caption}</figcaption></figure>")
    return "".join(strips)


def top_table_html(rows: pd.DataFrame) -> str:
    """A table of rows (rank, scores, mask share, label, ground truth, URI); headers sort on click."""
    with_truth = "label" in rows
    headers = ["rank", "score", "global", "map max", "mask %", "label"] + (["ground truth"] if with_truth else [])
    head = "".join(f"<th scope='col'>{h}</th>" for h in headers + ["image"])
    body = []
    for rank, (_, row) in enumerate(rows.iterrows(), start=1):
        record = row.to_dict()
        area = (record.get("mask_area") or 0) / max(1, int(record.get("width") or 1) * int(record.get("height") or 1))
        cells = [f"<td class='num' data-value='{rank}'>{rank}</td>"]
        for key in ("score", "global_score", "pixel_max"):
            cells.append(f"<td class='num' data-value='{record[key]:.6f}'>{record[key]:.3f}</td>")
        cells.append(f"<td class='num' data-value='{area * 100:.4f}'>{area * 100:.1f}</td>")
        cells.append(f"<td class='{_label(record)}'>{_label(record)}</td>")
        if with_truth:
            truth = _truth(record) or ""
            cells.append(f"<td class='{truth}'>{truth}</td>")
        cells.append(f"<td>{html.escape(str(record['image_uri']))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    if not body:
        return "<p>No scored images.</p>"
    return f"<table class='top'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def score_figures(rows: pd.DataFrame) -> dict[str, str]:
    """The headline numbers of a set of output rows."""
    ok = rows[rows["status"] == STATUS_OK]
    figures = {"images": str(len(rows)), "errors": str(int((rows["status"] != STATUS_OK).sum()))}
    if len(ok):
        q = ok["score"].quantile([0.5, 0.9, 0.99])
        threshold = image_threshold(ok)
        figures.update({
            "anomaly rate": f"{ok['is_anomalous'].mean():.3f} ({int(ok['is_anomalous'].sum())} of {len(ok)}"
                            + (f" above the threshold {threshold:g})" if threshold is not None else ")"),
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


def image_sections(rows: pd.DataFrame, top_n: int, storage_options: Optional[dict] = None) -> list[Section]:
    """The table of the top ``top_n`` images by score, and strips of the flagged ones among them."""
    ok = rows[rows["status"] == STATUS_OK].sort_values("score", ascending=False, kind="stable")
    top = ok.head(top_n)
    flagged = ok[ok["is_anomalous"].astype(bool)].head(top_n)
    threshold = image_threshold(ok)
    above = f"score above the threshold {threshold:g}" if threshold is not None else "flagged"
    if len(flagged):
        strips = (colorbar_svg(HEAT_COLORS, _mask_threshold(ok))
                  + "<p>image · heat map · predicted mask (red; one box per region)"
                  + (" · ground truth (green)" if "label" in ok or "mask_uri" in ok else "") + "</p>"
                  + strips_html(flagged, storage_options))
    else:
        strips = f"<p>No image has a {above}.</p>"
    return [Section(f"Top {len(top)} images by score (click a header to sort)", top_table_html(top)),
            Section(f"Flagged images ({above}): {len(flagged)} of "
                    f"{int(ok['is_anomalous'].astype(bool).sum())} shown", strips)]


def run_report(rows: pd.DataFrame, title: str, top_n: int = 12, storage_options: Optional[dict] = None) -> Report:
    """A report of one scoring run: figures, score histogram, top table, strips, errors."""
    ok = rows[rows["status"] == STATUS_OK]
    report = Report(title=title, figures=score_figures(rows))
    report.sections.append(Section("Score distribution",
                                   histogram_svg({"scores": ok["score"].tolist()}, image_threshold(ok))))
    report.sections.extend(image_sections(rows, top_n, storage_options))
    report.sections.append(Section("Errors", errors_html(rows)))
    return report


def audit_report(summary, day_rows: pd.DataFrame, baseline: pd.DataFrame, trend_points: Sequence[tuple[str, float]],
                 rate_increase: float, top_n: int, storage_options: Optional[dict] = None) -> Report:
    """The nightly audit's report: verdict, figures, the day against its baseline, 30-day trend,
    top table and strips of the day's flagged images, errors.

    ``summary`` is a :class:`headclip.reporting.audit.AuditSummary`; ``rate_increase``
    the alert's rise of the anomaly rate, drawn above the baseline rate.
    """
    comparison = summary.comparison
    if summary.alert:
        banner = ("alert", "ALERT: " + "; ".join(summary.reasons))
    elif summary.figures.images == 0:
        banner = ("ok", f"No images for {summary.date}. {summary.note}".strip())
    else:
        banner = ("ok", "No alert." + (f" {summary.note}." if summary.note else ""))
    report = Report(title=f"Anomaly audit {summary.date}", banner=banner)
    report.figures = ({"new images scored": str(summary.new_images), **score_figures(day_rows)}
                      if len(day_rows) else {"new images scored": "0"})
    if getattr(summary, "thresholds", None):
        report.figures["alarm thresholds from"] = summary.thresholds
    references = []
    if comparison.rate_change is not None:
        low, high = comparison.rate_change_ci95
        report.figures["baseline"] = (f"{', '.join(comparison.baseline_days)}: {comparison.baseline_images} images, "
                                      f"anomaly rate {comparison.baseline_anomaly_rate:.3f}")
        report.figures["change in anomaly rate"] = f"{comparison.rate_change:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
        report.figures["KS test of scores"] = f"D = {comparison.ks_statistic:.3f}, p = {comparison.ks_p_value:.2g}"
        references = [("baseline", comparison.baseline_anomaly_rate, SERIES_COLORS[2]),
                      ("alert at", min(1.0, comparison.baseline_anomaly_rate + rate_increase), SERIES_COLORS[0])]
    else:
        report.figures["baseline"] = "none in the trailing days"
    ok_day = day_rows[day_rows["status"] == STATUS_OK] if len(day_rows) else day_rows
    ok_base = baseline[baseline["status"] == STATUS_OK]["score"].tolist() if len(baseline) else []
    threshold = image_threshold(ok_day) if len(ok_day) else None
    report.sections.append(Section("Scores against the baseline",
                                   histogram_svg({summary.date: ok_day["score"].tolist() if len(ok_day) else [],
                                                  "baseline": ok_base}, threshold)))
    report.sections.append(Section("Anomaly rate, last 30 days", line_svg(trend_points, references)))
    if len(day_rows):
        report.sections.extend(image_sections(day_rows, top_n, storage_options))
        report.sections.append(Section("Errors", errors_html(day_rows)))
    return report


def errors_html(rows: pd.DataFrame, limit: int = 50) -> str:
    errors = rows[rows["status"] != STATUS_OK].head(limit)
    if errors.empty:
        return "<p>No errors.</p>"
    items = "".join(f"<tr><td>{html.escape(str(r.image_uri))}</td><td>{html.escape(str(r.error))}</td></tr>"
                    for r in errors.itertuples())
    return f"<table class='errors'><tr><th>image</th><th>error</th></tr>{items}</table>"
