"""Loading labelled batches (images and masks) for training and evaluation.

Images and masks get the model's preprocessing: the whole image resized
(bicubic) to the square input; masks are resized the same way as floats in
[0, 1] and binarised at 0.5.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .imageio import decode_image
from .storage import read_bytes
from .transforms import resize_square


@dataclass
class LabelledBatch:
    """images: (B, 3, S, S) uint8; masks: (B, S, S) bool; labels: (B,) int64;
    mask_valid: (B,) bool, False where an anomalous image has no mask;
    class_names: B strings."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    mask_valid: torch.Tensor
    class_names: list[str]


def load_mask(uri: Optional[str], size: int, storage_options: Optional[dict] = None) -> Optional[np.ndarray]:
    """(size, size) bool mask from a mask image, or None when ``uri`` is empty."""
    if not uri:
        return None
    image = Image.open(io.BytesIO(read_bytes(uri, storage_options)))
    values = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    resized = Image.fromarray(values).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized) > 0.5


def _load_one(record: dict, size: int, storage_options: Optional[dict]):
    image = decode_image(read_bytes(record["image_uri"], storage_options))
    pixels = resize_square(image, size)
    mask = load_mask(record.get("mask_uri"), size, storage_options)
    label = int(record["label"])
    valid = mask is not None or (label == 0 and record.get("has_masks", True))
    if mask is None:
        mask = np.zeros((size, size), dtype=bool)
    return pixels, mask, label, valid, record["class_name"]


def load_batch(records: Sequence[dict], size: int, pool: ThreadPoolExecutor,
               storage_options: Optional[dict] = None) -> LabelledBatch:
    """Read and preprocess ``records`` (rows of a data-set table) in parallel."""
    loaded = list(pool.map(lambda r: _load_one(r, size, storage_options), records))
    pixels, masks, labels, valid, classes = zip(*loaded)
    return LabelledBatch(
        images=torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(np.stack(masks)),
        labels=torch.tensor(labels, dtype=torch.long),
        mask_valid=torch.tensor(valid, dtype=torch.bool),
        class_names=list(classes),
    )
