"""Scoring with a bank: the reference map beside the zero-shot one, and their combination.

The rule (WinCLIP+, Jeong et al., CVPR 2023, which averages its zero-shot and
few-shot maps and scores; PatchCore, Roth et al., CVPR 2022, for the distances):

- reference map per patch: ``d / (d + s)``, ``d`` the distance of the patch's
  features to the nearest bank patch of the image's group, ``s`` that group's
  scale (see :class:`ReferenceBank`); in [0, 1), 0.5 at the distance a
  known-good patch rarely exceeds; upsampled and smoothed as the zero-shot map. The
  patches are those of the bank's reference size: the zero-shot forward's own when it
  equals the model's input size, else a second forward of the images resized to it
  (:meth:`HeadCLIP.patch_features`), whose map is upsampled to the model's side;
- reference score: the map's largest patch value ("max") or the mean of its
  top 1 % ("top1");
- published map = (1 - w) * zero-shot map + w * reference map, published score =
  (1 - w) * zero-shot joint score + w * reference score; w = 0.5: both in [0, 1].

An image whose group has no bank uses the pooled bank (every group's patches),
as an uncalibrated group gets the pooled thresholds; its row says ``*``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..model.smoothing import gaussian_blur
from .bank import BankError, ReferenceBank
from .index import GroupSearch, IndexSettings
from .nearest import DEFAULT_CHUNK

REFERENCE_WEIGHT = 0.5


def combine_rule(weight: float = REFERENCE_WEIGHT) -> str:
    return (f"score = {1 - weight:g} x zero-shot + {weight:g} x reference (WinCLIP+ averaging); "
            "reference map = d / (d + s) per patch")


@dataclass
class ReferenceOutput:
    """joint_score, reference_score: (B,) in [0, 1]; anomaly_map: (B, S, S) combined, in [0, 1];
    reference_map: (B, grid, grid) per patch; groups: the bank each image used."""

    joint_score: torch.Tensor
    reference_score: torch.Tensor
    anomaly_map: torch.Tensor
    reference_map: torch.Tensor
    groups: list[str]


class ReferenceScorer:
    """A bank on the model's device, applied to :meth:`HeadCLIP.score` outputs with patch features.

    Groups with an index are searched through it, ``nprobe`` lists per patch (default: the
    bank's setting); the others exactly, ``chunk`` bank rows per matmul. The pooled bank is
    searched group by group, keeping the smallest distance.
    """

    def __init__(self, bank: ReferenceBank, model, device=None, chunk: Optional[int] = DEFAULT_CHUNK,
                 weight: float = REFERENCE_WEIGHT, nprobe: Optional[int] = None):
        map_layers = tuple(model.vision.map_layers)
        missing = [l for l in bank.layers if l not in map_layers]
        if missing:
            raise BankError(f"reference bank uses layers {missing}, which are not map layers of the model "
                            f"({list(map_layers)})")
        self.index = [map_layers.index(l) for l in bank.layers]
        self.bank = bank.to(device or model.image_mean.device)
        # the side of a second forward for the bank's features; None: the zero-shot forward's are used
        self.own_size = bank.own_size
        self.grid, self.size, self.sigma = model.vision.grid, model.image_size, model.config.sigma
        if self.own_size is not None:
            patch = model.vision.patch_size
            if self.own_size % patch:
                raise BankError(f"reference bank's reference size {self.own_size}px is not a multiple of the "
                                f"model's patch size {patch}")
            self.grid = self.own_size // patch
        self.upsample = upsample_operator(self.grid, self.size, self.sigma, self.bank_device())
        self.chunk, self.weight = chunk, weight
        self.aggregate = bank.settings.get("aggregate", "max")
        self.nprobe = nprobe or IndexSettings.from_dict(bank.settings.get("index")).nprobe
        self.searches = {g: GroupSearch(f, self.bank.indexes.get(g), self.nprobe, chunk)
                         for g, f in self.bank.features.items()}

    def bank_device(self):
        return next(iter(self.bank.features.values())).device

    def distances(self, features: torch.Tensor, name: str) -> torch.Tensor:
        """(..., D) -> (...) distances to the bank of group ``name`` (``*``: the pooled one)."""
        if name in self.searches:
            return self.searches[name](features)
        return torch.stack([search(features) for search in self.searches.values()]).amin(0)

    def patch_scores(self, features: torch.Tensor, groups: Sequence) -> tuple[torch.Tensor, list[str]]:
        """features (B, N, layers, E) -> reference values per patch (B, N) in [0, 1), and the banks used."""
        chosen = features[:, :, self.index].flatten(2)
        out = torch.empty(chosen.shape[:2], device=chosen.device)
        used = [self.bank.group_of(g) for g in groups]
        for name in sorted(set(used)):
            rows = [i for i, u in enumerate(used) if u == name]
            scale = self.bank.scales[name]
            d = self.distances(chosen[rows], name)
            out[rows] = d / (d + scale)
        return out, used

    def image_scores(self, patch: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B,): the largest patch value, or the mean of the top 1 %."""
        if self.aggregate == "max":
            return patch.amax(1)
        k = max(1, math.ceil(0.01 * patch.shape[1]))
        return patch.topk(k, dim=1).values.mean(1)

    def apply(self, out, groups: Sequence, features: Optional[torch.Tensor] = None) -> ReferenceOutput:
        """Combine a ScoreOutput with the bank; ``groups``: each image's group value. ``features``: the
        images' (B, N, layers, E) patch features at the bank's reference size when it has its own
        (:attr:`own_size`), else None and ``out`` holds them (scored with patch_features=True)."""
        if features is None:
            if self.own_size is not None:
                raise ValueError(f"this bank's features are taken at {self.own_size}px: pass the images' "
                                 "patch_features at that side")
            features = out.patch_features
        if features is None:
            raise ValueError("score with patch_features=True to use a reference bank")
        if features.shape[1] != self.grid * self.grid:
            raise ValueError(f"{features.shape[1]} patches per image, the bank's reference size gives "
                             f"{self.grid * self.grid}")
        patch, used = self.patch_scores(features, groups)
        reference_score = self.image_scores(patch)
        grid_map = patch.reshape(-1, self.grid, self.grid)
        up = self.upsample.to(grid_map.device)
        ref_map = (up @ grid_map @ up.t()).clamp_(0.0, 1.0)
        w = self.weight
        joint = (1 - w) * out.joint_score.float() + w * reference_score
        anomaly_map = ((1 - w) * out.anomaly_map.float() + w * ref_map).clamp_(0.0, 1.0)
        return ReferenceOutput(joint, reference_score, anomaly_map, patch.reshape(-1, self.grid, self.grid), used)

    def apply_to(self, out, records: Sequence[dict], features: Optional[torch.Tensor] = None
                 ) -> "ReferencedScores":
        """:meth:`apply` for image records (their bank's group column read from each), as the scorer's
        model output: joint score and map combined, the zero-shot and reference scores kept."""
        column = self.bank.group_column
        ref = self.apply(out, [r.get(column) if column else None for r in records], features)
        return ReferencedScores(ref.joint_score, out.global_score, ref.anomaly_map, out.joint_score.float(),
                                ref.reference_score, ref.groups)


def upsample_operator(grid: int, size: int, sigma: float, device=None) -> torch.Tensor:
    """(size, grid) matrix A with ``A @ m @ A.T`` = bilinear upsampling of a (grid, grid) map to
    (size, size) (align_corners=False), then the Gaussian blur of the zero-shot maps: both are
    separable and linear, so one small matmul per side replaces the 2-D convolution."""
    basis = torch.eye(grid, dtype=torch.float64).unsqueeze(1)  # (grid, 1, grid): one row per grid cell
    up = F.interpolate(basis, size=size, mode="linear", align_corners=False)  # (grid, 1, size)
    return gaussian_blur(up, sigma).squeeze(1).t().float().contiguous().to(device)


@dataclass
class ReferencedScores:
    """A batch's scores with a bank, shaped as :class:`~headclip.model.headclip.ScoreOutput`
    (joint_score, global_score, anomaly_map: the published ones), plus the parts of the combination."""

    joint_score: torch.Tensor
    global_score: torch.Tensor
    anomaly_map: torch.Tensor
    zero_shot_score: torch.Tensor
    reference_score: torch.Tensor
    groups: list[str]

    def row_fields(self, j: int) -> dict:
        """Image ``j``'s reference columns of the Parquet contract."""
        if not hasattr(self, "_lists"):
            self._lists = (self.zero_shot_score.cpu().tolist(), self.reference_score.float().cpu().tolist())
        zero_shot, reference = self._lists
        return {"zero_shot_score": zero_shot[j], "reference_score": reference[j], "reference_group": self.groups[j]}
