"""Reports as a person sees them: rendered in headless Chromium, screenshotted, checked.

The demo report (generated surfaces with known masks, scored by the packaged
demo model) and an audit report (those images against a baseline of normal
fabric, which alerts) are opened in Debian's chromium; the checks read the
screenshot's pixels at the legend swatches, axis lines and strip panels, and
the page's DOM for ticks, thresholds, strips and the table's sorting.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from headclip.data.datasets import load_dataset
from headclip.data.synthetic import make_sample
from headclip.model.assets import DEMO_CHECKPOINT_URI
from headclip.reporting import audit as audit_lib
from headclip.reporting.html import audit_report, run_report
from headclip.reporting.overlay import MASK_COLOR, TRUTH_COLOR, region_boxes
from headclip.reporting.plots import line_svg
from headclip.scoring.scorer import ScoringOptions, ImageScorer
from jobs.demo import generate
from tests.browser import CHROMIUM, Browser

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here")
TOP_N = 6


def _flood_boxes(mask: np.ndarray) -> set[tuple[int, int, int, int]]:
    """Boxes of 8-connected regions by a plain breadth-first flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    boxes = set()
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            queue, xs, ys = deque([(y, x)]), [], []
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                xs.append(cx)
                ys.append(cy)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            boxes.add((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return boxes


def test_one_box_per_connected_region_matches_a_flood_fill():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((24, 31)) > 0.8
        boxes = region_boxes(mask)
        assert set(boxes) == _flood_boxes(mask) and len(boxes) == len(set(boxes))
    scattered = np.zeros((40, 40), bool)
    scattered[2:5, 2:5] = scattered[30:36, 33:38] = True  # two blobs far apart: two boxes, largest first
    assert region_boxes(scattered) == [(33, 30, 38, 36), (2, 2, 5, 5)]


def test_rate_axis_stops_at_one():
    svg = line_svg([("d1", 0.9), ("d2", 1.0)])
    ticks = [float(t) for t in re.findall(r"class='tick'[^>]*>([0-9.]+)<", svg.split("x-axis")[0])]
    assert max(ticks) == 1.0 and 1.15 not in ticks


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(demo rows with ground truth, baseline rows of normal fabric), scored by the demo model in-process
    with per-texture thresholds (as ``make demo`` scores with calibrated ones)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("reports")
    manifest = generate(root / "demo-data", 16, 128)
    fabric = root / "fabric"
    fabric.mkdir()
    for i in range(10):
        Image.fromarray(make_sample(500 + i, size=128, texture_kind="fabric", defect=None).image).save(
            fabric / f"good-{i:02d}.png")
    labelled = load_dataset(str(manifest))
    extras = [f for f in labelled.schema if f.name not in ("image_id", "image_uri")]  # label, mask_uri, ...
    options = ScoringOptions(batch_size=16, io_threads=2)
    with ImageScorer("probe", DEMO_CHECKPOINT_URI, options, extra_fields=extras) as scorer:
        probe = scorer.score_table(labelled).to_pandas()
    # each texture its own pair: the image threshold at its median score (so each flags some, not all)
    medians = probe.groupby("class_name")["score"].median()
    thresholds = {name: (float(medians[name]), 0.3 + 0.15 * k) for k, name in enumerate(sorted(medians.index))}
    grouped = dataclasses.replace(options, group_column="class_name", group_thresholds=thresholds)
    with ImageScorer("demo", DEMO_CHECKPOINT_URI, grouped, extra_fields=extras) as scorer:
        demo = scorer.score_table(labelled).to_pandas()
    uris = sorted(str(p) for p in fabric.glob("*.png"))
    with ImageScorer("baseline", DEMO_CHECKPOINT_URI, grouped, extra_fields=[pa.field("class_name", pa.string())]) \
            as scorer:
        baseline = scorer.score_table(pa.table({"image_id": uris, "image_uri": uris,
                                                "class_name": ["fabric"] * len(uris)})).to_pandas()
    return root, demo, baseline


@pytest.fixture(scope="module")
def pages(scored):
    """(demo report path, audit report path, demo rows, audit day rows)."""
    root, demo, baseline = scored
    demo_html = root / "demo-report.html"
    demo_html.write_text(run_report(demo, "Demo run", top_n=TOP_N, group_column="class_name",
                                    checkpoint=DEMO_CHECKPOINT_URI).html())
    day = demo.drop(columns=[c for c in ("label", "mask_uri", "has_masks") if c in demo])  # no truth
    days = ["2026-11-21", "2026-11-22"]
    figures = audit_lib.day_figures(day)
    comparison = audit_lib.compare(day, baseline, days)
    reasons = audit_lib.alert_reasons(figures, comparison, audit_lib.Thresholds())
    assert reasons, "the day should alert against a baseline of normal fabric"
    summary = audit_lib.AuditSummary(date="2026-11-23", new_images=len(day), figures=figures,
                                     comparison=comparison, alert=True, reasons=reasons, top_images=[])
    base_rate = float(baseline["is_anomalous"].mean())
    trend = [(days[0], base_rate), (days[1], base_rate), ("2026-11-23", figures.anomaly_rate)]
    audit_html = root / "audit-report.html"
    audit_html.write_text(audit_report(summary, day, baseline, trend, 0.05, TOP_N, group_column="class_name",
                                       checkpoint=DEMO_CHECKPOINT_URI).html())
    return demo_html, audit_html, demo, day


LEGENDS = """Array.from(document.querySelectorAll('svg[role=img] .legend')).map(function (g) {
  var texts = g.querySelectorAll('text');
  return Array.from(g.querySelectorAll('rect.swatch')).map(function (r, i) {
    var b = r.getBoundingClientRect();
    return {plot: g.closest('svg').getAttribute('class'), label: texts[i].textContent,
            x: b.left + window.scrollX, y: b.top + window.scrollY, w: b.width, h: b.height,
            fill: getComputedStyle(r).fill, text: getComputedStyle(texts[i]).fill};
  });
})"""
SERIES = """Array.from(document.querySelectorAll('svg.histogram g.series')).map(function (g) {
  return {name: g.getAttribute('data-series'), fill: getComputedStyle(g.querySelector('rect')).fill};
})"""
PLOTS = """Array.from(document.querySelectorAll('svg[role=img]')).map(function (s) {
  function texts(sel) { return Array.from(s.querySelectorAll(sel)).map(function (t) { return t.textContent; }); }
  function line(sel) {
    var l = Array.from(s.querySelectorAll(sel + ' > line')).pop();
    if (!l) return null;
    var b = l.getBoundingClientRect();
    return {x: b.left + window.scrollX, y: b.top + window.scrollY, w: b.width, h: b.height};
  }
  return {plot: s.getAttribute('class'), x: texts('.x-axis .tick'), y: texts('.y-axis .tick'),
          titles: texts('.axis-title'), thresholds: texts('.threshold-label'),
          xline: line('.x-axis'), yline: line('.y-axis')};
})"""
STRIPS = """Array.from(document.querySelectorAll('figure.strip')).map(function (f) {
  return {score: parseFloat(f.getAttribute('data-score')), id: f.getAttribute('data-image-id'),
          caption: f.querySelector('figcaption').textContent,
          panels: Array.from(f.querySelectorAll('figure.panel')).map(function (p) {
            var img = p.querySelector('img'), b = img.getBoundingClientRect();
            return {name: p.getAttribute('data-panel'), loaded: img.complete && img.naturalWidth > 0,
                    x: b.left + window.scrollX, y: b.top + window.scrollY, w: b.width, h: b.height};
          })};
})"""
GROUPS = """(function () {
  function texts(root, sel) { return Array.from(root.querySelectorAll(sel)).map(function (t) { return t.textContent; }); }
  var count = document.getElementById('anomalous-count');
  return {headline: count && parseInt(count.getAttribute('data-value')), headline_text: count && count.textContent,
    rate: count && count.parentElement.textContent,
    figures: Array.from(document.querySelectorAll('table.figures tr')).map(function (r) {
      return [r.cells[0].textContent, r.cells[1].textContent]; }),
    table: Array.from(document.querySelectorAll('table.groups tbody tr')).map(function (r) {
      return {group: r.getAttribute('data-group'), name: r.querySelector('th').textContent,
              threshold: r.querySelector('td.threshold').textContent,
              mask: r.querySelector('td.mask-threshold').textContent,
              flagged: parseInt(r.querySelector('td.flagged').textContent)}; }),
    histograms: Array.from(document.querySelectorAll('svg.histogram')).map(function (s) {
      return {group: s.getAttribute('data-group'), legend: texts(s, '.legend-label'),
              thresholds: texts(s, '.threshold-label')}; }),
    colorbar: Array.from(document.querySelectorAll('svg.colorbar g.threshold')).map(function (g) {
      return {group: g.getAttribute('data-group'), name: g.querySelector('.group-label').textContent,
              label: g.querySelector('.threshold-label').textContent}; }),
    labelled: document.querySelectorAll('table.top td.anomalous').length};
})()"""
# Every text of every plot: inside its picture, and clear of the plot's other texts.
LAYOUT = """(function () {
  var problems = [];
  document.querySelectorAll('svg[role=img]').forEach(function (s, k) {
    var box = s.getBoundingClientRect(), name = s.getAttribute('class') + ' ' + k;
    var rects = Array.from(s.querySelectorAll('text')).map(function (t) {
      var b = t.getBoundingClientRect(); return {text: t.textContent, l: b.left, r: b.right, t: b.top, b: b.bottom}; });
    rects.forEach(function (a, i) {
      if (a.l < box.left - 0.5 || a.r > box.right + 0.5 || a.t < box.top - 0.5 || a.b > box.bottom + 0.5)
        problems.push(name + ': clipped: ' + a.text);
      rects.slice(i + 1).forEach(function (b) {
        if (a.l < b.r - 1 && b.l < a.r - 1 && a.t < b.b - 1 && b.t < a.b - 1)
          problems.push(name + ': overlap: ' + a.text + ' / ' + b.text);
      });
    });
  });
  if (document.documentElement.scrollWidth > window.innerWidth) problems.push('page wider than the window: ' +
      document.documentElement.scrollWidth);
  document.querySelectorAll('.wide').forEach(function (w) {  // a table cut at the window's edge
    if (w.scrollWidth > w.clientWidth + 1) problems.push('table scrolls sideways: ' + w.scrollWidth + ' > ' + w.clientWidth);
  });
  return problems;
})()"""
TABLE_SCORES = "Array.from(document.querySelectorAll('table.top tbody tr')).map(r => parseFloat(r.cells[1].textContent))"


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in css.strip("rgba() ").split(",")[:3])


def _render(url: str, shot: Path, profile: Path, width: int = 1280) -> dict:
    with Browser(profile, width=width) as browser:
        browser.open(url)
        browser.screenshot(shot)
        found = {name: browser.js(script) for name, script in
                 [("legends", LEGENDS), ("series", SERIES), ("plots", PLOTS), ("strips", STRIPS),
                  ("groups", GROUPS), ("layout", LAYOUT),
                  ("loaded", "document.body.getAttribute('data-images-loaded')")]}
        found["sorted"] = []
        for _ in range(2):  # first click: descending, second: ascending
            browser.js("document.querySelectorAll('table.top th')[1].click()")
            found["sorted"].append(browser.js(TABLE_SCORES))
    found["pixels"] = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    return found


def _check_legends(found: dict, plots: set[str]) -> None:
    pixels = found["pixels"]
    seen = set()
    for entries in found["legends"]:
        colors = [_rgb(e["fill"]) for e in entries]
        assert len(set(colors)) == len(colors), entries  # each series its own colour
        for entry, color in zip(entries, colors):
            assert _rgb(entry["text"]) == color, entry  # the label keeps its series' colour
            cx, cy = int(entry["x"] + entry["w"] / 2), int(entry["y"] + entry["h"] / 2)
            patch = pixels[cy - 3:cy + 4, cx - 3:cx + 4].reshape(-1, 3)
            assert np.abs(patch - np.array(color)).max() <= 2, (entry, patch[:3])
            seen.add(entry["plot"].split()[-1])
    assert plots <= seen
    for series in found["series"]:  # the bars are drawn in the legend's colour
        legend = next(e for entries in found["legends"] for e in entries if e["label"].startswith(series["name"]))
        assert _rgb(series["fill"]) == _rgb(legend["fill"])


def _line_is_drawn(pixels: np.ndarray, rect: dict) -> bool:
    """Whether a line's middle 11 px are dark in the screenshot (the darkest pixel across its width)."""
    cx, cy = int(rect["x"] + rect["w"] / 2), int(rect["y"] + rect["h"] / 2)
    if rect["w"] >= rect["h"]:
        darkest = pixels[cy - 2:cy + 3, cx - 5:cx + 6].max(axis=2).min(axis=0)
    else:
        darkest = pixels[cy - 5:cy + 6, cx - 2:cx + 3].max(axis=2).min(axis=1)
    return bool(darkest.max() < 140)


def _check_axes(found: dict, expected: dict[str, list[str]]) -> None:
    pixels = found["pixels"]
    for name, thresholds in expected.items():
        plots = [p for p in found["plots"] if p["plot"].split()[-1] == name]
        assert plots, name
        for plot in plots:
            assert len(plot["x"]) >= 3, plot
            if name != "colorbar":
                assert len(plot["y"]) >= 2 and float(plot["y"][0]) == 0, plot
                assert len(plot["titles"]) == 2, plot
                assert _line_is_drawn(pixels, plot["yline"]) and _line_is_drawn(pixels, plot["xline"]), plot
            for prefix in thresholds:
                assert any(t.startswith(prefix) for t in plot["thresholds"]), (name, plot["thresholds"])


def _check_groups(found: dict, rows: pd.DataFrame) -> None:
    """The headline counts what scoring applied, and every group's thresholds are named in the table,
    in its own histogram and on the colour scale, printed with one rounding."""
    groups = found["groups"]
    ok = rows[rows["status"] == "ok"]
    applied = sum(1 for score, threshold in zip(ok["score"], ok["threshold"]) if score > threshold)  # a plain loop
    assert groups["headline"] == int(ok["is_anomalous"].sum()) == applied, groups
    assert groups["headline"] == sum(g["flagged"] for g in groups["table"]), groups["table"]
    assert "above their group's threshold" in groups["rate"], groups["rate"]
    expected = {name: (float(part["threshold"].iloc[0]), float(part["mask_threshold"].iloc[0]))
                for name, part in ok.groupby("class_name")}
    assert len(expected) > 1 and len({t for t, _ in expected.values()}) == len(expected)
    assert {g["group"] for g in groups["table"]} == set(expected)
    for row in groups["table"]:
        threshold, mask_threshold = expected[row["group"]]
        assert row["name"] == row["group"]
        assert row["threshold"] == f"{threshold:.4g}" and row["mask"] == f"{mask_threshold:.4g}", row
        flagged = int((ok["class_name"] == row["group"]).mul(ok["is_anomalous"]).sum())
        assert row["flagged"] == flagged, row
    by_group = {h["group"]: h for h in groups["histograms"]}
    assert set(by_group) == set(expected), by_group
    for name, (threshold, mask_threshold) in expected.items():
        assert by_group[name]["thresholds"] == [f"threshold {threshold:.4g}"], by_group[name]
        assert by_group[name]["legend"][0].startswith(f"{name} (n=") or by_group[name]["legend"][0].startswith("20")
    bars = {c["group"]: c for c in groups["colorbar"]}
    assert set(bars) == set(expected)
    for name, (_, mask_threshold) in expected.items():
        assert bars[name]["name"] == name and bars[name]["label"] == f"mask threshold {mask_threshold:.4g}"
    page = " ".join(f"{k} {v}" for k, v in groups["figures"]).replace("\u00a0", " ")
    for name, (threshold, mask_threshold) in expected.items():  # the same rounding in the figures
        assert f"{name} > {threshold:.4g} / > {mask_threshold:.4g}" in page, page
    assert "demo model" in page and "headclip:demo.safetensors" in page, page
    assert found["layout"] == [], found["layout"]


def _near(region: np.ndarray, color: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(region - np.array(color)).max(axis=2) <= tolerance).sum())


