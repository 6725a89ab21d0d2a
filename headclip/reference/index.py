"""An inverted-file index over one group's bank: approximate nearest distances for large banks.

Built with the bank (Jégou et al., "Product quantization for nearest neighbor search",
TPAMI 2011, the IVF part): k-means ``nlist`` coarse centroids (nlist, D), the bank's rows
stored list by list (list j = rows ``offsets[j]:offsets[j+1]``, each row in the list of
its nearest centroid). A query is compared with the rows of its ``nprobe`` nearest
lists only, one matmul per list the batch touches. The result is the minimum over a
subset of the bank's rows: never below the exact nearest distance (up to float32
rounding), equal to it when ``nprobe >= nlist``. Small banks are searched exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .nearest import DEFAULT_CHUNK, nearest_distances

ROWS_PER_STEP = 16_384  # rows compared with all centroids at a time: (rows x nlist) float32
SMALL_BLOCK = 65_536  # (queries x rows) of one list below which the CPU scan runs it on one thread
CHECK_ROWS = 2_048  # rows whose list is checked against their nearest centroid when a bank is read


@dataclass
class IndexSettings:
    """When and how a group's bank gets an index. Defaults measured on the demo textures
    and a 100k-patch bank (python -m jobs.benchmark_reference)."""

    exact_below: int = 16_384  # a group with fewer rows is searched exactly (no index built)
    nlist: Optional[int] = None  # coarse lists; None: round(sqrt(rows)); at most rows // 8
    nprobe: int = 4  # lists searched per query
    iterations: int = 10  # k-means steps
    train_per_list: int = 64  # k-means trains on up to this many rows per list (a fixed random sample)
    seed: int = 0

    def lists_for(self, rows: int) -> int:
        nlist = self.nlist or round(math.sqrt(rows))
        return max(1, min(int(nlist), rows // 8 or 1))

    def to_dict(self) -> dict:
        return {"exact_below": self.exact_below, "nlist": self.nlist, "nprobe": self.nprobe,
                "iterations": self.iterations, "train_per_list": self.train_per_list, "seed": self.seed}

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "IndexSettings":
        known = cls().to_dict()
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


@dataclass
class ListIndex:
    """centroids: (nlist, D) float32; offsets: (nlist + 1,) int64, list j = rows offsets[j]:offsets[j+1]
    of the list-ordered bank. Every list holds at least one row."""

    centroids: torch.Tensor
    offsets: torch.Tensor

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    def to(self, device) -> "ListIndex":
        return ListIndex(self.centroids.to(device), self.offsets.to(device))

    def nbytes(self) -> int:
        return self.centroids.numel() * 4 + self.offsets.numel() * 8


def _nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(rows,) index of each row's nearest centroid, ROWS_PER_STEP rows at a time."""
    c_sq = centroids.square().sum(1)
    out = []
    for start in range(0, x.shape[0], ROWS_PER_STEP):
        part = x[start:start + ROWS_PER_STEP]
        out.append(torch.addmm(c_sq.unsqueeze(0), part, centroids.t(), alpha=-2.0).argmin(1))
    return torch.cat(out)


def build_index(features: torch.Tensor, settings: IndexSettings) -> tuple[torch.Tensor, ListIndex]:
    """k-means on ``features`` (M, D) (on their device). Returns (order, index): ``features[order]``
    are the rows list by list, as the index expects them. Lists left empty are dropped."""
    x = features.float()
    rows = x.shape[0]
    k = settings.lists_for(rows)
    generator = torch.Generator().manual_seed(settings.seed)
    train = x[torch.randperm(rows, generator=generator)[:min(rows, k * settings.train_per_list)].to(x.device)]
    centroids = train[torch.randperm(train.shape[0], generator=generator)[:k].to(x.device)].clone()
    for _ in range(settings.iterations):
        assign = _nearest_centroid(train, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, train)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # an empty list restarts at a random training row
            pick = torch.randint(train.shape[0], (empty.numel(),), generator=generator).to(x.device)
            centroids[empty] = train[pick]
    assign = _nearest_centroid(x, centroids)
    counts = torch.bincount(assign, minlength=k)
    used = counts > 0
    if not bool(used.all()):  # renumber the lists that hold rows
        renumber = torch.cumsum(used.long(), 0) - 1
        assign, centroids, counts = renumber[assign], centroids[used], counts[used]
    order = torch.argsort(assign, stable=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).long()
    return order, ListIndex(centroids.contiguous(), offsets)


