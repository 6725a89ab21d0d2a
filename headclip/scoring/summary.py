"""What a scoring run reports: its summary, counted shard by shard."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..evaluation.metrics import MetricsByClass
from ..redact import redact_text
from ..storage.layout import run_uri
from .tasks import ShardResult


@dataclass
class JobSummary:
    run_id: str
    output: str
    images: int = 0
    errors: int = 0
    anomalous: int = 0
    shards: int = 0
    shards_skipped: int = 0
    shards_scored: int = 0
    seconds: float = 0.0
    output_bytes: int = 0
    checkpoint_id: str = ""
    resumed: bool = False
    peak_actor_rss_bytes: int = 0
    metrics: Optional[MetricsByClass] = None  # per-class metric state, for labelled inputs

    skipped_images: int = 0  # images of shards finished by an earlier invocation

    @property
    def images_per_second(self) -> float:
        scored = self.images - self.skipped_images
        return scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "metrics"}
        return {**data, "output": redact_text(self.output), "images_per_second": round(self.images_per_second, 3)}

    def lines(self) -> list[str]:
        return [
            f"run {self.run_id}: {self.images} images in {self.shards} shards "
            f"({self.shards_skipped} already done), {self.errors} errors, {self.anomalous} anomalous",
            f"throughput {self.images_per_second:.1f} images/s over {self.seconds:.1f}s",
            f"output: {redact_text(run_uri(self.output, self.run_id))}",
        ]


def account(summary: JobSummary, result: ShardResult) -> None:
    """Count a finished shard (scored now, or found published) into ``summary``."""
    summary.images += result.images
    summary.errors += result.errors
    summary.anomalous += result.anomalous
    if result.metrics is not None:
        state = MetricsByClass.from_dict(result.metrics)
        summary.metrics = state if summary.metrics is None else summary.metrics.merge(state)
    if result.skipped:
        summary.shards_skipped += 1
        summary.skipped_images += result.images
        return
    summary.shards_scored += 1
    summary.output_bytes += result.output_bytes
    summary.peak_actor_rss_bytes = max(summary.peak_actor_rss_bytes, result.peak_rss_bytes)
