"""Writing an export folder for review (local or s3://), and reading one back.

Layout::

    EXPORT/labels.json               COCO instance annotations (FiftyOne: COCODetectionDataset)
    EXPORT/data/<file_name>          the images, with images="copy"
    EXPORT/label-studio/tasks.json   Label Studio tasks with pre-annotations
    EXPORT/label-studio/config.xml   the labelling config to create the project with
    EXPORT/selection.parquet         the exported rows: what an import matches reviews against
    EXPORT/sampling.json             how the images were chosen (see selection.Sampling)

With images="uri" nothing is copied and each COCO ``file_name`` is the image's URI.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError, UsageError
from ..storage.fs import describe_error, join, open_file, read_bytes, write_bytes_atomic
from ..storage.schema import MASK_RLE_TYPE
from .coco import coco_document
from .labelstudio import LABEL_CONFIG, task
from .selection import Sampling

log = logging.getLogger(__name__)

COCO_FILE = "labels.json"
DATA_DIR = "data"
TASKS_FILE = "label-studio/tasks.json"
CONFIG_FILE = "label-studio/config.xml"
SELECTION_FILE = "selection.parquet"
SAMPLING_FILE = "sampling.json"
IMAGE_MODES = ("copy", "uri")
RECORD_SCHEMA = pa.schema([
    ("coco_id", pa.int64()), ("file_name", pa.string()), ("image_id", pa.string()), ("image_uri", pa.string()),
    ("run_id", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("score", pa.float64()),
    ("is_anomalous", pa.bool_()), ("group", pa.string()), ("class_name", pa.string()), ("reasons", pa.string()),
    ("in_sample", pa.bool_()), ("mask_rle", MASK_RLE_TYPE)])


@dataclass
class ExportConfig:
    """Where and how to export. image_url_prefix: Label Studio image URL = prefix + file name (copied images)."""

    output: str
    images: str = "copy"
    image_url_prefix: Optional[str] = None
    storage_options: Optional[dict] = None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def export_records(chosen: pd.DataFrame, images: str) -> list[dict]:
    """One plain dict per chosen row (RECORD_SCHEMA's fields), with its COCO id and exported file name."""
    records = []
    for k, row in enumerate(chosen.to_dict("records"), start=1):
        suffix = posixpath.splitext(str(row["image_uri"]))[1].lower() or ".png"
        stem = posixpath.splitext(str(row["image_id"]))[0]
        name = f"{k:05d}_{safe_name(stem)}{suffix}" if images == "copy" else str(row["image_uri"])
        rle = row.get("mask_rle")
        records.append({
            "coco_id": k, "file_name": name, "image_id": str(row["image_id"]), "image_uri": str(row["image_uri"]),
            "run_id": str(row.get("run_id")), "width": int(row["width"]), "height": int(row["height"]),
            "score": round(float(row["score"]), 6), "is_anomalous": bool(row["is_anomalous"]),
            "group": str(row["group"]),
            "class_name": str(row["class_name"]) if "class_name" in row and row["class_name"] is not None
            else str(row["group"]),
            "reasons": row["reasons"], "in_sample": bool(row["in_sample"]),
            "mask_rle": None if rle is None else {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]}})
    return records


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def write_export(chosen: pd.DataFrame, sampling: Sampling, config: ExportConfig) -> list[dict]:
    """Write the export folder for ``chosen`` (rows from :func:`selection.select`); returns its records."""
    if config.images not in IMAGE_MODES:
        raise UsageError(f"images must be one of {', '.join(IMAGE_MODES)}, got {config.images!r}")
    records = export_records(chosen, config.images)
    out, options = config.output, config.storage_options
    try:
        if config.images == "copy":
            for record in records:
                try:
                    data = read_bytes(record["image_uri"], options)
                except Exception as err:  # noqa: BLE001 - a storage failure of any kind, named in one line
                    raise UsageError(f"cannot copy {record['image_uri']}: {describe_error(err)}") from None
                write_bytes_atomic(join(out, DATA_DIR, record["file_name"]), data, options)
        note = f" (run {', '.join(sampling.run_ids)})" if sampling.run_ids else ""
        write_bytes_atomic(join(out, COCO_FILE), _json_bytes(coco_document(records, note)), options)
        prefix = config.image_url_prefix
        tasks = [task(r, f"{prefix}{r['file_name']}" if prefix and config.images == "copy" else r["image_uri"])
                 for r in records]
        write_bytes_atomic(join(out, TASKS_FILE), _json_bytes(tasks), options)
        write_bytes_atomic(join(out, CONFIG_FILE), LABEL_CONFIG.encode(), options)
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), buffer, compression="zstd")
        write_bytes_atomic(join(out, SELECTION_FILE), buffer.getvalue(), options)
        meta = {**sampling.to_dict(), "images": config.images, "exported": len(records),
                "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_bytes_atomic(join(out, SAMPLING_FILE), _json_bytes(meta), options)
    except (OSError, PermissionError) as err:
        raise OutputError(f"cannot write the export to {out}: {describe_error(err)}") from None
    return records


def read_export(export: str, storage_options: Optional[dict] = None) -> tuple[list[dict], Sampling]:
    """The records and sampling of an export folder written by :func:`write_export`."""
    try:
        with open_file(join(export, SELECTION_FILE), "rb", storage_options) as handle:
            records = pq.read_table(handle).to_pylist()
        meta = json.loads(read_bytes(join(export, SAMPLING_FILE), storage_options))
    except FileNotFoundError:
        raise UsageError(f"{export} is not an export folder (no {SELECTION_FILE} and {SAMPLING_FILE}); "
                         "write one with jobs.export") from None
    fields = set(Sampling.__dataclass_fields__)
    return records, Sampling.from_dict({k: v for k, v in meta.items() if k in fields})
