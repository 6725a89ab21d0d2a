"""Alarm thresholds from known-good images at a target false-alarm rate, with exact intervals.

Image threshold. With ``n`` good images scored ``x_(1) <= ... <= x_(n)`` and the rule
``is_anomalous = score > t``, the threshold ``t = x_(k)`` (an order statistic) has the realised
false-alarm rate ``FPR = P(score of a new good image > x_(k))``. For continuous scores
``F(x_(k))`` is the k-th order statistic of ``n`` uniforms, so whatever the score distribution

    FPR ~ Beta(n - k + 1, k),   E[FPR] = (n - k + 1) / (n + 1),
    P(FPR <= p) = P(Binomial(n, 1 - p) <= k - 1).

Rules for ``k`` at a target rate ``a``:

* ``quantile``: ``k = ceil((n + 1)(1 - a))``, the smallest rank with ``E[FPR] <= a`` (the
  conformal quantile). It needs ``n + 1 >= 1 / a``; with fewer images ``k = n`` (the largest
  score) and ``E[FPR] = 1 / (n + 1) > a``.
* ``bound``: the smallest ``k`` with ``P(FPR <= a) >= confidence``. Even ``k = n`` gives only
  ``P(FPR <= a) = 1 - (1 - a)^n``, so this needs ``n >= log(1 - confidence) / log(1 - a)``
  (:func:`min_good_images`; 299 for a = 1 % at 95 %); with fewer, ``k = n``.
* ``f1``: anomalib's adaptive threshold, the F1-optimal cut over good and defective images
  (:func:`f1_threshold`); it needs labelled defects.

The interval stated for the realised FPR is the central ``confidence`` interval of
``Beta(n - k + 1, k)``; ``fpr_bound`` is its one-sided upper ``confidence`` quantile. On ``m``
further good images the number of false alarms is Beta-Binomial(m, n - k + 1, k)
(:func:`held_out_interval`). Tied scores only lower the FPR (the upper ends stay valid). For the
``f1`` rule the threshold is chosen from the same good images, so its interval is optimistic.

Pixel threshold. Normal pixels of the good images are counted in a histogram of ``B`` equal bins
over [0, 1] (the scoring actors' :class:`~headclip.evaluation.metrics.MetricState`, merged on
the driver). The mask threshold is the lowest bin edge ``b / B`` with at most ``target * N`` of
the ``N`` normal pixels in bins ``>= b``, so on the calibration images ``map > b / B`` marks at
most that share (at the model's map resolution). Pixels of one image are strongly correlated, so
no binomial interval is claimed for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .ranking import ranking_metrics

RULES = ("quantile", "bound", "f1")
UNGROUPED = ""  # the metric-state class of images without a group value: pooled into the default only


def quantile_rank(n: int, target_fpr: float) -> int:
    """Rank k (1-based) of the ``quantile`` rule: ceil((n + 1)(1 - target)), at most n."""
    k = math.ceil(round((n + 1) * (1.0 - target_fpr), 9))
    return max(1, min(n, k))


def min_good_images(target_fpr: float, confidence: float) -> int:
    """Good images needed before any threshold has P(FPR <= target) >= confidence."""
    return math.ceil(round(math.log1p(-confidence) / math.log1p(-target_fpr), 9))  # log1p: exact for tiny rates


def bound_rank(n: int, target_fpr: float, confidence: float) -> int:
    """Smallest rank k with P(FPR <= target) = P(Binomial(n, 1 - target) <= k - 1) >= confidence; else n."""
    from scipy.stats import binom

    ranks = np.arange(1, n + 1)
    ok = binom.cdf(ranks - 1, n, 1.0 - target_fpr) >= confidence
    return int(ranks[np.argmax(ok)]) if ok.any() else n


def fpr_distribution(n: int, k: int) -> tuple[int, int]:
    """(a, b) of the Beta law of the realised FPR of t = x_(k) among n good scores."""
    if not 1 <= k <= n:
        raise ValueError(f"rank {k} outside 1..{n}")
    return n - k + 1, k


def fpr_interval(n: int, k: int, confidence: float) -> tuple[float, float]:
    """Central ``confidence`` interval of the realised FPR of t = x_(k) (distribution-free)."""
    from scipy.stats import beta

    a, b = fpr_distribution(n, k)
    low, high = beta.ppf([(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0], a, b)
    return float(low), float(high)


def fpr_upper_bound(n: int, k: int, confidence: float) -> float:
    """One-sided upper bound: P(FPR <= bound) = confidence for t = x_(k)."""
    from scipy.stats import beta

    return float(beta.ppf(confidence, *fpr_distribution(n, k)))


def held_out_interval(n: int, k: int, m: int, confidence: float) -> tuple[int, int]:
    """Central ``confidence`` interval of the false-alarm count on ``m`` further good images."""
    from scipy.stats import betabinom

    a, b = fpr_distribution(n, k)
    low, high = betabinom.ppf([(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0], m, a, b)
    return int(low), int(high)


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Exact binomial interval of a rate from ``successes`` of ``trials``."""
    from scipy.stats import beta

    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2.0, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1.0 - alpha / 2.0, successes + 1, trials - successes))
    return low, high


