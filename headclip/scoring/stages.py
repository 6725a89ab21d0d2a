"""The CPU work around the model: reading and decoding images, encoding maps, publishing a shard's rows.

:func:`decode_records` reads and decodes on a thread pool (reads wait on
storage, not on a CPU); :func:`loaded_to_columns` turns its images into
columns that travel between stages as Arrow tensors; :func:`publish_shard`
writes a shard's Parquet file atomically. No Ray here: :mod:`headclip.ray`
makes them Ray Data stages.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from ..data.loading import LoadedImage, load_image
from ..evaluation.metrics import MetricsByClass
from ..storage.fs import write_bytes_atomic
from ..storage.layout import metrics_uri
from ..storage.schema import STATUS_ERROR, table_to_parquet_bytes
from .masks import MapBatch
from .tasks import ScoringOptions, ShardResult, peak_rss_bytes

log = logging.getLogger(__name__)


class ImageLoader:
    """Reads and decodes images on a thread pool, ahead of their consumer, in their order.

    ``resize``: images come out at the model's (size, size) (and, with a
    ``reference_size``, also at that side); otherwise at their decoded size
    (resized on the model's device). ``keep_jpeg``: JPEG bytes are
    left for decoding on the device. A read that takes over
    ``options.read_timeout`` seconds becomes an error; its thread is left behind.
    """

    def __init__(self, size: int, options: ScoringOptions, storage_options: Optional[dict], threads: int,
                 resize: bool = True, keep_jpeg: bool = False, reference_size: Optional[int] = None):
        self.size, self.options, self.storage_options = size, options, storage_options
        self.reference_size = reference_size if reference_size and reference_size != size else None
        self.threads, self.resize, self.keep_jpeg = threads, resize, keep_jpeg
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="headclip-io")

    def load(self, record: dict, data: Optional[bytes] = None) -> LoadedImage:
        """Read (unless ``data`` holds its bytes) and decode one image (on an I/O thread)."""
        options = self.options
        return load_image(record, self.size, self.storage_options, options.max_pixels,
                          with_mask=bool(record.get("has_masks")), reduced_decode=options.reduced_decode,
                          resize=self.resize, keep_jpeg=self.keep_jpeg, data=data,
                          reference_size=self.reference_size)

    def iterate(self, records: list[dict], blobs: Optional[list[bytes]] = None) -> Iterator[LoadedImage]:
        """One LoadedImage per record, in order; up to a window of reads run ahead. ``blobs``: the
        records' image bytes, already read."""
        window = max(2 * self.options.batch_size, self.threads)
        loads: deque[Future] = deque()
        next_to_submit = 0
        for record in records:
            while next_to_submit < len(records) and len(loads) < window:
                data = None if blobs is None else blobs[next_to_submit]
                loads.append(self.pool.submit(self.load, records[next_to_submit], data))
                next_to_submit += 1
            yield self._wait(loads.popleft(), record["image_uri"])

    def submit(self, fn, *args) -> Future:
        """Run other CPU work (map encoding) on the same threads."""
        return self.pool.submit(fn, *args)

    def _wait(self, future: Future, uri: str) -> LoadedImage:
        """The loaded image, or an error after ``read_timeout``; a hung read's thread is left behind."""
        try:
            return future.result(timeout=self.options.read_timeout)
        except FutureTimeout:
            log.warning("reading %s took over %gs; it becomes an error row", uri, self.options.read_timeout)
            # the hung thread keeps its pool slot: later work goes to a fresh pool
            self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="headclip-io")
            return LoadedImage(error=f"read timed out after {self.options.read_timeout:g}s")

    def close(self) -> None:
        """Stop the threads; a hung read does not block this."""
        self.pool.shutdown(wait=False, cancel_futures=True)


DECODED_COLUMNS = ("pixels", "width", "height", "decode_error", "gt_mask", "gt_mask_known", "reference_pixels")


def decode_records(records: list[dict], size: int, options: ScoringOptions, storage_options: Optional[dict] = None,
                   threads: Optional[int] = None) -> list[LoadedImage]:
    """The decode stage: read each record's image (and mask) and resize it to (size, size), and to
    ``options.reference_size`` where that differs; never raises."""
    loader = ImageLoader(size, options, storage_options, threads or options.io_threads or 4,
                         reference_size=options.reference_size)
    try:
        return list(loader.iterate(records))
    finally:
        loader.close()


