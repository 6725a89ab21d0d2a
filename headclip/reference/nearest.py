"""Nearest-neighbour distances of patch features to a bank, by batched matmul."""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_CHUNK = 65_536  # bank rows per matmul: (queries x chunk) float32 distances at a time


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: Optional[int] = DEFAULT_CHUNK
                      ) -> torch.Tensor:
    """Euclidean distance of each query to its nearest bank row.

    queries: (..., D); bank: (M, D), M >= 1. Returns (...) float32 on the queries' device.
    ``||q - b||^2 = |q|^2 + |b|^2 - 2 q.b``, one matmul per ``chunk`` bank rows
    (None or >= M: one matmul over the whole bank, exact), keeping the running minimum.
    In float32 a distance near 0 is off by up to about ``sqrt(1e-7 * |q|^2)`` (1e-3 for
    four unit-norm layers): the expansion cancels there; larger distances are exact to rounding.
    """
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"a bank is a non-empty (M, D) tensor, got shape {tuple(bank.shape)}")
    if queries.shape[-1] != bank.shape[1]:
        raise ValueError(f"queries of width {queries.shape[-1]} against a bank of width {bank.shape[1]}")
    shape = queries.shape[:-1]
    q = queries.reshape(-1, queries.shape[-1]).float()
    q_sq = q.square().sum(1, keepdim=True)
    step = bank.shape[0] if not chunk or chunk >= bank.shape[0] else int(chunk)
    best = torch.full((q.shape[0],), float("inf"), device=q.device)
    for start in range(0, bank.shape[0], step):
        b = bank[start:start + step].to(q.device, torch.float32)
        squared = (q_sq + b.square().sum(1).unsqueeze(0)).addmm_(q, b.t(), alpha=-2.0)
        best = torch.minimum(best, squared.amin(dim=1))
    return best.clamp_(min=0.0).sqrt_().reshape(shape)
