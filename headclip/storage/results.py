"""Reading scoring output back: a run as a pandas DataFrame, masks and heat maps as numpy.

A shard file that does not read back as Parquet (truncated, foreign) is
skipped with a warning, never a crash.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..scoring.masks import decode_heatmap, decode_rle
from .fs import as_uri, filesystem
from .layout import partition_value, shard_glob
from .schema import METADATA_RUN_CONFIG, PARTITION_KEYS

log = logging.getLogger(__name__)


class BrokenShard(Exception):
    """A shard file that cannot be read as a whole shard."""


def read_shard_table(fs, path: str, columns: Optional[list[str]] = None,
                     expected_rows: Optional[int] = None) -> pa.Table:
    """The columns of a shard file; BrokenShard unless it is whole Parquet with those columns (and rows)."""
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or unreadable: all the same here
        raise BrokenShard(f"{path}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    missing = [c for c in ("image_uri", "status") if columns is None and c not in table.column_names]
    if missing:
        raise BrokenShard(f"{path}: not a scoring shard (no {', '.join(missing)} column)")
    if expected_rows is not None and table.num_rows != expected_rows:
        raise BrokenShard(f"{path}: {table.num_rows} rows, the shard has {expected_rows} images")
    return table


def shard_files(run: str, storage_options: Optional[dict] = None) -> list[str]:
    """The published shard files of a run directory (``.../run_id=<id>``), sorted."""
    fs, path = filesystem(run, storage_options)
    return sorted(as_uri(fs, p, run) for p in fs.glob(shard_glob(path)))


def read_run(run: str, storage_options: Optional[dict] = None, columns: Optional[list[str]] = None) -> pd.DataFrame:
    """All rows of a run directory, sorted by image_uri, with ``run_id`` (from the path) first.

    ``run`` is ``OUTPUT/run_id=<id>`` (:func:`headclip.storage.layout.run_uri`).
    """
    fs, _ = filesystem(run, storage_options)
    file_columns = None if columns is None else [c for c in columns if c not in PARTITION_KEYS]
    tables, broken = [], []
    for uri in shard_files(run, storage_options):
        try:
            tables.append(read_shard_table(fs, filesystem(uri, storage_options)[1], file_columns))
        except BrokenShard as err:
            log.warning("skipped a shard file that does not read back: %s", err)
            broken.append(uri)
    if not tables:
        raise FileNotFoundError(f"no readable shard files under {run}"
                                + (f" ({len(broken)} broken, e.g. {broken[0]})" if broken else ""))
    frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    if (columns is None or "run_id" in columns) and "run_id" not in frame:  # older outputs hold the column
        frame.insert(0, "run_id", partition_value(run, "run_id"))
    return frame.sort_values("image_uri", kind="stable").reset_index(drop=True)


def run_config(run: str, storage_options: Optional[dict] = None) -> dict:
    """The run config a run's first readable shard records (``headclip.run_config``: input, checkpoint as
    named, ``group_column``...); empty when no shard says."""
    fs, _ = filesystem(run, storage_options)
    for uri in shard_files(run, storage_options):
        try:
            with fs.open(filesystem(uri, storage_options)[1], "rb") as handle:
                metadata = pq.read_schema(handle).metadata or {}
            return json.loads(metadata.get(METADATA_RUN_CONFIG, b"{}"))
        except Exception as err:  # noqa: BLE001 - a broken shard says nothing; try the next
            log.debug("no run config in %s: %s", uri, err)
    return {}


def mask(row) -> Optional[np.ndarray]:
    """A row's mask as a (h, w) bool array (None for error rows)."""
    rle = row["mask_rle"]
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return None
    return decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})


def heatmap(row) -> Optional[np.ndarray]:
    """A row's preview heat map as a (h, w) float32 array in [0, 1] (None for error rows)."""
    data = row["anomaly_map"]
    return None if data is None else decode_heatmap(data)
