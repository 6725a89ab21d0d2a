"""The scoring job's driver: plan the run, score its unfinished shards, write the summary.

Data flows one way: listing -> plan -> Ray Data pipeline (read -> decode ->
model -> publish, :mod:`headclip.scoring.pipeline`) -> Parquet -> summary. A
shard is done once its file is published; a rerun skips it.

Before any Ray work, the checkpoint is checked against its backbone's
structure; a resumed run must keep its settings. An actor that cannot start,
a shard that keeps failing and an output that cannot be written end the run
with one line (JobError).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Any, Callable, Optional

import pyarrow as pa

from ..data.listing import check_image_table, sorted_listing
from ..errors import InputError, JobError, OutputError
from ..model.checkpoint import read_checkpoint
from ..model.validate import check_checkpoint
from ..redact import redact_options, redact_text
from ..storage.fs import canonical_uri, describe_error, write_bytes_atomic
from ..storage.layout import run_uri, summary_uri
from ..storage.schema import RESULT_COLUMNS
from .config import RESUME_SETTINGS, JobConfig
from .pipeline import run_pipeline
from .plan import RunPlan, StagedPlan, derive_run_id, read_plan
from .progress import Progress
from .shards import finished_shards, remove_temporary_files
from .summary import JobSummary, account

log = logging.getLogger(__name__)


def prepare(config: JobConfig, images: Optional[pa.Table] = None) -> RunPlan:
    """Validate the checkpoint, list the input and write (or read back) the run's plan.

    ``images`` replaces the listing of ``config.input`` (e.g. a labelled data
    set's table; scored in its own order). The listing streams through a local
    folder (sorted in runs, merged into plan pieces), so the driver's memory
    does not grow with the input. Raises CheckpointError, InputError or
    OutputError before any Ray work.
    """
    checkpoint = read_checkpoint(config.checkpoint_uri, config.storage_options)
    check_checkpoint(checkpoint, config.model_overrides, config.storage_options)
    with tempfile.TemporaryDirectory(prefix="headclip-plan-") as workdir:
        if images is None:
            listing = sorted_listing(config.input, workdir, config.extensions, config.storage_options)
        else:
            check_image_table(images, f"input {config.input}", reserved=_OUTPUT_ONLY)
            listing = images.to_batches(max_chunksize=65536)
            listing = (pa.Table.from_batches([batch]) for batch in listing)
        staged = StagedPlan(workdir, config.shard_size, None if images is None else images.schema)
        staged.add_all(listing, config.limit)
        settings = {**config.row_settings(), "listing_hash": staged.listing_hash}
        input_uri = canonical_uri(config.input, config.storage_options)
        run_id = config.run_id or derive_run_id(input_uri, checkpoint.checkpoint_id, settings)
        run_config = redact_options({"input": input_uri, "checkpoint": config.checkpoint_uri, **config.row_settings()})
        try:
            existing = read_plan(config.output, run_id, config.storage_options)
        except Exception as err:  # noqa: BLE001 - unreadable, unreachable, not a directory: one line
            raise OutputError(f"cannot use output {config.output}: {describe_error(err)}") from None
        if existing is not None:
            differing = _differing_settings(existing, run_config, checkpoint.checkpoint_id)
            if differing:
                raise InputError(f"run {run_id} was planned with other settings ({'; '.join(differing)}); run it "
                                 f"with those, or give a new --run-id")
            if existing.listing_hash != staged.listing_hash:
                log.warning("run %s was planned over a different listing (%d images, now %d); continuing its "
                            "stored plan, give a new --run-id to score the current listing", run_id,
                            existing.num_images, staged.num_images)
            log.info("resuming run %s from its stored plan (%d images)", run_id, existing.num_images)
            return existing
        try:
            return staged.publish(run_id, config.output, run_config, checkpoint.checkpoint_id,
                                  config.storage_options)
        except Exception as err:  # noqa: BLE001 - read-only, full, unreachable: one line before any work
            raise OutputError(f"cannot use output {config.output}: {describe_error(err)}") from None


_OUTPUT_ONLY = tuple(c for c in RESULT_COLUMNS if c not in ("image_id", "image_uri"))


def _differing_settings(plan: RunPlan, run_config: dict, checkpoint_id: str) -> list[str]:
    """'name stored -> now' for each setting of a stored plan that the current command changes."""
    differing = []
    if plan.checkpoint_id != checkpoint_id:
        differing.append(f"checkpoint {plan.checkpoint_id[:12]} -> {checkpoint_id[:12]}")
    stored = dict(plan.config)
    if "input" in stored:
        stored["input"] = canonical_uri(stored["input"])  # plans written before inputs were canonical
    for name in RESUME_SETTINGS:
        if name in stored and name in run_config and stored[name] != run_config[name]:
            differing.append(f"{name} {stored[name]!r} -> {run_config[name]!r}")
    return differing


def execute(plan: RunPlan, config: JobConfig, on_event: Optional[Callable[[str, Any], None]] = None) -> JobSummary:
    """Score every unfinished shard of ``plan`` on Ray Data (:mod:`headclip.scoring.pipeline`).

    Ray must be initialised. Published shards are counted from their files and
    left out. ``on_event(name, value)`` is told of each "shard_done" (a
    ShardResult), for monitoring.
    """
    start = time.perf_counter()
    summary = JobSummary(plan.run_id, plan.output, shards=plan.num_shards, checkpoint_id=plan.checkpoint_id,
                         resumed=plan.resumed)
    progress = Progress(plan.num_shards, plan.num_images, config.progress_interval)
    for result in finished_shards(plan, config.storage_options):
        account(summary, result)
        progress.update(result)
    pending = [i for i in range(plan.num_shards) if not progress.is_done(i)]
    if pending:
        run_pipeline(plan, config, summary, progress, pending, on_event)
    return _finish(summary, plan, config, progress, start)


def _finish(summary: JobSummary, plan: RunPlan, config: JobConfig, progress: Progress, start: float) -> JobSummary:
    progress.close()
    summary.seconds = time.perf_counter() - start
    remove_temporary_files(plan, config.storage_options)
    uri = summary_uri(run_uri(plan.output, plan.run_id))
    try:
        write_bytes_atomic(uri, json.dumps(summary.to_dict(), indent=2).encode(), config.storage_options)
    except OSError as err:
        raise JobError(f"every shard is published, but the summary cannot be written to {redact_text(uri)}: "
                       f"{' '.join(str(err).split())}") from None
    return summary
