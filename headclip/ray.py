"""HeadCLIP as Ray Data stages: callable classes for ``map_batches``, in your pipeline or the job's.

Score a manifest (a Parquet or CSV table with ``image_uri``) on a pool of GPU
actors, each loading the model once::

    import ray
    from headclip.ray import HeadCLIPScorer

    ds = ray.data.read_parquet("s3://bucket/manifest.parquet")
    ds = ds.map_batches(HeadCLIPScorer, fn_constructor_kwargs={"checkpoint": "s3://bucket/models/headclip.safetensors"},
                        concurrency=(1, 8), num_gpus=1, batch_size=32)
    ds.write_parquet("s3://bucket/scores/")

The rows that come out are the Parquet contract of ``jobs.score``
(docs/output-schema.md): one per input row, error rows for images that cannot be read, the
input's other columns carried after them. Batches in and out are Arrow tables
(or dicts of numpy arrays in): nothing travels as pickled Python objects.

A batch's images are taken from, in order: ``pixels`` (decoded by
:class:`DecodeImages`, at the model's side), ``image`` (decoded at any size,
as ``ray.data.read_images(..., include_paths=True)`` gives them), ``bytes``
(``read_binary_files(..., include_paths=True)``), else read from
``image_uri``. ``path`` stands in for a missing ``image_uri``, and
``image_uri`` for a missing ``image_id``.

To decode on CPU nodes and keep the GPUs for the model, put
:func:`decode_images` (Ray tasks) or :class:`DecodeImages` (an actor pool)
before it: ``ds.map_batches(decode_images, fn_kwargs={"image_size": 518},
num_cpus=1)``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional, Union

import numpy as np
import pyarrow as pa

from .scoring.stages import DECODED_COLUMNS, columns_to_loaded, decode_records, loaded_to_columns
from .scoring.tasks import ScoringOptions
from .storage.schema import RESULT_COLUMNS, result_schema, rows_to_table

log = logging.getLogger(__name__)

Batch = Union[pa.Table, Mapping[str, Any]]

METRIC_STATE_COLUMN = "_metric_state"  # a batch's per-class metric state (JSON) on its first row, when asked
IMAGE_COLUMNS = ("image", "bytes")  # image data in a batch, besides the decode stage's columns


def _options(options: Union[ScoringOptions, Mapping, None]) -> ScoringOptions:
    if isinstance(options, ScoringOptions):
        return options
    return ScoringOptions(**dict(options or {}))


def _table(batch: Batch) -> pa.Table:
    """A batch as an Arrow table (numpy dicts and pandas frames from ``map_batches``'s other formats)."""
    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        batch = {name: batch[name].to_numpy() for name in batch.columns}
    return pa.table({name: _arrow(np.asarray(values)) for name, values in batch.items()})


def _arrow(values: np.ndarray) -> pa.Array:
    """A numpy column as Arrow: (N, ...) arrays and object arrays of arrays (images of several sizes) as Ray
    Data tensor columns, 1-d arrays as plain Arrow arrays."""
    from ray.data.extensions import ArrowTensorArray

    if values.ndim > 1 or (values.dtype == object and len(values) and isinstance(values[0], np.ndarray)):
        return ArrowTensorArray.from_numpy(values)
    return pa.array(values.tolist())


def _numpy(column: Union[pa.ChunkedArray, pa.Array]) -> np.ndarray:
    """A column as numpy: tensor columns as (N, ...) arrays, others as 1-d arrays."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if chunks and isinstance(chunks[0].type, pa.ExtensionType):
        parts = [chunk.to_numpy() for chunk in chunks]
        if any(p.dtype == object for p in parts):  # variable-shaped tensors: one array per row
            return np.array([row for p in parts for row in p] if parts else [], dtype=object)
        return np.concatenate(parts) if parts else np.zeros(0)
    return column.to_numpy(zero_copy_only=False)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class DecodeImages:
    """CPU stage: image records -> the records plus their decoded images at the model's side.

    Adds ``pixels`` (S, S, 3) uint8, ``width``/``height`` of the full image
    (-1 unknown), ``decode_error`` ("" when decoded), ``gt_mask`` (S, S) bool
    and ``gt_mask_known`` (for labelled records with ``has_masks``), and
    ``reference_pixels`` (R, R, 3) uint8 where ``options.reference_size`` R (a
    reference bank's own side) differs from S. Reads run
    on ``threads`` threads; a failed read or decode is the row's
    ``decode_error``, never an exception. ``node_column`` names a column that
    gets the node id.
    """

    def __init__(self, image_size: int, options: Union[ScoringOptions, Mapping, None] = None,
                 storage_options: Optional[dict] = None, threads: Optional[int] = None,
                 node_column: Optional[str] = None):
        self.size, self.options = int(image_size), _options(options)
        self.storage_options, self.threads, self.node_column = storage_options, threads, node_column

    def __call__(self, batch: Batch) -> pa.Table:
        table = _table(batch)
        records = table.drop_columns([c for c in DECODED_COLUMNS if c in table.column_names]).to_pylist()
        if "image_uri" not in table.column_names:
            raise ValueError("DecodeImages needs an image_uri column")
        loaded = decode_records(records, self.size, self.options, self.storage_options, self.threads)
        return _with_columns(table, loaded_to_columns(loaded, self.size, self.options.reference_size),
                             self.node_column)


def decode_images(batch: Batch, image_size: int, options: Union[ScoringOptions, Mapping, None] = None,
                  storage_options: Optional[dict] = None, threads: Optional[int] = None,
                  node_column: Optional[str] = None) -> pa.Table:
    """:class:`DecodeImages` as a function, for a stage of Ray tasks (``map_batches(decode_images,
    fn_kwargs={"image_size": 518})``) rather than an actor pool."""
    return DecodeImages(image_size, options, storage_options, threads, node_column)(batch)


def _with_columns(table: pa.Table, columns: dict[str, np.ndarray], node_column: Optional[str]) -> pa.Table:
    for name, values in columns.items():
        array = _arrow(values)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)
    if node_column:
        table = table.append_column(node_column, pa.array([_node_id()] * table.num_rows, pa.string()))
    return table


class HeadCLIPScorer:
    """Model stage: image rows -> result rows of the Parquet contract (scores, mask RLE, box, heat map).

    ``checkpoint``: a HeadCLIP checkpoint (local, ``s3://``; None: the packaged
    demo model). ``options``: :class:`~headclip.scoring.tasks.ScoringOptions`
    or a dict of its fields (thresholds, forward batch size, device, ...).
    ``run_id``/``run_config`` go into the rows' schema metadata. With
    ``metrics`` and ``label``/``class_name`` columns, each output batch's first
    row carries its per-class metric state as JSON (:data:`METRIC_STATE_COLUMN`).
    An actor that holds GPUs scores on them or not at all: without CUDA it
    fails to start.
    """

    def __init__(self, checkpoint: Optional[str] = None, *, options: Union[ScoringOptions, Mapping, None] = None,
                 storage_options: Optional[dict] = None, run_id: str = "", run_config: Optional[dict] = None,
                 model_overrides: Optional[dict] = None, torch_threads: Optional[int] = None,
                 metrics: bool = False, node_column: Optional[str] = None):
        from .scoring.scorer import ImageScorer

        _refuse_gpu_without_cuda()
        self.options = _options(options)
        self.metrics, self.node_column = metrics, node_column
        self.run_id, self.run_config = run_id or None, run_config
        self.on_batch = None  # called with n as each forward batch of n images is done (a subclass's progress)
        self.scorer = ImageScorer(run_id, checkpoint, self.options, storage_options, run_config,
                                  model_overrides, torch_threads=torch_threads)

    @property
    def image_size(self) -> int:
        return self.scorer.image_size

    def __call__(self, batch: Batch) -> pa.Table:
        table = _identified(_table(batch))
        consumed = [c for c in (*DECODED_COLUMNS, *IMAGE_COLUMNS) if c in table.column_names]
        records = table.drop_columns(consumed).to_pylist()
        loaded = self._loaded(table, records)
        metrics = self.scorer.metrics_for(table.column_names) if self.metrics else None
        rows = self.scorer.score_rows(records, loaded, metrics=metrics, on_batch=self.on_batch)
        extra = [f for f in table.drop_columns(consumed).schema if f.name not in RESULT_COLUMNS]
        out = rows_to_table(rows, result_schema(extra, self.run_config, self.scorer.checkpoint_id, self.run_id))
        if self.metrics:
            state = None if metrics is None else json.dumps(metrics.to_dict(as_lists=True))
            out = out.append_column(METRIC_STATE_COLUMN, pa.array([state] + [None] * (out.num_rows - 1), pa.string()))
        if self.node_column:
            out = out.append_column(self.node_column, pa.array([_node_id()] * out.num_rows, pa.string()))
        return out

    def _loaded(self, table: pa.Table, records: list[dict]) -> Optional[list]:
        """The batch's images as LoadedImages, or None to read them from ``image_uri`` in the scorer."""
        names = table.column_names
        if "pixels" in names:
            return columns_to_loaded({c: _numpy(table[c]) for c in DECODED_COLUMNS if c in names})
        if "image" in names:
            from .data.loading import LoadedImage

            images = _numpy(table["image"])
            return [LoadedImage(pixels=np.asarray(image, np.uint8)[..., :3] if np.ndim(image) == 3
                                else np.repeat(np.asarray(image, np.uint8)[..., None], 3, axis=2),
                                width=int(np.shape(image)[1]), height=int(np.shape(image)[0]))
                    for image in images]
        if "bytes" in names:
            return list(self.scorer.loader.iterate(records, table["bytes"].to_pylist()))
        return None

    def __del__(self):
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.close()


def _identified(table: pa.Table) -> pa.Table:
    """``image_uri`` from ``path`` where missing, and ``image_id`` from ``image_uri``."""
    names = table.column_names
    if "image_uri" not in names:
        if "path" not in names:
            raise ValueError("HeadCLIPScorer needs an image_uri (or path) column: give a manifest's image_uri, "
                             "or read with include_paths=True")
        table = table.append_column("image_uri", table["path"].cast(pa.string())).drop_columns(["path"])
    if "image_id" not in table.column_names:
        table = table.append_column("image_id", table["image_uri"].cast(pa.string()))
    return table


def _refuse_gpu_without_cuda() -> None:
    """Inside a Ray actor that holds GPUs, raise unless CUDA is usable (it must not score on the CPU)."""
    try:
        import ray

        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return
    if gpus and not _cuda_available():
        raise RuntimeError(f"this actor holds GPU {', '.join(map(str, gpus))} but CUDA is not available on node "
                           f"{_node_id()[:12]}; it will not score on the CPU")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
