"""The scoring pipeline on Ray Data's streaming executor (``engine="data"``).

One row per unfinished shard flows top to bottom; Ray Data runs each step as
an operator, holds back the earlier ones when a later one falls behind, and
shows their progress and metrics in the Ray dashboard::

    from_items(shards)
      -> map(decode_stage)        CPU tasks, any node: plan rows read, images read and decoded
      -> map_batches(ModelStage)  actor pool of (min, max) actors, each pinning its GPUs: the model
      -> map(encode_stage)        CPU tasks, any node: maps encoded, the shard's Parquet file published
      -> the driver               one small row per shard: its counts and metric state

With ``cpu_stages="actor"`` the actor does all of it (``map_batches(ShardStage)``).

The product's contract stays with the stages, not with Ray Data: a shard is
done once its file is published atomically, so a step Ray Data runs again
(after an actor or a node died) finds the file and skips it; a rerun skips
every published shard; a bad image is an error row of its shard. The driver
counts each shard once.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ..errors import JobError, PlacementError, cause_line
from ..model.checkpoint import read_checkpoint
from .placement import autoscaler_capacity, check_placement, describe_need, live_nodes
from .plan import RunPlan
from .pool import ActorSize
from .progress import Progress
from .remote import ScorerActor, _decode_task, _encode_task
from .scorer import ShardResult, ShardTask
from .shards import BrokenShard, shard_result
from .summary import JobSummary, account

if TYPE_CHECKING:  # pragma: no cover
    from .runner import JobConfig

log = logging.getLogger(__name__)

MAX_BLOCKS = 20_000  # one shard per input block up to this many shards; beyond, several per block


def _task(plan: RunPlan, shard: int) -> ShardTask:
    return ShardTask(shard, plan.shard_uri(shard), source=plan.shard_source(shard))


def _objects(values: list) -> np.ndarray:
    """A 1-d object array of ``values`` (numpy would unpack sequences)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _with_attempts(attempts: int, what: str, step: Callable[[], Any]) -> Any:
    """Run ``step`` up to ``attempts`` times (storage that fails for a moment); the last error is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return step()
        except Exception as err:  # noqa: BLE001 - retried, then raised with its cause
            if attempt == attempts:
                raise
            log.warning("%s failed (attempt %d of %d), retrying: %s: %s", what, attempt, attempts,
                        type(err).__name__, err)


def decode_stage(row: dict, plan: RunPlan, size: int, config: "JobConfig", threads: int) -> dict:
    """A shard's rows read from the plan and its images decoded to the model's size (a CPU task)."""
    shard = int(row["shard"])
    decoded = _with_attempts(config.max_shard_attempts, f"decoding shard {shard}",
                             lambda: _decode_task(_task(plan, shard), size, config.scoring, config.storage_options,
                                                  threads))
    return {"shard": shard, "decoded": decoded}


class ModelStage:
    """The model of one actor of the pool: decoded shards in, scored shards out (maps not yet encoded)."""

    def __init__(self, scorer_kwargs: dict):
        self.actor = ScorerActor(scorer_kwargs)  # a GPU actor without CUDA refuses to start here

    def __call__(self, batch: dict) -> dict:
        scored = [self.actor.score_decoded(decoded) for decoded in batch["decoded"]]
        return {"shard": batch["shard"], "scored": _objects(scored)}


def encode_stage(row: dict, config: "JobConfig") -> dict:
    """A scored shard's maps encoded and its Parquet file published (a CPU task); its result row."""
    scored = row["scored"]
    result = _with_attempts(config.max_shard_attempts, f"publishing shard {scored.task.index}",
                            lambda: _encode_task(scored, config.storage_options))
    return {"shard": result.index, "result": result}


class ShardStage:
    """All three stages in one actor of the pool (``cpu_stages="actor"``): shards in, results out."""

    def __init__(self, plan: RunPlan, scorer_kwargs: dict, attempts: int):
        self.plan, self.attempts = plan, attempts
        self.actor = ScorerActor(scorer_kwargs)

    def __call__(self, batch: dict) -> dict:
        results = []
        for shard in batch["shard"]:
            task = _task(self.plan, int(shard))
            results.append(_with_attempts(self.attempts, f"shard {int(shard)}", lambda: self.actor.score_shard(task)))
        return {"shard": batch["shard"], "result": _objects(results)}


def pool_bounds(config: "JobConfig", size: ActorSize, work: int) -> tuple[int, int]:
    """(min, max) actors: ``--actors`` fixes both; else at most what the autoscaler can add (or the live
    nodes hold, when that is more) and never more than the shards to score. Without an autoscaler config
    the maximum is the work, so a node that joins mid-run gets an actor."""
    if config.actors:
        return min(config.actors, work), min(config.actors, work)
    autoscaled = autoscaler_capacity(size.fits_in)
    live = size.fits_in_cluster(live_nodes())
    high = work if autoscaled in (None, -1) else max(autoscaled, live)
    if config.max_actors is not None:
        high = min(high, config.max_actors)
    high = max(1, min(high, work))
    return max(1, min(config.min_actors, high)), high