def _check_strips(found: dict, rows: pd.DataFrame, panels: list[str]) -> None:
    flagged = rows[rows["is_anomalous"]].sort_values("score", ascending=False).head(TOP_N)
    strips = found["strips"]
    assert [s["id"] for s in strips] == flagged["image_id"].tolist()  # only flagged images, worst first
    pixels = found["pixels"]
    for strip, (_, row) in zip(strips, flagged.iterrows()):
        assert [p["name"] for p in strip["panels"]] == panels and all(p["loaded"] for p in strip["panels"])
        assert strip["score"] > float(row["threshold"])  # its own group's threshold
        caption = strip["caption"]
        assert f"{row['class_name']}: threshold {row['threshold']:.4g}" in caption, caption
        assert f"score {row['score']:.4g}" in caption and "anomalous" in caption and row["image_uri"] in caption
        assert ("ground truth:" in caption) == ("ground truth" in panels)
        crops = {p["name"]: pixels[int(p["y"]):int(p["y"] + p["h"]), int(p["x"]):int(p["x"] + p["w"])]
                 for p in strip["panels"]}
        image, heat = crops["image"].astype(float), crops["heat map"].astype(float)
        assert image.shape == heat.shape and np.abs(image - heat).mean() > 20  # the heat map is its own picture
        if row["mask_area"] > 0:
            assert _near(crops["prediction"], MASK_COLOR) > _near(crops["image"], MASK_COLOR) + 10
        if "ground truth" in panels and row.get("label") == 1:
            assert _near(crops["ground truth"], TRUTH_COLOR) > _near(crops["image"], TRUTH_COLOR) + 10
    n = len(strips) * len(panels)
    assert found["loaded"] is not None and found["loaded"].split("/")[0] == found["loaded"].split("/")[1]
    assert int(found["loaded"].split("/")[0]) == n


