"""The Ray side of a run's stages: the scoring actor, and the decode and encode tasks.

Each shard goes either to its actor alone, which reads, decodes, scores,
encodes and publishes it (``cpu_stages="actor"``), or through a decode task,
the actor's model stage and an encode task that publishes it
(``cpu_stages="tasks"``): Ray schedules the two tasks on any node with free
CPUs, and moves each step's result through its object store.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from .scorer import ScoringOptions, ShardResult, ShardScorer, ShardTask
from .stages import DecodedShard, ScoredShard, decode_shard, encode_shard

if TYPE_CHECKING:
    from .runner import JobConfig


class ScorerActor:
    """A Ray actor around :class:`ShardScorer`: the model loads once, in ``__init__``.

    An actor that holds GPUs scores on them or not at all: without a usable
    CUDA device it fails to start instead of scoring on the CPU.
    """

    def __init__(self, kwargs: dict):
        import ray

        gpus = ray.get_gpu_ids()
        if gpus and not torch_cuda_available():
            raise RuntimeError(f"this actor holds GPU {', '.join(map(str, gpus))} but CUDA is not available on "
                               f"node {ray.get_runtime_context().get_node_id()[:12]}; it will not score on the CPU")
        self.scorer = ShardScorer(**kwargs)

    def ready(self) -> tuple[str, int]:
        """(the node the actor runs on, the model's input side), once its model is loaded."""
        import ray

        return ray.get_runtime_context().get_node_id(), self.scorer.image_size

    def score_shard(self, task: ShardTask) -> ShardResult:
        """All three stages of a shard: its file is published here."""
        import ray

        result = self.scorer.score_shard(task)
        result.node = ray.get_runtime_context().get_node_id()
        return result

    def score_decoded(self, decoded: DecodedShard) -> ScoredShard:
        """The model stage of a shard decoded by a task; an encode task publishes it."""
        import ray

        scored = self.scorer.score_decoded(decoded)
        scored.node = ray.get_runtime_context().get_node_id()
        return scored

    def close(self) -> None:
        """Stop the scorer's I/O threads before the actor is killed."""
        self.scorer.close()


STAGE_RETRIES = 3  # a decode or encode task whose node dies runs again elsewhere


def _decode_task(task: ShardTask, size: int, options: ScoringOptions, storage_options: Optional[dict],
                 threads: int) -> DecodedShard:
    import ray

    decoded = decode_shard(task, size, options, storage_options, threads)
    decoded.node = ray.get_runtime_context().get_node_id()
    return decoded


def _encode_task(scored: ScoredShard, storage_options: Optional[dict]) -> ShardResult:
    import ray

    result = encode_shard(scored, storage_options)
    result.encode_node = ray.get_runtime_context().get_node_id()
    return result


class Stages:
    """How a shard is sent on its way: to its actor alone, or through decode task -> actor -> encode task."""

    def __init__(self, ray, config: "JobConfig"):
        self.config = config
        self.tasks = config.cpu_stages == "tasks"
        self.in_flight = config.shards_per_actor or (4 if self.tasks else 2)
        if self.tasks:
            opts = dict(num_cpus=config.stage_cpus, resources=dict(config.stage_resources) or None,
                        max_retries=STAGE_RETRIES, scheduling_strategy="SPREAD")
            self.decode = ray.remote(_decode_task).options(name="headclip-decode", **opts)
            self.encode = ray.remote(_encode_task).options(name="headclip-encode", **opts)
            # a decode task reads on threads: reads wait on storage, not on its CPU
            self.threads = config.scoring.io_threads or max(4, 4 * math.ceil(config.stage_cpus))

    def submit(self, actor, task: ShardTask, image_size: int):
        """The ref whose value is the shard's ShardResult, once its file is published."""
        if not self.tasks:
            return actor.score_shard.remote(task)
        config = self.config
        decoded = self.decode.remote(task, image_size, config.scoring, config.storage_options, self.threads)
        return self.encode.remote(actor.score_decoded.remote(decoded), config.storage_options)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
