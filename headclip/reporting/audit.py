"""Nightly audits: score what arrived, compare it with the recent past, decide on an alert.

The history is a table of scoring rows partitioned by day:
``HISTORY/scores/date=YYYY-MM-DD/run_id=<id>/shard-*.parquet`` (the scoring
job's own output, one output location per day). Reports go to
``HISTORY/_reports/date=YYYY-MM-DD/``. Images are identified by their URI, so
an audit re-run adds no rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import pandas as pd

from ..storage.fs import filesystem
from ..storage.results import BrokenShard, read_shard_table
from ..storage.schema import PARTITION_KEYS, STATUS_OK
from ..storage.layout import day_of_partition, day_output, day_shard_glob, history_scores, partition_value
from .groups import num, signed

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["image_id", "image_uri", "status", "error", "score", "global_score", "is_anomalous", "run_id"]


def read_day(history: str, day: dt.date, storage_options: Optional[dict] = None,
             columns: Optional[list[str]] = None) -> pd.DataFrame:
    """Every row of one day of history (all its runs), with ``run_id`` and ``date`` from the path; empty if none."""
    fs, root = filesystem(day_output(history, day), storage_options)
    files = sorted(fs.glob(day_shard_glob(root))) if fs.exists(root) else []
    file_columns = None if columns is None else [c for c in columns if c not in PARTITION_KEYS]
    frames = []
    for path in files:
        try:  # a foreign or broken file under the history is skipped, never fatal
            frame = read_shard_table(fs, path, file_columns).to_pandas()
        except BrokenShard as err:
            log.warning("skipped a file under the history that is not a readable shard: %s", err)
            continue
        frame["run_id"] = partition_value(path, "run_id")
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns or SCORE_COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    frame["date"] = day.isoformat()
    return frame


def days_with_history(history: str, storage_options: Optional[dict] = None) -> list[dt.date]:
    fs, root = filesystem(history_scores(history), storage_options)
    if not fs.exists(root):
        return []
    days = (day_of_partition(posixpath.basename(path.rstrip("/"))) for path in fs.ls(root, detail=False))
    return sorted(day for day in days if day is not None)


@dataclass
class Thresholds:
    """Alert conditions (each a flag of ``jobs.audit``)."""

    rate_increase: float = 0.05  # absolute rise of the anomaly rate, with a 95% CI above 0
    p_value: float = 0.001  # two-sample KS test of the score distribution
    error_rate: float = 0.05  # share of images that could not be scored


@dataclass
class DayFigures:
    images: int = 0
    errors: int = 0
    anomalous: int = 0
    anomaly_rate: Optional[float] = None
    score_quantiles: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    baseline_days: list[str]
    baseline_images: int
    baseline_anomaly_rate: Optional[float]
    rate_change: Optional[float]
    rate_change_ci95: Optional[tuple[float, float]]
    ks_statistic: Optional[float]
    ks_p_value: Optional[float]


@dataclass
class AuditSummary:
    date: str
    new_images: int
    figures: DayFigures
    comparison: Comparison
    alert: bool
    reasons: list[str]
    top_images: list[dict[str, Any]]
    report: str = ""
    note: str = ""
    thresholds: Optional[str] = None  # the calibrated thresholds used, in one line (None: fixed --threshold)

    @property
    def message(self) -> str:
        """One line a scheduler or a person reads: ``AUDIT ALERT <day>: ...`` or ``AUDIT OK <day>: ...``."""
        rate = "n/a" if self.figures.anomaly_rate is None else num(self.figures.anomaly_rate)
        head = (f"{self.figures.images} images ({self.new_images} new), {self.figures.errors} errors, "
                f"anomaly rate {rate}")
        if self.alert:
            return f"AUDIT ALERT {self.date}: " + "; ".join(self.reasons) + f" ({head}; report {self.report})"
        return f"AUDIT OK {self.date}: {head}; report {self.report}"

    @property
    def text(self) -> str:
        """A few lines for a person (a chat message): what alerted, the figures, the report."""
        head = f"HeadCLIP audit {self.date}: " + ("ALERT" if self.alert else "no alert")
        lines = [head] + [f"- {reason}" for reason in self.reasons]
        figures = self.figures
        day = (f"{figures.images} images ({self.new_images} new), {figures.errors} errors, {figures.anomalous} "
               f"flagged" + ("" if figures.anomaly_rate is None else f", anomaly rate {num(figures.anomaly_rate)}"))
        lines.append(f"Day: {day}")
        comparison = self.comparison
        if comparison.baseline_anomaly_rate is not None:
            lines.append(f"Baseline ({len(comparison.baseline_days)} days): {comparison.baseline_images} images, "
                         f"anomaly rate {num(comparison.baseline_anomaly_rate)}; change "
                         f"{signed(comparison.rate_change)}, KS p = {num(comparison.ks_p_value)}")
        else:
            lines.append("Baseline: none in the trailing days")
        if self.note:
            lines.append(self.note)
        lines.append(f"Report: {self.report}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def day_figures(rows: pd.DataFrame) -> DayFigures:
    ok = rows[rows["status"] == STATUS_OK]
    figures = DayFigures(images=len(rows), errors=int((rows["status"] != STATUS_OK).sum()),
                         anomalous=int(ok["is_anomalous"].sum()) if len(ok) else 0)
    if len(ok):
        figures.anomaly_rate = float(ok["is_anomalous"].mean())
        figures.score_quantiles = {f"p{int(q * 100)}": float(ok["score"].quantile(q)) for q in (0.5, 0.9, 0.99)}
    return figures


def rate_difference_ci(k1: int, n1: int, k0: int, n0: int, z: float = 1.959964) -> tuple[float, tuple[float, float]]:
    """Difference of two proportions k1/n1 - k0/n0 with a Newcombe (Wilson score) 95% interval."""
    def wilson(k: int, n: int) -> tuple[float, float]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half

    p1, p0 = k1 / n1, k0 / n0
    l1, u1 = wilson(k1, n1)
    l0, u0 = wilson(k0, n0)
    diff = p1 - p0
    low = diff - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2)
    high = diff + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)
    return diff, (low, high)


def compare(day: pd.DataFrame, baseline: pd.DataFrame, baseline_days: list[str]) -> Comparison:
    from scipy.stats import ks_2samp

    ok_day, ok_base = day[day["status"] == STATUS_OK], baseline[baseline["status"] == STATUS_OK]
    comparison = Comparison(baseline_days, len(ok_base), None, None, None, None, None)
    if len(ok_base) == 0 or len(ok_day) == 0:
        return comparison
    comparison.baseline_anomaly_rate = float(ok_base["is_anomalous"].mean())
    diff, ci = rate_difference_ci(int(ok_day["is_anomalous"].sum()), len(ok_day),
                                  int(ok_base["is_anomalous"].sum()), len(ok_base))
    comparison.rate_change, comparison.rate_change_ci95 = diff, ci
    test = ks_2samp(ok_day["score"].to_numpy(float), ok_base["score"].to_numpy(float))
    comparison.ks_statistic, comparison.ks_p_value = float(test.statistic), float(test.pvalue)
    return comparison


def alert_reasons(figures: DayFigures, comparison: Comparison, thresholds: Thresholds) -> list[str]:
    """Why the day alerts; empty when it does not."""
    reasons = []
    if figures.images and figures.errors / figures.images > thresholds.error_rate:
        reasons.append(f"error rate {num(figures.errors / figures.images)} exceeds {num(thresholds.error_rate)}")
    if comparison.rate_change is not None:
        low = comparison.rate_change_ci95[0]
        if comparison.rate_change >= thresholds.rate_increase and low > 0:
            reasons.append(f"anomaly rate rose by {signed(comparison.rate_change)} (95% CI {signed(low)} to "
                           f"{signed(comparison.rate_change_ci95[1])}) against the baseline's "
                           f"{num(comparison.baseline_anomaly_rate)}; threshold {num(thresholds.rate_increase)}")
    if comparison.ks_p_value is not None and comparison.ks_p_value < thresholds.p_value:
        reasons.append(f"score distribution shifted (KS statistic {num(comparison.ks_statistic)}, "
                       f"p = {num(comparison.ks_p_value)} < {num(thresholds.p_value)})")
    return reasons


def days_before(day: dt.date, days: int) -> dt.date:
    """The day ``days`` before ``day``, or the first day of the calendar when that is earlier (no overflow)."""
    return dt.date.fromordinal(max(1, day.toordinal() - days))


def trend(history: str, day: dt.date, days: int = 30, storage_options: Optional[dict] = None) -> list[tuple[str, float]]:
    """(date, anomaly rate) for the days with history in the ``days`` up to ``day``."""
    points = []
    for d in days_with_history(history, storage_options):
        if days_before(day, days - 1) <= d <= day:
            rows = read_day(history, d, storage_options, ["status", "is_anomalous"])
            ok = rows[rows["status"] == STATUS_OK]
            if len(ok):
                points.append((d.isoformat(), float(ok["is_anomalous"].mean())))
    return points


def baseline_rows(history: str, day: dt.date, baseline_days: int,
                  storage_options: Optional[dict] = None) -> tuple[pd.DataFrame, list[str]]:
    """The rows of the days with history among the ``baseline_days`` before ``day``, and those days."""
    frames, used = [], []
    first = days_before(day, baseline_days)
    for d in days_with_history(history, storage_options):
        if not first <= d < day:
            continue
        rows = read_day(history, d, storage_options, SCORE_COLUMNS)
        if len(rows):
            frames.append(rows)
            used.append(d.isoformat())
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCORE_COLUMNS)
    return frame, sorted(used)


def top_images(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    ok = rows[rows["status"] == STATUS_OK]
    return ok.sort_values("score", ascending=False).head(n)