def f1_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """(threshold, F1) of the F1-optimal rule ``score > threshold`` over 0/1 labels (1 = defect).

    The best cut flags every score >= s* (anomalib's adaptive threshold); the threshold returned
    is the largest score below s*, so ``score > threshold`` flags the same images (or just below
    s* when s* is the lowest score).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if not y.any() or y.all():
        raise ValueError("the F1 rule needs both good and defective images")
    levels, level_of = np.unique(s, return_inverse=True)
    pos = np.bincount(level_of[y], minlength=levels.size)[::-1]
    neg = np.bincount(level_of, minlength=levels.size)[::-1] - pos
    tp, fp = np.cumsum(pos), np.cumsum(neg)  # flagged when score >= level, levels from the top
    f1 = 2.0 * tp / (tp + fp + y.sum())
    best = int(np.argmax(f1))
    cut = levels.size - 1 - best  # index of s* in ascending levels
    threshold = levels[cut - 1] if cut > 0 else float(np.nextafter(levels[0], -np.inf))
    return float(threshold), float(f1[best])


def pixel_threshold(normal_hist: Any, target_pixel_fpr: float) -> tuple[float, int]:
    """(mask threshold b / B, normal pixels in bins >= b) at a target pixel FPR (module docstring)."""
    hist = np.asarray(normal_hist, dtype=np.int64)
    bins = hist.size
    above = np.concatenate((np.cumsum(hist[::-1])[::-1], [0]))  # above[b]: pixels in bins >= b
    allowed = target_pixel_fpr * int(hist.sum())
    b = int(np.argmax(above <= allowed + 1e-9))
    return b / bins, int(above[b])


@dataclass
class GroupThreshold:
    """The thresholds of one group and the evidence behind them (fractions in [0, 1])."""

    threshold: float  # image: is_anomalous = score > threshold
    mask_threshold: float  # mask pixels: anomaly map > mask_threshold
    good_images: int
    rank: int  # threshold = rank-th smallest good score (1-based); good images above it: good_images - rank
    calibration_fpr: float  # share of the good images above the threshold
    expected_fpr: float  # E[realised FPR] = (n - k + 1) / (n + 1)
    fpr_interval: tuple[float, float]  # central `confidence` interval of the realised FPR
    fpr_bound: float  # P(realised FPR <= fpr_bound) = confidence
    min_good_images: int  # good images needed for P(FPR <= target) >= confidence
    normal_pixels: int
    calibration_pixel_fpr: float  # upper bound from the histogram (pixels in bins >= the threshold's)
    pixel_bins: int
    defects: Optional[dict[str, Any]] = None  # detection at the threshold, with labelled defects
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fpr_interval"] = list(self.fpr_interval)
        return out


def _defect_figures(good: np.ndarray, defects: np.ndarray, threshold: float, confidence: float,
                    mask_bin: Optional[int], defect_pixels: Optional[np.ndarray]) -> dict[str, Any]:
    detected = int((defects > threshold).sum())
    false_alarms = int((good > threshold).sum())
    labels = np.concatenate((np.zeros(good.size, np.int8), np.ones(defects.size, np.int8)))
    ranking = ranking_metrics(np.concatenate((good, defects)), labels)
    flagged = detected + false_alarms
    out = {
        "images": int(defects.size),
        "detected": detected,
        "detection_rate": detected / defects.size,
        "detection_interval": list(clopper_pearson(detected, int(defects.size), confidence)),
        "f1": 2.0 * detected / (flagged + defects.size),
        "image_auroc": ranking["auroc"],
        "image_f1_max": ranking["f1_max"],
        "pixel_detection_rate": None,
    }
    if defect_pixels is not None and int(defect_pixels.sum()) > 0 and mask_bin is not None:
        out["pixel_detection_rate"] = float(defect_pixels[mask_bin:].sum() / defect_pixels.sum())
    return out


def fit_group(good_scores: Any, normal_hist: Any, target_fpr: float, target_pixel_fpr: float,
              confidence: float = 0.95, rule: str = "quantile", defect_scores: Any = None,
              defect_hist: Any = None) -> GroupThreshold:
    """Thresholds of one group from its good images' scores (n,) and normal-pixel histogram (B,).

    ``defect_scores`` (d,) and ``defect_hist`` (B,) (defect pixels) add detection figures; the
    ``f1`` rule needs ``defect_scores``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
    if not (0.0 < target_fpr < 1.0 and 0.0 <= target_pixel_fpr <= 1.0 and 0.0 < confidence < 1.0):
        raise ValueError("target_fpr and confidence must lie in (0, 1), target_pixel_fpr in [0, 1]")
    good = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    n = int(good.size)
    if n == 0:
        raise ValueError("no good images to calibrate on")
    defects = None if defect_scores is None else np.asarray(defect_scores, dtype=np.float64).ravel()
    warnings: list[str] = []
    need = min_good_images(target_fpr, confidence)
    if rule == "f1":
        if defects is None or defects.size == 0:
            raise ValueError("the f1 rule needs labelled defects")
        threshold, _ = f1_threshold(np.concatenate((good, defects)),
                                    np.concatenate((np.zeros(n), np.ones(defects.size))))
        rank = int(np.searchsorted(good, threshold, side="right"))
        warnings.append("the f1 rule picks the threshold from these same good images: the false-alarm "
                        "interval is optimistic")
        if rank == 0:
            warnings.append("the f1 rule flags every good image")
        # t lies in [x_(k), x_(k+1)): the FPR lies between those of the two order statistics
        low = fpr_interval(n, rank + 1, confidence)[0] if rank < n else 0.0
        high = fpr_interval(n, rank, confidence)[1] if rank > 0 else 1.0
        interval = (low, high)
        bound = fpr_upper_bound(n, rank, confidence) if rank > 0 else 1.0
        expected = (n - rank + 1) / (n + 1) if rank > 0 else 1.0
    else:
        rank = quantile_rank(n, target_fpr) if rule == "quantile" else bound_rank(n, target_fpr, confidence)
        threshold = float(good[rank - 1])
        interval, bound = fpr_interval(n, rank, confidence), fpr_upper_bound(n, rank, confidence)
        expected = (n - rank + 1) / (n + 1)
        if (n + 1) * target_fpr < 1.0:
            warnings.append(f"{n} good images cannot set a threshold at a false-alarm rate of {target_fpr:g}: "
                            f"the largest score is used, expected rate 1/{n + 1} = {expected:.3g}; "
                            f"needs at least {math.ceil(round(1.0 / target_fpr, 9)) - 1} images")
    if rule != "f1" and n < need:
        warnings.append(f"{n} good images cannot show a false-alarm rate below {target_fpr:g} with "
                        f"{confidence:.0%} confidence (needs {need}); the rate may be up to {bound:.3g}")
    hist = np.asarray(normal_hist, dtype=np.int64).ravel()
    mask_threshold, above = pixel_threshold(hist, target_pixel_fpr)
    pixels = int(hist.sum())
    if pixels == 0:
        raise ValueError("no normal pixels to calibrate the mask threshold on")
    mask_bin = int(round(mask_threshold * hist.size))
    if mask_bin == hist.size and target_pixel_fpr > 0 and hist[-1] > 0:
        warnings.append(f"more than {target_pixel_fpr:g} of the normal pixels lie in the top bin: the mask "
                        f"threshold is 1 (use more bins)")
    figures = None
    if defects is not None and defects.size:
        defect_pixels = None if defect_hist is None else np.asarray(defect_hist, dtype=np.int64).ravel()
        figures = _defect_figures(good, defects, threshold, confidence, mask_bin, defect_pixels)
    return GroupThreshold(
        threshold=float(threshold), mask_threshold=float(mask_threshold), good_images=n, rank=rank,
        calibration_fpr=float((good > threshold).sum() / n), expected_fpr=float(expected),
        fpr_interval=(float(interval[0]), float(interval[1])), fpr_bound=float(bound), min_good_images=need,
        normal_pixels=pixels, calibration_pixel_fpr=above / pixels, pixel_bins=int(hist.size), defects=figures,
        warnings=warnings)


