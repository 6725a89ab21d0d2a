"""Metrics: exact image metrics vs scikit-learn, binned pixel metrics within their proven bound,
AUPRO vs a plain per-region implementation, and exact merging of sharded state."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from headclip.evaluation.metrics import (
    COLUMNS,
    MetricsByClass,
    MetricState,
    histogram_error_bounds,
    histogram_metrics,
    ranking_metrics,
)

PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def sklearn_metrics(scores, labels) -> dict[str, float]:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": float(f1.max()),
    }


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Plain AUPRO: every distinct score a threshold, 8-connected regions, MVTec's trapezoid."""
    regions = []
    for score_map, mask in zip(maps, masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score_map[labels == r] for r in range(1, n + 1)]
    normal = maps[masks == 0]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(region >= t) for region in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
            break
    return area / fpr_limit


def make_pixel_data(seed: int, n_images: int = 6, size: int = 24, decimals: int | None = None, n_normal: int = 2):
    """Image scores/labels, (B, S, S) float64 maps in [0, 1] and bool masks with a few regions."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_normal, n_images):  # the first n_normal images stay normal
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, r:r + h, c:c + w] = True
        masks[i, size - 3, 0] = masks[i, size - 2, 1] = True  # diagonal pair: one region (8-conn)
    noise = ndimage.gaussian_filter(rng.random(masks.shape), sigma=(0, 1.5, 1.5))
    noise = (noise - noise.min()) / np.ptp(noise)
    maps = np.clip(0.6 * noise + 0.15 * masks + 0.25 * rng.random(masks.shape), 0, 1)
    if decimals is not None:
        maps = np.round(maps, decimals)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = np.clip(maps.max(axis=(1, 2)) + 0.3 * rng.standard_normal(n_images), 0, 1)
    return scores, labels, maps, masks


# --- image level: exact ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_image_metrics_match_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = rng.random(500) + 0.3 * labels
    if tied:
        scores = np.round(scores, 1)
    expected = sklearn_metrics(scores, labels)
    state = MetricState(n_bins=10)
    for chunk in np.array_split(np.arange(500), 7):
        state.update(scores[chunk], labels[chunk])
    got = state.compute()
    for key in ("auroc", "ap", "f1_max"):
        assert ranking_metrics(scores, labels)[key] == pytest.approx(expected[key], abs=1e-12)
        assert got[f"image_{key}"] == pytest.approx(expected[key], abs=1e-12)


# --- pixel level: binned, within the bound -----------------------------------------------------

def _check_within_bounds(state: MetricState, maps, masks):
    got, bounds = state.compute(), state.bounds()
    exact = sklearn_metrics(maps.ravel(), masks.ravel())
    for key in ("auroc", "ap"):
        assert abs(got[f"pixel_{key}"] - exact[key]) <= bounds[f"pixel_{key}"] + 1e-12, key
    gap = exact["f1_max"] - got["pixel_f1_max"]
    assert -1e-12 <= gap <= bounds["pixel_f1_max"] + 1e-12
    assert abs(got["pixel_aupro"] - reference_aupro(maps, masks)) <= bounds["pixel_aupro"] + 1e-12
    return got, bounds, exact


@pytest.mark.parametrize("decimals,n_bins", [(None, 50), (None, 1000), (2, 20), (1, 4)])
def test_pixel_metrics_within_bound(decimals, n_bins):
    scores, labels, maps, masks = make_pixel_data(3, decimals=decimals)
    state = MetricState(n_bins)
    state.update(scores, labels, maps, masks)
    got, bounds, exact = _check_within_bounds(state, maps, masks)
    assert any(abs(got[f"pixel_{k}"] - exact[k]) > 1e-9 for k in ("auroc", "ap", "f1_max"))  # binning bites


def test_bound_and_error_shrink_as_bins_grow():
    scores, labels, maps, masks = make_pixel_data(4, n_images=8, size=32)
    exact = sklearn_metrics(maps.ravel(), masks.ravel())
    previous = None
    for n_bins in (10, 100, 1000, 10_000):  # nested refinements
        state = MetricState(n_bins)
        state.update(scores, labels, maps, masks)
        got, bounds = state.compute(), state.bounds()
        assert abs(got["pixel_auroc"] - exact["auroc"]) <= bounds["pixel_auroc"]
        if previous is not None:
            assert all(bounds[k] <= previous[k] for k in PIXEL_KEYS), (n_bins, bounds, previous)
            assert bounds["pixel_auroc"] < previous["pixel_auroc"] and bounds["pixel_ap"] < previous["pixel_ap"]
        previous = bounds
    assert max(previous.values()) < 1e-3
    assert abs(got["pixel_auroc"] - exact["auroc"]) < 1e-4


def test_auroc_bound_formula():
    pos, neg = np.array([3, 0, 2, 5]), np.array([4, 1, 0, 2])
    assert histogram_error_bounds(pos, neg)["auroc"] == pytest.approx(0.5 * (12 + 0 + 0 + 10) / (10 * 7))
    one_per_bin = histogram_error_bounds(np.array([1, 0, 1]), np.array([0, 1, 0]))
    assert one_per_bin == pytest.approx({"auroc": 0.0, "ap": 0.0, "f1_max": 0.0}, abs=1e-15)


@pytest.mark.parametrize("seed", [5, 6])
def test_pixel_metrics_exact_when_binning_is_lossless(seed):
    """Scores on bin centres: every bin holds one score value, so binned equals exact."""
    n_bins = 64
    scores, labels, maps, masks = make_pixel_data(seed)
    maps = (np.floor(maps * (n_bins - 1e-9)) + 0.5) / n_bins
    state = MetricState(n_bins)
    state.update(scores, labels, maps, masks)
    got, exact = state.compute(), sklearn_metrics(maps.ravel(), masks.ravel())
    for key in ("auroc", "ap", "f1_max"):
        assert got[f"pixel_{key}"] == pytest.approx(exact[key], abs=1e-9)
    assert got["pixel_aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


def test_aupro_close_to_reference_with_default_bins():
    scores, labels, maps, masks = make_pixel_data(7, n_images=5, size=28)
    state = MetricState()
    state.update(scores, labels, maps, masks)
    assert state.bounds()["pixel_aupro"] < 1e-3
    assert state.compute()["pixel_aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-3)


def test_regions_use_8_connectivity_within_each_image():
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[:, 1, 1] = masks[:, 2, 2] = True  # diagonal neighbours, same pixels in both images
    state = MetricState(16)
    state.update([0.5, 0.5], [1, 1], np.full(masks.shape, 0.3), masks)
    assert state.n_regions == 2
    assert state.region_mass.sum() == pytest.approx(2.0)


# --- merging --------------------------------------------------------------------------------------

def _assert_same(single: dict, merged: dict):
    for key, value in single.items():
        if key in ("pixel_aupro", "mad_pixel", "mad_all"):  # float overlap mass: equal to rounding
            assert merged[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert merged[key] == value or (np.isnan(value) and np.isnan(merged[key])), key


def test_merge_equals_single_state_including_round_trip():
    scores, labels, maps, masks = make_pixel_data(8, n_images=12)
    single = MetricState(500)
    single.update(scores, labels, maps, masks)
    shards = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 12)]
    states = []
    for idx in shards:
        state = MetricState(500)
        for chunk in np.array_split(idx, 2):
            state.update(scores[chunk], labels[chunk], maps[chunk], masks[chunk])
        states.append(state)
    states.append(MetricState(500))  # an empty shard
    travelled = [MetricState.from_dict(json.loads(json.dumps(s.to_dict(as_lists=True)))) for s in states]
    merged = MetricState.from_dict(states[0].to_dict())
    for state in travelled[1:]:
        merged.merge(state)
    assert np.array_equal(merged.pixel_pos, single.pixel_pos)
    assert np.array_equal(merged.pixel_neg, single.pixel_neg)
    assert merged.n_regions == single.n_regions and merged.n_images == single.n_images
    np.testing.assert_allclose(merged.region_mass, single.region_mass, rtol=1e-13)
    _assert_same(single.compute(), merged.compute())
    _assert_same(single.bounds(), merged.bounds())


def test_metrics_by_class_merge_and_table():
    scores, labels, maps, masks = make_pixel_data(9, n_images=10)
    names = np.array(["screw", "bottle"] * 5)
    whole = MetricsByClass(200)
    whole.update(names, scores, labels, maps, masks)
    left, right = MetricsByClass(200), MetricsByClass(200)
    left.update(names[:4], scores[:4], labels[:4], maps[:4], masks[:4])
    right.update(list(names[4:]), torch.tensor(scores[4:]), torch.tensor(labels[4:]),
                 torch.tensor(maps[4:]), torch.tensor(masks[4:]))
    merged = MetricsByClass.from_dict(json.loads(json.dumps(left.to_dict(as_lists=True)))).merge(right)
    for name in ("bottle", "screw"):
        _assert_same(whole[name].compute(), merged[name].compute())
    table = merged.table()
    assert list(table.columns) == list(COLUMNS)
    assert list(table.index) == ["bottle", "screw", "mean"]
    np.testing.assert_allclose(table.loc["mean"], table.loc[["bottle", "screw"]].mean())
    row = table.loc["screw"]
    assert row["mad_all"] == pytest.approx(row[list(COLUMNS[:7])].mean())
    assert row["mad_image"] == pytest.approx(row[list(COLUMNS[:3])].mean())
    only = MetricState(200)
    pick = names == "screw"
    only.update(scores[pick], labels[pick], maps[pick], masks[pick])
    assert row["image_auroc"] == only.compute()["image_auroc"]
    np.testing.assert_allclose(merged.table(percent=True).to_numpy(), 100 * table.to_numpy())


# --- sanity and edge cases ----------------------------------------------------------------------

def test_perfect_and_inverted_detectors():
    _, labels, _, masks = make_pixel_data(10)
    perfect = MetricState(100)
    perfect.update(labels.astype(float), labels, masks.astype(float), masks)
    assert all(value == pytest.approx(1.0, abs=1e-12) for value in perfect.compute().values())
    inverted = MetricState(100)
    inverted.update(1.0 - labels, labels, 1.0 - masks, masks)
    got = inverted.compute()
    assert got["image_auroc"] == 0.0 and got["pixel_auroc"] == 0.0 and got["pixel_aupro"] == 0.0
    assert got["pixel_ap"] < 0.5


def test_degenerate_cases_give_nan():
    assert all(np.isnan(v) for v in MetricState().compute().values())
    one_label = MetricState(10)
    one_label.update([0.1, 0.7, 0.3], [0, 0, 0], np.full((3, 4, 4), 0.2), np.zeros((3, 4, 4)))
    got = one_label.compute()
    assert all(np.isnan(got[k]) for k in COLUMNS)
    classification_only = MetricState(10)
    classification_only.update([0.1, 0.9], [0, 1])
    got = classification_only.compute()
    assert got["image_auroc"] == 1.0 and all(np.isnan(got[k]) for k in PIXEL_KEYS)
    assert np.isnan(got["mad_pixel"]) and np.isnan(got["mad_all"]) and got["mad_image"] == 1.0
    assert all(np.isnan(v) for v in histogram_metrics(np.zeros(5), np.ones(5)).values())


def test_invalid_input_is_rejected():
    state = MetricState(10)
    with pytest.raises(ValueError):
        state.update([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        state.update([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError):
        state.update([0.1, 0.2], [0, 1], maps=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError):
        state.update([0.1, 0.2], [0, 1], np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
    state.update([0.1, 0.2], [0, 1])
    with pytest.raises(ValueError):  # pixel data for some images of a state only
        state.update([0.1], [1], np.zeros((1, 3, 3)), np.ones((1, 3, 3)))
    with pytest.raises(ValueError):
        state.merge(MetricState(20))


def test_torch_tensors_and_channel_axis_accepted():
    scores, labels, maps, masks = make_pixel_data(11)
    from_numpy, from_torch = MetricState(300), MetricState(300)
    from_numpy.update(scores, labels, maps.astype(np.float32), masks)
    from_torch.update(torch.tensor(scores), torch.tensor(labels),
                      torch.tensor(maps, dtype=torch.float32).unsqueeze(1), torch.tensor(masks).unsqueeze(1))
    assert from_torch.compute() == from_numpy.compute()


def _python_calls_of_update(batch: int, seed: int) -> tuple[int, MetricState]:
    """Python function calls (profiler "call" and "c_call" events) of one update with a batch
    of 256 px maps whose masks hold about 75 regions per image."""
    rng = np.random.default_rng(seed)
    maps = rng.random((batch, 256, 256), dtype=np.float32)
    masks = ndimage.gaussian_filter(rng.random((batch, 256, 256)), (0, 4, 4)) > 0.53
    scores, labels = rng.random(batch), rng.integers(0, 2, batch)
    state = MetricState()
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        state.update(scores, labels, maps, masks)
    finally:
        sys.setprofile(None)
    return calls, state


def test_update_is_vectorised_over_images_and_regions():
    """A batch of 256 px maps is one pass of array operations: the Python work of ``update`` does
    not grow with the images or their regions (no wall-clock bound, which a busy machine breaks).
    Catches a loop over images or over regions in Python (one ``ndimage.label`` per image, one
    overlap per region)."""
    _python_calls_of_update(2, seed=0)  # first use: imports and caches
    small_calls, small = _python_calls_of_update(4, seed=12)
    large_calls, large = _python_calls_of_update(32, seed=13)
    assert small.n_regions > 200 and large.n_regions > 7 * small.n_regions
    assert large_calls == small_calls, (small_calls, large_calls)
    assert float(large.region_mass.sum()) == pytest.approx(large.n_regions)