def check_index(features: torch.Tensor, index: ListIndex, rows: int = CHECK_ROWS) -> Optional[str]:
    """Why ``index`` does not fit the list-ordered ``features`` (M, D), or None when it does:
    shapes, offsets from 0 to M rising, no empty list, finite centroids, and for ``rows`` rows
    spread over the bank, their list's centroid is (to rounding) their nearest one."""
    m, width = features.shape
    c, offsets = index.centroids, index.offsets
    if c.ndim != 2 or c.shape[1] != width or c.shape[0] == 0:
        return f"centroids of shape {tuple(c.shape)}, not (nlist, {width})"
    if offsets.ndim != 1 or offsets.shape[0] != c.shape[0] + 1 or offsets.dtype != torch.int64:
        return f"list offsets of shape {tuple(offsets.shape)} ({offsets.dtype}), not ({c.shape[0] + 1},) int64"
    if int(offsets[0]) != 0 or int(offsets[-1]) != m or not bool((offsets[1:] > offsets[:-1]).all()):
        return f"list offsets do not rise from 0 to the bank's {m} rows"
    if not bool(torch.isfinite(c).all()):
        return "NaN or infinite centroids"
    picked = torch.linspace(0, m - 1, min(m, rows)).round().long().unique()
    lists = torch.searchsorted(offsets, picked, right=True) - 1
    x, cd = features[picked].double(), c.double()
    d2 = x.square().sum(1, keepdim=True) + cd.square().sum(1).unsqueeze(0) - 2.0 * x @ cd.t()
    own = d2.gather(1, lists.unsqueeze(1)).squeeze(1)
    wrong = own > d2.amin(1) + 1e-4 * (1.0 + x.square().sum(1))
    if bool(wrong.any()):
        return (f"{int(wrong.sum())} of {picked.numel()} rows checked are not in the list of their nearest "
                "centroid (rows and lists out of order)")
    return None


class GroupSearch:
    """Nearest distances to one group's bank: exact (no index) or through its index.

    features: (M, D) float32, list-ordered when ``index`` is given; all on one device.
    """

    def __init__(self, features: torch.Tensor, index: Optional[ListIndex] = None, nprobe: int = 4,
                 chunk: Optional[int] = DEFAULT_CHUNK):
        self.features, self.index, self.chunk = features, index, chunk
        self.nprobe = max(1, int(nprobe))
        if index is not None:
            self.centroids = index.centroids.to(features.device, torch.float32)
            self.c_sq = self.centroids.square().sum(1)
            row_sq = features.float().square().sum(1)
            bounds = index.offsets.tolist()
            # per list: (1, rows) squared norms and the (D, rows) transposed rows, views made once
            self.lists = [(row_sq[lo:hi].unsqueeze(0), features[lo:hi].t()) for lo, hi in zip(bounds, bounds[1:])]

    @property
    def exact(self) -> bool:
        return self.index is None or self.nprobe >= self.index.nlist

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        """queries (..., D) -> (...) float32 distances; an upper bound of the exact ones when indexed."""
        if self.exact:
            return nearest_distances(queries, self.features, self.chunk)
        shape, width = queries.shape[:-1], queries.shape[-1]
        if width != self.features.shape[1]:
            raise ValueError(f"queries of width {width} against a bank of width {self.features.shape[1]}")
        q = queries.reshape(-1, width).float()
        if q.shape[0] == 0:
            return q.new_zeros(shape)
        return self.scan(q, self.probe(q)).reshape(shape)

    def probe(self, q: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, nprobe): the lists of each query's nearest centroids."""
        d = torch.addmm(self.c_sq.unsqueeze(0), q, self.centroids.t(), alpha=-2.0)
        return d.topk(self.nprobe, dim=1, largest=False).indices

    def scan(self, q: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
        """(n, D), (n, nprobe) list ids -> (n,) distance to the nearest row of those lists;
        the query/probe pairs grouped by list, one matmul per list touched."""
        n, nprobe = probes.shape
        flat = probes.flatten()
        pairs = torch.argsort(flat)
        q_pairs = q.index_select(0, pairs // nprobe)  # (n * nprobe, D) in list order
        counts = torch.bincount(flat, minlength=len(self.lists)).tolist()
        touched = [j for j, count in enumerate(counts) if count]
        blocks = torch.split(q_pairs, [counts[j] for j in touched])
        parts = [None] * len(touched)
        small = [i for i, j in enumerate(touched) if counts[j] * self.lists[j][1].shape[1] < SMALL_BLOCK]
        with _one_thread(q.device):
            for i in small:
                parts[i] = self._block(touched[i], blocks[i])
        for i, part in enumerate(parts):
            if part is None:
                parts[i] = self._block(touched[i], blocks[i])
        best = torch.empty(n * nprobe, device=q.device)
        best[pairs] = torch.cat(parts)
        best = best.view(n, nprobe).amin(1) + q.square().sum(1)
        return best.clamp_(min=0.0).sqrt_()

    def _block(self, j: int, block: torch.Tensor) -> torch.Tensor:
        """(count, D) queries probing list j -> (count,) their smallest ``|b|^2 - 2 q.b`` over its rows."""
        row_sq, rows_t = self.lists[j]
        return torch.addmm(row_sq, block, rows_t, alpha=-2.0).amin(1)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """On the CPU, the scan's small per-list matmuls (below SMALL_BLOCK query x row pairs) run
    on one thread: too small to share, each op's thread handoff costs more than its work, many
    times more on a busy machine (measured: 1.3 s against 30 s for 6,272 queries in a 100k
    bank, 2 threads, load 20). Restored afterwards; GPUs are left alone."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
