"""A scoring run's settings: what the job's flags become, and which of them shape its rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..data.decode import IMAGE_EXTENSIONS
from ..model.assets import DEMO_CHECKPOINT_URI
from .tasks import ScoringOptions

DEFAULT_PLACEMENT_TIMEOUT = 300.0  # seconds; a cloud GPU node usually joins within a few minutes


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
    max_shard_attempts: int = 3  # tries of a shard's read/decode or publish step (storage that fails for a moment)
    max_actor_restarts: int = 16  # restarts of a dead scoring actor (out of memory, a lost node) before the run ends
    max_init_failures: int = 2  # actors whose model fails to load before the run gives up
    progress_interval: float = 5.0
    placement_timeout: float = DEFAULT_PLACEMENT_TIMEOUT  # seconds to wait for a node that can hold an actor
    stage_cpus: float = 1.0  # CPUs each read/decode or publish task reserves
    stage_resources: dict = field(default_factory=dict)  # custom resources per stage task, e.g. a CPU node type
    shards_per_actor: int = 2  # shards queued on each scoring actor, so its model never waits for the next

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
        if scoring.reference:  # a bank names the run too (absent without one: same ids as before)
            from ..redact import redact_uri

            calibrated["reference"] = redact_uri(scoring.reference)
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