def alarm_rates(groups: Sequence[Any], labels: Sequence[Any], flagged: Sequence[Any]):
    """Per group and overall ("all"): good images, false alarms and their rate; defects, detected and rate.

    Rows whose label is unknown (None/NaN) are left out. Returns a pandas DataFrame.
    """
    import pandas as pd

    frame = pd.DataFrame({"group": [str(g) for g in groups], "label": list(labels), "flag": list(flagged)})
    frame = frame.dropna(subset=["label", "flag"])
    frame["label"] = frame["label"].astype(int)
    frame["flag"] = frame["flag"].astype(bool)
    rows = []
    for name, part in list(frame.groupby("group", sort=True)) + [("all", frame)]:
        good, bad = part[part["label"] == 0], part[part["label"] == 1]
        rows.append({"group": name, "good": len(good), "false_alarms": int(good["flag"].sum()),
                     "false_alarm_rate": good["flag"].mean() if len(good) else float("nan"),
                     "defects": len(bad), "detected": int(bad["flag"].sum()),
                     "detection_rate": bad["flag"].mean() if len(bad) else float("nan")})
    return pd.DataFrame(rows).set_index("group")


def fit_states(good, defects=None, grouped: bool = True, **settings) -> tuple[GroupThreshold, dict[str, GroupThreshold]]:
    """(pooled default, per-group thresholds) from merged metric state of the scoring actors.

    ``good``: :class:`~headclip.evaluation.metrics.MetricsByClass` of the good images, one class
    per group (their image scores and normal-pixel histograms); ``defects``: the same of labelled
    defects, or None. ``settings`` are :func:`fit_group`'s keywords. Without ``grouped`` only the
    pooled default is fitted.
    """
    def pooled(metrics) -> tuple[np.ndarray, Optional[np.ndarray]]:
        states = [metrics[name] for name in metrics]
        scores = np.concatenate([s.image_scores for s in states]) if states else np.zeros(0)
        full = states and all(s.n_pixel_images == s.n_images for s in states)
        return scores, (sum(s.pixel_pos for s in states) if full else None)

    def fit(scores, normal, defect) -> GroupThreshold:
        defect_scores, defect_hist = defect if defect is not None else (None, None)
        return fit_group(scores, normal, defect_scores=defect_scores, defect_hist=defect_hist, **settings)

    def defect_of(name: str):
        if defects is None or name not in defects:
            return None
        state = defects[name]
        return state.image_scores, (state.pixel_pos if state.n_pixel_images else None)

    normal = sum(good[name].pixel_neg for name in good)
    default = fit(pooled(good)[0], normal, pooled(defects) if defects is not None and len(defects) else None)
    groups = {}
    if grouped:
        groups = {name: fit(good[name].image_scores, good[name].pixel_neg, defect_of(name)) for name in good
                  if name != UNGROUPED}
    return default, groups