def loaded_to_columns(loaded: list[LoadedImage], size: int, reference_size: Optional[int] = None
                      ) -> dict[str, np.ndarray]:
    """Decoded images as columns (:data:`DECODED_COLUMNS`): pixels (N, S, S, 3) uint8 (zeros for errors),
    width/height (N,) int64 (-1 unknown), decode_error (N,) str ("" none), gt_mask (N, S, S) bool and
    gt_mask_known (N,) bool; with a ``reference_size`` R other than S, reference_pixels (N, R, R, 3) uint8."""
    n = len(loaded)
    pixels = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for j, image in enumerate(loaded):
        if image.pixels is not None:
            pixels[j] = image.pixels
        if image.mask is not None:
            masks[j] = image.mask
    return {"pixels": pixels,
            "width": np.array([-1 if i.width is None else i.width for i in loaded], np.int64),
            "height": np.array([-1 if i.height is None else i.height for i in loaded], np.int64),
            "decode_error": np.array([i.error or "" for i in loaded], dtype=object),
            "gt_mask": masks, "gt_mask_known": np.array([i.mask is not None for i in loaded], bool),
            **({"reference_pixels": _reference_pixels(loaded, reference_size)}
               if reference_size and reference_size != size else {})}


def _reference_pixels(loaded: list[LoadedImage], side: int) -> np.ndarray:
    pixels = np.zeros((len(loaded), side, side, 3), np.uint8)
    for j, image in enumerate(loaded):
        if image.reference_pixels is not None:
            pixels[j] = image.reference_pixels
    return pixels


def columns_to_loaded(columns: dict[str, np.ndarray]) -> list[LoadedImage]:
    """The inverse of :func:`loaded_to_columns` (``reference_pixels`` may be absent)."""
    out = []
    reference = columns.get("reference_pixels")
    for j in range(len(columns["width"])):
        error = str(columns["decode_error"][j]) or None
        width, height = int(columns["width"][j]), int(columns["height"][j])
        out.append(LoadedImage(pixels=None if error else columns["pixels"][j],
                               mask=columns["gt_mask"][j] if columns["gt_mask_known"][j] else None,
                               width=None if width < 0 else width, height=None if height < 0 else height,
                               error=error, reference_pixels=None if error or reference is None else reference[j]))
    return out


def encode_rows(maps: MapBatch, rows: list[dict]) -> list[dict]:
    """Finish a batch's map encoding on the CPU (RLE strings, heat maps) into its rows."""
    for j, row in enumerate(rows):
        try:
            encoded = maps.encoded(j)
        except Exception as err:  # noqa: BLE001 - an encoding failure costs the row its mask, not the row
            row.update(status=STATUS_ERROR, error=f"cannot encode anomaly map: {err}")
            continue
        bbox = encoded.bbox
        row.update(pixel_max=encoded.pixel_max, mask_rle=encoded.mask_rle, mask_area=encoded.mask_area,
                   bbox=None if bbox is None else dict(zip(("x0", "y0", "x1", "y1"), bbox)),
                   anomaly_map=encoded.anomaly_map_bytes)
    return rows


def publish_shard(index: int, uri: str, table: pa.Table, metrics: Optional[MetricsByClass],
                  storage_options: Optional[dict] = None) -> ShardResult:
    """Write a shard's Parquet file (its metric state first) atomically; the counts of what was written."""
    data = table_to_parquet_bytes(table)
    if metrics is not None:  # the metric state is published before the shard counts as done
        write_bytes_atomic(metrics_uri(uri), json.dumps(metrics.to_dict(as_lists=True)).encode(), storage_options)
    write_bytes_atomic(uri, data, storage_options)
    errors = sum(1 for status in table["status"].to_pylist() if status == STATUS_ERROR)
    anomalous = sum(1 for flag in table["is_anomalous"].to_pylist() if flag)
    return ShardResult(index, images=table.num_rows, errors=errors, anomalous=anomalous,
                       output_bytes=len(data), peak_rss_bytes=peak_rss_bytes(),
                       metrics=None if metrics is None else metrics.to_dict())
