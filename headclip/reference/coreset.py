"""Subsampling a group's patch features to a fixed budget: greedy k-centre (PatchCore) or random."""

from __future__ import annotations

from typing import Optional

import torch

METHODS = ("greedy", "random")


def random_subset(features: torch.Tensor, budget: int, seed: int = 0) -> torch.Tensor:
    """Indices (budget,) of ``budget`` rows drawn without replacement (all rows when fewer), sorted."""
    n = features.shape[0]
    if budget >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:budget].sort().values


def greedy_coreset(features: torch.Tensor, budget: int, projection: Optional[int] = 128, seed: int = 0
                   ) -> torch.Tensor:
    """Indices (budget,) of a greedy k-centre coreset (Roth et al., PatchCore, CVPR 2022, Alg. 1).

    Starts from a random row, then repeatedly adds the row farthest from the rows chosen
    so far. Distances are taken after a random Gaussian projection to ``projection``
    dimensions (None: none), as PatchCore does, to make each step cheaper.
    """
    n = features.shape[0]
    if budget >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection and projection < x.shape[1]:
        matrix = torch.randn(x.shape[1], projection, generator=generator) / projection ** 0.5
        x = x @ matrix.to(x.device)
    chosen = torch.empty(budget, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen[0] = first
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix-vector product per step, no (n, d) temporaries
    norms = x.square().sum(1)
    nearest = (norms - 2 * (x @ x[first]) + norms[first]).clamp_(min=0)
    for i in range(1, budget):
        nxt = int(nearest.argmax())
        chosen[i] = nxt
        torch.minimum(nearest, (norms - 2 * (x @ x[nxt]) + norms[nxt]).clamp_(min=0), out=nearest)
    return chosen.sort().values


def subsample(features: torch.Tensor, budget: int, method: str = "greedy", seed: int = 0) -> torch.Tensor:
    """Indices of ``budget`` rows of ``features`` by ``method`` (see :data:`METHODS`)."""
    if method == "greedy":
        return greedy_coreset(features, budget, seed=seed)
    if method == "random":
        return random_subset(features, budget, seed=seed)
    raise ValueError(f"unknown coreset method {method!r} (choose from {', '.join(METHODS)})")
