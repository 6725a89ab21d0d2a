"""The scoring job's pipeline on Ray Data, read top to bottom.

::

    from_items(unfinished shards)             one row per shard index
      -> map_batches(read_shards)             CPU tasks: each shard's image rows from the stored plan
      -> map_batches(decode_images)           CPU tasks, any node: images read, decoded, resized to the model's side
      -> map_batches(pad_shards)              each shard to exactly shard_size rows (see below)
      -> map_batches(ShardScorer)             actor pool pinning GPUs: HeadCLIPScorer, one shard per call
      -> map_batches(publish_shards)          CPU tasks, any node: each shard's Parquet file published atomically
      -> the driver                           one small row per shard: its counts, metric state and nodes

:func:`~headclip.ray.decode_images` and :class:`~headclip.ray.HeadCLIPScorer`
are the public stages a user's own pipeline uses. The contract stays with the
stages: a shard is done once its file is published atomically; a step Ray
Data runs again (after an actor or a node died) finds the file and skips it;
a rerun skips every published shard; a bad image is an error row of its shard.
The driver counts each shard once.

A shard travels as whole blocks: blocks are never split
(``target_max_block_size`` None) and every shard is padded to ``shard_size``
rows before the model, whose ``batch_size`` (Ray Data asks for one with GPUs)
is ``shard_size``, so each model call holds exactly one shard. The publish
step checks each shard's row count against the plan.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import threading
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from ..errors import JobError, PlacementError, cause_line
from ..evaluation.metrics import MetricsByClass
from ..model.checkpoint import read_checkpoint
from ..redact import redact_text
from ..ray import METRIC_STATE_COLUMN, HeadCLIPScorer, decode_images
from ..storage.fs import filesystem
from ..storage.schema import result_schema
from .config import JobConfig
from .placement import (ActorSize, actor_layout, check_placement, cpus_per_gpu, describe_need, largest_node, live_nodes,
                        node_can_hold, pool_bounds, wait_for_stage_nodes)
from .plan import RunPlan
from .progress import Progress, ScoredImages, watch_batches
from .shards import BrokenShard, shard_result
from .stages import publish_shard
from .summary import JobSummary, account
from .tasks import ShardResult, peak_rss_bytes

log = logging.getLogger(__name__)

MAX_BLOCKS = 20_000  # one shard per input block up to this many shards; beyond, several per block
PAD = "_pad"  # padding rows of a shard, dropped before the model
DECODE_NODE, MODEL_NODE = "_decode_node", "_model_node"
MODEL_RSS = "_model_peak_rss"  # the scoring actor's peak resident memory (bytes) after scoring the shard
INTERNAL = (PAD, DECODE_NODE, MODEL_NODE, MODEL_RSS, METRIC_STATE_COLUMN)
RESULT_TYPES = pa.schema([("shard", pa.int64()), ("images", pa.int64()), ("errors", pa.int64()),
                          ("anomalous", pa.int64()), ("skipped", pa.bool_()), ("output_bytes", pa.int64()),
                          ("peak_rss_bytes", pa.int64()), ("metrics", pa.string()), ("node", pa.string()),
                          ("decode_node", pa.string()), ("encode_node", pa.string())])


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


def read_shards(batch: dict, plan: RunPlan, storage_options: Optional[dict], attempts: int) -> pa.Table:
    """Shard indices -> the shards' image rows from the stored plan, with a ``shard`` column."""
    tables = []
    for shard in (int(s) for s in batch["shard"]):
        images = _with_attempts(attempts, f"reading shard {shard} from the plan",
                                lambda: plan.shard_images(shard, storage_options))
        tables.append(images.append_column("shard", pa.array(np.full(images.num_rows, shard, np.int32))))
    return pa.concat_tables(tables)


