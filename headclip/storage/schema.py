"""The Parquet contract of scoring output: one row per input image.

Column order and types are fixed here; docs/output-schema.md documents them. Manifest
columns beyond ``image_uri``/``image_id`` are appended after these.

The run id is not a column: it is the ``run_id=<id>`` directory (a hive
partition, like the audit history's ``date=``), so pandas, pyarrow, DuckDB,
Polars and Ray Data read it from the path, and one Parquet file names its run
in its key-value metadata (``headclip.run_id``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

MASK_RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
# The box's fields are never null (the box itself is, for an empty mask): pandas then reads them as
# integers; fields that may be null come back as floats wherever one box is null.
BBOX_TYPE = pa.struct([pa.field(name, pa.int32(), nullable=False) for name in ("x0", "y0", "x1", "y1")])

RESULT_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("score", pa.float32()),  # joint anomaly score
    pa.field("global_score", pa.float32()),
    pa.field("pixel_max", pa.float32()),
    pa.field("is_anomalous", pa.bool_()),
    pa.field("threshold", pa.float32(), nullable=False),
    pa.field("mask_threshold", pa.float32(), nullable=False),
    pa.field("mask_rle", MASK_RLE_TYPE),
    pa.field("mask_area", pa.int64()),
    pa.field("bbox", BBOX_TYPE),
    pa.field("anomaly_map", pa.binary()),  # 8-bit heat map, lossless WebP
    pa.field("checkpoint_id", pa.string(), nullable=False),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # with a reference bank (null without): the zero-shot joint score, the reference score and
    # the bank's group the image was compared with ("*": the pooled bank, its group having none)
    pa.field("zero_shot_score", pa.float32()),
    pa.field("reference_score", pa.float32()),
    pa.field("reference_group", pa.string()),
]
RESULT_COLUMNS = [f.name for f in RESULT_FIELDS]
METADATA_RUN_CONFIG = b"headclip.run_config"
METADATA_CHECKPOINT_ID = b"headclip.checkpoint_id"
METADATA_RUN_ID = b"headclip.run_id"
# Hive partition keys of the output layouts; manifest columns of these names are not carried.
PARTITION_KEYS = ("run_id", "date")
# Columns whose min/max statistics (per row group and in the page index) let readers skip
# data: ids, status, scores, flags and times. The heat map, mask and box get none.
STATISTICS_COLUMNS = ("image_id", "image_uri", "shard", "status", "score", "global_score", "pixel_max",
                      "is_anomalous", "mask_area", "checkpoint_id", "scored_at")
# Columns of values that rarely repeat (ids, URIs, scores, masks, heat maps) are written
# without a dictionary, so each data page holds its rows' bytes and nothing else.
PLAIN_COLUMNS = ("image_id", "image_uri", "score", "global_score", "pixel_max", "mask_rle", "mask_area",
                 "anomaly_map")
# Rows per row group, the unit that min/max statistics skip: a shard of up to 1024 images is one.
ROW_GROUP_ROWS = 1024
# Data pages of about 32 KiB (about 25 heat maps), so readers that use the page index fetch a
# few rows' heat maps without the rest of the column chunk.
DATA_PAGE_BYTES = 32 * 1024
PAGE_ROWS_CHECK = 64  # rows written between page-size checks
STATUS_OK = "ok"
STATUS_ERROR = "error"


def result_schema(extra_fields: Iterable[pa.Field] = (), run_config: Optional[dict] = None,
                  checkpoint_id: Optional[str] = None, run_id: Optional[str] = None) -> pa.Schema:
    """The output schema, with manifest columns appended and run metadata attached."""
    extra = [f for f in extra_fields if f.name not in RESULT_COLUMNS and f.name not in PARTITION_KEYS]
    metadata = {}
    if run_id is not None:
        metadata[METADATA_RUN_ID] = run_id.encode()
    if run_config is not None:
        metadata[METADATA_RUN_CONFIG] = json.dumps(run_config, sort_keys=True).encode()
    if checkpoint_id is not None:
        metadata[METADATA_CHECKPOINT_ID] = checkpoint_id.encode()
    return pa.schema(RESULT_FIELDS + extra, metadata=metadata or None)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table of ``schema`` from row dicts (missing keys are null)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def statistics_columns(schema: pa.Schema) -> list[str]:
    """Columns of ``schema`` written with statistics: :data:`STATISTICS_COLUMNS` and flat manifest columns."""
    extras = [f.name for f in schema if f.name not in RESULT_COLUMNS and _prunes(f.type)]
    return [name for name in STATISTICS_COLUMNS if name in schema.names] + extras


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet leaf columns of ``schema`` written with dictionary encoding: all but :data:`PLAIN_COLUMNS`."""
    return [path for f in schema if f.name not in PLAIN_COLUMNS for path in _leaf_paths(f.name, f.type)]


def _leaf_paths(name: str, type_: pa.DataType) -> list[str]:
    """Parquet column paths under a field (``bbox.x0``, ``mask_rle.size.list.element``)."""
    if pa.types.is_struct(type_):
        return [p for i in range(type_.num_fields) for p in _leaf_paths(f"{name}.{type_.field(i).name}",
                                                                        type_.field(i).type)]
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _leaf_paths(f"{name}.list.element", type_.value_type)
    return [name]


def _prunes(type_: pa.DataType) -> bool:
    return (pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)
            or pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_temporal(type_))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """zstd-compressed Parquet bytes of ``table`` (its schema metadata included).

    Row groups of up to :data:`ROW_GROUP_ROWS` rows; statistics only for
    :func:`statistics_columns`; dictionaries only for :func:`dictionary_columns`;
    the page index (column and offset indexes) on.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   data_page_size=DATA_PAGE_BYTES, write_batch_size=PAGE_ROWS_CHECK,
                   write_statistics=statistics_columns(table.schema),
                   use_dictionary=dictionary_columns(table.schema), write_page_index=True)
    return sink.getvalue().to_pybytes()
