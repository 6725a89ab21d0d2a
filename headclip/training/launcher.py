"""Running the training loop: in this process, or on Ray Train workers.

``fit`` returns the bytes of the final HeadCLIP checkpoint. A run is named by
``name`` under ``storage_path``; starting it again with the same name and
storage path continues from its latest checkpoint (Ray Train restores its
own run state from there; the in-process runner reads the newest complete
``checkpoint_epoch_NNNN`` directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from typing import Any, Optional

import pyarrow as pa

from ..model.factory import resolve_device
from .loop import STATE_FILE, TrainConfig, final_checkpoint_bytes, read_history, train_loop

log = logging.getLogger(__name__)


class LocalSession:
    """A single in-process worker whose checkpoints live under ``storage_path/name``."""

    rank = 0
    world_size = 1

    def __init__(self, storage_path: str, name: str):
        self.run_dir = os.path.join(os.path.abspath(os.path.expanduser(storage_path)), name)
        os.makedirs(self.run_dir, exist_ok=True)
        self.history: list[dict[str, Any]] = []

    def _checkpoints(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.run_dir) if n.startswith("checkpoint_epoch_"))
        return [os.path.join(self.run_dir, n) for n in names
                if os.path.exists(os.path.join(self.run_dir, n, STATE_FILE))]

    def latest_checkpoint_dir(self) -> Optional[str]:
        found = self._checkpoints()
        return found[-1] if found else None

    def new_checkpoint_dir(self, epoch: int) -> str:
        return os.path.join(self.run_dir, f"checkpoint_epoch_{epoch:04d}")

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None:
        self.history.append(metrics)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(metrics) + "\n")


class RaySession:
    """One Ray Train worker: ranks from the train context, checkpoints through ``ray.train.report``."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._restored: Optional[str] = None

    def latest_checkpoint_dir(self) -> Optional[str]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = checkpoint.to_directory(tempfile.mkdtemp(prefix="headclip-restore-"))
        return self._restored

    def new_checkpoint_dir(self, epoch: int) -> str:
        return tempfile.mkdtemp(prefix=f"headclip-epoch{epoch:04d}-")

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _ray_worker(loop_config: dict) -> None:
    import ray.train.torch

    config = TrainConfig(**loop_config["config"])
    device = ray.train.torch.get_device()
    train_loop(config, loop_config["train"], loop_config.get("val"), RaySession(), device)


def fit(config: TrainConfig, train_table: pa.Table, val_table: Optional[pa.Table], *, name: str,
        storage_path: str, workers: int = 0, use_gpu: bool = False) -> tuple[bytes, list[dict[str, Any]]]:
    """Train; returns (final checkpoint bytes, the metrics of every epoch of the run)."""
    if workers <= 0:
        session = LocalSession(storage_path, name)
        device = resolve_device("auto" if use_gpu else "cpu")
        train_loop(config, train_table, val_table, session, device)
        latest = session.latest_checkpoint_dir()
        if latest is None:
            raise RuntimeError(f"training {name} produced no checkpoint")
        return final_checkpoint_bytes(latest), read_history(latest)

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "://" not in storage_path:
        storage_path = os.path.abspath(os.path.expanduser(storage_path))
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": asdict(config), "train": train_table, "val": val_table},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=3)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        return final_checkpoint_bytes(directory), read_history(directory)
