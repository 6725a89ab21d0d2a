"""The model stage: a loaded model that turns images into finished result rows; no Ray here.

An :class:`ImageScorer` loads the model once, then scores image records
(``image_id``, ``image_uri`` and extra columns). The images arrive decoded by
the decode stage (:func:`headclip.scoring.stages.decode_records`), or the
scorer reads and decodes them itself on a thread pool ahead of the model, so
the device does not wait for I/O in steady state (:meth:`ImageScorer.score_table`).
Maps are encoded (mask RLE, box, heat map) on the same pool while the next
batch runs. :mod:`headclip.ray` wraps it as a Ray Data stage.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

import pyarrow as pa
import torch

from ..evaluation.metrics import MetricsByClass, add_scored_batch
from ..model.factory import create_model, resolve_device
from ..model.inference import prepare_for_inference
from ..storage.schema import STATUS_ERROR, STATUS_OK, result_schema, rows_to_table
from .device_batch import DeviceFeeder
from .masks import MapBatch, encode_maps
from .stages import ImageLoader, encode_rows
from .tasks import ScoringOptions

log = logging.getLogger(__name__)


class ImageScorer:
    """Holds a loaded model and turns image records into result rows of the Parquet contract."""

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
            prepare_for_inference(model, options.precision, options.compile, options.batch_size)
        self.model = model
        self.model.eval()
        self.checkpoint_id = self.model.checkpoint_id or "untrained"
        self.reference = _reference_scorer(options, storage_options, self.model, self.checkpoint_id)
        # a bank with its own side gets each image at that side too, for its own forward
        reference_size = self.reference.own_size if self.reference is not None else None
        self.feeder = DeviceFeeder(self.device, model.image_size, options.max_pixels, reference_size)
        self.schema = result_schema(extra_fields or [], run_config, self.checkpoint_id, run_id)
        # on a CPU device images are resized where they are decoded, else on the device
        self.loader = ImageLoader(model.image_size, options, storage_options, threads,
                                  resize=self.device.type == "cpu", keep_jpeg=options.device_decode,
                                  reference_size=reference_size)

    @property
    def image_size(self) -> int:
        """The side, in pixels, that the model's input images are resized to."""
        return self.model.image_size

    def read_at(self, side: int) -> None:
        """Read and batch images at ``side`` instead of the model's (for the model's ``patch_features`` at a
        reference bank's own side; :meth:`score_rows` then no longer fits the images)."""
        if side == self.loader.size:
            return
        loader = self.loader
        self.loader = ImageLoader(side, self.options, self.storage_options, loader.threads, resize=loader.resize,
                                  keep_jpeg=loader.keep_jpeg)
        loader.close()
        self.feeder = DeviceFeeder(self.device, side, self.options.max_pixels)

    # -- the model stage -------------------------------------------------------------

    def score_images(self, records: list[dict], loaded: Iterable, shard_index: int,
                     metrics: Optional[MetricsByClass], encode: Callable[[MapBatch, list[dict]], object],
                     on_batch: Optional[Callable[[int], None]] = None
                     ) -> tuple[list[Optional[dict]], list[tuple[list[int], object]]]:
        """Score ``records`` given their LoadedImages (in order): (rows, [(row indices, encode(maps, rows))]).

        Rows of failed images are complete; rows of scored images get their map
        fields from ``encode``, called once per batch while the next batch runs.
        With ``metrics`` (and ``label``/``class_name`` columns), scores and maps
        are also added to that per-class metric state. ``on_batch(n)`` is called
        as each forward batch of ``n`` images is done (progress within a shard).
        """
        options = self.options
        rows: list[Optional[dict]] = [None] * len(records)
        encodes: list[tuple[list[int], object]] = []
        batch: list[tuple[int, object]] = []
        scored_at = datetime.now(timezone.utc)

        def base_row(i: int) -> dict:
            threshold, mask_threshold = options.thresholds_for(records[i])
            return {"shard": shard_index, **records[i], "threshold": threshold,
                    "mask_threshold": mask_threshold, "checkpoint_id": self.checkpoint_id,
                    "scored_at": scored_at}

        def error_row(i: int, image, error: str) -> dict:
            return {**base_row(i), "status": STATUS_ERROR, "error": error, "width": image.width,
                    "height": image.height}

        in_flight: list[tuple] = []  # launched batches: (images, model output, event after the forward)

        def launch() -> None:
            """Upload, resize and queue the forward of the gathered batch."""
            pixels, reference_pixels, errors = self.feeder.batches([image for _, image in batch])
            for (i, image), error in zip(batch, errors):
                if error is not None:
                    rows[i] = error_row(i, image, error)
            scored = [(i, image) for (i, image), error in zip(batch, errors) if error is None]
            batch.clear()
            if scored:
                own = reference_pixels is not None  # the bank's features come from a forward at its own side
                out = self.model.score(pixels, patch_features=self.reference is not None and not own)
                if self.reference is not None:
                    features = self.model.patch_features(reference_pixels) if own else None
                    out = self.reference.apply_to(out, [records[i] for i, _ in scored], features)
                in_flight.append((scored, out, self.feeder.mark()))

        def collect() -> None:
            """Encode the oldest launched batch on the device (while the next forward runs) and make its rows."""
            scored, out, forward_done = in_flight.pop(0)
            with self.feeder.encoding(forward_done):
                rows_of = [base_row(i) for i, _ in scored]
                maps = encode_maps(out.anomaly_map, [(image.width, image.height) for _, image in scored],
                                   [row["mask_threshold"] for row in rows_of], options.mask_max_side,
                                   options.heatmap_side)
                joint, global_ = out.joint_score.float().cpu().tolist(), out.global_score.float().cpu().tolist()
                if metrics is not None:
                    labelled = [records[i] for i, _ in scored]
                    add_scored_batch(metrics, [r["class_name"] for r in labelled],
                                     [int(r["label"]) for r in labelled], joint, out.anomaly_map.float(),
                                     [image.mask for _, image in scored])
            for j, ((i, image), row) in enumerate(zip(scored, rows_of)):
                row.update(status=STATUS_OK, width=image.width, height=image.height, score=joint[j],
                           global_score=global_[j], is_anomalous=joint[j] > row["threshold"])
                if self.reference is not None:
                    row.update(out.row_fields(j))
                rows[i] = row
            encodes.append(([i for i, _ in scored], encode(maps, rows_of)))
            if on_batch is not None:
                on_batch(len(scored))

        for i, image in enumerate(loaded):
            if image.error is not None:
                rows[i] = error_row(i, image, image.error)
                continue
            batch.append((i, image))
            if len(batch) == options.batch_size:
                launch()
                while len(in_flight) > 1:  # one forward queued while the previous batch is encoded
                    collect()
        if batch:
            launch()
        while in_flight:
            collect()
        return rows, encodes

    # -- with reading, decoding and encoding --------------------------------------------

    def score_rows(self, records: list[dict], loaded: Optional[Iterable] = None, shard_index: int = 0,
                   metrics: Optional[MetricsByClass] = None,
                   on_batch: Optional[Callable[[int], None]] = None) -> list[dict]:
        """Finished rows (maps encoded) of ``records``, in order: one per record, error rows included.

        ``loaded``: their LoadedImages, decoded elsewhere; None reads and decodes
        them here, ahead of the model. A record's own ``shard`` wins over
        ``shard_index``. With ``metrics``, labelled images are added to it.
        ``on_batch(n)``: called as each forward batch of ``n`` images is done.
        """
        if loaded is None:
            loaded = self.loader.iterate(records)
        rows, encodes = self.score_images(records, loaded, shard_index, metrics,
                                          encode=lambda maps, rows_of: self.loader.submit(encode_rows, maps,
                                                                                          rows_of),
                                          on_batch=on_batch)
        for indices, future in encodes:
            for i, row in zip(indices, future.result()):
                rows[i] = row
        return rows

    def score_table(self, images: pa.Table, shard_index: int = 0,
                    metrics: Optional[MetricsByClass] = None) -> pa.Table:
        """Read, decode, score and encode every image of ``images`` (image_id, image_uri, extras); one row
        each, in order. With ``metrics``, labelled images are also added to that metric state."""
        return rows_to_table(self.score_rows(images.to_pylist(), None, shard_index, metrics), self.schema)

    def metrics_for(self, columns) -> Optional[MetricsByClass]:
        """An empty per-class metric state when ``columns`` (names) hold labels and class names, else None."""
        if {"label", "class_name"} <= set(columns):
            return MetricsByClass(self.options.metric_bins)
        return None

    def close(self) -> None:
        """Stop the I/O threads; the scorer cannot be used afterwards."""
        self.loader.close()  # a hung read must not hang the actor

    def __enter__(self) -> "ImageScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reference_scorer(options: ScoringOptions, storage_options: Optional[dict], model, checkpoint_id: str):
    """The bank of ``options.reference`` on the model's device, checked against the model; None without one."""
    if not options.reference:
        return None
    from ..reference import ReferenceScorer, read_bank

    bank = read_bank(options.reference, storage_options)
    bank.check(checkpoint_id, model.image_size)
    return ReferenceScorer(bank, model)
