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

import contextlib
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


class DeviceFeeder:
    """Builds model batches on ``device`` and lends a second stream for encoding their results.

    On CUDA, a batch's host arrays are copied into one of two pinned staging
    buffers and travel in one non-blocking copy; images of one size are
    resized in one call. :meth:`encoding` runs work on a second stream after
    a batch's forward, so the next forward queued on the default stream runs
    while the previous batch is encoded. On the CPU all of this is plain,
    in-order work.
    """

    def __init__(self, device: torch.device, size: int, max_pixels: int, reference_size: Optional[int] = None):
        self.device, self.size, self.max_pixels = device, size, max_pixels
        # a reference bank's own side: batches also come at that side (:meth:`batches`)
        self.reference_size = reference_size if reference_size and reference_size != size else None
        cuda = device.type == "cuda"
        self._staging: list[Optional[torch.Tensor]] = [None, None]
        self._copied: list[Optional[torch.cuda.Event]] = [None, None]
        self._turn = 0
        self.encode_stream = torch.cuda.Stream(device) if cuda else None

    def _upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """(H, W, 3) uint8 host arrays -> (3, H, W) uint8 views on the device."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.require(a, requirements=["C", "W"])).permute(2, 0, 1) for a in arrays]
        total = sum(a.nbytes for a in arrays)
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the buffer's previous copy has left
        if self._staging[turn] is None or self._staging[turn].numel() < total:
            self._staging[turn] = torch.empty(int(total * 1.25), dtype=torch.uint8, pin_memory=True)
        staging = self._staging[turn]
        host = staging.numpy()
        offsets = np.cumsum([0] + [a.nbytes for a in arrays])
        for array, lo, hi in zip(arrays, offsets[:-1], offsets[1:]):
            host[lo:hi] = array.reshape(-1)
        on_device = staging[:total].to(self.device, non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        return [on_device[lo:hi].view(a.shape).permute(2, 0, 1) for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:])]

    def _resize(self, images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
        """(B, 3, size, size) uint8 from (3, H, W) images; one resize call per distinct size."""
        out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, image in enumerate(images):
            groups.setdefault(tuple(image.shape[1:]), []).append(j)
        for shape, index in groups.items():
            stacked = torch.stack([images[j] for j in index])
            if shape == (size, size):
                out[index] = stacked
            else:
                out[index] = torch.stack([resize_tensor(image, size) for image in stacked]) \
                    if self.device.type == "cpu" else _resize_batch(stacked, size)
        return out

    def batch(self, items: Sequence[LoadedImage]) -> tuple[Optional[torch.Tensor], list[Optional[str]]]:
        """((B', 3, size, size) uint8 on the device, one error or None per item).

        B' counts the items without an error, in order. Items with ``jpeg``
        bytes are decoded on the device first (on the host where that fails);
        the rest are uploaded as they are.
        """
        pixels, _, errors = self.batches(items)
        return pixels, errors

    def batches(self, items: Sequence[LoadedImage]
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[Optional[str]]]:
        """:meth:`batch`, plus the same images at ``reference_size`` (B', 3, R, R) uint8 (None without one).

        An image resized on the host brings its ``reference_pixels``; one at its decoded size is resized
        to both sides from the same pixels on the device. ValueError for an image resized on the host
        without its reference copy (decoded for another bank): resizing it again would not give the
        pixels the bank was built from.
        """
        errors: list[Optional[str]] = [None] * len(items)
        images: list[Optional[torch.Tensor]] = [None] * len(items)
        host: dict[int, np.ndarray] = {j: item.pixels for j, item in enumerate(items) if item.jpeg is None}
        pending = [j for j, item in enumerate(items) if item.jpeg is not None]
        if pending:
            for j, image in zip(pending, decode_jpegs([items[j].jpeg for j in pending], self.device)):
                if image is not None:
                    images[j] = orient(image, items[j].orientation)
                    continue
                try:  # the host decoder, at a reduced scale where it can
                    host[j] = np.asarray(decode_scaled(items[j].jpeg, self.max_pixels, self.size)[0], dtype=np.uint8)
                except ImageDecodeError as err:
                    errors[j] = str(err)
        order = sorted(host)
        for j, image in zip(order, self._upload([host[j] for j in order])):
            images[j] = image
        kept = [j for j in range(len(items)) if errors[j] is None]
        if not kept:
            return None, None, errors
        pixels = self._resize([images[j] for j in kept], self.size)
        if self.reference_size is None:
            return pixels, None, errors
        return pixels, self._reference_batch(items, images, kept), errors

    def _reference_batch(self, items: Sequence[LoadedImage], images: list, kept: list[int]) -> torch.Tensor:
        side = self.reference_size
        copies = [j for j in kept if items[j].reference_pixels is not None]
        for j in kept:
            if items[j].reference_pixels is None and tuple(images[j].shape[1:]) == (self.size, self.size) \
                    and (items[j].width, items[j].height) != (self.size, self.size):
                raise ValueError(f"an image came resized to {self.size}px without its {side}px copy: decode "
                                 f"with the scoring options' reference_size ({side})")
        uploaded = dict(zip(copies, self._upload([items[j].reference_pixels for j in copies]))) if copies else {}
        return self._resize([uploaded.get(j, images[j]) for j in kept], side)

    def mark(self) -> Optional[torch.cuda.Event]:
        """An event after the work queued so far (a batch's forward), or None on the CPU."""
        if self.encode_stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    @contextlib.contextmanager
    def encoding(self, after: Optional[torch.cuda.Event]):
        """Run the body on the encoding stream, once the work before ``after`` is done."""
        if self.encode_stream is None:
            yield
            return
        self.encode_stream.wait_event(after)
        with torch.cuda.stream(self.encode_stream):
            yield


def _resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 on a GPU -> (N, 3, size, size) uint8, as :func:`resize_tensor` per image."""
    import torch.nn.functional as F

    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)
