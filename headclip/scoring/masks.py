"""Encoding anomaly maps for storage: COCO RLE masks, boxes and small heat maps.

Masks are COCO compressed RLE (``{"size": [h, w], "counts": str}``), which
``pycocotools.mask.decode`` reads. Heat maps are small 8-bit previews stored
as lossless WebP (0 = probability 0, 255 = probability 1).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass
class EncodedMap:
    """What is stored of one image's anomaly map.

    pixel_max: maximum of the map at the mask's resolution.
    mask_rle: COCO compressed RLE of map > mask_threshold, {"size": [h, w], "counts": str}.
    mask_area: number of mask pixels (at the RLE's resolution).
    bbox: (x0, y0, x1, y1) of the mask in image pixels, x1/y1 exclusive; None if empty.
    anomaly_map_bytes: the map's heat map bytes (:func:`encode_heatmap`), ``heatmap_side`` on its long side.
    """

    pixel_max: float
    mask_rle: dict
    mask_area: int
    bbox: Optional[tuple[int, int, int, int]]
    anomaly_map_bytes: bytes


def mask_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(height, width) of the stored mask: the image's own, scaled down to ``max_side``."""
    long_side = max(width, height)
    if max_side <= 0 or long_side <= max_side:
        return height, width
    scale = max_side / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def encode_rle(mask: np.ndarray) -> dict:
    """(h, w) bool/uint8 mask -> COCO compressed RLE with a str ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO compressed RLE (counts as str or bytes) -> (h, w) bool mask."""
    counts = rle["counts"]
    coco = {"size": [int(x) for x in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(coco).astype(bool)


def _scale_box(r0: int, r1: int, c0: int, c1: int, shape: tuple[int, int], width: int,
               height: int) -> tuple[int, int, int, int]:
    """Rows r0..r1 and columns c0..c1 (inclusive) of a mask of ``shape`` as an image box, x1/y1 exclusive."""
    sy, sx = height / shape[0], width / shape[1]
    return (int(np.floor(c0 * sx)), int(np.floor(r0 * sy)), int(np.ceil((c1 + 1) * sx)), int(np.ceil((r1 + 1) * sy)))


def bounding_box(mask: np.ndarray, width: int, height: int) -> Optional[tuple[int, int, int, int]]:
    """Box of a (h', w') mask in the coordinates of a (height, width) image; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return _scale_box(int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]), mask.shape, width, height)


def encode_heatmap(quantised: np.ndarray) -> bytes:
    """(h, w) uint8 heat map (255 = probability 1) -> lossless WebP bytes of it (R = G = B).

    Lossless WebP keeps every 8-bit value and is about a fifth smaller than a
    PNG of the same smooth map.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(quantised[..., None], 3, axis=2)).save(
        buffer, format="WEBP", lossless=True, quality=100, method=1, exact=True)
    return buffer.getvalue()


def decode_heatmap(data: bytes) -> np.ndarray:
    """Heat map bytes (lossless WebP, or the 8-bit grayscale PNG of older outputs) -> (h, w) float32 in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    return pixels.astype(np.float32) / 255.0


def runs_to_rle(runs: list[int], height: int, width: int) -> dict:
    """Column-major run lengths (zeros first) of a (height, width) mask -> COCO compressed RLE."""
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


@dataclass
class MapBatch:
    """What the device computed for a batch of maps, on the CPU (see :func:`encode_maps`)."""

    sizes: list[tuple[int, int]]  # (width, height) of each image
    mask_shapes: list[tuple[int, int]]  # (h, w) of each stored mask
    pixel_max: np.ndarray  # (B,) float32
    first: np.ndarray  # (B,) bool: the mask's first pixel (column-major)
    changes: list[np.ndarray]  # per image: column-major indices where the mask value changes
    heat: list[np.ndarray]  # per image: (h, w) uint8 heat map

    def encoded(self, j: int) -> EncodedMap:
        """The stored form of image ``j``: COCO RLE, area and box from the run lengths, heat-map PNG."""
        (width, height), (mh, mw) = self.sizes[j], self.mask_shapes[j]
        bounds = np.concatenate([[0], self.changes[j], [mh * mw]]).astype(np.int64)
        runs = np.diff(bounds)
        # segment k holds the first pixel's value when k is even
        ones = np.arange(len(runs)) % 2 == (0 if self.first[j] else 1)
        starts, ends = bounds[:-1][ones], bounds[1:][ones] - 1  # inclusive, column-major
        area = int(runs[ones].sum())
        bbox = None
        if area:
            one_column = starts // mh == ends // mh
            r0 = int(np.where(one_column, starts % mh, 0).min())
            r1 = int(np.where(one_column, ends % mh, mh - 1).max())
            bbox = _scale_box(r0, r1, int(starts[0] // mh), int(ends[-1] // mh), (mh, mw), width, height)
        counts = runs.tolist()
        return EncodedMap(
            pixel_max=float(self.pixel_max[j]),
            mask_rle=runs_to_rle([0] + counts if self.first[j] else counts, mh, mw),
            mask_area=area,
            bbox=bbox,
            anomaly_map_bytes=encode_heatmap(self.heat[j]),
        )


def encode_maps(anomaly_maps: torch.Tensor, sizes: Sequence[tuple[int, int]],
                mask_threshold: Union[float, Sequence[float]], mask_max_side: int = 2048,
                heatmap_side: int = 64, host_masks: Optional[bool] = None) -> MapBatch:
    """Encode a batch of (B, S, S) anomaly maps on their own device.

    ``sizes`` are the images' (width, height). Each map is resized (bilinear)
    to its image's size, or to ``mask_max_side`` on the long side, and
    thresholded (``map > mask_threshold``, one threshold or one per image,
    compared in float32); its maximum, the points where its
    column-major mask changes value and a ``heatmap_side`` heat map are
    computed with batched tensor ops (one per distinct size; on the CPU the
    mask work runs in numpy, which is faster there). Only those come back to
    the host, where :meth:`MapBatch.encoded` derives runs, area and box and
    writes COCO RLE and PNG. ``host_masks``: do the mask work in numpy (default:
    when the maps are on the CPU); False runs the device path on any device.
    """
    maps = anomaly_maps.float()
    sizes = [(int(w), int(h)) for w, h in sizes]
    mask_shapes = [mask_size(w, h, mask_max_side) for w, h in sizes]
    heat_shapes = [mask_size(w, h, heatmap_side) for w, h in sizes]
    n = len(sizes)
    on_cpu = maps.device.type == "cpu" if host_masks is None else bool(host_masks)
    thresholds = np.broadcast_to(np.asarray(mask_threshold, dtype=np.float32), (n,))
    groups = _groups(mask_shapes)
    order, maxima, firsts, change_parts = [], [], [], []
    for shape, index in groups.items():
        resized = F.interpolate(maps[index][:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
        maxima.append(resized.amax((1, 2)))
        if on_cpu:
            limit = thresholds[index].reshape(-1, 1, 1)
            flat = np.ascontiguousarray(in_mask(resized.numpy(), limit).transpose(0, 2, 1)).reshape(len(index), -1)
            change_parts.append(np.flatnonzero(flat[:, 1:] != flat[:, :-1]))
            firsts.append(torch.from_numpy(flat[:, 0].copy()))
        else:
            limit = torch.from_numpy(thresholds[index].copy()).to(resized.device).view(-1, 1, 1)
            flat = in_mask(resized, limit).transpose(1, 2).reshape(len(index), -1)  # column-major, as COCO
            change_parts.append((flat[:, 1:] != flat[:, :-1]).reshape(-1))
            firsts.append(flat[:, 0])
        order.extend(index)
    heats, heat_order = [], []
    for shape, index in _groups(heat_shapes).items():
        small = F.interpolate(maps[index][:, None], size=shape, mode="bilinear", align_corners=False, antialias=True)
        heats.append(torch.round(small[:, 0].clamp(0.0, 1.0) * 255.0).to(torch.uint8).reshape(-1))
        heat_order.extend(index)
    if on_cpu:
        per_group = change_parts
    else:  # one nonzero for the whole batch: its only synchronisation
        positions = torch.nonzero(torch.cat(change_parts)).flatten().cpu().numpy()
        lengths = np.cumsum([0] + [len(index) * (shape[0] * shape[1] - 1) for shape, index in groups.items()])
        cuts = np.searchsorted(positions, lengths)
        per_group = [positions[a:b] - lo for a, b, lo in zip(cuts[:-1], cuts[1:], lengths[:-1])]
    changes: list[np.ndarray] = [np.empty(0, np.int64)] * n
    for (shape, index), local in zip(groups.items(), per_group):
        per_image = shape[0] * shape[1] - 1
        image_of = local // per_image if per_image else np.zeros(0, np.int64)
        for k, j in enumerate(index):
            changes[j] = local[image_of == k] - k * per_image + 1
    batch = MapBatch(sizes, mask_shapes, np.empty(n, np.float32), np.empty(n, bool), changes, [None] * n)
    batch.pixel_max[order] = torch.cat(maxima).cpu().numpy()
    batch.first[order] = torch.cat(firsts).cpu().numpy()
    heat_cpu = torch.cat(heats).cpu().numpy()
    start = 0
    for j in heat_order:
        hh, hw = heat_shapes[j]
        batch.heat[j] = heat_cpu[start:start + hh * hw].reshape(hh, hw)
        start += hh * hw
    return batch


def in_mask(values, limit):
    """Mask pixels of a map (numpy or torch, on any device): strictly above the mask threshold."""
    return values > limit


def _groups(shapes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images that share each shape, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(j)
    return groups