def state_table(table, keys: Sequence[str], label: int, has_masks: Sequence[bool]):
    """``table`` (a listing) with the columns the scoring actors keep metric state by.

    ``class_name`` becomes ``keys`` (one group per image; a different class_name the table had is
    kept as ``input_class_name``), ``label`` is ``label`` for every image, and ``has_masks`` says
    whose pixels count (a good image's mask is all background). Returns a pyarrow Table.
    """
    import pyarrow as pa

    keys = [str(k) for k in keys]
    kept = [c for c in table.column_names if c not in ("class_name", "label", "has_masks", "input_class_name")]
    out = table.select(kept)
    if "class_name" in table.column_names:
        original = table["class_name"].to_pylist()
        if [None if v is None else str(v) for v in original] != keys:
            out = out.append_column("input_class_name", table["class_name"])
    out = out.append_column("class_name", pa.array(keys, pa.string()))
    out = out.append_column("label", pa.array([int(label)] * table.num_rows, pa.int32()))
    return out.append_column("has_masks", pa.array([bool(m) for m in has_masks], pa.bool_()))


def reference_split(keys: Sequence[str], image_ids: Sequence[str], count: Optional[int] = None,
                    fraction: Optional[float] = None, seed: int = 0) -> list[bool]:
    """Which good images build a reference bank (True) and which are held out to calibrate on (False).

    Per group (``keys``), its images are ordered by ``sha256(f"{seed}:{image_id}")`` and the first
    ``count`` of them, or ``round(fraction * n)`` (at least 1, at most n - 1), build the bank: the
    choice depends on the seed and the ids only, not on the listing's order. ValueError (one line)
    for a group that would keep no image on either side.
    """
    import hashlib

    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    chosen = [False] * len(keys)
    for key, rows in sorted(members.items()):
        n = len(rows)
        take = count if count is not None else min(n - 1, max(1, round(float(fraction) * n)))
        if n < 2 or take >= n:
            raise ValueError(f"group {key or '(no value)'!r} has {n} good image{'s' * (n != 1)}: too few to build "
                             f"a bank from {take} and calibrate on the rest")
        order = sorted(rows, key=lambda i: (hashlib.sha256(f"{seed}:{image_ids[i]}".encode()).hexdigest(), i))
        for i in order[:take]:
            chosen[i] = True
    return chosen
