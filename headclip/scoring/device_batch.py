"""Building the model's uint8 batch on its device: uploads, resizing, and JPEG decoding there.

Images arrive decoded on the host (``pixels``, any size) or, with device
decoding, as JPEG bytes. Decoded pixels travel as uint8 (pinned, copied
without blocking on CUDA) and are resized on the device
(:func:`headclip.data.transforms.resize_tensor`). JPEG bytes are decoded in
one call for the batch (nvjpeg on CUDA, libjpeg-turbo on the CPU); an image
that fails there is decoded on the host instead, and an image that fails
both becomes an error.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from ..data.decode import decode_scaled
from ..data.loading import LoadedImage
from ..data.transforms import resize_tensor
from ..errors import ImageDecodeError

log = logging.getLogger(__name__)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a (C, H, W) tensor, as PIL's ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(1, 2))
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(1, 2))
    return image


def decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[Optional[torch.Tensor]]:
    """(3, H, W) uint8 RGB on ``device`` for each JPEG, None where it cannot be decoded there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - one bad image fails the whole call: retry one by one
        decoded: list[Optional[torch.Tensor]] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except Exception as err:  # noqa: BLE001 - decoded on the host instead
                log.debug("device JPEG decoding failed (%s); decoding on the host", err)
                decoded.append(None)
        return decoded


def upload(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 host array -> (3, H, W) uint8 on ``device`` (pinned, non-blocking on CUDA)."""
    tensor = torch.from_numpy(pixels)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.permute(2, 0, 1)


def model_batch(items: Sequence[LoadedImage], size: int, device: torch.device,
                max_pixels: int) -> tuple[Optional[torch.Tensor], list[Optional[str]]]:
    """((B', 3, size, size) uint8 on ``device``, one error or None per item).

    B' counts the items without an error, in order. Items with ``jpeg`` bytes
    are decoded on the device first; the rest are uploaded as they are.
    """
    errors: list[Optional[str]] = [None] * len(items)
    images: list[Optional[torch.Tensor]] = [None] * len(items)
    pending = [j for j, item in enumerate(items) if item.jpeg is not None]
    if pending:
        decoded = decode_jpegs([items[j].jpeg for j in pending], device)
        for j, image in zip(pending, decoded):
            if image is not None:
                images[j] = orient(image, items[j].orientation)
                continue
            try:  # the host decoder, at a reduced scale where it can
                host, _ = decode_scaled(items[j].jpeg, max_pixels, size)
                images[j] = upload(np.asarray(host, dtype=np.uint8), device)
            except ImageDecodeError as err:
                errors[j] = str(err)
    for j, item in enumerate(items):
        if item.jpeg is None:
            images[j] = upload(item.pixels, device)
    resized = [resize_tensor(image, size) for j, image in enumerate(images) if errors[j] is None]
    return (torch.stack(resized) if resized else None), errors
