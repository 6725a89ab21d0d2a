"""Reading scoring output back: a run as a pandas DataFrame, masks and heat maps as numpy."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..scoring.masks import decode_heatmap, decode_rle
from .fs import as_uri, filesystem
from .layout import partition_value, shard_glob
from .schema import PARTITION_KEYS


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
    tables = []
    for uri in shard_files(run, storage_options):
        with fs.open(filesystem(uri, storage_options)[1], "rb") as handle:
            tables.append(pq.read_table(handle, columns=file_columns))
    if not tables:
        raise FileNotFoundError(f"no shard files under {run}")
    frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    if (columns is None or "run_id" in columns) and "run_id" not in frame:  # older outputs hold the column
        frame.insert(0, "run_id", partition_value(run, "run_id"))
    return frame.sort_values("image_uri", kind="stable").reset_index(drop=True)


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
