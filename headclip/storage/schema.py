"""The Parquet contract of scoring output: one row per input image.

Column order and types are fixed here; README documents them. Manifest
columns beyond ``image_uri``/``image_id`` are appended after these.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

MASK_RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
BBOX_TYPE = pa.struct([("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32())])

RESULT_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
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
    pa.field("anomaly_map", pa.binary()),  # 8-bit grayscale PNG
    pa.field("checkpoint_id", pa.string(), nullable=False),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
]
RESULT_COLUMNS = [f.name for f in RESULT_FIELDS]
METADATA_RUN_CONFIG = b"headclip.run_config"
METADATA_CHECKPOINT_ID = b"headclip.checkpoint_id"
STATUS_OK = "ok"
STATUS_ERROR = "error"


def result_schema(extra_fields: Iterable[pa.Field] = (), run_config: Optional[dict] = None,
                  checkpoint_id: Optional[str] = None) -> pa.Schema:
    """The output schema, with manifest columns appended and run metadata attached."""
    extra = [f for f in extra_fields if f.name not in RESULT_COLUMNS]
    metadata = {}
    if run_config is not None:
        metadata[METADATA_RUN_CONFIG] = json.dumps(run_config, sort_keys=True).encode()
    if checkpoint_id is not None:
        metadata[METADATA_CHECKPOINT_ID] = checkpoint_id.encode()
    return pa.schema(RESULT_FIELDS + extra, metadata=metadata or None)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table of ``schema`` from row dicts (missing keys are null)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """zstd-compressed Parquet bytes of ``table`` (its schema metadata included)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
