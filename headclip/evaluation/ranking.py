"""Detection-quality metrics: image and pixel AUROC, AP, F1-max (exact and from histograms), mAD.

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
from collections.abc import Sequence
from typing import Any

import numpy as np

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
