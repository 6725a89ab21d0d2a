"""Mask encoding against pycocotools and plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco

from headclip.scoring.masks import bounding_box, decode_heatmap, encode_map, encode_rle, mask_size


def test_rle_decodes_with_pycocotools():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (120, 80)]:
        mask = rng.random(shape) > 0.7
        rle = encode_rle(mask)
        assert rle["size"] == list(shape)
        decoded = coco.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask)
        assert int(coco.area({"size": rle["size"], "counts": rle["counts"].encode()})) == int(mask.sum())


def _plain_bbox(mask):
    ys, xs = [], []
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                ys.append(y)
                xs.append(x)
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1) if xs else None


def test_bbox_matches_plain_loop():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = np.zeros((30, 40), bool)
        y0, x0 = rng.integers(0, 25), rng.integers(0, 35)
        mask[y0:y0 + rng.integers(1, 6), x0:x0 + rng.integers(1, 6)] = True
        assert bounding_box(mask, 40, 30) == _plain_bbox(mask)
    assert bounding_box(np.zeros((5, 5), bool), 5, 5) is None
    # a scaled mask maps back to image pixels
    small = np.zeros((10, 20), bool)
    small[2:4, 5:8] = True
    assert bounding_box(small, 200, 100) == (50, 20, 80, 40)


def test_mask_size_caps_long_side():
    assert mask_size(640, 480, 2048) == (480, 640)
    assert mask_size(8000, 4000, 2000) == (1000, 2000)
    assert mask_size(10, 5000, 1000) == (1000, 2)


def test_encode_map_at_image_size():
    anomaly_map = torch.zeros(64, 64)
    anomaly_map[16:32, 32:48] = 0.9
    encoded = encode_map(anomaly_map, width=128, height=96, mask_threshold=0.5, heatmap_side=32)
    mask = coco.decode({"size": encoded.mask_rle["size"], "counts": encoded.mask_rle["counts"].encode()})
    assert mask.shape == (96, 128)
    assert encoded.mask_area == int(mask.sum()) > 0
    x0, y0, x1, y1 = encoded.bbox
    assert 60 <= x0 <= 66 and 94 <= x1 <= 100 and 20 <= y0 <= 26 and 46 <= y1 <= 52
    heat = decode_heatmap(encoded.anomaly_map_png)
    assert heat.shape == (24, 32)
    assert heat.max() == pytest.approx(0.9, abs=0.05) and heat.min() == 0.0
    assert encoded.pixel_max == pytest.approx(0.9, abs=1e-5)