def _check_table(found: dict, rows: pd.DataFrame) -> None:
    top = [float(f"{v:.4g}") for v in rows.sort_values("score", ascending=False).head(TOP_N)["score"]]
    descending, ascending = found["sorted"]
    assert descending == sorted(top, reverse=True) and ascending == sorted(top)


WIDTHS = (1400, 800)  # a laptop's browser, and a narrow window


@needs_chromium
@pytest.mark.parametrize("width", WIDTHS)
def test_demo_report_in_chromium(pages, tmp_path, width):
    demo_html, _, demo, _ = pages
    shot = tmp_path / f"demo-report-{width}.png"
    found = _render(demo_html.as_uri(), shot, tmp_path / "profile", width)
    print(f"screenshot: {shot}")
    _check_legends(found, {"histogram"})
    _check_axes(found, {"histogram": ["threshold "], "colorbar": ["mask threshold "]})
    _check_groups(found, demo)
    _check_strips(found, demo, ["image", "heat map", "prediction", "ground truth"])
    _check_table(found, demo)


@needs_chromium
@pytest.mark.parametrize("width", WIDTHS)
def test_audit_report_in_chromium(pages, tmp_path, width):
    _, audit_html, _, day = pages
    shot = tmp_path / f"audit-report-{width}.png"
    found = _render(audit_html.as_uri(), shot, tmp_path / "profile", width)
    print(f"screenshot: {shot}")
    _check_legends(found, {"histogram", "trend"})
    _check_axes(found, {"histogram": ["threshold "], "trend": ["baseline", "alert at"],
                        "colorbar": ["mask threshold"]})
    _check_groups(found, day)
    legends = [e["label"] for entries in found["legends"] for e in entries]
    assert not any(label.startswith("baseline (n=0)") for label in legends), legends
    assert sum(label.startswith("baseline (n=10)") for label in legends) == 1, legends  # fabric's own baseline
    trend = next(p for p in found["plots"] if "trend" in p["plot"])
    assert max(float(t) for t in trend["y"]) <= 1.0
    _check_strips(found, day, ["image", "heat map", "prediction"])
    _check_table(found, day)
