"""Mergeable per-class metric state: what scoring actors and training workers accumulate.

A :class:`MetricState` is filled batch by batch on each worker and states
merge by :meth:`MetricState.merge`, so no worker ever gathers anomaly maps.
The metrics, the binning of pixel scores and its error bound are described
in :mod:`headclip.evaluation.ranking`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd

from . import aupro as _aupro
from .ranking import (
    COLUMNS,
    DEFAULT_BINS,
    IMAGE_METRICS,
    MAD_COLUMNS,
    PIXEL_METRICS,
    STATE_FORMAT,
    add_mad,
    as_numpy,
    histogram_error_bounds,
    histogram_metrics,
    ranking_metrics,
    score_bins,
)

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "DEFAULT_BINS", "IMAGE_METRICS", "MAD_COLUMNS", "PIXEL_METRICS", "MetricState",
           "MetricsByClass", "add_mad", "add_scored_batch", "histogram_error_bounds", "histogram_metrics",
           "ranking_metrics", "score_bins"]

def _squeeze_maps(x: np.ndarray, what: str, batch: int) -> np.ndarray:
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] != batch:
        raise ValueError(f"{what} must be (B, H, W) or (B, 1, H, W) with B={batch}, got {x.shape}")
    return x


class MetricState:
    """Mergeable metric state of one class (or of any set of images).

    Image level keeps every (score, label) pair; pixel level keeps ``n_bins``-bin histograms of
    anomalous and normal pixels and the AUPRO overlap mass. See the module docstring for the
    binning and its error bound.
    """

    def __init__(self, n_bins: int = DEFAULT_BINS):
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.n_pixel_images = 0
        self.pixel_pos = np.zeros(self.n_bins, dtype=np.int64)
        self.pixel_neg = np.zeros(self.n_bins, dtype=np.int64)
        self.region_mass = np.zeros(self.n_bins, dtype=np.float64)
        self.n_regions = 0

    @property
    def image_scores(self) -> np.ndarray:
        """(n_images,) float64 image scores seen so far."""
        self._consolidate()
        return self._scores[0] if self._scores else np.zeros(0, dtype=np.float64)

    @property
    def image_labels(self) -> np.ndarray:
        """(n_images,) int8 0/1 image labels seen so far."""
        self._consolidate()
        return self._labels[0] if self._labels else np.zeros(0, dtype=np.int8)

    @property
    def n_images(self) -> int:
        return sum(a.size for a in self._scores)

    def _consolidate(self) -> None:
        if len(self._scores) > 1:
            self._scores = [np.concatenate(self._scores)]
            self._labels = [np.concatenate(self._labels)]

    def _check_pixel_coverage(self, n_images: int, n_pixel_images: int) -> None:
        if n_pixel_images not in (0, n_images):
            raise ValueError(
                f"{n_pixel_images} of {n_images} images would have anomaly maps: pass maps and masks "
                "for all images of a state or for none")

    def update(self, scores: Any, labels: Any, maps: Any = None, masks: Any = None) -> None:
        """Add one batch.

        Args:
            scores: (B,) image anomaly scores, higher is more anomalous.
            labels: (B,) 0/1 image labels, 1 for anomalous.
            maps: (B, H, W) or (B, 1, H, W) float anomaly maps in [0, 1], or None.
            masks: ground truth of the maps' shape, anomalous where > 0.5 (so 0/1, bool and
                0/255 masks all work), or None. Give maps and masks together or not at all.
        Numpy arrays and torch tensors (any device) are accepted.
        """
        s = as_numpy(scores).astype(np.float64, copy=True).ravel()
        y = as_numpy(labels).ravel()
        if s.shape != y.shape:
            raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
        if not np.isfinite(s).all():
            raise ValueError("image scores contain NaN or infinite values")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0 or 1")
        if (maps is None) != (masks is None):
            raise ValueError("give both maps and masks, or neither")
        batch = s.size
        if maps is not None:
            m = _squeeze_maps(as_numpy(maps), "maps", batch)
            g = _squeeze_maps(as_numpy(masks), "masks", batch) > 0.5
            if m.shape != g.shape:
                raise ValueError(f"maps and masks differ in shape: {m.shape} vs {g.shape}")
        self._check_pixel_coverage(self.n_images + batch, self.n_pixel_images + (batch if maps is not None else 0))
        if maps is not None:
            bins = score_bins(m, self.n_bins)
            pos = np.bincount(bins[g], minlength=self.n_bins)
            self.pixel_pos += pos
            self.pixel_neg += np.bincount(bins.ravel(), minlength=self.n_bins) - pos
            mass, n_regions = _aupro.region_overlap_histogram(bins, g, self.n_bins)
            self.region_mass += mass
            self.n_regions += n_regions
            self.n_pixel_images += batch
        self._scores.append(s)
        self._labels.append(y.astype(np.int8))

    def merge(self, other: MetricState) -> MetricState:
        """Add ``other``'s data to this state in place; returns ``self``."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge states with {self.n_bins} and {other.n_bins} bins")
        self._check_pixel_coverage(self.n_images + other.n_images, self.n_pixel_images + other.n_pixel_images)
        if other.n_images:
            self._scores.append(other.image_scores.copy())
            self._labels.append(other.image_labels.copy())
        self.n_pixel_images += other.n_pixel_images
        self.pixel_pos += other.pixel_pos
        self.pixel_neg += other.pixel_neg
        self.region_mass += other.region_mass
        self.n_regions += other.n_regions
        return self

    def compute(self) -> dict[str, float]:
        """The seven metrics and mad_image, mad_pixel, mad_all (see :data:`COLUMNS`), fractions in [0, 1]."""
        image = ranking_metrics(self.image_scores, self.image_labels)
        pixel = histogram_metrics(self.pixel_pos, self.pixel_neg)
        out = {f"image_{k}": v for k, v in image.items()}
        out.update({f"pixel_{k}": v for k, v in pixel.items()})
        out["pixel_aupro"] = _aupro.aupro(self.region_mass, self.n_regions, self.pixel_neg)
        return add_mad(out)

    def bounds(self) -> dict[str, float]:
        """Worst-case binning error of each pixel metric (module docstring); NaN where undefined.

        pixel_auroc, pixel_ap, pixel_aupro bound ``|binned - exact|``; pixel_f1_max bounds
        ``exact - binned``, which is never negative.
        """
        out = {f"pixel_{k}": v for k, v in histogram_error_bounds(self.pixel_pos, self.pixel_neg).items()}
        out["pixel_aupro"] = _aupro.aupro_error_bound(self.region_mass, self.n_regions, self.pixel_neg)
        return out

    def to_dict(self, as_lists: bool = False) -> dict[str, Any]:
        """Plain state: numpy arrays and ints, or with ``as_lists`` only JSON types (exact for floats)."""
        arrays = {
            "image_scores": self.image_scores,
            "image_labels": self.image_labels,
            "pixel_pos": self.pixel_pos,
            "pixel_neg": self.pixel_neg,
            "region_mass": self.region_mass,
        }
        if as_lists:
            arrays = {k: v.tolist() for k, v in arrays.items()}
        else:
            arrays = {k: v.copy() for k, v in arrays.items()}
        return {"format": STATE_FORMAT, "n_bins": self.n_bins, "n_pixel_images": self.n_pixel_images,
                "n_regions": self.n_regions, **arrays}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> MetricState:
        """Rebuild a state written by :meth:`to_dict` (arrays or lists)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state: format={state.get('format')!r}")
        out = cls(int(state["n_bins"]))
        scores = np.asarray(state["image_scores"], dtype=np.float64).ravel()
        labels = np.asarray(state["image_labels"], dtype=np.int8).ravel()
        if scores.shape != labels.shape:
            raise ValueError("image_scores and image_labels differ in length")
        if scores.size:
            out._scores, out._labels = [scores.copy()], [labels.copy()]
        for name, dtype in (("pixel_pos", np.int64), ("pixel_neg", np.int64), ("region_mass", np.float64)):
            value = np.asarray(state[name], dtype=dtype)
            if value.shape != (out.n_bins,):
                raise ValueError(f"{name} has shape {value.shape}, expected ({out.n_bins},)")
            setattr(out, name, value.copy())
        out.n_pixel_images = int(state["n_pixel_images"])
        out.n_regions = int(state["n_regions"])
        out._check_pixel_coverage(out.n_images, out.n_pixel_images)
        return out


class MetricsByClass:
    """Class name -> :class:`MetricState`, with merging and a per-class table."""

    def __init__(self, n_bins: int = DEFAULT_BINS):
        self.n_bins = int(n_bins)
        self.states: dict[str, MetricState] = {}

    def __getitem__(self, name: str) -> MetricState:
        return self.states[name]

    def __contains__(self, name: object) -> bool:
        return name in self.states

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.states))

    def __len__(self) -> int:
        return len(self.states)

    def state(self, name: str) -> MetricState:
        """The state of class ``name``, created empty on first use."""
        if name not in self.states:
            self.states[name] = MetricState(self.n_bins)
        return self.states[name]

    def update(self, classes: str | Sequence[str], scores: Any, labels: Any, maps: Any = None,
               masks: Any = None) -> None:
        """Add a batch: ``classes`` is one name for the whole batch or (B,) names, one per image.

        The other arguments are as in :meth:`MetricState.update`.
        """
        if isinstance(classes, str):
            self.state(classes).update(scores, labels, maps, masks)
            return
        names = np.asarray(list(classes), dtype=object)
        s, y = as_numpy(scores).ravel(), as_numpy(labels).ravel()
        m = None if maps is None else as_numpy(maps)
        g = None if masks is None else as_numpy(masks)
        if names.size != s.size:
            raise ValueError(f"{names.size} class names for {s.size} images")
        for name in sorted(set(names.tolist())):
            pick = names == name
            self.state(str(name)).update(s[pick], y[pick], None if m is None else m[pick],
                                         None if g is None else g[pick])

    def merge(self, other: MetricsByClass) -> MetricsByClass:
        """Merge ``other`` class by class into this object in place; returns ``self``."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge {self.n_bins}-bin and {other.n_bins}-bin metrics")
        for name, state in other.states.items():
            self.state(name).merge(state)
        return self

    def to_dict(self, as_lists: bool = False) -> dict[str, Any]:
        """``{"n_bins": int, "classes": {name: MetricState.to_dict()}}``."""
        return {"n_bins": self.n_bins,
                "classes": {name: state.to_dict(as_lists) for name, state in self.states.items()}}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> MetricsByClass:
        out = cls(int(state["n_bins"]))
        for name, class_state in state["classes"].items():
            out.states[name] = MetricState.from_dict(class_state)
            if out.states[name].n_bins != out.n_bins:
                raise ValueError(f"class {name!r} has {out.states[name].n_bins} bins, expected {out.n_bins}")
        return out

    def compute(self) -> dict[str, dict[str, float]]:
        """Class name -> :meth:`MetricState.compute`, classes in sorted order."""
        return {name: self.states[name].compute() for name in self}

    def table(self, percent: bool = False) -> pd.DataFrame:
        """One row per class (sorted) plus a "mean" row (column means; NaN if any class is NaN).

        Columns are :data:`COLUMNS`; values are fractions, or percentages with ``percent=True``.
        """
        if "mean" in self.states:
            raise ValueError('a class named "mean" clashes with the mean row')
        rows = self.compute()
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS)).astype(np.float64)
        frame.loc["mean"] = frame.mean(axis=0, skipna=False) if len(frame) else np.nan
        frame.index.name = "class"
        return frame * 100.0 if percent else frame


def add_scored_batch(metrics: MetricsByClass, class_names: Sequence[str], labels: Any, scores: Any,
                     maps: Any = None, masks: Optional[Sequence[Optional[np.ndarray]]] = None) -> None:
    """Add one scored batch to per-class state: the path of both scoring actors and training.

    class_names: B names; labels: (B,) 0/1; scores: (B,) image scores;
    maps: (B, S, S) anomaly maps; masks: B ground-truth (S, S) masks, None
    for images whose pixel ground truth is unknown (image metrics only).
    """
    names = list(class_names)
    labels, scores = as_numpy(labels).ravel(), as_numpy(scores).ravel()
    known = [j for j in range(len(names)) if masks is not None and masks[j] is not None]
    unknown = [j for j in range(len(names)) if j not in set(known)]
    if unknown:
        metrics.update([names[j] for j in unknown], scores[unknown], labels[unknown])
    if known:
        metrics.update([names[j] for j in known], scores[known], labels[known], as_numpy(maps)[known],
                       np.stack([masks[j] for j in known]))
