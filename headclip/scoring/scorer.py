"""Scoring one shard of images into one Parquet file; no Ray here.

A :class:`ShardScorer` loads the model once and then scores whole shards:
image bytes are read and decoded on a thread pool, ahead of the model, so
the device does not wait for I/O in steady state; maps are encoded (mask
RLE, box, heat map) on the same pool while the next batch runs.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import pyarrow as pa
import torch

from ..data.decode import DEFAULT_MAX_PIXELS
from ..data.loading import LoadedImage, load_image
from ..evaluation.metrics import MetricsByClass, add_scored_batch
from ..model.factory import create_model, resolve_device
from ..storage.fs import filesystem, write_bytes_atomic
from ..storage.layout import metrics_uri
from ..storage.schema import STATUS_ERROR, STATUS_OK, result_schema, rows_to_table, table_to_parquet_bytes
from .device_batch import DeviceFeeder
from .masks import MapBatch, encode_maps
from .plan import ShardSource, read_shard_images

log = logging.getLogger(__name__)


@dataclass
class ScoringOptions:
    """How images are scored and encoded (the parts of a run that shape its rows)."""

    threshold: float = 0.5  # image label: score > threshold
    mask_threshold: float = 0.5  # pixels: anomaly_map > mask_threshold
    mask_max_side: int = 2048  # masks of larger images are stored scaled to this long side
    heatmap_side: int = 64  # long side of the stored heat map
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs
    batch_size: int = 16
    io_threads: Optional[int] = None  # reading and decoding threads; None: the CPUs the scorer is given
    device: str = "auto"  # "auto": CUDA when available
    reduced_decode: bool = True  # large JPEGs decode at a reduced DCT scale (still >= the input size)
    device_decode: bool = False  # JPEGs decode on the model's device (nvjpeg on CUDA), else on the host
    metric_bins: int = 1000  # pixel-metric histogram bins, for labelled inputs
    read_timeout: float = 300.0  # seconds one image may take to read and decode before it is an error row
    # Calibrated per-group thresholds: an image whose ``group_column`` value is a key of
    # ``group_thresholds`` gets that (threshold, mask_threshold); any other image the two above.
    group_column: Optional[str] = None
    group_thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def thresholds_for(self, record: dict) -> tuple[float, float]:
        """(threshold, mask_threshold) of one image record."""
        value = record.get(self.group_column) if self.group_column else None
        if value is not None and str(value) in self.group_thresholds:
            threshold, mask_threshold = self.group_thresholds[str(value)]
            return float(threshold), float(mask_threshold)
        return self.threshold, self.mask_threshold


@dataclass
class ShardTask:
    """A shard to score: its index, output URI and images (a table with image_id, image_uri, extras),
    given as a table or as the place in the run's plan that holds them (read by the scorer)."""

    index: int
    output_uri: str
    images: Optional[pa.Table] = None
    source: Optional[ShardSource] = None

    @property
    def rows(self) -> int:
        return self.images.num_rows if self.images is not None else self.source.rows


