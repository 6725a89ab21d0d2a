"""One image and its mask, read and preprocessed for the model: the loader of scoring and training.

Images get the model's preprocessing: the whole image resized (bicubic) to
the square input. Masks are binarised first (any non-zero pixel is defect, so
MVTec's 0/255 masks and VisA's class ids 1, 2, ... read alike), then resized
as AnomalyCLIP resizes them (``dataset.py``, ``utils.get_transform``): the 8-bit
0/255 mask resized bilinearly, a pixel defect when it is above half. Loading
never raises: a failure is returned as a one-line ``error``, which scoring
turns into an error row and training refuses.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError, ImageDecodeError
from ..storage.fs import describe_error, is_connection_error, read_bytes
from .decode import DEFAULT_MAX_PIXELS, decode_scaled, exif_orientation, open_image, upright_size
from .transforms import resize_square


JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"  # a JPEG without it is truncated: decoded on the host, which says so


@dataclass
class LoadedImage:
    """One record after reading and preprocessing, or the reason it failed.

    pixels: (S, S, 3) uint8, or (H, W, 3) as decoded when not resized; mask:
    (S, S) bool ground truth where it is known (None for classes without pixel
    ground truth); width/height: the full upright image's size (also for some
    errors); error: one line, or None; jpeg: bytes left for decoding on the
    model's device; reference_pixels: (R, R, 3) uint8, the image at a reference
    bank's own side, where one is asked for and the image is resized here.
    """

    pixels: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    width: Optional[int] = None
    height: Optional[int] = None
    error: Optional[str] = None
    jpeg: Optional[bytes] = None
    orientation: int = 1  # EXIF orientation of ``jpeg``
    reference_pixels: Optional[np.ndarray] = None


# Single-channel modes whose values are read as they are.
_VALUE_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "F")


def _defect_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) bool: pixels of a mask image with any non-zero value (colour channels; alpha ignored)."""
    if image.mode in _VALUE_MODES:
        return np.asarray(image) != 0
    return np.asarray(image.convert("RGB")).any(axis=-1)


def load_mask(uri: Optional[str], size: int, storage_options: Optional[dict] = None,
              image_size: Optional[tuple[int, int]] = None) -> Optional[np.ndarray]:
    """(size, size) bool mask from a mask image, or None when ``uri`` is empty.

    Binarised at ``!= 0`` before resizing; the binary mask is resized as an
    8-bit 0/255 image with PIL's bilinear filter (torchvision's ``Resize``
    default, AnomalyCLIP's mask transform) and kept where above 127.5.
    ``image_size``: the (width, height) of the mask's image; a mask of
    another size is refused (DatasetError), never stretched onto it.
    """
    if not uri:
        return None
    image = Image.open(io.BytesIO(read_bytes(uri, storage_options)))
    if image_size is not None and tuple(image.size) != tuple(image_size):
        raise DatasetError(f"the mask is {image.width}x{image.height} pixels, its image {image_size[0]}x"
                           f"{image_size[1]}: a mask must have its image's size")
    binary = Image.fromarray(_defect_pixels(image).astype(np.uint8) * 255)
    return np.asarray(binary.resize((size, size), Image.Resampling.BILINEAR)) > 127


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def load_image(record: dict, size: int, storage_options: Optional[dict] = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, with_mask: bool = False, reduced_decode: bool = False,
               resize: bool = True, keep_jpeg: bool = False, data: Optional[bytes] = None,
               reference_size: Optional[int] = None) -> LoadedImage:
    """Read, decode and resize ``record["image_uri"]``; with ``with_mask`` also its mask.

    ``reduced_decode``: a large JPEG may decode at a reduced DCT scale that
    keeps both sides >= ``size`` (:func:`decode_scaled`). ``resize`` False
    leaves ``pixels`` at the decoded size, for resizing on the model's device.
    ``keep_jpeg``: a JPEG is only opened and checked (header, pixel limit,
    size); its bytes stay in ``jpeg`` for decoding on the device, and
    ``pixels`` is None. The mask is known for an image with a ``mask_uri`` and
    for a normal image (``label`` 0: all background); an anomalous image
    without one has none. ``reference_size``: with ``resize``, the image is also resized to
    that side into ``reference_pixels`` (from the same decoded image); a reduced decode
    then keeps both sides >= the larger of the two sizes.
    """
    uri = record["image_uri"]
    try:
        if data is None:
            data = read_bytes(uri, storage_options)
    except Exception as err:  # noqa: BLE001 - any failure to read (store, protocol, credentials) is the row's error
        if isinstance(err, FileNotFoundError) and not is_connection_error(err):
            return LoadedImage(error=f"not found: {uri}")
        return LoadedImage(error=f"read error: {describe_error(err)}")
    jpeg, orientation, reference = None, 1, None
    try:
        if keep_jpeg and data[:3] == JPEG_MAGIC and data.rstrip(b"\x00")[-2:] == JPEG_END:
            opened = open_image(data, max_pixels)
            pixels, (width, height), jpeg, orientation = None, upright_size(opened), data, exif_orientation(opened)
        else:
            least = max(size, reference_size or 0)
            image, (width, height) = decode_scaled(data, max_pixels, least if reduced_decode else None)
            pixels = resize_square(image, size) if resize else np.asarray(image, dtype=np.uint8)
            if resize and reference_size:
                reference = resize_square(image, reference_size)
    except ImageDecodeError as err:
        return LoadedImage(width=err.width, height=err.height, error=str(err))
    mask = None
    if with_mask:
        try:
            mask = load_mask(record.get("mask_uri"), size, storage_options, (width, height))
        except Exception as err:  # noqa: BLE001 - any unreadable mask is reported on the row
            return LoadedImage(width=width, height=height,
                               error=f"cannot read mask {record.get('mask_uri')}: {_one_line(err)}")
        if mask is None and int(record.get("label", 0)) == 0:
            mask = np.zeros((size, size), dtype=bool)
    return LoadedImage(pixels=pixels, mask=mask, width=width, height=height, jpeg=jpeg, orientation=orientation,
                       reference_pixels=reference)


@dataclass
class LabelledBatch:
    """images: (B, 3, S, S) uint8; masks: (B, S, S) bool; labels: (B,) int64;
    mask_valid: (B,) bool, False where the mask is unknown (then all False);
    class_names: B strings."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    mask_valid: torch.Tensor
    class_names: list[str]


def load_batch(records: Sequence[dict], size: int, pool: ThreadPoolExecutor,
               storage_options: Optional[dict] = None) -> LabelledBatch:
    """Read and preprocess labelled ``records`` (rows of a data-set table) in parallel.

    Raises DatasetError naming the first image that cannot be loaded.
    """
    loaded = list(pool.map(lambda r: load_image(r, size, storage_options, with_mask=r.get("has_masks", True)),
                           records))
    for record, item in zip(records, loaded):
        if item.error is not None:
            raise DatasetError(f"{record['image_uri']}: {item.error}")
    empty = np.zeros((size, size), dtype=bool)
    return LabelledBatch(
        images=torch.from_numpy(np.stack([item.pixels for item in loaded])).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(np.stack([empty if item.mask is None else item.mask for item in loaded])),
        labels=torch.tensor([int(r["label"]) for r in records], dtype=torch.long),
        mask_valid=torch.tensor([item.mask is not None for item in loaded], dtype=torch.bool),
        class_names=[r["class_name"] for r in records],
    )
