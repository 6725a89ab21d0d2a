"""HTML reports a person reads in a minute: figures, plots, a sortable table and image strips.

One self-contained file: plots are inline SVG (:mod:`.plots`) and pictures are
JPEG data URIs, so the report opens from anywhere (a bucket, a mail, a laptop).
Rows scored with per-group thresholds are reported per group (:mod:`.groups`):
each image counts against its own group's threshold, each group gets its own
histogram and its own mask threshold on the colour scale.
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
from .groups import ALL_IMAGES, Grouping, checkpoint_figure, group_keys, num, signed
from .overlay import HEAT_COLORS, jpeg_bytes, panels, region_boxes, row_mask
from .plots import SERIES_COLORS, colorbar_svg, histogram_svg, line_svg

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1280px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table.figures td, table.figures th { padding: 2px 12px; text-align: left; vertical-align: top; }
table.figures th { white-space: nowrap; }
table.groups { border-collapse: collapse; } table.groups td, table.groups th { padding: 2px 12px; text-align: left; }
table.groups td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 0 12px; } .plots figure { margin: 0.4em 0; }
.plots figcaption { font-weight: bold; font-size: 0.9em; }
.alert { background: #fde2e1; border-left: 5px solid #d33; padding: 0.6em 1em; }
.ok { background: #e3f6e5; border-left: 5px solid #2a2; padding: 0.6em 1em; }
svg[role=img] { display: block; margin: 0.4em 0; }
svg .tick, svg .legend-label, svg .axis-title, svg .threshold-label, svg .group-label { font-size: 12px; }
table.top { border-collapse: collapse; font-size: 0.9em; }
table.top th, table.top td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; }
table.top th { cursor: pointer; background: #f3f3f3; user-select: none; }
table.top th[aria-sort=ascending]::after { content: " \\25B2"; }
table.top th[aria-sort=descending]::after { content: " \\25BC"; }
table.top td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.top td.uri { min-width: 9em; } table.errors td { overflow-wrap: anywhere; }
.strip { margin: 0 0 1.2em 0; padding: 0.5em; border: 1px solid #ddd; }
.strip .panels { display: flex; gap: 8px; flex-wrap: wrap; }
.strip .panel { margin: 0; font-size: 0.8em; color: #555; text-align: center; }
.strip .panel img { display: block; border: 1px solid #ccc; }
.strip figcaption { font-size: 0.85em; margin-top: 0.3em; } .uri { overflow-wrap: anywhere; }
.wide { overflow-x: auto; }
@media (max-width: 900px) { table.top { font-size: 0.8em; } table.top th, table.top td { padding: 3px 4px; } }
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


class Html(str):
    """Markup a report places as it is (its parts escaped by whoever built it)."""


def _cell(value) -> str:
    return value if isinstance(value, Html) else html.escape(str(value))


@dataclass
class Section:
    title: str
    body: str


@dataclass
class Report:
    title: str
    banner: Optional[tuple[str, str]] = None  # (css class, text)
    figures: dict[str, str] = field(default_factory=dict)  # values are text, or Html
    sections: list[Section] = field(default_factory=list)

    def html(self) -> str:
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
                 f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                 f"<title>{html.escape(self.title)}</title>",
                 f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        if self.banner:
            parts.append(f"<div class='{self.banner[0]}' id='verdict'>{html.escape(self.banner[1])}</div>")
        if self.figures:
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>" for k, v in self.figures.items())
            parts.append(f"<table class='figures'>{rows}</table>")
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>{section.body}")
        parts.append(SCRIPT + "</body></html>")
        return "\n".join(parts)


def image_threshold(rows: pd.DataFrame) -> Optional[float]:
    """The image threshold of rows that share one (the most common one otherwise), or None."""
    if "threshold" not in rows or rows["threshold"].dropna().empty:
        return None
    return float(rows["threshold"].dropna().mode().iloc[0])


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


def strips_html(rows: pd.DataFrame, storage_options: Optional[dict] = None, max_side: int = 200,
                groups: Optional[pd.Series] = None) -> str:
    """One strip per row: image, heat map, predicted mask, ground truth (when known), and a caption
    with rank, score, label, the thresholds applied (and the row's group), ground truth and URI."""
    strips = []
    for rank, (index, row) in enumerate(rows.iterrows(), start=1):
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
        group = "" if groups is None else f"{html.escape(str(groups.loc[index]))}: "
        caption = (f"<b>#{rank}</b> · score <b>{num(record['score'])}</b> (global {num(record['global_score'])}, "
                   f"map max {num(record['pixel_max'])}) · <span class='{label}'>{label}</span>"
                   f" · {group}threshold {num(record['threshold'])}, mask threshold {num(record['mask_threshold'])}"
                   + (f" · ground truth: <span class='{truth}'>{truth}</span>" if truth else "")
                   + f" · mask {num(share)}% of the image in {regions} region{'s' if regions != 1 else ''}"
                   + f"<br/><span class='uri'>{html.escape(str(record['image_uri']))}</span>")
        strips.append(f"<figure class='strip' data-image-id='{html.escape(str(record['image_id']))}' "
                      f"data-score='{record['score']:.6f}' data-threshold='{float(record['threshold']):.6f}'>"
                      f"<div class='panels'>{cells}</div><figcaption>{caption}</figcaption></figure>")
    return "".join(strips)


def top_table_html(rows: pd.DataFrame, groups: Optional[pd.Series] = None) -> str:
    """A table of rows (rank, scores, mask share, label, group, ground truth, URI); headers sort on click."""
    with_truth = "label" in rows
    headers = (["rank", "score", "global", "map max", "mask %", "label"] + (["group"] if groups is not None else [])
               + (["ground truth"] if with_truth else []))
    head = "".join(f"<th scope='col'>{h}</th>" for h in headers + ["image"])
    body = []
    for rank, (index, row) in enumerate(rows.iterrows(), start=1):
        record = row.to_dict()
        area = (record.get("mask_area") or 0) / max(1, int(record.get("width") or 1) * int(record.get("height") or 1))
        cells = [f"<td class='num' data-value='{rank}'>{rank}</td>"]
        for key in ("score", "global_score", "pixel_max"):
            cells.append(f"<td class='num' data-value='{record[key]:.6f}'>{num(record[key])}</td>")
        cells.append(f"<td class='num' data-value='{area * 100:.4f}'>{num(area * 100)}</td>")
        cells.append(f"<td class='{_label(record)}'>{_label(record)}</td>")
        if groups is not None:
            cells.append(f"<td>{html.escape(str(groups.loc[index]))}</td>")
        if with_truth:
            truth = _truth(record) or ""
            cells.append(f"<td class='{truth}'>{truth}</td>")
        cells.append(f"<td class='uri'>{html.escape(str(record['image_uri']))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    if not body:
        return "<p>No scored images.</p>"
    return (f"<div class='wide'><table class='top'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table></div>")


def score_figures(rows: pd.DataFrame, grouping: Optional[Grouping] = None) -> dict[str, str]:
    """The headline numbers of a set of output rows; flagged images counted against their own thresholds."""
    grouping = grouping or Grouping.of(rows)
    ok = rows[rows["status"] == STATUS_OK]
    figures = {"images": str(len(rows)), "errors": str(int((rows["status"] != STATUS_OK).sum()))}
    if len(ok):
        q = ok["score"].quantile([0.5, 0.9, 0.99])
        flagged = int(ok["is_anomalous"].astype(bool).sum())
        figures["anomaly rate"] = Html(
            f"{num(flagged / len(ok))} (<span id='anomalous-count' data-value='{flagged}'>{flagged}</span> of "
            f"{len(ok)} scored images above {html.escape(grouping.above())})")
        figures["score p50 / p90 / p99"] = " / ".join(num(v) for v in q)
    if grouping.groups:
        figures["thresholds"] = threshold_figure(grouping)
    return figures


def threshold_figure(grouping: Grouping) -> str:
    """The image and mask thresholds applied, in one line: one pair, or each group's."""
    if not grouping.several:
        group = grouping.groups[0]
        return f"image score > {num(group.threshold)}, mask pixels > {num(group.mask_threshold)}"
    by = f"by {grouping.column}" if grouping.column else "by threshold pair"
    pairs = [f"{g.name + ' ' if grouping.column else ''}> {num(g.threshold)} / > {num(g.mask_threshold)}"
             for g in grouping.groups]
    shown = "; ".join(p.replace(" ", "\u00a0") for p in pairs)  # a pair stays on one line when the row wraps
    return f"{len(grouping.groups)} groups {by} (image score / mask pixels): {shown}"


def groups_table_html(grouping: Grouping) -> str:
    """One row per group: its name, image and mask thresholds, images, flagged images and rate."""
    head = "".join(f"<th scope='col'>{h}</th>" for h in
                   (grouping.column or "group", "image threshold", "mask threshold", "images", "flagged",
                    "anomaly rate"))
    body = "".join(
        f"<tr data-group='{html.escape(g.name)}'><th scope='row' class='group'>{html.escape(g.name)}</th>"
        f"<td class='num threshold'>{num(g.threshold)}</td><td class='num mask-threshold'>{num(g.mask_threshold)}"
        f"</td><td class='num'>{g.images}</td><td class='num flagged'>{g.flagged}</td>"
        f"<td class='num'>{num(g.flagged / g.images) if g.images else ''}</td></tr>" for g in grouping.groups)
    return f"<table class='groups'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def histograms_html(series_of, grouping: Grouping) -> str:
    """The score histogram with the image threshold: one plot, or one small plot per group.

    ``series_of(group_name or None)``: the {series name: scores} to draw (None: every row).
    """
    if not grouping.several:
        group = grouping.groups[0] if grouping.groups else None
        return histogram_svg(series_of(None), group.threshold if group else None,
                             group=group.name if group else None)
    plots = "".join(f"<figure class='plot'><figcaption>{html.escape(g.name)}: image threshold {num(g.threshold)}"
                    f"</figcaption>{histogram_svg(series_of(g.name), g.threshold, width=350, height=200, group=g.name)}"
                    f"</figure>" for g in grouping.groups)
    return f"<div class='plots'>{plots}</div>"


def image_sections(rows: pd.DataFrame, top_n: int, storage_options: Optional[dict] = None,
                   grouping: Optional[Grouping] = None) -> list[Section]:
    """The table of the top ``top_n`` images by score, and strips of the flagged ones among them."""
    grouping = grouping or Grouping.of(rows)
    ok = rows[rows["status"] == STATUS_OK].sort_values("score", ascending=False, kind="stable")
    keys = grouping.keys(ok) if grouping.several else None
    top = ok.head(top_n)
    flagged = ok[ok["is_anomalous"].astype(bool)].head(top_n)
    above = f"score above {grouping.above()}"
    if len(flagged):
        markers = [(g.name, g.mask_threshold) for g in grouping.groups]
        strips = (colorbar_svg(HEAT_COLORS, markers)
                  + "<p>image · heat map · predicted mask (red; one box per region)"
                  + (" · ground truth (green)" if "label" in ok or "mask_uri" in ok else "") + "</p>"
                  + strips_html(flagged, storage_options, groups=keys))
    else:
        strips = f"<p>No image has a {above}.</p>"
    return [Section(f"Top {len(top)} images by score (click a header to sort)", top_table_html(top, keys)),
            Section(f"Flagged images ({above}): {len(flagged)} of "
                    f"{int(ok['is_anomalous'].astype(bool).sum())} shown", strips)]


def run_report(rows: pd.DataFrame, title: str, top_n: int = 12, storage_options: Optional[dict] = None,
               group_column: Optional[str] = None, checkpoint: Optional[str] = None) -> Report:
    """A report of one scoring run: figures, thresholds by group, score histograms, top table, strips, errors.

    ``group_column``: the column the run's thresholds were calibrated by (the run config's
    ``group_column``); ``checkpoint``: the checkpoint as the run named it.
    """
    ok = rows[rows["status"] == STATUS_OK]
    grouping = Grouping.of(rows, group_column)
    report = Report(title=title, figures=score_figures(rows, grouping))
    named = checkpoint_figure(rows, checkpoint)
    if named:
        report.figures["checkpoint"] = named
    if grouping.several:
        report.sections.append(Section("Thresholds by group", groups_table_html(grouping)))
    keys = grouping.keys(ok) if grouping.several else None

    def series_of(name):
        scores = ok["score"] if name is None else ok.loc[keys == name, "score"]
        return {"scores" if name is None else name: scores.tolist()}

    report.sections.append(Section("Score distribution", histograms_html(series_of, grouping)))
    report.sections.extend(image_sections(rows, top_n, storage_options, grouping))
    report.sections.append(Section("Errors", errors_html(rows)))
    return report


def audit_report(summary, day_rows: pd.DataFrame, baseline: pd.DataFrame, trend_points: Sequence[tuple[str, float]],
                 rate_increase: float, top_n: int, storage_options: Optional[dict] = None,
                 group_column: Optional[str] = None, checkpoint: Optional[str] = None,
                 single_name: str = ALL_IMAGES) -> Report:
    """The nightly audit's report: verdict, figures, the day against its baseline, 30-day trend,
    top table and strips of the day's flagged images, errors.

    ``summary`` is a :class:`headclip.reporting.audit.AuditSummary`; ``rate_increase``
    the alert's rise of the anomaly rate, drawn above the baseline rate; ``single_name``
    names the one group of a day scored with one threshold (e.g. ``--threshold-group``).
    """
    comparison = summary.comparison
    if summary.alert:
        banner = ("alert", "ALERT: " + "; ".join(summary.reasons))
    elif summary.figures.images == 0:
        banner = ("ok", f"No images for {summary.date}. {summary.note}".strip())
    else:
        banner = ("ok", "No alert." + (f" {summary.note}." if summary.note else ""))
    report = Report(title=f"Anomaly audit {summary.date}", banner=banner)
    grouping = Grouping.of(day_rows, group_column, single_name) if len(day_rows) else Grouping(None, [])
    report.figures = ({"new images scored": str(summary.new_images), **score_figures(day_rows, grouping)}
                      if len(day_rows) else {"new images scored": "0"})
    named = checkpoint_figure(day_rows, checkpoint) if len(day_rows) else None
    if named:
        report.figures["checkpoint"] = named
    if getattr(summary, "thresholds", None):
        report.figures["alarm thresholds from"] = summary.thresholds
    references = []
    if comparison.rate_change is not None:
        low, high = comparison.rate_change_ci95
        report.figures["baseline"] = (f"{', '.join(comparison.baseline_days)}: {comparison.baseline_images} images, "
                                      f"anomaly rate {num(comparison.baseline_anomaly_rate)}")
        report.figures["change in anomaly rate"] = (f"{signed(comparison.rate_change)} "
                                                    f"(95% CI {signed(low)} to {signed(high)})")
        report.figures["KS test of scores"] = f"D = {num(comparison.ks_statistic)}, p = {num(comparison.ks_p_value)}"
        references = [("baseline", comparison.baseline_anomaly_rate, SERIES_COLORS[2]),
                      ("alert at", min(1.0, comparison.baseline_anomaly_rate + rate_increase), SERIES_COLORS[0])]
    else:
        report.figures["baseline"] = "none in the trailing days"
    if grouping.several:
        report.sections.append(Section("Thresholds by group", groups_table_html(grouping)))
    ok_day = day_rows[day_rows["status"] == STATUS_OK] if len(day_rows) else day_rows
    ok_base = baseline[baseline["status"] == STATUS_OK] if len(baseline) else baseline
    day_keys = grouping.keys(ok_day) if grouping.several else None
    base_keys = group_keys(ok_base, grouping.column) if grouping.several and len(ok_base) else None

    def series_of(name):
        day = ok_day["score"] if name is None or day_keys is None else ok_day.loc[day_keys == name, "score"]
        series = {summary.date: day.tolist() if len(ok_day) else []}
        base = ok_base["score"] if len(ok_base) and (name is None or base_keys is None) else (
            ok_base.loc[base_keys == name, "score"] if base_keys is not None else [])
        if len(base):  # no baseline: no empty series in the legend
            series["baseline"] = list(base)
        return series

    report.sections.append(Section("Scores against the baseline" if len(ok_base) else
                                   "Scores (no baseline in the trailing days)", histograms_html(series_of, grouping)))
    report.sections.append(Section("Anomaly rate, last 30 days", line_svg(trend_points, references)))
    if len(day_rows):
        report.sections.extend(image_sections(day_rows, top_n, storage_options, grouping))
        report.sections.append(Section("Errors", errors_html(day_rows)))
    return report


def errors_html(rows: pd.DataFrame, limit: int = 50) -> str:
    errors = rows[rows["status"] != STATUS_OK].head(limit)
    if errors.empty:
        return "<p>No errors.</p>"
    items = "".join(f"<tr><td>{html.escape(str(r.image_uri))}</td><td>{html.escape(str(r.error))}</td></tr>"
                    for r in errors.itertuples())
    return f"<table class='errors'><tr><th>image</th><th>error</th></tr>{items}</table>"
