"""The CPU stages around the model: reading and decoding a shard's images, encoding and publishing its rows.

Both run inside the scoring actor (on its thread pool) or, with CPU stages as
tasks, as Ray tasks on any node, so CPU-only nodes decode and encode while
the actors' GPUs only run the model::

    decode_shard (CPU task)  ->  actor: ShardScorer.score_decoded  ->  encode_shard (CPU task)
    DecodedShard                 ScoredShard                           ShardResult (file published)

No Ray here: the runner makes these functions tasks.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa

from ..data.loading import LoadedImage, load_image
from ..evaluation.metrics import MetricsByClass
from ..storage.fs import filesystem, write_bytes_atomic
from ..storage.layout import metrics_uri
from ..storage.schema import STATUS_ERROR, rows_to_table, table_to_parquet_bytes
from .masks import MapBatch
from .plan import read_shard_images
from .tasks import ScoringOptions, ShardResult, ShardTask, peak_rss_bytes

log = logging.getLogger(__name__)


class ImageLoader:
    """Reads and decodes images on a thread pool, ahead of their consumer, in their order.

    ``resize``: images come out at the model's (size, size); otherwise at their
    decoded size (resized on the model's device). ``keep_jpeg``: JPEG bytes are
    left for decoding on the device. A read that takes over
    ``options.read_timeout`` seconds becomes an error; its thread is left behind.
    """

    def __init__(self, size: int, options: ScoringOptions, storage_options: Optional[dict], threads: int,
                 resize: bool = True, keep_jpeg: bool = False):
        self.size, self.options, self.storage_options = size, options, storage_options
        self.threads, self.resize, self.keep_jpeg = threads, resize, keep_jpeg
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="headclip-io")

    def load(self, record: dict) -> LoadedImage:
        """Read and decode one image (on an I/O thread)."""
        options = self.options
        return load_image(record, self.size, self.storage_options, options.max_pixels,
                          with_mask=bool(record.get("has_masks")), reduced_decode=options.reduced_decode,
                          resize=self.resize, keep_jpeg=self.keep_jpeg)

    def iterate(self, records: list[dict]) -> Iterator[LoadedImage]:
        """One LoadedImage per record, in order; up to a window of reads run ahead."""
        window = max(2 * self.options.batch_size, self.threads)
        loads: deque[Future] = deque()
        next_to_submit = 0
        for record in records:
            while next_to_submit < len(records) and len(loads) < window:
                loads.append(self.pool.submit(self.load, records[next_to_submit]))
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


@dataclass
class DecodedShard:
    """A shard after the decode stage: its images table and one LoadedImage per row, at the model's size."""

    task: ShardTask
    images: Optional[pa.Table] = None
    loaded: list[LoadedImage] = field(default_factory=list)
    skipped: bool = False  # its file was already published
    node: Optional[str] = None


@dataclass
class ScoredShard:
    """A shard after the model: its rows, and the device-side map results still to encode.

    rows: one per image, in order; those of scored images lack their map fields
    until :func:`encode_shard`. batches: (row indices, maps of those rows).
    """

    task: ShardTask
    schema: Optional[pa.Schema] = None
    rows: list[Optional[dict]] = field(default_factory=list)
    batches: list[tuple[list[int], MapBatch]] = field(default_factory=list)
    metrics: Optional[MetricsByClass] = None  # for labelled inputs
    skipped: bool = False
    node: Optional[str] = None
    decode_node: Optional[str] = None


def shard_images(task: ShardTask, storage_options: Optional[dict] = None) -> Optional[pa.Table]:
    """A shard's images (from the task, or read from the plan); None when its file is already published."""
    fs, path = filesystem(task.output_uri, storage_options)
    if fs.exists(path):
        return None
    return task.images if task.images is not None else read_shard_images(task.source, storage_options)


def decode_shard(task: ShardTask, size: int, options: ScoringOptions, storage_options: Optional[dict] = None,
                 threads: Optional[int] = None) -> DecodedShard:
    """Read a shard's images from the plan and decode them to (size, size); a published shard is skipped."""
    images = shard_images(task, storage_options)
    if images is None:
        return DecodedShard(task, skipped=True)
    loader = ImageLoader(size, options, storage_options, threads or options.io_threads or 4)
    try:
        loaded = list(loader.iterate(images.to_pylist()))
    finally:
        loader.close()
    return DecodedShard(ShardTask(task.index, task.output_uri, source=task.source), images, loaded)


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


def publish_shard(task: ShardTask, table: pa.Table, metrics: Optional[MetricsByClass],
                  storage_options: Optional[dict] = None) -> ShardResult:
    """Write a shard's Parquet file (its metric state first) atomically; the counts of what was written."""
    data = table_to_parquet_bytes(table)
    if metrics is not None:  # the metric state is published before the shard counts as done
        write_bytes_atomic(metrics_uri(task.output_uri), json.dumps(metrics.to_dict(as_lists=True)).encode(),
                           storage_options)
    write_bytes_atomic(task.output_uri, data, storage_options)
    errors = sum(1 for status in table["status"].to_pylist() if status == STATUS_ERROR)
    anomalous = sum(1 for flag in table["is_anomalous"].to_pylist() if flag)
    return ShardResult(task.index, images=table.num_rows, errors=errors, anomalous=anomalous,
                       output_bytes=len(data), peak_rss_bytes=peak_rss_bytes(),
                       metrics=None if metrics is None else metrics.to_dict())


def encode_shard(scored: ScoredShard, storage_options: Optional[dict] = None) -> ShardResult:
    """The encode stage: finish the maps' encoding, build the table and publish the shard."""
    task = scored.task
    if scored.skipped:
        return ShardResult(task.index, images=task.rows, skipped=True, node=scored.node)
    rows = scored.rows
    for indices, maps in scored.batches:
        for i, row in zip(indices, encode_rows(maps, [rows[i] for i in indices])):
            rows[i] = row
    result = publish_shard(task, rows_to_table(rows, scored.schema), scored.metrics, storage_options)
    result.node, result.decode_node = scored.node, scored.decode_node
    return result
