"""Detection-quality metrics with mergeable state: image and pixel AUROC, AP, F1-max, AUPRO.

Every metric is a fraction in [0, 1]. Per class, as AnomalyCLIP and HeadCLIP report them:

* image level, from one score per image: AUROC, AP (average precision) and F1-max;
* pixel level, from every pixel of every anomaly map: AUROC, AP, F1-max and AUPRO (per-region
  overlap up to 30 % false-positive rate, divided by 0.3; see :mod:`headclip.aupro`);
* mAD: the mean of the three image metrics, of the four pixel metrics and of all seven.

State and merging. A :class:`MetricState` is filled batch by batch on each worker and states
merge by :meth:`MetricState.merge`, so no worker ever gathers anomaly maps. Image-level state
keeps the exact (score, label) pairs, one per image; merging concatenates them and the metrics
are exact (ties handled as scikit-learn does). Pixel-level state is a fixed histogram: the score
range [0, 1] is cut into ``n_bins`` equal bins, pixel ``s`` going to bin
``min(floor(s * n_bins), n_bins - 1)`` (scores outside [0, 1] are clipped into the end bins,
with a warning), and the state counts anomalous and normal pixels per bin, plus the AUPRO
overlap mass. Merging adds histograms: the integer counts merge bit for bit, the float overlap
mass to float64 rounding (so AUPRO of merged shards may differ from one pass in the last bits).

Binning error. Each bin acts as one threshold, "score in bin b or above", so the pixel metrics
are the exact metrics of the quantised scores ``floor(s * n_bins)``. Quantising is monotone:
two pixels in different bins keep their order and only pixels sharing a bin become tied. With
``pos_b``/``neg_b`` the anomalous/normal pixels in bin b, ``P``/``N`` their totals and
``TP_b``/``FP_b`` the anomalous/normal pixels in bins >= b, the error against the metrics of
the unbinned scores is bounded by (:func:`histogram_error_bounds`, :meth:`MetricState.bounds`):

* AUROC, the share of (anomalous, normal) pairs ranked right (a tie counting 1/2): binning only
  turns same-bin pairs into ties, each moving by at most 1/2, so
  ``|AUROC_binned - AUROC_exact| <= 0.5 * sum_b pos_b * neg_b / (P * N)``.
* AP, the mean over anomalous pixels of the precision at their own score (ties grouped): the
  j-th anomalous pixel of bin b (from the top) has exact precision
  ``f(x, y) = (TP_{b+1} + x) / (TP_{b+1} + x + FP_{b+1} + y)`` for some ``j <= x <= pos_b``,
  ``0 <= y <= neg_b``; f rises with x and falls with y, and binning uses ``f_b = f(pos_b, neg_b)``.
  So the bin's exact precision sum lies in ``[L_b, pos_b * f(pos_b, 0)]`` with
  ``L_b = sum_j f(j, neg_b) >= f(1, neg_b) + integral_1^pos_b f(t, neg_b) dt
  = f(1, neg_b) + pos_b - 1 - K log((TP_{b+1} + pos_b + K) / (TP_{b+1} + 1 + K))``,
  ``K = FP_{b+1} + neg_b`` (``L_b = 0`` when ``pos_b = 0``), and
  ``|AP_binned - AP_exact| <= sum_b max(pos_b * (f(pos_b, 0) - f_b), pos_b * f_b - L_b) / P``.
* F1-max: the binned thresholds are a subset of the exact ones, and an exact threshold inside
  bin b keeps at most ``TP_b`` true and at least ``FP_{b+1}`` false positives, so
  ``0 <= F1_exact - F1_binned <= max_b 2 TP_b / (TP_b + FP_{b+1} + P) - F1_binned``.
* AUPRO: see :mod:`headclip.aupro` (the exact curve stays inside the boxes between binned points).

All four bounds are computed from the histograms themselves (worst case over how the scores
could lie inside each bin), grow only with bins that hold several pixels, and shrink roughly
like 1 / n_bins for continuous scores. Scores piled on one value (maps clamped to exactly 1.0)
share a bin with their neighbours; the bound then charges for ties that may not exist.

Degenerate data: a metric that needs both kinds of sample is NaN, not an error, when one kind is
missing: a class with only normal (or only anomalous) images has NaN image AUROC, AP and F1-max;
without anomalous or without normal pixels the pixel metrics are NaN; without anomaly maps
(classification-only data sets) all pixel metrics are NaN. Any mean that includes a NaN is NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import aupro as _aupro

logger = logging.getLogger(__name__)

DEFAULT_BINS = 10_000
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
MAD_COLUMNS = ("mad_image", "mad_pixel", "mad_all")
COLUMNS = IMAGE_METRICS + PIXEL_METRICS + MAD_COLUMNS
STATE_FORMAT = "headclip.metrics.MetricState/1"
NAN = float("nan")


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view or copy of an array-like or torch tensor (half-precision tensors become float32)."""
    if hasattr(x, "detach"):  # a torch tensor; torch is not imported here
        x = x.detach().cpu()
        try:
            return x.numpy()
        except TypeError:  # bfloat16 has no numpy dtype
            return x.float().numpy()
    return np.asarray(x)


