"""HeadCLIP configuration: a dataclass whose defaults are the paper's.

A config is plain data. It is written into every checkpoint as JSON, so a
checkpoint alone says how to rebuild the model that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

AGGREGATES = ("max", "topk_mean")
POS_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class HeadCLIPConfig:
    """Everything needed to build a HeadCLIP model.

    Layer numbers are 1-based, as in the paper ("vision layer 6 of 24").
    """

    # Backbone: an open_clip model name and its weights. ``pretrained`` is an
    # open_clip pretrained tag ("openai", "laion2b_s32b_b82k"), a local path or
    # fsspec URL of a weight file, or None for seeded random weights (tests).
    backbone: str = "ViT-L-14-336"
    pretrained: Optional[str] = "openai"
    # sha256 of the backbone weight file, filled in when weights come from a file.
    pretrained_sha256: Optional[str] = None
    # None: QuickGELU is selected automatically for OpenAI-trained weights
    # (tag "openai" or a file in OpenAI's layout); True/False forces it.
    quick_gelu: Optional[bool] = None
    # Seed of the random backbone weights when ``pretrained`` is None.
    init_seed: int = 0

    # Square input side in pixels; the positional embedding is interpolated
    # to the patch grid (518 / 14 = 37 for ViT-L-14-336).
    image_size: int = 518
    # How the patch position embeddings are resized to that grid: "bilinear"
    # (AnomalyCLIP's VisionTransformer.forward) or "bicubic".
    pos_embedding_interpolation: str = "bilinear"

    # First vision layer with the V-V (DPAM) path. None: 6 for a 24-layer
    # backbone, scaled proportionally for other depths.
    vv_start_layer: Optional[int] = None
    # Vision layers whose V-V path features make the anomaly map (per-layer
    # abnormal probabilities averaged). None: the tower's quarter points, as
    # AnomalyCLIP's 6, 12, 18, 24 of 24 (see default_map_layers).
    map_layers: Optional[tuple[int, ...]] = None

    # Learnable prompts (AnomalyCLIP's object-agnostic prompts).
    n_ctx: int = 12
    normal_template: str = "object"
    abnormal_template: str = "damaged object"
    deep_prompt_length: int = 4
    deep_prompt_start: int = 2  # first text layer with deep prompts
    deep_prompt_end: int = 9  # last text layer with deep prompts (inclusive)

    # Learnable head weights: one scalar per head per adapted layer.
    head_weights: bool = True  # False: AnomalyCLIP mode
    head_weights_on_original: bool = False  # also rescale the original path

    # Scoring.
    temperature: float = 0.07
    class_token_layernorm: bool = False  # AnomalyCLIP projects without ln_post
    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in input pixels
    alpha: float = 0.5  # joint = alpha * global + (1 - alpha) * aggregate(map)
    aggregate: str = "max"  # "max" or "topk_mean"
    top_k: int = 100  # pixels averaged by "topk_mean"

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.map_layers is not None:
            self.map_layers = tuple(int(x) for x in self.map_layers)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line message on an invalid setting."""
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.pos_embedding_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_embedding_interpolation must be one of {POS_INTERPOLATIONS}, "
                             f"got {self.pos_embedding_interpolation!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.sigma < math.inf:  # NaN fails too
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.n_ctx <= 0 or self.deep_prompt_length < 0:
            raise ValueError("n_ctx must be positive and deep_prompt_length non-negative")
        if self.deep_prompt_length > self.n_ctx:
            raise ValueError(
                f"deep_prompt_length ({self.deep_prompt_length}) cannot exceed n_ctx ({self.n_ctx})"
            )
        if self.deep_prompt_length and not 2 <= self.deep_prompt_start <= self.deep_prompt_end:
            raise ValueError(
                "deep prompts need 2 <= deep_prompt_start <= deep_prompt_end, got "
                f"{self.deep_prompt_start}..{self.deep_prompt_end}"
            )

    @property
    def n_deep_layers(self) -> int:
        if self.deep_prompt_length == 0:
            return 0
        return self.deep_prompt_end - self.deep_prompt_start + 1

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["map_layers"] is not None:
            data["map_layers"] = list(data["map_layers"])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadCLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HeadCLIP config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "HeadCLIPConfig":
        return dataclasses.replace(self, **changes)


def default_vv_start_layer(depth: int) -> int:
    """First V-V layer for a vision tower of ``depth`` layers: 6 of 24, scaled."""
    return max(1, min(depth, int(round(depth * 6 / 24))))


def default_map_layers(depth: int, vv_start: int) -> tuple[int, ...]:
    """Map layers for a tower of ``depth`` layers whose V-V path starts at ``vv_start``.

    The quarter points ``depth * k / 4`` for k = 1..4, rounded half up: 6, 12,
    18, 24 of 24 (AnomalyCLIP's ``features_list``), 3, 6, 9, 12 of 12, and
    2, 3, 5, 6 of 6. A point before ``vv_start`` moves up to it; repeats are
    dropped, so shallow towers get fewer layers.
    """
    points = ((depth * k + 2) // 4 for k in range(1, 5))
    return tuple(sorted({min(depth, max(vv_start, p)) for p in points}))
