"""Mask encoding against pycocotools and plain loops."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from pycocotools import mask as coco

import torch.nn.functional as F

from headclip.scoring.masks import bounding_box, decode_heatmap, encode_maps, encode_rle, mask_size


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
    encoded = encode_maps(anomaly_map[None], [(128, 96)], mask_threshold=0.5, heatmap_side=32).encoded(0)
    mask = coco.decode({"size": encoded.mask_rle["size"], "counts": encoded.mask_rle["counts"].encode()})
    assert mask.shape == (96, 128)
    assert encoded.mask_area == int(mask.sum()) > 0
    x0, y0, x1, y1 = encoded.bbox
    assert 60 <= x0 <= 66 and 94 <= x1 <= 100 and 20 <= y0 <= 26 and 46 <= y1 <= 52
    heat = decode_heatmap(encoded.anomaly_map_bytes)
    assert heat.shape == (24, 32)
    assert heat.max() == pytest.approx(0.9, abs=0.05) and heat.min() == 0.0
    assert encoded.pixel_max == pytest.approx(0.9, abs=1e-5)


def _plain_encoding(anomaly_map: torch.Tensor, width: int, height: int, threshold: float, max_side: int,
                    heat_side: int):
    """The encoding written plainly, one image at a time on the CPU: the reference for encode_maps."""
    mh, mw = mask_size(width, height, max_side)
    x = anomaly_map.float()[None, None]
    resized = F.interpolate(x, size=(mh, mw), mode="bilinear", align_corners=False)[0, 0]
    mask = (resized > threshold).numpy()
    hh, hw = mask_size(width, height, heat_side)
    small = F.interpolate(x, size=(hh, hw), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    heat = np.clip(np.rint(small.clamp(0.0, 1.0).numpy() * 255.0), 0, 255).astype(np.uint8)
    rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return float(resized.max()), rle["counts"].decode(), int(mask.sum()), _plain_bbox_scaled(mask, width, height), heat


def _plain_bbox_scaled(mask, width, height):
    box = _plain_bbox(mask)
    if box is None:
        return None
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    return (int(np.floor(box[0] * sx)), int(np.floor(box[1] * sy)), int(np.ceil(box[2] * sx)),
            int(np.ceil(box[3] * sy)))


def _maps(rng, n, side):
    """Random maps, blobs, empty, full, a single pixel, stripes and a checkerboard."""
    maps = [torch.from_numpy(rng.random((side, side)).astype(np.float32)) for _ in range(n)]
    blob = torch.zeros(side, side)
    blob[side // 3: side // 2, side // 4: side - 3] = 0.8
    pixel = torch.zeros(side, side)
    pixel[side - 1, 0] = 1.0
    stripes = torch.zeros(side, side)
    stripes[:, ::3] = 0.7
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    checker = ((yy + xx) % 2).float()
    return torch.stack(maps + [blob, torch.zeros(side, side), torch.ones(side, side), pixel, stripes, checker])


@pytest.mark.parametrize("threshold", [0.0, 0.37, 0.5, 0.999])
def test_batched_device_encoding_equals_plain_encoding_bit_for_bit(threshold):
    """encode_maps (batched, grouped by size, run lengths from change points) against the plain path:
    the same RLE counts string, area, box, maximum and heat-map bytes for every map, on random and
    structured maps of odd sizes, images smaller and larger than the map, some capped by max_side."""
    rng = np.random.default_rng(7)
    maps = _maps(rng, 4, 21)
    sizes = [(1, 1), (37, 23), (23, 37), (37, 23), (300, 17), (5, 400), (64, 64), (129, 97), (97, 129), (11, 11)]
    for start in range(0, len(maps), 5):
        chunk = maps[start:start + 5]
        chunk_sizes = [sizes[(start + j) % len(sizes)] for j in range(len(chunk))]
        batch = encode_maps(chunk, chunk_sizes, threshold, mask_max_side=120, heatmap_side=16)
        for j, (width, height) in enumerate(chunk_sizes):
            got = batch.encoded(j)
            pixel_max, counts, area, box, heat = _plain_encoding(chunk[j], width, height, threshold, 120, 16)
            assert got.mask_rle["counts"] == counts
            assert got.mask_rle["size"] == list(mask_size(width, height, 120))
            assert got.mask_area == area and got.bbox == box and got.pixel_max == pixel_max
            assert np.array_equal(np.rint(decode_heatmap(got.anomaly_map_bytes) * 255).astype(np.uint8), heat)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encoding_on_cuda_equals_a_plain_threshold_there():
    """On a GPU: each stored mask is exactly ``resize(map) > t`` computed on that GPU; the maps
    encoded on the CPU differ from it only where the map lies within 1e-5 of the threshold."""
    rng = np.random.default_rng(3)
    maps = _maps(rng, 10, 97)
    sizes = [(1024, 1024), (1023, 767), (4000, 3000), (64, 64), (1024, 1024), (333, 1111)] * 3
    sizes = sizes[:len(maps)]
    gpu = encode_maps(maps.cuda(), sizes, 0.5, mask_max_side=2048, heatmap_side=64)
    cpu = encode_maps(maps, sizes, 0.5, mask_max_side=2048, heatmap_side=64)
    for j, (width, height) in enumerate(sizes):
        shape = mask_size(width, height, 2048)
        resized = F.interpolate(maps[j].cuda()[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
        plain = (resized > 0.5).cpu().numpy()
        got = gpu.encoded(j)
        decoded = coco.decode({"size": got.mask_rle["size"], "counts": got.mask_rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), plain)
        assert got.mask_area == int(plain.sum()) and got.bbox == _plain_bbox_scaled(plain, width, height)
        reference = cpu.encoded(j)
        cpu_mask = coco.decode({"size": reference.mask_rle["size"], "counts": reference.mask_rle["counts"].encode()})
        near = (resized - 0.5).abs().cpu().numpy() < 1e-5
        assert not np.any((cpu_mask.astype(bool) != plain) & ~near)