def score_bins(scores: Any, n_bins: int) -> np.ndarray:
    """Bin index ``min(floor(s * n_bins), n_bins - 1)`` of each score, as int64 of the same shape.

    Scores are probabilities; values outside [0, 1] land in the end bins (logged); NaN raises.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size and not np.isfinite(s).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        logger.warning("anomaly map values outside [0, 1] (min %g, max %g) clipped into the end bins",
                       s.min(), s.max())
    return np.clip(np.floor(s * n_bins), 0, n_bins - 1).astype(np.int64)


def _threshold_metrics(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max from counts per threshold level, ordered from the highest score down.

    Args:
        pos, neg: (L,) integer counts of positives and negatives whose score is level l.
    """
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return {"auroc": NAN, "ap": NAN, "f1_max": NAN}
    tp = np.cumsum(pos).astype(np.float64)  # positives scored at this level or higher
    fp = np.cumsum(neg).astype(np.float64)
    pos_f, neg_f = pos.astype(np.float64), neg.astype(np.float64)
    auroc = np.sum(neg_f * (tp - pos_f + 0.5 * pos_f)) / (float(n_pos) * n_neg)
    kept = tp + fp
    precision = np.divide(tp, kept, out=np.zeros_like(tp), where=kept > 0)
    ap = np.sum(pos_f * precision) / n_pos
    f1_max = np.max(2.0 * tp / (kept + n_pos))
    return {"auroc": float(auroc), "ap": float(ap), "f1_max": float(f1_max)}


def ranking_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Exact AUROC, AP and F1-max of scores against 0/1 labels (ties as in scikit-learn).

    Args:
        scores: (n,) float, higher means more anomalous.
        labels: (n,) 0/1, 1 for anomalous.
    Returns:
        ``{"auroc", "ap", "f1_max"}``, NaN when ``labels`` lacks either value.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    levels, level_of = np.unique(s, return_inverse=True)
    pos = np.bincount(level_of[y], minlength=levels.size)
    neg = np.bincount(level_of, minlength=levels.size) - pos
    return _threshold_metrics(pos[::-1], neg[::-1])


def histogram_metrics(pos_hist: np.ndarray, neg_hist: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max treating each bin as one threshold.

    Args:
        pos_hist, neg_hist: (n_bins,) counts of anomalous / normal samples per score bin, bin 0
            holding the lowest scores.
    Returns:
        ``{"auroc", "ap", "f1_max"}``, NaN when either histogram is empty.
    """
    return _threshold_metrics(np.asarray(pos_hist)[::-1], np.asarray(neg_hist)[::-1])


def histogram_error_bounds(pos_hist: np.ndarray, neg_hist: np.ndarray) -> dict[str, float]:
    """Bounds on the binning error of :func:`histogram_metrics` (module docstring).

    Returns:
        ``{"auroc", "ap", "f1_max"}``: ``|binned - exact|`` is at most the AUROC and AP values;
        for F1-max, ``0 <= exact - binned <=`` the value. NaN when either histogram is empty.
    """
    pos = np.asarray(pos_hist, dtype=np.float64)[::-1]
    neg = np.asarray(neg_hist, dtype=np.float64)[::-1]
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return {"auroc": NAN, "ap": NAN, "f1_max": NAN}
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    tp_above, fp_above = tp - pos, fp - neg  # TP_{b+1}, FP_{b+1}
    auroc = 0.5 * np.sum(pos * neg) / (n_pos * n_neg)

    def precision(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        kept = tp_above + x + fp_above + y
        return np.divide(tp_above + x, kept, out=np.zeros_like(kept), where=kept > 0)

    binned_sum = pos * precision(pos, neg)  # the bin's precision sum as binned
    upper_sum = pos * precision(pos, 0.0)
    k = fp_above + neg
    has = pos > 0
    log_ratio = np.log((tp_above + pos + k) / (tp_above + 1.0 + k), out=np.zeros_like(pos), where=has)
    lower_sum = np.where(has, precision(np.ones_like(pos), neg) + pos - 1.0 - k * log_ratio, 0.0)
    ap = np.sum(np.maximum(upper_sum - binned_sum, binned_sum - lower_sum)) / n_pos
    f1_binned = np.max(2.0 * tp / (tp + fp + n_pos))
    f1_best = np.max(2.0 * tp / (tp + fp_above + n_pos))
    return {"auroc": float(auroc), "ap": float(ap), "f1_max": float(f1_best - f1_binned)}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if not any(np.isnan(values)) else NAN


def add_mad(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with mad_image, mad_pixel and mad_all (means of the 3, 4 and 7 metrics) added."""
    out = dict(metrics)
    out["mad_image"] = _mean([metrics[k] for k in IMAGE_METRICS])
    out["mad_pixel"] = _mean([metrics[k] for k in PIXEL_METRICS])
    out["mad_all"] = _mean([metrics[k] for k in IMAGE_METRICS + PIXEL_METRICS])
    return out


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
