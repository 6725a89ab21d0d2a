"""Reports as a person sees them: rendered in headless Chromium, screenshotted, checked.

The demo report (generated surfaces with known masks, scored by the packaged
demo model) and an audit report (those images against a baseline of normal
fabric, which alerts) are opened in Debian's chromium; the checks read the
screenshot's pixels at the legend swatches, axis lines and strip panels, and
the page's DOM for ticks, thresholds, strips and the table's sorting.
"""

from __future__ import annotations

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
    """(demo rows with ground truth, baseline rows of normal fabric), scored by the demo model in-process."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("reports")
    manifest = generate(root / "demo-data", 12, 128)
    fabric = root / "fabric"
    fabric.mkdir()
    for i in range(10):
        Image.fromarray(make_sample(500 + i, size=128, texture_kind="fabric", defect=None).image).save(
            fabric / f"good-{i:02d}.png")
    labelled = load_dataset(str(manifest))
    extras = [f for f in labelled.schema if f.name not in ("image_id", "image_uri")]  # label, mask_uri, ...
    options = ScoringOptions(batch_size=12, io_threads=2)
    with ImageScorer("demo", DEMO_CHECKPOINT_URI, options, extra_fields=extras) as scorer:
        demo = scorer.score_table(labelled).to_pandas()
    uris = sorted(str(p) for p in fabric.glob("*.png"))
    with ImageScorer("baseline", DEMO_CHECKPOINT_URI, options) as scorer:
        baseline = scorer.score_table(pa.table({"image_id": uris, "image_uri": uris})).to_pandas()
    return root, demo, baseline


@pytest.fixture(scope="module")
def pages(scored):
    """(demo report path, audit report path, demo rows, audit day rows)."""
    root, demo, baseline = scored
    demo_html = root / "demo-report.html"
    demo_html.write_text(run_report(demo, "Demo run", top_n=TOP_N).html())
    day = demo.drop(columns=[c for c in ("label", "mask_uri", "has_masks", "class_name") if c in demo])  # no truth
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
    audit_html.write_text(audit_report(summary, day, baseline, trend, 0.05, TOP_N).html())
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
TABLE_SCORES = "Array.from(document.querySelectorAll('table.top tbody tr')).map(r => parseFloat(r.cells[1].textContent))"


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in css.strip("rgba() ").split(",")[:3])


def _render(url: str, shot: Path, profile: Path) -> dict:
    with Browser(profile) as browser:
        browser.open(url)
        browser.screenshot(shot)
        found = {name: browser.js(script) for name, script in
                 [("legends", LEGENDS), ("series", SERIES), ("plots", PLOTS), ("strips", STRIPS),
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
    by_class = {p["plot"].split()[-1]: p for p in found["plots"]}
    for name, thresholds in expected.items():
        plot = by_class[name]
        assert len(plot["x"]) >= 3, plot
        if name != "colorbar":
            assert len(plot["y"]) >= 3 and float(plot["y"][0]) == 0, plot
            assert len(plot["titles"]) == 2, plot
            assert _line_is_drawn(pixels, plot["yline"]) and _line_is_drawn(pixels, plot["xline"]), plot
        for prefix in thresholds:
            assert any(t.startswith(prefix) for t in plot["thresholds"]), (name, plot["thresholds"])


def _near(region: np.ndarray, color: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(region - np.array(color)).max(axis=2) <= tolerance).sum())


def _check_strips(found: dict, rows: pd.DataFrame, panels: list[str]) -> None:
    flagged = rows[rows["is_anomalous"]].sort_values("score", ascending=False).head(TOP_N)
    strips = found["strips"]
    assert [s["id"] for s in strips] == flagged["image_id"].tolist()  # only flagged images, worst first
    threshold = float(rows["threshold"].iloc[0])
    pixels = found["pixels"]
    for strip, (_, row) in zip(strips, flagged.iterrows()):
        assert [p["name"] for p in strip["panels"]] == panels and all(p["loaded"] for p in strip["panels"])
        assert strip["score"] > threshold
        caption = strip["caption"]
        assert f"score {row['score']:.3f}" in caption and "anomalous" in caption and row["image_uri"] in caption
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
    top = rows.sort_values("score", ascending=False).head(TOP_N)["score"].astype(float).round(3).tolist()
    descending, ascending = found["sorted"]
    assert descending == sorted(top, reverse=True) and ascending == sorted(top)


@needs_chromium
def test_demo_report_in_chromium(pages, tmp_path):
    demo_html, _, demo, _ = pages
    found = _render(demo_html.as_uri(), tmp_path / "demo-report.png", tmp_path / "profile")
    print(f"screenshot: {tmp_path / 'demo-report.png'}")
    _check_legends(found, {"histogram"})
    _check_axes(found, {"histogram": ["threshold 0.5"], "colorbar": ["mask threshold 0.5"]})
    _check_strips(found, demo, ["image", "heat map", "prediction", "ground truth"])
    _check_table(found, demo)


@needs_chromium
def test_audit_report_in_chromium(pages, tmp_path):
    _, audit_html, _, day = pages
    found = _render(audit_html.as_uri(), tmp_path / "audit-report.png", tmp_path / "profile")
    print(f"screenshot: {tmp_path / 'audit-report.png'}")
    _check_legends(found, {"histogram", "trend"})
    _check_axes(found, {"histogram": ["threshold 0.5"], "trend": ["baseline", "alert at"],
                        "colorbar": ["mask threshold"]})
    trend = next(p for p in found["plots"] if "trend" in p["plot"])
    assert max(float(t) for t in trend["y"]) <= 1.0
    _check_strips(found, day, ["image", "heat map", "prediction"])
    _check_table(found, day)
