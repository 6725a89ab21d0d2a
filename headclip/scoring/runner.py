"""The distributed scoring job: plan on the driver, score shards on Ray actors.

Data flows one way: listing -> shards -> actors (decode -> model -> encode)
-> Parquet. Each actor reserves a GPU (or CPUs), loads the model once and
scores whole shards. A shard is done once its file is published; a rerun
skips it. If an actor dies, its shards go to a fresh actor.

With ``engine="data"`` the same stages run on Ray Data's streaming executor
instead (:mod:`headclip.scoring.streaming`); planning, resuming and the summary
are shared.

Before any actor starts, the checkpoint is checked against its backbone's
structure and the cluster against one actor's resources; a resumed run must
keep its settings. An actor that cannot start, a shard that keeps failing
and an output that cannot be written end the run with one line (JobError).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa

from ..errors import InputError, JobError, OutputError, cause_line
from ..model.checkpoint import read_checkpoint
from ..model.assets import DEMO_CHECKPOINT_URI
from ..model.validate import check_checkpoint
from ..data.decode import IMAGE_EXTENSIONS
from ..data.listing import check_image_table, sorted_listing
from .placement import DEFAULT_TIMEOUT, actor_layout, autoscaler_capacity, cpus_per_gpu, wait_for_placement
from .pool import ActorPool, ActorSize
from .plan import RunPlan, StagedPlan, derive_run_id, read_plan
from .progress import Progress
from ..redact import redact_options, redact_text
from .remote import ScorerActor, Stages
from .scorer import ScoringOptions, ShardResult, ShardTask
from .summary import JobSummary, account
from .shards import BrokenShard, finished_shards, remove_temporary_files, shard_result
from ..storage.fs import canonical_uri, describe_error, write_bytes_atomic
from ..storage.layout import run_uri, summary_uri
from ..storage.schema import RESULT_COLUMNS

log = logging.getLogger(__name__)


@dataclass
class JobConfig:
    """Everything a scoring run needs. ``checkpoint`` None means the demo model.

    ``checkpoint_uri`` is the checkpoint as the user named it (the demo model as
    ``headclip:demo.safetensors``); the plan and the Parquet metadata record
    that name next to the checkpoint id, never the path it resolved to on a node.
    """

    input: str
    output: str
    checkpoint: Optional[str] = None
    run_id: Optional[str] = None
    shard_size: int = 256
    actors: Optional[int] = None  # a fixed pool size; None: the pool follows the cluster
    min_actors: int = 1
    max_actors: Optional[int] = None  # None: as many as the cluster holds (or its autoscaler can add)
    actor_resources: dict = field(default_factory=dict)  # custom resources per actor, e.g. an accelerator type
    # None: 1 when the cluster has GPUs now, else CPU actors. A value given
    # explicitly is always requested, so an autoscaling cluster adds GPU nodes.
    gpus_per_actor: Optional[float] = None
    cpus_per_actor: Optional[float] = None
    limit: Optional[int] = None
    extensions: Sequence[str] = IMAGE_EXTENSIONS
    storage_options: Optional[dict] = None
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    model_overrides: dict = field(default_factory=dict)
    max_shard_attempts: int = 3
    max_actor_restarts: int = 16
    max_init_failures: int = 2  # actors whose model fails to load before the run gives up
    progress_interval: float = 5.0
    placement_timeout: float = DEFAULT_TIMEOUT  # seconds to wait for a node that can hold an actor
    # "actor": each actor reads, decodes and encodes its shards on its own CPUs; "tasks": reading and
    # decoding, then encoding and publishing, run as Ray tasks on any node (CPU-only nodes included)
    cpu_stages: str = "actor"
    # "core": the driver runs its own actor pool and tasks on Ray core; "data": Ray Data's streaming
    # executor runs the stages as operators (its autoscaling actor pool, backpressure, dashboard metrics)
    engine: str = "core"
    stage_cpus: float = 1.0  # CPUs each decode or encode task reserves
    stage_resources: dict = field(default_factory=dict)  # custom resources per stage task, e.g. a CPU node type
    shards_per_actor: Optional[int] = None  # shards in flight per actor; None: 2, or 4 with CPU stages as tasks

    @property
    def stage_reserve_cpus(self) -> float:
        """CPUs default-sized actors leave to the decode and encode tasks (none when the actor does both)."""
        return float(self.stage_cpus) if self.cpu_stages == "tasks" else 0.0

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint or DEMO_CHECKPOINT_URI

    def row_settings(self) -> dict[str, Any]:
        """The settings that shape rows; they, the input and the checkpoint name a run."""
        scoring = self.scoring
        calibrated = {}  # per-group thresholds name the run too (absent without them: same ids as before)
        if scoring.group_column and scoring.group_thresholds:
            calibrated = {"group_column": scoring.group_column,
                          "group_thresholds": {k: list(v) for k, v in sorted(scoring.group_thresholds.items())}}
        return {
            **calibrated,
            "threshold": scoring.threshold,
            "mask_threshold": scoring.mask_threshold,
            "mask_max_side": scoring.mask_max_side,
            "heatmap_side": scoring.heatmap_side,
            "max_pixels": scoring.max_pixels,
            "reduced_decode": scoring.reduced_decode,
            "device_decode": scoring.device_decode,
            "shard_size": self.shard_size,
            "limit": self.limit,
            "extensions": sorted(self.extensions),
            "model_overrides": self.model_overrides,
        }


# settings a resumed run must keep, besides its checkpoint
RESUME_SETTINGS = ("input", "threshold", "mask_threshold", "mask_max_side", "heatmap_side", "max_pixels", "shard_size",
                   "limit", "extensions", "model_overrides")


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


SCALE_EVERY = 1.0  # seconds between the pool's looks at the cluster


def execute(plan: RunPlan, config: JobConfig, on_event: Optional[Callable[[str, Any], None]] = None) -> JobSummary:
    """Score every unfinished shard of ``plan`` on a pool of Ray actors that follows the cluster.

    Ray must be initialised. ``on_event(name, value)`` is told of "actors"
    (names started), "actor_ready" ((name, node id)) and "shard_done" (a
    ShardResult), for monitoring.
    """
    import ray
    from ray.exceptions import (ActorDiedError, ActorUnavailableError, NodeDiedError, ObjectLostError,
                                OwnerDiedError, RayActorError, WorkerCrashedError)

    actor_errors = (ActorDiedError, ActorUnavailableError, RayActorError)
    lost_errors = (ObjectLostError, OwnerDiedError, NodeDiedError, WorkerCrashedError)
    start = time.perf_counter()
    summary = JobSummary(plan.run_id, plan.output, shards=plan.num_shards, checkpoint_id=plan.checkpoint_id,
                         resumed=plan.resumed)
    progress = Progress(plan.num_shards, plan.num_images, config.progress_interval)
    for result in finished_shards(plan, config.storage_options):
        account(summary, result)
        progress.update(result)
    pending = deque(i for i in range(plan.num_shards) if not progress.is_done(i))
    if not pending:
        return _finish(summary, plan, config, progress, start)
    _, gpus, cpus = actor_layout(config, ray.cluster_resources(), len(pending), cpus_per_gpu(ray.nodes()))
    size = ActorSize(cpus, gpus, dict(config.actor_resources),
                     leave_cpus=config.stage_reserve_cpus)
    if gpus == 0 and not config.actor_resources and config.gpus_per_actor is None:
        log.warning("the cluster has no GPU now: scoring on CPU actors (%g CPU each); give --gpus-per-actor 1 to "
                    "wait for GPU nodes instead", cpus)
    scorer_kwargs = dict(run_id=plan.run_id, checkpoint=config.checkpoint_uri, options=config.scoring,
                         storage_options=config.storage_options, run_config=plan.config,
                         model_overrides=config.model_overrides, extra_fields=plan.extra_fields,
                         torch_threads=max(1, int(cpus)))
    if config.engine == "data":
        from .streaming import execute_streaming

        execute_streaming(plan, config, summary, progress, list(pending), size, scorer_kwargs, on_event)
        return _finish(summary, plan, config, progress, start)
    low, high = (config.actors, config.actors) if config.actors else (config.min_actors, config.max_actors)
    pool = ActorPool(ray.remote(ScorerActor), (scorer_kwargs,), size, f"headclip-scorer-{plan.run_id}", low, high,
                     autoscaled=autoscaler_capacity(size.fits_in))
    log.info("run %s: %d images in %d shards; scoring actors of %s, %d to %s of them", plan.run_id,
             plan.num_images, plan.num_shards, ", ".join(f"{v:g} {k}" for k, v in size.need().items()), low,
             "as many as the cluster holds" if high is None else high)
    stages = Stages(ray, config)
    image_size = 0  # the model's input side, known once an actor is ready
    inflight: dict[Any, tuple[int, int, int]] = {}  # ref -> (slot, generation, shard)
    attempts = [0] * plan.num_shards
    init_failures = 0
    lost = 0  # shards whose decoded or scored data was lost with a node

    def actor_died(slot: int, err: BaseException) -> None:
        nonlocal init_failures
        summary.actor_restarts += 1
        if getattr(err, "actor_init_failed", False):
            init_failures += 1
            if init_failures >= config.max_init_failures:
                raise JobError(f"scoring actors cannot start: {cause_line(err)}") from None
        if summary.actor_restarts > config.max_actor_restarts:
            raise JobError(f"too many scoring actors died ({summary.actor_restarts}); the "
                           f"last: {cause_line(err)}") from None
        log.warning("scoring actor %d died (%s); its shards go to other actors", slot, type(err).__name__)
        pool.forget(slot)

    try:
        started = pool.scale_to(pool.target(len(pending)))
        if on_event:
            on_event("actors", started)
        wait_for_placement(cpus, gpus, config.placement_timeout, resources=config.actor_resources)
        next_scaling = time.monotonic() + SCALE_EVERY
        while pending or inflight:
            if time.monotonic() >= next_scaling or len(pool.slots) < pool.min_actors:  # asks the GCS: not per shard
                next_scaling = time.monotonic() + SCALE_EVERY
                started = pool.scale_to(pool.target(len(pending) + len(inflight)))
                if started and on_event:
                    on_event("actors", started)
            if not pending:  # nothing left to give: idle actors go
                busy = {slot for slot, _, _ in inflight.values()}
                for slot in [s for s in pool.slots if s not in busy]:
                    pool.stop(slot)
            for slot in pool.ready_slots():
                generation = pool.slots[slot].generation
                while pending and sum(1 for s, _, _ in inflight.values() if s == slot) < stages.in_flight:
                    shard = pending.popleft()
                    task = ShardTask(shard, plan.shard_uri(shard), source=plan.shard_source(shard))
                    inflight[stages.submit(pool.slots[slot].actor, task, image_size)] = (slot, generation, shard)
            readiness = pool.ready_refs()
            ready, _ = ray.wait(list(inflight) + list(readiness), num_returns=1, timeout=config.progress_interval)
            for ref in ready:
                if ref in readiness:
                    slot = readiness[ref]
                    try:
                        node, image_size = ray.get(ref)
                    except actor_errors as err:
                        actor_died(slot, err)
                        continue
                    pool.mark_ready(slot, node)
                    if on_event:
                        on_event("actor_ready", (pool.slots[slot].name, node))
                    continue
                slot, gen, shard = inflight.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except actor_errors as err:
                    pending.appendleft(shard)
                    entry = pool.slots.get(slot)
                    if entry is not None and entry.generation == gen:
                        actor_died(slot, err)
                    continue
                except lost_errors as err:  # a stage's output was on a node that died: the shard runs again
                    lost += 1
                    if lost > config.max_actor_restarts:
                        raise JobError(f"too many shards lost a stage's result ({lost}); the last: "
                                       f"{cause_line(err)}") from None
                    log.warning("shard %d lost an intermediate result (%s); it is scored again", shard,
                                type(err).__name__)
                    pending.appendleft(shard)
                    continue
                except ray.exceptions.RayTaskError as err:
                    attempts[shard] += 1
                    if attempts[shard] >= config.max_shard_attempts:
                        raise JobError(f"shard {shard} failed {attempts[shard]} times: {cause_line(err)} "
                                       f"(writing {redact_text(plan.shard_uri(shard))})") from None
                    log.warning("shard %d failed (attempt %d), retrying: %s", shard, attempts[shard],
                                cause_line(err))
                    pending.append(shard)
                    continue
                if result.skipped:  # another driver published it: count what its file holds
                    try:
                        result = shard_result(plan, shard, config.storage_options)
                    except BrokenShard as broken:
                        log.warning("shard %d is broken and is scored again: %s", shard, broken)
                        pending.append(shard)
                        continue
                account(summary, result)
                progress.update(result)
                if on_event:
                    on_event("shard_done", result)
            progress.tick()
    finally:
        pool.stop_all()
        _discard(ray, list(inflight))
    summary.actors_started = pool.started
    return _finish(summary, plan, config, progress, start)


def _discard(ray, refs: list, timeout: float = 10.0) -> None:
    """Collect the calls still in flight when a run ends early, so Ray prints no 'unhandled error' for them."""
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - the run has already failed or been interrupted
            pass


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
