"""Pictures of results: an image with its anomaly mask overlaid, as PNG bytes."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..data.decode import ImageDecodeError, decode_image
from ..scoring.masks import decode_heatmap, decode_rle
from ..storage.fs import read_bytes

MASK_COLOR = (255, 40, 40)


def overlay(image: Image.Image, mask: Optional[np.ndarray], heatmap: Optional[np.ndarray] = None,
            bbox: Optional[dict] = None, alpha: float = 0.45, max_side: int = 384) -> Image.Image:
    """The image (RGB), downsized to ``max_side``, with the mask tinted red and its box outlined.

    mask: (h, w) bool at any resolution (resized to the picture). heatmap: optional (h, w)
    map in [0, 1] shown faintly under the mask. bbox: {x0, y0, x1, y1} in image pixels.
    """
    picture = image.convert("RGB")
    scale = min(1.0, max_side / max(picture.size))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(picture, dtype=np.float32)
    if heatmap is not None:
        heat = np.asarray(Image.fromarray((heatmap * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
                          dtype=np.float32)[..., None] / 255.0
        pixels = pixels * (1 - 0.35 * heat) + 0.35 * heat * np.array([255, 200, 0], dtype=np.float32)
    if mask is not None and mask.any():
        resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
        tint = np.array(MASK_COLOR, dtype=np.float32)
        pixels[resized] = (1 - alpha) * pixels[resized] + alpha * tint
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if bbox is not None:
        draw = ImageDraw.Draw(out)
        box = [bbox["x0"] * scale, bbox["y0"] * scale, bbox["x1"] * scale - 1, bbox["y1"] * scale - 1]
        draw.rectangle(box, outline=MASK_COLOR, width=2)
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def row_overlay(row, storage_options: Optional[dict] = None, max_side: int = 384) -> Image.Image:
    """The overlay picture of one output row (its image read from ``image_uri``).

    If the image cannot be read any more, the stored heat map stands in for it.
    """
    mask = None
    if row.get("mask_rle") is not None:
        rle = row["mask_rle"]
        mask = decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})
    heat = decode_heatmap(row["anomaly_map"]) if row.get("anomaly_map") is not None else None
    try:
        image = decode_image(read_bytes(row["image_uri"], storage_options))
    except (OSError, ImageDecodeError, ValueError):
        gray = (heat if heat is not None else np.zeros((8, 8))) * 255
        image = Image.fromarray(gray.astype(np.uint8)).resize((int(row.get("width") or 64), int(row.get("height") or 64)))
    bbox = row.get("bbox")
    return overlay(image, mask, heat, bbox if isinstance(bbox, dict) else None, max_side=max_side)
