"""A scoring run's plan: its id, its sorted image list and its shards.

The plan is written next to the output before any work starts:
``OUTPUT/run_id=<id>/_plan/plan.json`` (config, checkpoint id, listing
hash, shard count) and ``_plan/images.arrow`` (the sorted image list). A
rerun of the same run reads the stored plan instead of listing again, so
shard boundaries never move and no row is ever written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from ..data.listing import listing_hash, shard_slices
from ..storage.fs import filesystem, read_bytes, write_bytes_atomic
from ..storage.layout import VERSION_COLUMN, plan_file_uri, plan_images_uri, shard_uri

log = logging.getLogger(__name__)

def derive_run_id(input_uri: str, checkpoint_id: str, settings: dict[str, Any]) -> str:
    """A short stable id from the input, the checkpoint and the settings that shape rows."""
    payload = json.dumps({"input": input_uri, "checkpoint": checkpoint_id, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class RunPlan:
    run_id: str
    output: str
    images: pa.Table  # image_id, image_uri, extras; sorted
    shard_size: int
    listing_hash: str
    config: dict[str, Any]
    checkpoint_id: str
    resumed: bool = False

    @property
    def num_shards(self) -> int:
        return len(shard_slices(self.images.num_rows, self.shard_size))

    def shard_images(self, index: int) -> pa.Table:
        start, stop = shard_slices(self.images.num_rows, self.shard_size)[index]
        return self.images.slice(start, stop - start)

    def shard_uri(self, index: int) -> str:
        return shard_uri(self.output, self.run_id, index)

    @property
    def extra_fields(self) -> list[pa.Field]:
        return [f for f in self.images.schema if f.name not in ("image_id", "image_uri", VERSION_COLUMN)]


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_plan(plan: RunPlan, storage_options: Optional[dict] = None) -> None:
    write_bytes_atomic(plan_images_uri(plan.output, plan.run_id), _ipc_bytes(plan.images), storage_options)
    document = {
        "run_id": plan.run_id,
        "checkpoint_id": plan.checkpoint_id,
        "listing_hash": plan.listing_hash,
        "num_images": plan.images.num_rows,
        "shard_size": plan.shard_size,
        "num_shards": plan.num_shards,
        "shards": [plan.shard_uri(i) for i in range(plan.num_shards)],
        "config": plan.config,
    }
    write_bytes_atomic(plan_file_uri(plan.output, plan.run_id), json.dumps(document, indent=2, sort_keys=True).encode(),
                       storage_options)


def read_plan(output: str, run_id: str, storage_options: Optional[dict] = None) -> Optional[RunPlan]:
    """The stored plan of ``run_id``, or None if the run has not been planned."""
    fs, path = filesystem(plan_file_uri(output, run_id), storage_options)
    if not fs.exists(path):
        return None
    document = json.loads(read_bytes(plan_file_uri(output, run_id), storage_options))
    images = pa.ipc.open_file(pa.BufferReader(read_bytes(plan_images_uri(output, run_id), storage_options))).read_all()
    return RunPlan(run_id, output, images, document["shard_size"], document["listing_hash"], document["config"],
                   document["checkpoint_id"], resumed=True)


def make_plan(run_id: str, output: str, images: pa.Table, shard_size: int, config: dict[str, Any],
              checkpoint_id: str) -> RunPlan:
    return RunPlan(run_id, output, images, shard_size, listing_hash(images), config, checkpoint_id)
