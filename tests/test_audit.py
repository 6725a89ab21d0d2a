"""Nightly audits over generated days, the reports people read, and README's queries."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headclip.data.synthetic import make_sample
from jobs import audit as audit_job
from jobs import report as report_job
from jobs import show as show_job
from jobs.cli import UsageError

REPO = Path(__file__).resolve().parents[1]
DAYS = ["2026-11-21", "2026-11-22", "2026-11-23"]


def _pools(checkpoint: str, size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Generated surfaces the test model scores low (< 0.6) and high (> 0.85)."""
    import headclip

    model = headclip.create_model(checkpoint=checkpoint)
    images = [make_sample(seed, size, defect=None).image for seed in range(400)]
    scores = model.score(headclip.preprocess([Image.fromarray(a) for a in images], size)).joint_score.numpy()
    low = [a for a, s in zip(images, scores) if s < 0.6]
    high = [a for a, s in zip(images, scores) if s > 0.85]
    assert len(low) >= 60 and len(high) >= 12, (len(low), len(high))
    return low, high


def _write_day(folder: Path, images: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(images):
        Image.fromarray(array).save(folder / f"img-{i:04d}.png")


@pytest.fixture(scope="module")
def audited(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """Three audited days (the third with a jump in anomalies); returns (history, codes, archive).

    Days one and two hold images the model scores low; day three adds twelve
    it scores high, so its anomaly rate (threshold 0.75) jumps.
    """
    root = tmp_path_factory.mktemp("audit")
    archive = root / "archive"
    low, high = _pools(tiny_checkpoint)
    _write_day(archive / f"date={DAYS[0]}", low[0:24])
    _write_day(archive / f"date={DAYS[1]}", low[24:48])
    _write_day(archive / f"date={DAYS[2]}", low[48:60] + high[0:12])
    history = root / "history"
    codes = [audit_job.main(_args(archive, history, tiny_checkpoint, day)) for day in DAYS]
    return history, codes, archive


def _args(archive, history, checkpoint, day, *extra):
    return ["--date", day, "--prefix-template", f"{archive}/date={{date}}/", "--history", str(history),
            "--checkpoint", checkpoint, "--threshold", "0.75", "--top-n", "6", "--shard-size", "16", *extra]


def _summary(history: Path, day: str) -> dict:
    return json.loads((history / "reports" / f"date={day}" / "summary.json").read_text())


def test_third_day_alerts_and_first_two_do_not(audited):
    history, codes, _ = audited
    assert codes == [0, 0, audit_job.EXIT_ALERT]
    first, second, third = (_summary(history, d) for d in DAYS)
    assert first["comparison"]["baseline_days"] == [] and not first["alert"]
    assert second["comparison"]["baseline_days"] == [DAYS[0]] and not second["alert"]
    assert third["alert"] and any("anomaly rate rose" in r for r in third["reasons"])
    assert third["comparison"]["rate_change"] > 0.05 and third["comparison"]["rate_change_ci95"][0] > 0
    assert third["figures"]["images"] == 24 and third["new_images"] == 24
    assert len(third["top_images"]) == 6


def test_rerun_adds_no_rows(audited, tiny_checkpoint):
    history, _, archive = audited
    count = lambda: duckdb.sql(  # noqa: E731
        f"SELECT count(*) FROM read_parquet('{history}/scores/date={DAYS[2]}/*/*.parquet')").fetchall()[0][0]
    before = count()
    code = audit_job.main(_args(archive, history, tiny_checkpoint, DAYS[2]))
    assert code == audit_job.EXIT_ALERT
    assert count() == before == 24
    assert _summary(history, DAYS[2])["new_images"] == 0


def test_day_without_images_says_so(audited, tiny_checkpoint):
    history, _, archive = audited
    code = audit_job.main(_args(archive, history, tiny_checkpoint, "2026-11-24"))
    assert code == 0
    summary = _summary(history, "2026-11-24")
    assert summary["new_images"] == 0 and summary["figures"]["images"] == 0
    page = (history / "reports" / "date=2026-11-24" / "report.html").read_text()
    assert "No images for 2026-11-24" in page


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.svgs, self.images, self.verdict = [], [], None
        self._in_verdict = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            self.svgs.append(attrs.get("class"))
        if tag == "img":
            self.images.append(attrs["src"])
        if attrs.get("id") == "verdict":
            self._in_verdict = True

    def handle_data(self, data):
        if self._in_verdict:
            self.verdict = data
            self._in_verdict = False


def test_report_has_plots_and_gallery(audited):
    history, _, _ = audited
    page = _Page()
    page.feed((history / "reports" / f"date={DAYS[2]}" / "report.html").read_text())
    assert {"histogram", "trend"} <= set(page.svgs)
    assert page.verdict.startswith("ALERT")
    assert len(page.images) == 6 * 3  # a strip per flagged image: image, heat map, prediction
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert picture.size == (64, 64)
    trend = re.findall(r"<circle [^>]*><title>([0-9-]+): ", (history / "reports" / f"date={DAYS[2]}" /
                                                            "report.html").read_text())
    assert trend == DAYS


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed here")
def test_report_renders_in_headless_chromium(audited, tmp_path):
    history, _, _ = audited
    report = history / "reports" / f"date={DAYS[2]}" / "report.html"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', result.stdout)
    assert loaded, result.stderr[-2000:]
    assert loaded.group(1) == loaded.group(2) == str(6 * 3)


def test_report_and_show_for_a_run(audited, tmp_path, capsys):
    history, _, _ = audited
    run_dir = next((history / "scores" / f"date={DAYS[2]}").glob("run_id=*"))
    assert report_job.main(["--run", str(run_dir), "--output", str(tmp_path / "r.html"), "--top-n", "3"]) == 0
    page = _Page()
    page.feed((tmp_path / "r.html").read_text())
    assert "histogram" in page.svgs and len(page.images) == 3 * 3
    assert show_job.main(["--run", str(run_dir), "--top", "2", "--output-dir", str(tmp_path / "png")]) == 0
    files = sorted((tmp_path / "png").glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (64, 64)
    with pytest.raises(UsageError, match="'nope' is not in"):
        show_job.main(["--run", str(run_dir), "--image-id", "nope"])


def _readme_queries() -> tuple[list[str], list[str]]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- queries:start -->")[1].split("<!-- queries:end -->")[0]
    sql = re.findall(r"```sql\n(.*?)```", block, re.S)
    python = re.findall(r"```python\n(.*?)```", block, re.S)
    return sql, python


def test_readme_queries_run(audited):
    history, _, _ = audited
    sql, python = _readme_queries()
    assert len(sql) >= 3 and len(python) >= 1
    results = [duckdb.sql(query.replace("HISTORY", str(history))).df() for query in sql]
    per_day, top, errors = results[:3]
    assert per_day["date"].astype(str).tolist() == DAYS
    assert per_day["anomaly_rate"].iloc[2] > per_day["anomaly_rate"].iloc[0]
    assert len(top) == 10 and top["score"].is_monotonic_decreasing
    assert list(errors.columns)[:2] == ["image_uri", "error"] and len(errors) == 0
    scope: dict = {}
    for code in python:
        exec(code.replace("HISTORY", str(history)), scope)  # noqa: S102 - README's own example
    frame = scope["rates"]
    assert isinstance(frame, pd.Series) and len(frame) == 3