def pad_shards(table: pa.Table, shard_size: int) -> pa.Table:
    """Each shard of ``table`` (rows grouped by shard) filled up to ``shard_size`` rows with padding rows."""
    shards = table["shard"].to_numpy()
    pieces, start = [], 0
    for end in [*np.flatnonzero(shards[1:] != shards[:-1]) + 1, len(shards)]:
        rows = table.slice(start, end - start)
        missing = shard_size - rows.num_rows
        rows = rows.append_column(PAD, pa.array(np.zeros(rows.num_rows, bool)))
        if missing > 0:
            filler = rows.take(np.zeros(missing, np.int64)).set_column(
                rows.schema.get_field_index(PAD), PAD, pa.array(np.ones(missing, bool)))
            rows = pa.concat_tables([rows, filler])
        pieces.append(rows)
        start = end
    return pa.concat_tables(pieces)


class ShardScorer(HeadCLIPScorer):
    """The model stage of the job: :class:`HeadCLIPScorer` on a shard, its padding rows left out; each forward
    batch's image count goes to ``counter`` (a :class:`ScoredImages` actor), for the driver's progress."""

    def __init__(self, *, counter=None, **kwargs):
        super().__init__(**kwargs)
        if counter is not None:
            self.on_batch = lambda images: counter.add.remote(images)  # fire and forget

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = np.flatnonzero(~batch[PAD].to_numpy(zero_copy_only=False))
        scored = super().__call__(batch.take(keep).drop_columns([PAD]))
        return scored.append_column(MODEL_RSS, pa.array(np.full(scored.num_rows, peak_rss_bytes(), np.int64)))


def publish_shards(table: pa.Table, plan: RunPlan, schema: pa.Schema, storage_options: Optional[dict],
                   attempts: int) -> pa.Table:
    """Scored rows -> each shard's Parquet file (and metric state) published; one result row per shard."""
    from ..ray import _node_id

    results, node = [], _node_id()
    shards = table["shard"].to_numpy()
    for shard in dict.fromkeys(shards.tolist()):
        rows = table.take(np.flatnonzero(shards == shard))
        expected = plan.shard_rows(shard)
        if rows.num_rows != expected:  # the pipeline keeps shards whole; never publish part of one
            raise JobError(f"shard {shard} reached the publish step with {rows.num_rows} of its {expected} rows")
        try:
            result = _with_attempts(attempts, f"publishing shard {shard}",
                                    lambda: _publish(plan, schema, shard, rows, storage_options))
        except Exception as err:  # noqa: BLE001 - its cause in one line, for the driver to say
            raise JobError(f"shard {shard} failed {attempts} times: {type(err).__name__}: "
                           f"{' '.join(str(err).split())[:300]} (writing {redact_text(plan.shard_uri(shard))})") from None
        result.node, result.decode_node, result.encode_node = _first(rows, MODEL_NODE), _first(rows, DECODE_NODE), node
        result.peak_rss_bytes = int(_first(rows, MODEL_RSS) or 0)
        results.append(result)
    return pa.Table.from_pylist([_result_row(r) for r in results], schema=RESULT_TYPES)


def _publish(plan: RunPlan, schema: pa.Schema, shard: int, rows: pa.Table,
             storage_options: Optional[dict]) -> ShardResult:
    uri = plan.shard_uri(shard)
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):  # published by an earlier try of this step, or by another driver
        return ShardResult(shard, images=rows.num_rows, skipped=True)
    metrics = None
    if METRIC_STATE_COLUMN in rows.column_names:
        for state in rows[METRIC_STATE_COLUMN].to_pylist():
            if state is not None:
                part = MetricsByClass.from_dict(json.loads(state))
                metrics = part if metrics is None else metrics.merge(part)
    table = rows.drop_columns([c for c in INTERNAL if c in rows.column_names]).select(schema.names)
    return publish_shard(shard, uri, table.cast(schema), metrics, storage_options)


def _first(rows: pa.Table, column: str) -> Optional[str]:
    return rows[column][0].as_py() if column in rows.column_names and rows.num_rows else None


