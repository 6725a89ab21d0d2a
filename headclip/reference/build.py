"""Building a bank: patch features of known-good images gathered per group, subsampled to a budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .bank import POOLED, ReferenceBank
from .coreset import subsample
from .index import IndexSettings, build_index
from .nearest import nearest_distances

log = logging.getLogger(__name__)

SCALE_IMAGES = 32  # images per group whose leave-one-out distances set the group's scale


@dataclass
class BankSettings:
    """How a bank is built and read. Defaults chosen on the demo textures (jobs.benchmark_reference)."""

    budget: int = 10_000  # patches kept per group
    coreset: str = "greedy"  # "greedy" (PatchCore's k-centre) or "random"
    layers: Optional[Sequence[int]] = None  # map layers (block numbers) used; None: all of them
    input_size: Optional[int] = None  # side the reference path's images are resized to; None: the model's
    aggregate: str = "max"  # image reference score: "max" patch, or "top1" (mean of the top 1 % of patches)
    scale_quantile: float = 0.99  # leave-one-out distance that maps to 0.5
    seed: int = 0
    index: IndexSettings = field(default_factory=IndexSettings)  # groups of index.exact_below rows or more

    def to_dict(self) -> dict:
        return {"budget": self.budget, "coreset": self.coreset, "aggregate": self.aggregate,
                "scale_quantile": self.scale_quantile, "seed": self.seed, "index": self.index.to_dict()}


class BankBuilder:
    """Collects (B, N, layers, E) patch features of known-good images per group, then builds the bank.

    ``map_layers``: the model's map layers, in the order of the features' layer axis.
    """

    def __init__(self, map_layers: Sequence[int], settings: Optional[BankSettings] = None):
        self.settings = settings or BankSettings()
        self.map_layers = tuple(map_layers)
        layers = tuple(self.settings.layers or self.map_layers)
        unknown = [l for l in layers if l not in self.map_layers]
        if unknown:
            raise ValueError(f"layers {unknown} are not map layers of the model ({list(self.map_layers)})")
        self.layers = layers
        self.index = [self.map_layers.index(l) for l in layers]
        self._features: dict[str, list[torch.Tensor]] = {}

    def add(self, features: torch.Tensor, groups: Sequence[Optional[str]]) -> None:
        """features: (B, N, layers, E) of B known-good images; groups: their group values (None: pooled)."""
        chosen = features[:, :, self.index].flatten(2).to("cpu", torch.float32)
        for image, group in zip(chosen, groups):
            self._features.setdefault(POOLED if group is None else str(group), []).append(image)

    def images(self) -> dict[str, int]:
        return {g: len(v) for g, v in self._features.items()}

    def build(self, checkpoint_id: str, backbone: str, image_size: int, embed_dim: int,
              group_column: Optional[str] = None, command: str = "", reference_size: Optional[int] = None
              ) -> ReferenceBank:
        """The bank: each group's features subsampled to the budget, its distance scale measured,
        an index built for groups of ``settings.index.exact_below`` kept patches or more.
        ``image_size``: the model's input side; ``reference_size``: the side the features were taken
        at (None: ``image_size``)."""
        if not self._features:
            raise ValueError("no known-good images were scored: nothing to build a bank from")
        settings = self.settings
        features, scales, counts, distances, indexes = {}, {}, {}, [], {}
        for group, images in sorted(self._features.items()):
            kept, scale, normal = _group_bank(images, settings)
            counts[group] = {"images": len(images), "patches": sum(i.shape[0] for i in images), "kept": kept.shape[0]}
            if kept.shape[0] >= settings.index.exact_below:
                order, indexes[group] = build_index(kept, settings.index)
                kept = kept[order].contiguous()
                counts[group]["lists"] = indexes[group].nlist
            features[group], scales[group] = kept, scale
            distances.append(normal)
            log.info("group %s: %d images, %d of %d patches kept, distance scale %.4f, %s", group, len(images),
                     kept.shape[0], counts[group]["patches"], scale,
                     f"{indexes[group].nlist} lists" if group in indexes else "exact search")
        if POOLED not in scales:  # the pooled bank is all groups' banks together
            scales[POOLED] = float(_quantile(torch.cat(distances), settings.scale_quantile))
        return ReferenceBank(features=features, scales=scales, checkpoint_id=checkpoint_id, backbone=backbone,
                             image_size=int(image_size), layers=self.layers, embed_dim=int(embed_dim),
                             group_column=group_column, counts=counts, settings=settings.to_dict(),
                             command=command, indexes=indexes, reference_size=int(reference_size or image_size))


def _group_bank(images: list[torch.Tensor], settings: BankSettings) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(kept features, scale, the leave-one-out distances the scale came from) of one group."""
    everything = torch.cat(images)
    source = torch.cat([torch.full((im.shape[0],), i) for i, im in enumerate(images)])
    keep = subsample(everything, settings.budget, settings.coreset, settings.seed)
    kept, kept_source = everything[keep], source[keep]
    normal = []
    if len(images) == 1:  # no other image: each kept patch against the other kept patches
        d = torch.cdist(kept, kept)
        d.fill_diagonal_(float("inf"))
        normal.append(d.amin(1)[torch.isfinite(d.amin(1))])
    else:
        for i in range(min(len(images), SCALE_IMAGES)):
            others = kept[kept_source != i]
            if others.shape[0]:
                normal.append(nearest_distances(images[i], others))
    normal = torch.cat(normal) if normal else torch.ones(1)
    scale = max(float(_quantile(normal, settings.scale_quantile)), 1e-6)
    return kept.contiguous(), scale, normal


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    values = values.flatten().float()
    if values.numel() > 1_000_000:  # torch.quantile's input limit: a fixed sample
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return torch.quantile(values, q)