@dataclass
class ShardResult:
    index: int
    images: int = 0
    errors: int = 0
    anomalous: int = 0
    skipped: bool = False
    output_bytes: int = 0
    peak_rss_bytes: int = 0  # peak resident memory of the scoring process
    metrics: Optional[dict] = None  # MetricsByClass state, for labelled inputs
    node: Optional[str] = None  # the cluster node that scored it (set by the Ray actor)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ShardScorer:
    """Holds a loaded model and turns shards into Parquet files."""

    def __init__(self, run_id: str, checkpoint: Optional[str], options: ScoringOptions,
                 storage_options: Optional[dict] = None, run_config: Optional[dict] = None,
                 model_overrides: Optional[dict] = None, extra_fields: Optional[list[pa.Field]] = None,
                 torch_threads: Optional[int] = None, model=None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        threads = options.io_threads or max(2, torch_threads or torch.get_num_threads())
        self.run_id = run_id
        self.options = options
        self.storage_options = storage_options
        self.device = resolve_device(options.device)
        if model is None:  # a model built elsewhere (in-process use) is used as it is
            model = create_model(checkpoint=checkpoint, device=self.device, storage_options=storage_options,
                                 **(model_overrides or {}))
        self.model = model
        self.feeder = DeviceFeeder(self.device, model.image_size, options.max_pixels)
        self.model.eval()
        self.checkpoint_id = self.model.checkpoint_id or "untrained"
        self.schema = result_schema(extra_fields or [], run_config, self.checkpoint_id, run_id)
        self.io_threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="headclip-io")

    # -- per image -----------------------------------------------------------------

    def _load(self, record: dict) -> LoadedImage:
        """Read and decode one image on an I/O thread; on a CPU device also resize it there."""
        options = self.options
        return load_image(record, self.model.image_size, self.storage_options, options.max_pixels,
                          with_mask=bool(record.get("has_masks")), reduced_decode=options.reduced_decode,
                          resize=self.device.type == "cpu", keep_jpeg=options.device_decode)

    @staticmethod
    def _encoded_rows(maps: MapBatch, rows: list[dict]) -> list[dict]:
        """Finish a batch's map encoding on the CPU (RLE strings, PNGs) into its rows."""
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

    # -- per shard -----------------------------------------------------------------

    def score_table(self, images: pa.Table, shard_index: int = 0,
                    metrics: Optional[MetricsByClass] = None) -> pa.Table:
        """Score every image of ``images`` (image_id, image_uri, extras); one row each, in order.

        With ``metrics`` (and ``label``/``class_name`` columns), the scores and
        maps are also added to that per-class metric state.
        """
        options = self.options
        records = images.to_pylist()
        window = max(2 * options.batch_size, self.io_threads)
        loads: deque[Future] = deque()
        next_to_submit = 0
        rows: list[Optional[dict]] = [None] * len(records)
        encodes: list[tuple[list[int], Future]] = []
        batch: list[tuple[int, LoadedImage]] = []
        scored_at = datetime.now(timezone.utc)

        def base_row(i: int) -> dict:
            threshold, mask_threshold = options.thresholds_for(records[i])
            return {**records[i], "shard": shard_index, "threshold": threshold,
                    "mask_threshold": mask_threshold, "checkpoint_id": self.checkpoint_id,
                    "scored_at": scored_at}

        def error_row(i: int, loaded: LoadedImage, error: str) -> dict:
            return {**base_row(i), "status": STATUS_ERROR, "error": error, "width": loaded.width,
                    "height": loaded.height}

        in_flight: deque[tuple] = deque()  # launched batches: (images, model output, event after the forward)

        def launch() -> None:
            """Upload, resize and queue the forward of the gathered batch."""
            pixels, errors = self.feeder.batch([loaded for _, loaded in batch])
            for (i, loaded), error in zip(batch, errors):
                if error is not None:
                    rows[i] = error_row(i, loaded, error)
            scored = [(i, loaded) for (i, loaded), error in zip(batch, errors) if error is None]
            batch.clear()
            if scored:
                in_flight.append((scored, self.model.score(pixels), self.feeder.mark()))

        def collect() -> None:
            """Encode the oldest launched batch (while the next forward runs) and make its rows."""
            scored, out, forward_done = in_flight.popleft()
            with self.feeder.encoding(forward_done):
                rows_of = [base_row(i) for i, _ in scored]
                maps = encode_maps(out.anomaly_map, [(loaded.width, loaded.height) for _, loaded in scored],
                                   [row["mask_threshold"] for row in rows_of], options.mask_max_side,
                                   options.heatmap_side)
                joint, global_ = out.joint_score.float().cpu().tolist(), out.global_score.float().cpu().tolist()
                if metrics is not None:
                    labelled = [records[i] for i, _ in scored]
                    add_scored_batch(metrics, [r["class_name"] for r in labelled],
                                     [int(r["label"]) for r in labelled], joint, out.anomaly_map.float(),
                                     [loaded.mask for _, loaded in scored])
            for j, ((i, loaded), row) in enumerate(zip(scored, rows_of)):
                row.update(status=STATUS_OK, width=loaded.width, height=loaded.height, score=joint[j],
                           global_score=global_[j], is_anomalous=joint[j] > row["threshold"])
            encodes.append(([i for i, _ in scored], self.pool.submit(self._encoded_rows, maps, rows_of)))

        for i in range(len(records)):
            while next_to_submit < len(records) and len(loads) < window:
                loads.append(self.pool.submit(self._load, records[next_to_submit]))
                next_to_submit += 1
            loaded = self._wait(loads.popleft(), records[i]["image_uri"])
            if loaded.error is not None:
                rows[i] = error_row(i, loaded, loaded.error)
                continue
            batch.append((i, loaded))
            if len(batch) == options.batch_size:
                launch()
                while len(in_flight) > 1:  # one forward queued while the previous batch is encoded
                    collect()
        if batch:
            launch()
        while in_flight:
            collect()
        for indices, future in encodes:
            for i, row in zip(indices, future.result()):
                rows[i] = row
        return rows_to_table(rows, self.schema)

    def _wait(self, future: Future, uri: str) -> LoadedImage:
        """The loaded image, or an error after ``read_timeout``; a hung read's thread is left behind."""
        try:
            return future.result(timeout=self.options.read_timeout)
        except FutureTimeout:
            log.warning("reading %s took over %gs; it becomes an error row", uri, self.options.read_timeout)
            # the hung thread keeps its pool slot: later work goes to a fresh pool
            self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="headclip-io")
            return LoadedImage(error=f"read timed out after {self.options.read_timeout:g}s")

    def score_shard(self, task: ShardTask) -> ShardResult:
        """Score a shard and publish its Parquet file; a finished shard is skipped."""
        fs, path = filesystem(task.output_uri, self.storage_options)
        if fs.exists(path):
            return ShardResult(task.index, images=task.rows, skipped=True)
        images = task.images if task.images is not None else read_shard_images(task.source, self.storage_options)
        metrics = None
        if {"label", "class_name"} <= set(images.column_names):
            metrics = MetricsByClass(self.options.metric_bins)
        table = self.score_table(images, task.index, metrics)
        data = table_to_parquet_bytes(table)
        if metrics is not None:  # the metric state is published before the shard counts as done
            write_bytes_atomic(metrics_uri(task.output_uri), json.dumps(metrics.to_dict(as_lists=True)).encode(),
                               self.storage_options)
        write_bytes_atomic(task.output_uri, data, self.storage_options)
        errors = sum(1 for status in table["status"].to_pylist() if status == STATUS_ERROR)
        anomalous = sum(1 for flag in table["is_anomalous"].to_pylist() if flag)
        return ShardResult(task.index, images=table.num_rows, errors=errors, anomalous=anomalous,
                           output_bytes=len(data), peak_rss_bytes=peak_rss_bytes(),
                           metrics=None if metrics is None else metrics.to_dict())

    def close(self) -> None:
        """Stop the I/O threads; the scorer cannot be used afterwards."""
        self.pool.shutdown(wait=False, cancel_futures=True)  # a hung read must not hang the actor

    def __enter__(self) -> "ShardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