def _result_row(result: ShardResult) -> dict:
    return {"shard": result.index, "images": result.images, "errors": result.errors, "anomalous": result.anomalous,
            "skipped": result.skipped, "output_bytes": result.output_bytes, "peak_rss_bytes": result.peak_rss_bytes,
            "metrics": None if result.metrics is None else json.dumps(MetricsByClass.from_dict(result.metrics)
                                                                       .to_dict(as_lists=True)),
            "node": result.node, "decode_node": result.decode_node, "encode_node": result.encode_node}


def _shard_result(row: dict) -> ShardResult:
    metrics = None if row["metrics"] is None else MetricsByClass.from_dict(json.loads(row["metrics"])).to_dict()
    return ShardResult(int(row["shard"]), images=row["images"], errors=row["errors"], anomalous=row["anomalous"],
                       skipped=row["skipped"], output_bytes=row["output_bytes"], peak_rss_bytes=row["peak_rss_bytes"],
                       metrics=metrics, node=row["node"], decode_node=row["decode_node"],
                       encode_node=row["encode_node"])


def actor_size(config: JobConfig, work: int) -> ActorSize:
    """What each scoring actor reserves, from the flags and the cluster now (see :func:`actor_layout`)."""
    import ray

    _, gpus, cpus = actor_layout(config, ray.cluster_resources(), work, cpus_per_gpu(ray.nodes()))
    if gpus == 0 and not config.actor_resources and config.gpus_per_actor is None:
        log.warning("the cluster has no GPU now: scoring on CPU actors (%g CPU each); give --gpus-per-actor 1 to "
                    "wait for GPU nodes instead", cpus)
    return ActorSize(cpus, gpus, dict(config.actor_resources), leave_cpus=float(config.stage_cpus))


def build(plan: RunPlan, config: JobConfig, pending: list[int], size: ActorSize, low: int, high: int,
          counter=None):
    """The dataset of result rows: the pending shards through the stages (lazy; iterating it runs them)."""
    import ray

    checkpoint = read_checkpoint(config.checkpoint_uri, config.storage_options)
    model_config = checkpoint.config.replace(**config.model_overrides) if config.model_overrides else checkpoint.config
    labelled = {"label", "class_name"} <= set(plan.schema.names)
    scorer = dict(checkpoint=config.checkpoint_uri, options=config.scoring, storage_options=config.storage_options,
                  run_id=plan.run_id, run_config=plan.config, model_overrides=config.model_overrides,
                  torch_threads=max(1, int(size.cpus)), metrics=labelled, node_column=MODEL_NODE, counter=counter)
    stage = dict(num_cpus=config.stage_cpus, resources=dict(config.stage_resources) or None, batch_format="pyarrow")
    threads = config.scoring.io_threads or max(4, 4 * int(max(1.0, config.stage_cpus)))
    schema = result_schema(plan.extra_fields, plan.config, checkpoint.checkpoint_id, plan.run_id)
    pool = ray.data.ActorPoolStrategy(min_size=low, max_size=high,
                                      max_tasks_in_flight_per_actor=max(1, config.shards_per_actor))
    shards = ray.data.from_items([{"shard": shard} for shard in pending],
                                 override_num_blocks=min(len(pending), MAX_BLOCKS))
    ds = shards.map_batches(read_shards, fn_args=(plan, config.storage_options, config.max_shard_attempts),
                            batch_format="numpy", **{k: v for k, v in stage.items() if k != "batch_format"})
    if not config.scoring.device_decode:  # else the actor reads the bytes and decodes JPEGs on its GPU
        ds = ds.map_batches(decode_images, fn_args=(model_config.image_size, config.scoring, config.storage_options,
                                                    threads, DECODE_NODE), **stage)
    # an actor that keeps dying (out of memory on every shard) is restarted at most max_actor_restarts times, then
    # the run ends with one line; Ray Data's own default restarts it for ever. Ray 2.60 takes max_restarts only as
    # a plain remote argument, which it marks deprecated (to be removed in 2.64).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = (ds.map_batches(pad_shards, fn_args=(plan.shard_size,), **stage)
              .map_batches(ShardScorer, fn_constructor_kwargs=scorer, compute=pool, batch_size=plan.shard_size,
                           num_cpus=size.cpus, num_gpus=size.gpus or None, resources=dict(size.resources) or None,
                           batch_format="pyarrow", max_restarts=config.max_actor_restarts))
    return ds.map_batches(publish_shards, fn_args=(plan, schema, config.storage_options, config.max_shard_attempts),
                          **stage)