def execute_streaming(plan: RunPlan, config: "JobConfig", summary: JobSummary, progress: Progress,
                      pending: list[int], size: ActorSize, scorer_kwargs: dict,
                      on_event: Optional[Callable[[str, Any], None]] = None) -> None:
    """Score the ``pending`` shards of ``plan`` on Ray Data, counting each finished shard into ``summary``."""
    import ray
    from ray.data import DataContext

    low, high = pool_bounds(config, size, len(pending))
    check_placement(size.cpus, size.gpus, resources=size.resources, timeout=config.placement_timeout)
    context = DataContext.get_current()
    context.wait_for_min_actors_s = max(1, int(config.placement_timeout))
    context.max_consecutive_actor_init_deaths = max(0, config.max_init_failures - 1)
    log.info("run %s: %d images in %d shards on Ray Data; scoring actors of %s, %d to %d of them",
             plan.run_id, plan.num_images, plan.num_shards,
             describe_need(size.need()), low, high)
    with warnings.catch_warnings():  # max_restarts is passed as a plain remote argument, which Ray 2.60 warns of
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        scored = _pipeline(ray, plan, config, pending, size, scorer_kwargs, low, high)
    started = time.monotonic()
    try:
        for row in scored.iter_rows():
            result: ShardResult = row["result"]
            if progress.is_done(result.index):
                continue  # a step run again after a failure: the shard is counted once
            if result.skipped:  # published by another driver, or by an earlier try of this step
                try:
                    result = shard_result(plan, result.index, config.storage_options)
                except BrokenShard as broken:
                    raise JobError(f"shard {result.index} is broken: {broken}; run the job again to score it") from None
            account(summary, result)
            progress.update(result)
            if on_event:
                on_event("shard_done", result)
            progress.tick()
    except (JobError, PlacementError):
        raise
    except Exception as err:  # noqa: BLE001 - a step failed for good: one line
        if _caused_by(err, ray.exceptions.GetTimeoutError):  # the pool's minimum did not start in time
            raise PlacementError(f"no scoring actor needing {describe_need(size.need())} started within {config.placement_timeout:g}s "
                                 f"(--placement-timeout); lower --cpus-per-actor/--gpus-per-actor or add nodes") from None
        cause = _root_cause(err)
        if getattr(cause, "actor_init_failed", False):
            raise JobError(f"scoring actors cannot start: {cause_line(cause)}") from None
        raise JobError(f"scoring failed after {time.monotonic() - started:.0f}s: {cause_line(cause)}") from None
    missing = [shard for shard in pending if not progress.is_done(shard)]
    if missing:
        raise JobError(f"{len(missing)} shards ended without a result (first: {missing[0]}); run the job again "
                       f"to score them")


def _pipeline(ray, plan: RunPlan, config: "JobConfig", pending: list[int], size: ActorSize, scorer_kwargs: dict,
              low: int, high: int):
    """The dataset of result rows: the pending shards through the stages (lazy; iterating it runs them)."""
    pool = ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                      max_tasks_in_flight_per_actor=config.shards_per_actor or 2)
    # an actor that keeps dying (out of memory on every shard) is restarted at most max_actor_restarts times,
    # then the run ends with one line; Ray Data's own default restarts it for ever
    actor_args = dict(compute=pool, num_cpus=size.cpus, num_gpus=size.gpus or None,
                      resources=dict(size.resources) or None, batch_size=1, batch_format="numpy",
                      max_restarts=config.max_actor_restarts)
    shards = ray.data.from_items([{"shard": shard} for shard in pending],
                                 override_num_blocks=min(len(pending), MAX_BLOCKS))
    if config.cpu_stages != "tasks":
        return shards.map_batches(ShardStage, fn_constructor_args=(plan, scorer_kwargs, config.max_shard_attempts),
                                  **actor_args)
    # Ray tasks on any node with the stage's resources. Ray Data runs the decode step inside the model's
    # actors instead when both ask for the same resources (CPU actors of --stage-cpus CPUs, no custom
    # resources): there every node is a CPU node, so nothing is lost.
    stage_args = dict(num_cpus=config.stage_cpus, resources=dict(config.stage_resources) or None)
    threads = config.scoring.io_threads or max(4, 4 * int(max(1.0, config.stage_cpus)))
    decode_args = dict(plan=plan, size=_model_input_side(config), config=config, threads=threads)
    return (shards
            .map(decode_stage, fn_kwargs=decode_args, **stage_args)
            .map_batches(ModelStage, fn_constructor_args=(scorer_kwargs,), **actor_args)
            .map(encode_stage, fn_kwargs=dict(config=config), **stage_args))


def _root_cause(err: BaseException) -> BaseException:
    """The innermost error under Ray's and Ray Data's wrappers (a stage's own exception)."""
    from ray.data.exceptions import SystemException

    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException) or isinstance(inner, SystemException):  # an empty marker
            break
        err = inner
    return err


def _caused_by(err: BaseException, kind: type) -> bool:
    while err is not None:
        if isinstance(err, kind):
            return True
        err = err.__cause__ or err.__context__
    return False


def _model_input_side(config: "JobConfig") -> int:
    """The side the model's input images are resized to, from the checkpoint's config (decode needs it
    before any actor has loaded the model)."""
    checkpoint = read_checkpoint(config.checkpoint_uri, config.storage_options)
    model_config = checkpoint.config
    if config.model_overrides:
        model_config = model_config.replace(**config.model_overrides)
    return int(model_config.image_size)
