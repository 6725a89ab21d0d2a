"""Pictures of results: the image, its heat map, its predicted mask and its ground truth.

A row's pictures (:func:`panels`) are drawn side by side in reports, as
anomalib's visualiser does: the untouched image, the heat map in colour, the
image with the predicted mask outlined and one box per connected region, and
the image with the ground-truth mask outlined when the row carries one.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..data.decode import ImageDecodeError, decode_image
from ..scoring.masks import decode_heatmap, decode_rle
from ..storage.fs import read_bytes

MASK_COLOR = (230, 30, 30)  # predicted mask and its boxes
TRUTH_COLOR = (20, 200, 60)  # ground-truth mask
# The heat map's colour scale (inferno), from probability 0 to 1.
HEAT_COLORS = ["#000004", "#420a68", "#932667", "#dd513a", "#fca50a", "#fcffa4"]
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def region_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each 8-connected region of a (h, w) mask (x1, y1 exclusive), largest first."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
    order = np.argsort(-areas, kind="stable")
    return [tuple(int(v) for v in boxes[i]) for i in order]


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """(h, w) map in [0, 1] -> (h, w, 3) uint8 in the :data:`HEAT_COLORS` scale."""
    anchors = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in HEAT_COLORS], dtype=np.float32)
    position = np.clip(heat, 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(position.astype(int), len(anchors) - 2)
    frac = (position - low)[..., None]
    return np.rint(anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def _fit(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """The image as RGB, scaled down to ``max_side`` on its long side; (picture, scale)."""
    picture = image.convert("RGB")
    scale = min(1.0, max_side / max(picture.size))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.BILINEAR), scale


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


def outline(picture: Image.Image, mask: Optional[np.ndarray], color: tuple[int, int, int],
            alpha: float = 0.25, boxes: bool = True, max_boxes: int = 12) -> Image.Image:
    """``picture`` with a (h, w) mask (any resolution) lightly tinted, its edge drawn and,
    with ``boxes``, one box around each of its ``max_boxes`` largest connected regions."""
    out = np.asarray(picture, dtype=np.float32).copy()
    if mask is None or not mask.any():
        return picture.copy()
    inside = _resized_mask(mask, picture.size)
    edge = inside & ~ndimage.binary_erosion(inside, structure=EIGHT_CONNECTED, border_value=0)
    tint = np.array(color, dtype=np.float32)
    out[inside] = (1 - alpha) * out[inside] + alpha * tint
    out[edge] = tint
    result = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if boxes:
        draw = ImageDraw.Draw(result)
        sy, sx = picture.height / mask.shape[0], picture.width / mask.shape[1]
        for x0, y0, x1, y1 in region_boxes(mask)[:max_boxes]:
            draw.rectangle([x0 * sx - 1, y0 * sy - 1, x1 * sx, y1 * sy], outline=color, width=2)
    return result


def overlay(image: Image.Image, mask: Optional[np.ndarray], max_side: int = 384) -> Image.Image:
    """The image, scaled to ``max_side``, with the predicted mask outlined and boxed per region."""
    picture, _ = _fit(image, max_side)
    return outline(picture, mask, MASK_COLOR)


def heat_picture(heat: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The heat map in colour, resized (bilinear) to ``size`` (width, height)."""
    values = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    return Image.fromarray(heat_colors(values))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4 keeps thin outlines
    return buffer.getvalue()


def row_mask(row) -> Optional[np.ndarray]:
    """The row's predicted mask, (h, w) bool, or None."""
    rle = row.get("mask_rle")
    if not isinstance(rle, dict):
        return None
    return decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})


def ground_truth(row, storage_options: Optional[dict] = None) -> Optional[np.ndarray]:
    """The row's ground-truth mask when known: from ``mask_uri``, or empty for a normal image
    (``label`` 0); None when the row carries neither or the mask cannot be read."""
    uri = row.get("mask_uri")
    if isinstance(uri, str) and uri:
        try:
            with Image.open(io.BytesIO(read_bytes(uri, storage_options))) as image:
                return np.asarray(image.convert("L")) > 127
        except (OSError, ValueError):
            return None
    label = row.get("label")
    if label is not None and not (isinstance(label, float) and np.isnan(label)) and int(label) == 0:
        height, width = int(row.get("height") or 1), int(row.get("width") or 1)
        return np.zeros((height, width), dtype=bool)
    return None


def _image(row, heat: Optional[np.ndarray], storage_options: Optional[dict]) -> Image.Image:
    """The row's image read from ``image_uri``; the stored heat map in grey when it cannot be read."""
    try:
        return decode_image(read_bytes(row["image_uri"], storage_options))
    except (OSError, ImageDecodeError, ValueError):
        gray = (heat if heat is not None else np.zeros((8, 8))) * 255
        size = (int(row.get("width") or 64), int(row.get("height") or 64))
        return Image.fromarray(gray.astype(np.uint8)).resize(size)


def panels(row, storage_options: Optional[dict] = None, max_side: int = 256) -> dict[str, Image.Image]:
    """The pictures of one scored row, each ``max_side`` on its long side at most:
    "image", "heat map", "prediction" and, when known, "ground truth"."""
    heat = decode_heatmap(row["anomaly_map"]) if row.get("anomaly_map") is not None else None
    picture, _ = _fit(_image(row, heat, storage_options), max_side)
    out = {"image": picture}
    if heat is not None:
        out["heat map"] = heat_picture(heat, picture.size)
    out["prediction"] = outline(picture, row_mask(row), MASK_COLOR)
    truth = ground_truth(row, storage_options)
    if truth is not None:
        out["ground truth"] = outline(picture, truth, TRUTH_COLOR, boxes=False)
    return out


def row_overlay(row, storage_options: Optional[dict] = None, max_side: int = 384) -> Image.Image:
    """The prediction picture of one output row: its image (read from ``image_uri``; the stored
    heat map stands in when it cannot be read) with the mask outlined and boxed per region."""
    heat = decode_heatmap(row["anomaly_map"]) if row.get("anomaly_map") is not None else None
    return overlay(_image(row, heat, storage_options), row_mask(row), max_side)