def run_pipeline(plan: RunPlan, config: JobConfig, summary: JobSummary, progress: Progress, pending: list[int],
                 on_event: Optional[Callable[[str, Any], None]] = None) -> None:
    """Score the ``pending`` shards of ``plan``, counting each finished shard into ``summary`` once."""
    import ray
    from ray.data import DataContext

    size = actor_size(config, len(pending))
    # actors no node holds yet are started all the same: pending, they are the autoscaler's demand, and
    # Ray Data gives up on them after --placement-timeout (wait_for_min_actors_s), said in one line
    check_placement(size.cpus, size.gpus, size.resources, config.placement_timeout)
    wait_for_stage_nodes(config)
    low, high = pool_bounds(config, size, len(pending))
    context = DataContext.get_current()
    context.target_max_block_size = None  # a shard's rows stay in one block from stage to stage
    context.wait_for_min_actors_s = max(1, int(config.placement_timeout))
    context.max_consecutive_actor_init_deaths = max(0, config.max_init_failures - 1)
    log.info("run %s: %d images in %d shards; scoring actors of %s, %d to %d of them", plan.run_id,
             plan.num_images, plan.num_shards, describe_need(size.need()), low, high)
    counter = ray.remote(num_cpus=0)(ScoredImages).remote()
    results = build(plan, config, pending, size, low, high, counter)
    started = time.monotonic()
    quiet = _QuietRayDataErrors()
    logging.getLogger("ray.data.exceptions").addFilter(quiet)
    stop = threading.Event()
    threading.Thread(target=watch_batches, args=(counter, progress, stop), daemon=True,
                     name="scoring-progress").start()
    rows = iter(results.iter_rows())
    try:
        count_results(rows, plan, config, summary, progress, on_event)
    except (JobError, PlacementError):
        raise
    except Exception as err:  # noqa: BLE001 - a step failed for good: one line
        raise _one_line(err, size, config, time.monotonic() - started) from None
    finally:
        close = getattr(rows, "close", None)
        if close is not None:  # stops the executor now (Ctrl-C, a failure), so its last log lines come first
            close()
        logging.getLogger("ray.data.exceptions").removeFilter(quiet)
        stop.set()
        ray.kill(counter)
        # the dataset's iterators shut their executor down when collected; an exception's traceback keeps
        # this frame (and them) alive until after the driver stops Ray, when they would start a new one
        rows = results = close = None
        gc.collect()
    missing = [shard for shard in pending if not progress.is_done(shard)]
    if missing:
        raise JobError(f"{len(missing)} shards ended without a result (first: {missing[0]}); run the job again "
                       f"to score them")


def count_results(rows, plan: RunPlan, config: JobConfig, summary: JobSummary, progress: Progress,
                  on_event: Optional[Callable[[str, Any], None]] = None) -> None:
    """Count the publish step's result rows into ``summary``, each shard once (a step Ray Data ran again after
    a failure reports its shard again); a shard found published is counted from its file."""
    for row in rows:
        result = _shard_result(row)
        if progress.is_done(result.index):
            continue
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


