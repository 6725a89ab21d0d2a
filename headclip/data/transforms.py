"""From PIL images to the model's input: RGB, resized whole to a square, uint8.

Normalisation with the backbone's mean/std happens on the model's device
(:meth:`HeadCLIP.normalize`), so batches travel as uint8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer images are scaled from 0..65535 to 0..255
    (a plain ``convert("RGB")`` would clip them to white); float images in
    [0, 1] are scaled by 255; palette, grayscale, CMYK and alpha images are
    converted with PIL (alpha is dropped).
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image).astype(np.float32)
        if values.size and float(np.nanmax(values)) <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values)
        return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def resize_tensor(image: "torch.Tensor", size: int) -> "torch.Tensor":
    """(3, H, W) uint8 on any device -> (3, size, size) uint8, the whole image resized.

    Antialiased bicubic, the filter PIL's ``resize(BICUBIC)`` uses (within one
    grey level of it). On the CPU torch resizes uint8 directly; on a GPU it
    resizes in float32 and rounds.
    """
    import torch.nn.functional as F

    if tuple(image.shape[-2:]) == (size, size):
        return image
    x = image[None]
    if x.device.type == "cpu":
        import torch

        out = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bicubic",
                            antialias=True)
    else:
        out = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
        out = out.round_().clamp_(0, 255).to(image.dtype)
    return out[0]


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """The whole image resized (:func:`resize_tensor`) to size x size, nothing cropped; (size, size, 3) uint8."""
    import torch

    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    if pixels.shape[:2] == (size, size):
        return pixels
    resized = resize_tensor(torch.from_numpy(pixels.copy()).permute(2, 0, 1), size)
    return np.ascontiguousarray(resized.permute(1, 2, 0).numpy())


def stack_images(arrays: Iterable[np.ndarray]) -> "torch.Tensor":
    """(H, W, 3) uint8 arrays -> (B, 3, H, W) uint8 tensor."""
    import torch

    batch = np.stack(list(arrays))
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def preprocess(images: Iterable[Image.Image], size: int) -> "torch.Tensor":
    """PIL images -> (B, 3, size, size) uint8 tensor ready for :meth:`HeadCLIP.score`."""
    return stack_images(resize_square(image, size) for image in images)
