"""Encoding anomaly maps for storage: COCO RLE masks, boxes and small heat maps.

Masks are COCO compressed RLE (``{"size": [h, w], "counts": str}``), which
``pycocotools.mask.decode`` reads. Heat maps are small 8-bit previews stored
as lossless WebP (0 = probability 0, 255 = probability 1).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

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
    anomaly_map_png: the map's heat map bytes (:func:`heatmap_png`), ``heatmap_side`` on its long side.
    """

    pixel_max: float
    mask_rle: dict
    mask_area: int
    bbox: Optional[tuple[int, int, int, int]]
    anomaly_map_png: bytes


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


def bounding_box(mask: np.ndarray, width: int, height: int) -> Optional[tuple[int, int, int, int]]:
    """Box of a (h', w') mask in the coordinates of a (height, width) image; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    sy, sx = height / mask.shape[0], width / mask.shape[1]
    return (int(np.floor(cols[0] * sx)), int(np.floor(rows[0] * sy)),
            int(np.ceil((cols[-1] + 1) * sx)), int(np.ceil((rows[-1] + 1) * sy)))


def heatmap_png(anomaly_map: np.ndarray) -> bytes:
    """(h, w) float map in [0, 1] -> heat map bytes: lossless WebP of the 8-bit map (R = G = B).

    255 is probability 1. Lossless WebP keeps every 8-bit value and is about a
    fifth smaller than a PNG of the same smooth map.
    """
    quantised = np.clip(np.rint(anomaly_map * 255.0), 0, 255).astype(np.uint8)
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


def encode_map(anomaly_map: torch.Tensor, width: int, height: int, mask_threshold: float,
               mask_max_side: int = 2048, heatmap_side: int = 64) -> EncodedMap:
    """Encode one (S, S) anomaly map for an image of ``width`` x ``height`` pixels.

    The map is resized (bilinear, on its own device) to the image's size, or
    to ``mask_max_side`` on the long side for larger images, then thresholded.
    """
    mh, mw = mask_size(width, height, mask_max_side)
    x = anomaly_map.float()[None, None]
    resized = F.interpolate(x, size=(mh, mw), mode="bilinear", align_corners=False)[0, 0]
    mask = (resized > mask_threshold).cpu().numpy()
    hh, hw = mask_size(width, height, heatmap_side)
    small = F.interpolate(x, size=(hh, hw), mode="bilinear", align_corners=False, antialias=True)
    small = small[0, 0].clamp(0.0, 1.0).cpu().numpy()
    return EncodedMap(
        pixel_max=float(resized.max()),
        mask_rle=encode_rle(mask),
        mask_area=int(mask.sum()),
        bbox=bounding_box(mask, width, height),
        anomaly_map_png=heatmap_png(small),
    )