class _QuietRayDataErrors(logging.Filter):
    """Drops Ray Data's console reports of the failure that ends the run (its stack trace, and for its pool's
    start timing out an invitation to report a Ray bug): the run ends with its own line naming the cause and
    what to do, and the same failure is in Ray Data's own log file under the session's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        import ray

        if record.exc_info and isinstance(record.exc_info[1], ray.exceptions.GetTimeoutError):
            return False
        message = str(record.msg)
        return not message.startswith(("Exception occurred in Ray Data or Ray Core internal code",
                                        "Full stack trace"))


def _one_line(err: BaseException, size: ActorSize, config: JobConfig, seconds: float) -> Exception:
    """The error a failed pipeline ends the run with: what failed, and what to do."""
    import ray

    if _caused_by(err, ray.exceptions.GetTimeoutError):  # the pool's minimum did not start in time
        need = size.need()
        if node_can_hold(need):  # a node is large enough: the actors died while starting, or waited for others
            return JobError(f"no scoring actor finished starting in {config.placement_timeout:g}s "
                            f"(--placement-timeout) although a node can hold one ({describe_need(need)}): they "
                            f"died while loading the model (killed by Ray for lack of memory, when the raylet's "
                            f"lines above say so: give the actors more memory or a smaller --reference bank) or "
                            f"waited for resources other work holds, or the model loads slowly (a longer "
                            f"--placement-timeout)")
        return PlacementError(f"no node can hold a scoring actor needing {describe_need(size.need())} "
                              f"({largest_node(live_nodes())}); gave up after {config.placement_timeout:g}s "
                              f"(--placement-timeout); lower --cpus-per-actor/--gpus-per-actor or add nodes")
    cause = _root_cause(err)
    if _caused_by(err, ray.exceptions.OutOfMemoryError) or isinstance(cause, ray.exceptions.OutOfMemoryError):
        bank = (f"; each scoring actor also holds the --reference bank ({_bank_size(config)})"
                if config.scoring.reference else "")
        return JobError(f"a scoring step ran out of memory and was killed by Ray ({cause_line(cause)[:200]}){bank}; "
                        f"give it more memory per node, or lower --batch-size or --shard-size")
    name, message = remote_cause(err)
    died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    if not getattr(cause, "actor_init_failed", False) and (isinstance(cause, died) or _caused_by(err, died)):
        return JobError(f"a Ray worker of the run died ({cause_line(cause)[:200]}) and was not replaced within the "
                        f"run's bounds ({config.max_actor_restarts} actor restarts); published shards are kept: run "
                        f"the same command to resume. If it keeps dying, look for the reason in its node's log "
                        f"(`ray logs raylet.out --node-id ...`): memory, a lost node, a crashing library")
    if getattr(cause, "actor_init_failed", False):
        return JobError(f"scoring actors cannot start: {cause_line(cause)}")
    if name in ("JobError", "PlacementError"):  # a stage's own one line
        return (PlacementError if name == "PlacementError" else JobError)(message)
    what = f"{name}: {message}" if name else cause_line(cause)
    return JobError(f"scoring failed after {seconds:.0f}s: {what}")


def _bank_size(config: JobConfig) -> str:
    """The size of the --reference bank's file: what each scoring actor holds of it in memory."""
    try:
        fs, path = filesystem(config.scoring.reference, config.storage_options)
        return f"{fs.size(path) / 2**30:.2f} GiB"
    except Exception:  # noqa: BLE001 - the size is a hint only
        return "size unknown"


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_cause(err: BaseException) -> tuple[str, str]:
    """(type name, message) of the innermost exception a Ray task or actor reported, read from the remote
    traceback Ray attaches (Ray Data's UserCodeException keeps the user's exception as text only);
    ("", "") when there is none. A stage's own JobError or PlacementError wins over the errors before it."""
    found = []
    for line in _ANSI.sub("", str(err)).splitlines():
        match = _EXCEPTION_LINE.match(line)
        if match and not line.startswith("ray."):
            found.append((match.group(1), " ".join(match.group(2).split())[:500]))
    own = [item for item in found if item[0] in ("JobError", "PlacementError")]
    return (own or found or [("", "")])[0]


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


def _caused_by(err: Optional[BaseException], kind) -> bool:
    """Whether ``err`` or an error it wraps is a ``kind`` (a type or a tuple of types)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kind):
            return True
        err = getattr(err, "cause", None) if isinstance(getattr(err, "cause", None), BaseException) else \
            (err.__cause__ or err.__context__)
    return False
