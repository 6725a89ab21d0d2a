"""A run's published shard files: what they hold, whether they are whole, what failed writes left.

A shard counts as done only when its file reads back as Parquet with one row
per image of the shard; a truncated or foreign file in its place is removed
(with a warning) and the shard is scored again. Counts in a run's summary
come from the files, so a shard another driver wrote is counted as it is.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Optional

from ..evaluation.metrics import MetricsByClass
from ..storage.fs import filesystem, is_local, read_bytes
from ..storage.layout import METRICS_DIR, metrics_uri, run_uri
from ..storage.results import BrokenShard, read_shard_table
from ..storage.schema import STATUS_OK
from .plan import RunPlan
from .tasks import ShardResult

log = logging.getLogger(__name__)

COUNT_COLUMNS = ["status", "is_anomalous"]


def shard_result(plan: RunPlan, index: int, storage_options: Optional[dict] = None) -> ShardResult:
    """The counts (and metric state) of a published shard, read from its files."""
    uri = plan.shard_uri(index)
    fs, path = filesystem(uri, storage_options)
    table = read_shard_table(fs, path, COUNT_COLUMNS, plan.shard_rows(index))
    metrics = None
    metrics_path = filesystem(metrics_uri(uri), storage_options)[1]
    if fs.exists(metrics_path):
        metrics = MetricsByClass.from_dict(json.loads(read_bytes(metrics_uri(uri), storage_options))).to_dict()
    status = table["status"].to_pylist()
    return ShardResult(index, images=table.num_rows, skipped=True,
                       errors=sum(1 for s in status if s != STATUS_OK),
                       anomalous=sum(1 for a in table["is_anomalous"].to_pylist() if a), metrics=metrics)


def finished_shards(plan: RunPlan, storage_options: Optional[dict] = None) -> list[ShardResult]:
    """Shards of ``plan`` whose files are published and whole; broken ones are removed to be scored again."""
    fs, root = filesystem(run_uri(plan.output, plan.run_id), storage_options)
    if not fs.exists(root):
        return []
    names = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
    results = []
    for index in range(plan.num_shards):
        uri = plan.shard_uri(index)
        if posixpath.basename(uri) not in names:
            continue
        try:
            results.append(shard_result(plan, index, storage_options))
        except BrokenShard as err:
            log.warning("shard %d is broken and is scored again: %s", index, err)
            fs.rm_file(filesystem(uri, storage_options)[1])
    return results


def remove_temporary_files(plan: RunPlan, storage_options: Optional[dict] = None) -> int:
    """Remove what interrupted local writes left in the run directory (``.shard-*.tmp``); returns the count."""
    fs, root = filesystem(run_uri(plan.output, plan.run_id), storage_options)
    if not is_local(fs) or not os.path.isdir(root):
        return 0
    removed = 0
    for folder in (root, posixpath.join(root, METRICS_DIR)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".shard-") and name.endswith(".tmp"):
                try:
                    os.unlink(posixpath.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    if removed:
        log.info("removed %d temporary files left by interrupted writes in %s", removed, root)
    return removed
