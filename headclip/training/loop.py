"""Fitting HeadCLIP's prompts and head weights on a labelled auxiliary data set.

The loop is the same in-process and on Ray Train: each worker builds the
model, reads its share of every epoch, and averages the gradients of the
learned parameters only (prompts and head weights; the backbone is frozen and
never communicated). Each epoch ends with a checkpoint directory holding the
model checkpoint (``headclip.safetensors``), the optimiser state
(``optimizer.safetensors``) and ``train_state.json``; a restarted run
continues from the latest one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from ..data.loading import load_batch
from ..model.checkpoint import apply_learned_state, parse_checkpoint, serialize
from ..model.config import HeadCLIPConfig
from ..model.factory import create_model
from .loss import LossConfig, headclip_loss
from ..evaluation.metrics import MetricsByClass, add_scored_batch

log = logging.getLogger(__name__)

MODEL_FILE = "headclip.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


@dataclass
class TrainConfig:
    """The method's defaults: Adam lr 1e-3, betas (0.5, 0.999), 15 epochs, batch 8, seed 111."""

    model: dict[str, Any] = field(default_factory=dict)  # HeadCLIPConfig fields
    epochs: int = 15
    batch_size: int = 8  # global batch, split over workers
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig fields
    io_threads: int = 8
    storage_options: Optional[dict] = None
    metric_bins: int = 1000


class Session(Protocol):
    """What the loop needs from whatever runs it (Ray Train or this process)."""

    rank: int
    world_size: int

    def latest_checkpoint_dir(self) -> Optional[str]: ...

    def new_checkpoint_dir(self, epoch: int) -> str: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None: ...


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The same shuffled order on every worker."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def worker_share(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's indices; every worker gets the same count (wrapping), so steps match."""
    per_worker = math.ceil(len(order) / world)
    padded = np.resize(order, per_worker * world)
    return padded[rank::world]


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    import torch.distributed as dist

    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)


def _broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def save_training_state(directory: str, model, optimizer: torch.optim.Optimizer, epoch: int,
                        history: list[dict[str, Any]]) -> None:
    """Write a checkpoint directory: model checkpoint, optimiser tensors, JSON state. No pickle."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_FILE), "wb") as handle:
        handle.write(serialize(model))
    names = {id(p): name for name, p in model.learnable_parameters().items()}
    tensors, steps = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            name = names[id(param)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"{name}.{key}"] = state[key].detach().cpu().contiguous()
            if "step" in state:
                steps[name] = float(state["step"])
    save_file(tensors, os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as handle:
        json.dump({"epoch": epoch, "steps": steps, "history": history}, handle, indent=2)


def read_history(directory: str) -> list[dict[str, Any]]:
    """The metrics of every epoch up to a checkpoint directory's."""
    with open(os.path.join(directory, STATE_FILE)) as handle:
        return json.load(handle)["history"]


def load_training_state(directory: str, model, optimizer: torch.optim.Optimizer) -> int:
    """Restore model and optimiser from a checkpoint directory; returns the finished epoch."""
    with open(os.path.join(directory, MODEL_FILE), "rb") as handle:
        checkpoint = parse_checkpoint(handle.read(), os.path.join(directory, MODEL_FILE))
    apply_learned_state(model, checkpoint)
    with open(os.path.join(directory, STATE_FILE)) as handle:
        state = json.load(handle)
    tensors = load_file(os.path.join(directory, OPTIMIZER_FILE))
    for name, param in model.learnable_parameters().items():
        if name in state["steps"]:
            optimizer.state[param] = {
                "step": torch.tensor(state["steps"][name]),
                "exp_avg": tensors[f"{name}.exp_avg"].to(param.device),
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(param.device),
            }
    return int(state["epoch"])


def evaluate(model, table: pa.Table, batch_size: int, pool: ThreadPoolExecutor,
             storage_options: Optional[dict] = None, n_bins: int = 1000) -> MetricsByClass:
    """Score a labelled table and accumulate per-class metric state."""
    metrics = MetricsByClass(n_bins)
    records = table.to_pylist()
    model.eval()
    for start in range(0, len(records), batch_size):
        batch = load_batch(records[start:start + batch_size], model.image_size, pool, storage_options)
        out = model.score(batch.images)
        masks = [m if valid else None for m, valid in zip(batch.masks.numpy(), batch.mask_valid.tolist())]
        add_scored_batch(metrics, batch.class_names, batch.labels, out.joint_score.float(),
                         out.anomaly_map.float(), masks)
    return metrics


def train_loop(config: TrainConfig, train_table: pa.Table, val_table: Optional[pa.Table], session: Session,
               device: torch.device) -> None:
    """One worker's training: the same code for every worker and for in-process runs."""
    _set_seed(config.seed)
    model = create_model(HeadCLIPConfig(**config.model), device=device, storage_options=config.storage_options)
    params = list(model.learnable_parameters().values())
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas))
    loss_config = LossConfig(**config.loss)
    distributed = session.world_size > 1
    start_epoch = 0
    history: list[dict[str, Any]] = []
    resume_dir = session.latest_checkpoint_dir()
    if resume_dir:
        start_epoch = load_training_state(resume_dir, model, optimizer)
        history = read_history(resume_dir)
        log.info("resumed from %s after epoch %d", resume_dir, start_epoch)
    if distributed:
        _broadcast_parameters(params)
    records = train_table.to_pylist()
    per_worker_batch = max(1, math.ceil(config.batch_size / session.world_size))
    pool = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="headclip-train")
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            model.train()
            share = worker_share(epoch_order(len(records), config.seed, epoch), session.rank, session.world_size)
            totals = np.zeros(3)
            steps = 0
            for begin in range(0, len(share), per_worker_batch):
                batch = load_batch([records[i] for i in share[begin:begin + per_worker_batch]],
                                   model.image_size, pool, config.storage_options)
                logits = model(model.normalize(batch.images.to(device)))
                parts = headclip_loss(logits, batch.labels.to(device), batch.masks.to(device),
                                      batch.mask_valid.to(device), loss_config)
                optimizer.zero_grad(set_to_none=False)
                parts.total.backward()
                if distributed:
                    _average_gradients(params, session.world_size)
                optimizer.step()
                totals += [parts.total.item(), parts.image.item(), parts.pixel.item()]
                steps += 1
            metrics: dict[str, Any] = {
                "epoch": epoch, "loss": float(totals[0] / steps), "image_loss": float(totals[1] / steps),
                "pixel_loss": float(totals[2] / steps), "epoch_seconds": time.perf_counter() - started,
            }
            if val_table is not None and session.rank == 0:
                table = evaluate(model, val_table, per_worker_batch * 2, pool, config.storage_options,
                                 config.metric_bins).table()
                mean = table.loc["mean"]
                metrics.update({f"val_{k}": float(mean[k]) for k in table.columns})
            log.info("epoch %d/%d: %s", epoch, config.epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            history.append(metrics)
            if session.rank == 0:
                directory = session.new_checkpoint_dir(epoch)
                save_training_state(directory, model, optimizer, epoch, history)
                session.report(metrics, directory)
            else:
                session.report(metrics, None)
    finally:
        pool.shutdown(wait=False)



def final_checkpoint_bytes(directory: str) -> bytes:
    """The HeadCLIP checkpoint bytes in a checkpoint directory."""
    with open(os.path.join(directory, MODEL_FILE), "rb") as handle:
        return handle.read()
