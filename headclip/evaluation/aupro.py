"""Per-region overlap (PRO) on binned anomaly maps, and its area up to a false-positive limit.

Definition (MVTec AD's reference ``pro_curve_util.compute_pro``): ground-truth regions are the
connected components of each image's mask under **8-connectivity**
(``scipy.ndimage.label(mask, structure=np.ones((3, 3)))``); regions never span two images.
At a threshold ``t``

* the overlap of a region is the fraction of its pixels with score ``>= t``;
* ``PRO(t)`` is the mean overlap over all regions of all images;
* ``FPR(t)`` is the fraction of normal pixels (mask 0, in every image) with score ``>= t``.

The curve starts at (0, 0), runs through one point per threshold and ends at (1, 1); AUPRO is
its trapezoid area over FPR in [0, 0.3] (the curve interpolated linearly at exactly 0.3),
divided by 0.3, so it lies in [0, 1].

Mergeable state: keeping one histogram per region would grow with the data set, so the state
is a float histogram of *overlap mass*, ``mass[b] = sum over regions of (region pixels in bin
b) / (region size)``, the region count and the normal-pixel histogram. The PRO at the threshold
"bin >= b" is then ``sum(mass[b:]) / n_regions``, exact up to binning, and states merge by
addition. The overlap mass is a sum of floats, so two states merged agree with one state fed
all the data to float64 rounding (about 1e-15 relative), not necessarily bit for bit.

Binning error: the binned thresholds are a subset of the exact ones (the lowest score of each
bin), and PRO and FPR both fall as the threshold rises, so between two consecutive binned points
the exact curve stays in the box they span. Replacing it there by the chord changes the area by
at most half the box (width x height / 2); the box cut by the 0.3 limit contributes at most its
clipped width x height. :func:`aupro_error_bound` sums these terms (divided by 0.3).
"""

from __future__ import annotations

import numpy as np

FPR_LIMIT = 0.3


def _structure_8_per_image() -> np.ndarray:
    """(3, 3, 3) structure: 8-connectivity inside each image, no links between images."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    return structure


def region_overlap_histogram(bins: np.ndarray, masks: np.ndarray, n_bins: int) -> tuple[np.ndarray, int]:
    """Overlap mass per score bin of the ground-truth regions in a batch.

    Args:
        bins: (B, H, W) integer bin index of every pixel's score, in [0, n_bins).
        masks: (B, H, W) bool ground truth, True for anomalous pixels.
        n_bins: number of score bins.
    Returns:
        ``(mass, n_regions)``: ``mass`` (n_bins,) float64 with ``mass[b]`` the sum over regions
        of the fraction of the region's pixels in bin b (so ``mass.sum() == n_regions``), and
        the number of 8-connected regions.
    """
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy ships with the dev extra
        raise ImportError("pixel-level metrics need scipy (scipy.ndimage.label)") from exc
    if masks.shape != bins.shape or masks.ndim != 3:
        raise ValueError(f"bins and masks must both be (B, H, W), got {bins.shape} and {masks.shape}")
    labels, n_regions = ndimage.label(masks, structure=_structure_8_per_image())
    mass = np.zeros(n_bins, dtype=np.float64)
    if n_regions == 0:
        return mass, 0
    flat = labels.ravel()
    inside = flat > 0
    region = flat[inside]
    sizes = np.bincount(region, minlength=n_regions + 1)
    weights = 1.0 / sizes[region]
    mass += np.bincount(bins.ravel()[inside], weights=weights, minlength=n_bins)
    return mass, int(n_regions)


def pro_curve(region_mass: np.ndarray, n_regions: int, normal_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binned (FPR, PRO) curve, one point per bin threshold from the top, starting at (0, 0).

    Args:
        region_mass: (n_bins,) overlap mass per bin (see :func:`region_overlap_histogram`).
        n_regions: number of ground-truth regions (> 0).
        normal_hist: (n_bins,) count of normal pixels per bin (total > 0).
    Returns:
        ``(fpr, pro)``, each (n_bins + 1,) float64, non-decreasing, ending at (1, 1).
    """
    fp = np.cumsum(np.asarray(normal_hist, dtype=np.int64)[::-1])
    overlap = np.cumsum(np.asarray(region_mass, dtype=np.float64)[::-1])
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    pro = np.concatenate(([0.0], np.clip(overlap / n_regions, 0.0, 1.0)))
    return fpr, pro


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) for x in [x[0], x_max], interpolating at x_max.

    ``x`` must be non-decreasing (repeated x, vertical steps, are allowed) and reach x_max.
    """
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    right = np.minimum(x1, x_max)
    width = np.clip(right - x0, 0.0, None)
    span = x1 - x0
    frac = np.divide(width, span, out=np.zeros_like(width), where=span > 0)
    y_right = y0 + (y1 - y0) * frac
    return float(np.sum(0.5 * (y0 + y_right) * width))


def aupro(region_mass: np.ndarray, n_regions: int, normal_hist: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """Normalised area under the binned PRO curve up to ``fpr_limit``; NaN without regions or normal pixels."""
    if n_regions == 0 or int(np.sum(normal_hist)) == 0:
        return float("nan")
    fpr, pro = pro_curve(region_mass, n_regions, normal_hist)
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_error_bound(region_mass: np.ndarray, n_regions: int, normal_hist: np.ndarray,
                      fpr_limit: float = FPR_LIMIT) -> float:
    """Largest possible |AUPRO(binned) - AUPRO(exact scores)| given the histograms (module docstring)."""
    if n_regions == 0 or int(np.sum(normal_hist)) == 0:
        return float("nan")
    fpr, pro = pro_curve(region_mass, n_regions, normal_hist)
    x0, x1 = fpr[:-1], fpr[1:]
    height = pro[1:] - pro[:-1]
    width = np.clip(np.minimum(x1, fpr_limit) - x0, 0.0, None)
    inside = x1 <= fpr_limit
    slack = np.where(inside, 0.5 * width * height, width * height)
    return float(np.sum(slack)) / fpr_limit
