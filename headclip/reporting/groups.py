"""The thresholds a set of scored rows applied, per group, and the one way reports print numbers.

Rows scored with calibrated per-group thresholds (``jobs.score --thresholds``)
carry each image's own ``threshold`` and ``mask_threshold``; a report states
them per group (the run's ``group_column`` value, e.g. a texture or a line)
and counts an image as flagged against its own group's threshold, as scoring did.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from ..storage.schema import STATUS_OK

NO_GROUP = "(no group)"  # rows whose group value is missing: they got the pooled default
ALL_IMAGES = "all images"  # the one group of rows scored without per-group thresholds


def num(value) -> str:
    """Every number a report prints: 4 significant digits (0.8249, 74, 1.234e-07)."""
    return f"{float(value):.4g}"


def signed(value) -> str:
    """A change, with its sign: +0.04167."""
    return f"{float(value):+.4g}"


@dataclass
class Group:
    """One group's thresholds and counts among ``ok`` rows."""

    name: str
    threshold: float
    mask_threshold: float
    images: int
    flagged: int


def _mode(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mode().iloc[0]) if len(values) else float("nan")


def group_keys(rows: pd.DataFrame, group_column: Optional[str]) -> Optional[pd.Series]:
    """Each row's group name (a string; missing values are :data:`NO_GROUP`), or None without a column."""
    if not group_column or group_column not in rows:
        return None
    values = rows[group_column]
    return values.map(lambda v: NO_GROUP if v is None or (isinstance(v, float) and pd.isna(v))
                      else str(v) if str(v).strip() else repr(str(v)))


def threshold_groups(rows: pd.DataFrame, group_column: Optional[str] = None,
                     single_name: str = ALL_IMAGES) -> list[Group]:
    """The groups of the ok ``rows``, sorted by name: by ``group_column`` when the rows have it,
    else by distinct (threshold, mask_threshold) pair (``single_name`` when there is one)."""
    ok = rows[rows["status"] == STATUS_OK] if "status" in rows else rows
    if not len(ok) or "threshold" not in ok:
        return []
    keys = group_keys(ok, group_column)
    if keys is None:
        pairs = ok[["threshold", "mask_threshold"]].astype(float).apply(tuple, axis=1)
        distinct = sorted(set(pairs))
        names = {p: single_name if len(distinct) == 1 else f"thresholds {num(p[0])} / {num(p[1])}"
                 for p in distinct}
        keys = pairs.map(names)
    groups = []
    for name, part in ok.groupby(keys, sort=True):
        groups.append(Group(str(name), _mode(part["threshold"]), _mode(part["mask_threshold"]), len(part),
                            int(part["is_anomalous"].astype(bool).sum())))
    return groups


@dataclass
class Grouping:
    """How a report splits rows by threshold: the run's group column (None: by threshold pair)
    and the groups of the rows reported."""

    column: Optional[str]
    groups: list[Group]

    @classmethod
    def of(cls, rows: pd.DataFrame, column: Optional[str] = None, single_name: str = ALL_IMAGES) -> "Grouping":
        return cls(column if column and column in rows else None, threshold_groups(rows, column, single_name))

    @property
    def several(self) -> bool:
        return len(self.groups) > 1

    def keys(self, rows: pd.DataFrame) -> pd.Series:
        """Each row's group name."""
        keys = group_keys(rows, self.column)
        if keys is not None:
            return keys
        by_pair = {(g.threshold, g.mask_threshold): g.name for g in self.groups}
        return rows[["threshold", "mask_threshold"]].astype(float).apply(tuple, axis=1).map(by_pair)

    def above(self) -> str:
        """What a flagged image's score is above, in words."""
        if self.several:
            return "their group's threshold"
        return f"the threshold {num(self.groups[0].threshold)}" if self.groups else "the threshold"


@functools.lru_cache(maxsize=1)
def demo_checkpoint_id() -> str:
    """sha256 of the packaged demo checkpoint (as rows record it in ``checkpoint_id``)."""
    from ..model.assets import DEMO_CHECKPOINT
    from ..model.checkpoint import checkpoint_id

    return checkpoint_id(DEMO_CHECKPOINT.read_bytes())


def checkpoint_figure(rows: pd.DataFrame, checkpoint: Optional[str] = None) -> Optional[str]:
    """The checkpoint the rows were scored with: its name (when known) and id, and whether it is the demo model."""
    ids = sorted(rows["checkpoint_id"].dropna().unique()) if "checkpoint_id" in rows else []
    if not ids and not checkpoint:
        return None
    parts = [checkpoint] if checkpoint else []
    parts.append("id " + ", ".join(i[:12] for i in ids) if ids else "")
    text = " ".join(p for p in parts if p)
    if demo_checkpoint_id() in ids:
        text += (" (the packaged demo model: a toy trained on generated surfaces, not a detector for real "
                 "photographs)")
    return text
