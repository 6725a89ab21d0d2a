"""Choosing the images of a run to review, and recording how they were chosen.

Four rules, combined as a union (an image chosen twice is exported once, with
both reasons): the top N ok rows by score; every flagged row
(``is_anomalous``); a stratified random sample of the unflagged ok rows, drawn
without replacement within each group with a seeded generator; the rows a
DuckDB ``WHERE`` clause over the run's columns picks. The sample's population
and draw per group are kept in :class:`Sampling`, so that what is estimated
from it (see :mod:`.estimates`) is weighted by what it stands for.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..storage.schema import STATUS_OK

log = logging.getLogger(__name__)

ALL_GROUP = "all"  # the one group of runs without a group column
REASONS = ("top", "flagged", "sample", "query")


@dataclass
class Selection:
    """What to review. ``top``/``sample`` are counts (0: none); ``where`` a DuckDB condition."""

    top: int = 0
    flagged: bool = False
    sample: int = 0
    where: Optional[str] = None
    group_column: Optional[str] = None  # default: class_name when the run has it
    seed: int = 0

    def empty(self) -> bool:
        return not (self.top or self.flagged or self.sample or self.where)


@dataclass
class Sampling:
    """How the images were chosen; ``groups`` maps a group to its sample's population and draw.

    population: unflagged ok images of the group in the run; drawn: how many were
    sampled (simple random sampling without replacement within each group,
    totals allocated to groups in proportion to their population).
    """

    run_ids: list[str]
    group_column: Optional[str]
    seed: int
    rules: dict
    ok_images: int
    flagged_images: int
    groups: dict[str, dict] = field(default_factory=dict)
    flagged_by_group: dict[str, int] = field(default_factory=dict)
    method: str = "stratified simple random sample without replacement of unflagged ok images, proportional allocation"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Sampling":
        return cls(**data)


def group_column_of(frame: pd.DataFrame, requested: Optional[str]) -> Optional[str]:
    """The column whose values are the groups: ``requested`` (must exist), else class_name if present."""
    if requested is not None:
        if requested not in frame.columns:
            raise UsageError(f"no column {requested!r} in the run (columns: {', '.join(map(str, frame.columns))})")
        return requested
    return "class_name" if "class_name" in frame.columns else None


def groups_of(frame: pd.DataFrame, column: Optional[str]) -> pd.Series:
    """Each row's group as a string (``all`` without a group column; ``<null>`` for missing values)."""
    if column is None:
        return pd.Series(ALL_GROUP, index=frame.index, dtype=object)
    return frame[column].map(lambda v: "<null>" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))


def allocate(populations: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` draws over groups in proportion to their populations (largest remainder), capped."""
    size = sum(populations.values())
    if size == 0 or total <= 0:
        return {g: 0 for g in populations}
    total = min(total, size)
    exact = {g: total * n / size for g, n in populations.items()}
    counts = {g: int(np.floor(v)) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: (counts[g] - exact[g], g))[:total - sum(counts.values())]:
        counts[g] += 1
    return counts


def query_ids(frame: pd.DataFrame, where: str) -> set:
    """The image_uri values of the rows that the DuckDB condition ``where`` picks (columns as in the run)."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("rows", frame)
        picked = con.execute(f"SELECT image_uri FROM rows WHERE {where}").fetchall()
    except duckdb.Error as err:
        raise UsageError(f"--where {where!r}: {' '.join(str(err).split())[:300]}") from None
    finally:
        con.close()
    return {uri for (uri,) in picked}


def select(frame: pd.DataFrame, selection: Selection) -> tuple[pd.DataFrame, Sampling]:
    """The rows to review (run order by score, highest first) with ``reasons`` and ``in_sample`` columns.

    ``frame`` holds a run's rows (``image_uri``, ``status``, ``score``,
    ``is_anomalous``, ``run_id``, and the group column). Error rows are never
    chosen: they have no score to review.
    """
    if selection.empty():
        raise UsageError("choose images to review: --top N, --flagged, --sample N and/or --where CONDITION")
    column = group_column_of(frame, selection.group_column)
    ok = frame[frame["status"] == STATUS_OK]
    flagged = ok["is_anomalous"].fillna(False).astype(bool)
    group = groups_of(ok, column)
    reasons: dict[str, list[str]] = {}

    def add(uris, reason: str) -> None:
        for uri in uris:
            reasons.setdefault(uri, []).append(reason)

    if selection.top:
        add(ok.sort_values(["score", "image_uri"], ascending=[False, True]).head(selection.top)["image_uri"], "top")
    if selection.flagged:
        add(ok.loc[flagged, "image_uri"], "flagged")
    populations = {str(g): int(n) for g, n in group[~flagged].value_counts().sort_index().items()}
    draws = allocate(populations, selection.sample)
    sampled: set = set()
    if selection.sample:
        rng = np.random.default_rng(selection.seed)
        for name in sorted(populations):
            members = np.sort(ok.loc[(~flagged) & (group == name), "image_uri"].to_numpy())
            picked = rng.choice(len(members), size=draws[name], replace=False) if draws[name] else []
            sampled.update(members[np.sort(np.asarray(picked, dtype=np.int64))])
        add(sorted(sampled), "sample")
        if sum(draws.values()) < selection.sample:
            log.warning("--sample %d: only %d unflagged ok images in the run", selection.sample, sum(draws.values()))
    if selection.where:
        add(sorted(query_ids(frame.drop(columns=["anomaly_map"], errors="ignore"), selection.where)
                   & set(ok["image_uri"])), "query")
    chosen = ok[ok["image_uri"].isin(reasons)].copy()
    chosen["group"] = group.loc[chosen.index]
    chosen["reasons"] = chosen["image_uri"].map(lambda u: ",".join(reasons[u]))
    chosen["in_sample"] = chosen["image_uri"].isin(sampled)
    chosen = chosen.sort_values(["score", "image_uri"], ascending=[False, True]).reset_index(drop=True)
    sampling = Sampling(
        run_ids=sorted(map(str, frame["run_id"].dropna().unique())) if "run_id" in frame else [],
        group_column=column, seed=selection.seed,
        rules={"top": selection.top, "flagged": selection.flagged, "sample": selection.sample,
               "where": selection.where},
        ok_images=int(len(ok)), flagged_images=int(flagged.sum()),
        groups={g: {"population": populations[g], "drawn": draws[g]} for g in populations},
        flagged_by_group={str(g): int(n) for g, n in group[flagged].value_counts().sort_index().items()})
    return chosen, sampling


def read_rows(uri: str, storage_options: Optional[dict] = None) -> pd.DataFrame:
    """The rows of a run directory (``OUTPUT/run_id=<id>``), or of an audit day (``.../date=<day>``: its
    runs' rows, the newest row of each image); without the heat maps."""
    import posixpath

    from ..storage.fs import as_uri, filesystem
    from ..storage.results import read_run

    fs, path = filesystem(uri, storage_options)
    if not posixpath.basename(path.rstrip("/")).startswith("date="):
        return read_run(uri, storage_options).drop(columns=["anomaly_map"], errors="ignore")
    runs = sorted(p for p in fs.glob(path.rstrip("/") + "/run_id=*") if fs.isdir(p))
    if not runs:
        raise FileNotFoundError(f"no run_id=<id> folders under {uri}")
    frames = [read_run(as_uri(fs, p, uri), storage_options).drop(columns=["anomaly_map"], errors="ignore")
              for p in runs]
    rows = pd.concat(frames, ignore_index=True).sort_values(["image_uri", "scored_at"], kind="stable")
    return rows.drop_duplicates("image_uri", keep="last").reset_index(drop=True)
