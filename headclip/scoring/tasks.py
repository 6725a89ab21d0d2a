"""What a run's stages are told and what they report: scoring options and shard results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..data.decode import DEFAULT_MAX_PIXELS
from ..evaluation.thresholds import group_key


@dataclass
class ScoringOptions:
    """How images are scored and encoded (the parts of a run that shape its rows)."""

    threshold: float = 0.5  # image label: score > threshold
    mask_threshold: float = 0.5  # pixels: anomaly_map > mask_threshold
    mask_max_side: int = 2048  # masks of larger images are stored scaled to this long side
    heatmap_side: int = 64  # long side of the stored heat map
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs
    batch_size: int = 16
    io_threads: Optional[int] = None  # reading and decoding threads; None: the CPUs the scorer is given
    device: str = "auto"  # "auto": CUDA when available
    reduced_decode: bool = True  # large JPEGs decode at a reduced DCT scale (still >= the input size)
    device_decode: bool = False  # JPEGs decode on the model's device (nvjpeg on CUDA), else on the host
    metric_bins: int = 1000  # pixel-metric histogram bins, for labelled inputs
    read_timeout: float = 300.0  # seconds one image may take to read and decode before it is an error row
    precision: str = "auto"  # vision tower: "auto" (fp32 weights, autocast on CUDA) or "bf16" (bf16 weights)
    compile: bool = False  # torch.compile the model's forward when the scorer loads it (eager if that fails)
    # Calibrated per-group thresholds: an image whose ``group_column`` value is a key of
    # ``group_thresholds`` gets that (threshold, mask_threshold); any other image the two above.
    group_column: Optional[str] = None
    group_thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # A reference bank (jobs.reference) the scoring actor loads once with the model: each image's
    # score and map combine the zero-shot ones with its group's bank (headclip.reference.combine).
    reference: Optional[str] = None
    # The side that bank resizes images to for its own forward (its reference_size), where it differs
    # from the model's: the decode stage then also sends each image at that side. None: no second copy.
    reference_size: Optional[int] = None

    def thresholds_for(self, record: dict) -> tuple[float, float]:
        """(threshold, mask_threshold) of one image record."""
        value = group_key(record.get(self.group_column)) if self.group_column else None
        if value is not None and str(value) in self.group_thresholds:
            threshold, mask_threshold = self.group_thresholds[str(value)]
            return float(threshold), float(mask_threshold)
        return self.threshold, self.mask_threshold


@dataclass
class ShardResult:
    index: int
    images: int = 0
    errors: int = 0
    anomalous: int = 0
    skipped: bool = False
    output_bytes: int = 0
    peak_rss_bytes: int = 0  # peak resident memory of the scoring process
    metrics: Optional[dict] = None  # MetricsByClass state, for labelled inputs
    node: Optional[str] = None  # the cluster nodes whose model scored it, that decoded it and that published it
    decode_node: Optional[str] = None
    encode_node: Optional[str] = None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
