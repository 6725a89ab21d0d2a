"""HeadCLIP: a frozen CLIP ViT adapted to anomaly detection.

The model knows nothing of files, storage or Ray: it takes image tensors and
returns scores and maps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HeadCLIPConfig
from .smoothing import gaussian_blur
from .text import PromptLearner
from .vision import DualPathVisionEncoder


class HeadCLIPLogits(NamedTuple):
    """Differentiable outputs for training.

    global_logits: (B, 2) class-token similarity to [normal, abnormal] / temperature.
    patch_logits: one (B, 2, grid, grid) tensor per map layer, patch similarity
        to [normal, abnormal] / temperature.
    """

    global_logits: torch.Tensor
    patch_logits: list[torch.Tensor]


@dataclass
class ScoreOutput:
    """Per-image scores of a batch.

    joint_score: (B,) alpha * global_score + (1 - alpha) * aggregate(anomaly_map), in [0, 1].
    global_score: (B,) abnormal probability from the class token, in [0, 1].
    anomaly_map: (B, S, S) float32 abnormal probability per input pixel, in [0, 1].
    patch_features: (B, grid*grid, layers, embed_dim) float32 projected patch
        features of each map layer, each L2-normalised; only when asked for.
    """

    joint_score: torch.Tensor
    global_score: torch.Tensor
    anomaly_map: torch.Tensor
    patch_features: Optional[torch.Tensor] = None

    def cpu(self) -> "ScoreOutput":
        features = None if self.patch_features is None else self.patch_features.cpu()
        return ScoreOutput(self.joint_score.cpu(), self.global_score.cpu(), self.anomaly_map.cpu(), features)


class HeadCLIP(nn.Module):
    """HeadCLIP over an open_clip CLIP model.

    Learned state (everything else is the frozen backbone):
        prompt.ctx_normal, prompt.ctx_abnormal: (n_ctx, text_width)
        prompt.deep: (deep layers, deep_prompt_length, text_width)
        vision.head_weights: (adapted vision layers, heads)
    """

    def __init__(self, clip: nn.Module, tokenizer, config: HeadCLIPConfig,
                 image_mean: Sequence[float], image_std: Sequence[float]):
        super().__init__()
        self.config = config
        self.clip = clip
        for param in clip.parameters():
            param.requires_grad_(False)
        clip.eval()
        self.vision = DualPathVisionEncoder(clip.visual, config)
        self.prompt = PromptLearner(clip, tokenizer, config)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: tuple[tuple, torch.Tensor] | None = None
        self.checkpoint_id: str | None = None

    # -- learned state -------------------------------------------------------------

    def learnable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters HeadCLIP learns, by their checkpoint names."""
        return {
            "prompt.ctx_normal": self.prompt.ctx_normal,
            "prompt.ctx_abnormal": self.prompt.ctx_abnormal,
            "prompt.deep": self.prompt.deep,
            "vision.head_weights": self.vision.head_weights,
        }

    def train(self, mode: bool = True) -> "HeadCLIP":
        super().train(mode)
        self.clip.eval()  # the backbone stays frozen and in eval mode
        return self

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # -- text ----------------------------------------------------------------------

    def _text_cache_key(self) -> tuple:
        params = self.learnable_parameters()
        return tuple((id(p), p._version, p.device, p.dtype) for p in params.values())

    def text_features(self) -> torch.Tensor:
        """L2-normalised text features, row 0 normal, row 1 abnormal; (2, embed_dim).

        Cached for inference and recomputed whenever a prompt parameter changes.
        Under autograd the features are computed afresh so gradients flow.
        """
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.prompt.parameters())
        if needs_grad:
            return F.normalize(self.prompt(), dim=-1)
        key = self._text_cache_key()
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():
                features = F.normalize(self.prompt().float(), dim=-1)
            self._text_cache = (key, features)
        return self._text_cache[1]

    # -- images --------------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) RGB -> float32 normalised with the backbone's mean/std."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
        x = images.to(self.image_mean.device, non_blocking=True).float().div_(255.0)
        return (x - self.image_mean) / self.image_std

    def forward(self, images: torch.Tensor) -> HeadCLIPLogits:
        """images: (B, 3, S, S) normalised float, S = config.image_size."""
        return self.forward_with_features(images)[0]

    def forward_with_features(self, images: torch.Tensor) -> tuple[HeadCLIPLogits, list[torch.Tensor]]:
        """The logits of :meth:`forward` and, per map layer, its L2-normalised projected
        patch features (B, grid*grid, embed_dim): the vectors the logits compare with the text."""
        config = self.config
        text = self.text_features()
        features = self.vision(images)
        cls = self.vision.project(features.class_token, layernorm=config.class_token_layernorm)
        global_logits = F.normalize(cls, dim=-1) @ text.to(cls.dtype).t() / config.temperature
        patch_logits, patch_features = [], []
        grid = self.vision.grid
        for tokens in features.patch_tokens:
            patches = F.normalize(self.vision.project(tokens), dim=-1)
            logits = patches @ text.to(patches.dtype).t() / config.temperature  # (B, N, 2)
            patch_logits.append(logits.transpose(1, 2).reshape(-1, 2, grid, grid))
            patch_features.append(patches)
        return HeadCLIPLogits(global_logits, patch_logits), patch_features

    def _autocast(self, images: torch.Tensor):
        """Autocast on CUDA for an fp32 tower; a tower with bf16 weights runs as it is."""
        if images.device.type == "cuda" and self.vision.dtype == torch.float32:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def anomaly_probabilities(self, logits: HeadCLIPLogits) -> tuple[torch.Tensor, torch.Tensor]:
        """Global abnormal probability (B,) and the smoothed anomaly map (B, S, S), float32."""
        config = self.config
        global_score = logits.global_logits.float().softmax(dim=-1)[:, 1]
        # Abnormal probability per patch, averaged over layers (AnomalyCLIP
        # sums them: the same ranking, but the mean stays in [0, 1]), then
        # upsampled once (bilinear upsampling commutes with the average).
        patch_prob = torch.stack([l.float().softmax(dim=1)[:, 1] for l in logits.patch_logits]).mean(0)
        size = (config.image_size, config.image_size)
        anomaly_map = F.interpolate(patch_prob.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        anomaly_map = gaussian_blur(anomaly_map.squeeze(1), config.sigma)
        return global_score, anomaly_map.clamp_(0.0, 1.0)

    def aggregate(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Image-level summary of (B, S, S) maps: max or mean of the top-k pixels; (B,)."""
        flat = anomaly_map.flatten(1)
        if self.config.aggregate == "max":
            return flat.amax(dim=1)
        k = min(self.config.top_k, flat.shape[1])
        return flat.topk(k, dim=1).values.mean(dim=1)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, patch_features: bool = False) -> ScoreOutput:
        """Score a batch.

        Args:
            images: (B, 3, S, S) normalised float tensor (see :meth:`normalize`),
                or uint8 RGB, which is normalised here.
            patch_features: also return the map layers' patch features (for a
                reference bank); the scores and maps are the same either way.
        """
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        images = images.to(self.image_mean.device, non_blocking=True)
        with self._autocast(images):  # self.forward where no features are asked: a compiled forward stands there
            logits, features = self.forward_with_features(images) if patch_features else (self.forward(images), [])
        global_score, anomaly_map = self.anomaly_probabilities(logits)
        alpha = self.config.alpha
        joint = alpha * global_score + (1.0 - alpha) * self.aggregate(anomaly_map)
        stacked = torch.stack(features, dim=2).float() if patch_features else None
        return ScoreOutput(joint_score=joint, global_score=global_score, anomaly_map=anomaly_map,
                           patch_features=stacked)

    @torch.inference_mode()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """The map layers' L2-normalised projected patch features of images at any side.

        Args:
            images: (B, 3, R, R) normalised float or uint8 RGB; R any multiple of the patch size.
        Returns:
            (B, (R/patch)^2, map layers, embed_dim) float32: at the model's own side, what
            :meth:`score` returns with ``patch_features=True``; at another side, what a model built
            at side R would (positional embedding interpolated alike). Blocks after the last map
            layer are not run.
        """
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        images = images.to(self.image_mean.device, non_blocking=True)
        with self._autocast(images):
            tokens = self.vision.map_tokens(images)
            features = [F.normalize(self.vision.project(t), dim=-1) for t in tokens]
        return torch.stack(features, dim=2).float()


def resize_maps(anomaly_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, S, S) or (S, S) maps to an image's own size, bilinear."""
    squeeze = anomaly_map.dim() == 2
    x = anomaly_map.unsqueeze(0) if squeeze else anomaly_map
    x = F.interpolate(x.unsqueeze(1).float(), size=(height, width), mode="bilinear", align_corners=False)
    x = x.squeeze(1)
    return x.squeeze(0) if squeeze else x
