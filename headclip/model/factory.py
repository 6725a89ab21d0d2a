"""The front door: build a HeadCLIP model from a config or a checkpoint."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch

from .backbone import load_backbone
from ..errors import CheckpointError
from .checkpoint import Checkpoint, apply_learned_state, read_checkpoint
from .config import HeadCLIPConfig
from .headclip import HeadCLIP

log = logging.getLogger(__name__)


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """The torch device for ``device``; "auto" is CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_model(
    config: Optional[HeadCLIPConfig] = None,
    *,
    checkpoint: Union[str, Checkpoint, None] = None,
    device: Union[str, torch.device] = "cpu",
    storage_options: Optional[dict] = None,
    cache_dir: Optional[str] = None,
    **overrides: Any,
) -> HeadCLIP:
    """Build a HeadCLIP model.

    Args:
        config: the model config; defaults to the paper's (ViT-L-14-336, openai, 518 px).
        checkpoint: a checkpoint URI (local path, ``file://``, ``s3://``) or a read
            :class:`Checkpoint`; its config is used, updated by ``overrides``.
        device: where the model lives.
        storage_options: fsspec options for the checkpoint and weight files.
        overrides: config fields to change, e.g. ``pretrained="/weights/ViT-L-14-336px.pt"``.

    The returned model has ``checkpoint_id`` set (None without a checkpoint).
    """
    if checkpoint is not None and config is not None:
        raise ValueError("give either config or checkpoint, not both")
    loaded = None
    if checkpoint is not None:
        loaded = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, storage_options)
        config = loaded.config
    config = (config or HeadCLIPConfig()).replace(**overrides) if overrides else (config or HeadCLIPConfig())
    backbone = load_backbone(config, storage_options=storage_options, cache_dir=cache_dir)
    if backbone.weights_sha256 and not config.pretrained_sha256:
        config = config.replace(pretrained_sha256=backbone.weights_sha256)
    if backbone.quick_gelu and config.quick_gelu is None:
        config = config.replace(quick_gelu=True)
    try:
        model = HeadCLIP(backbone.clip, backbone.tokenizer, config, backbone.image_mean, backbone.image_std)
    except ValueError as err:
        if loaded is not None:
            raise CheckpointError(f"{loaded.uri or 'checkpoint'} does not match backbone {config.backbone}: {err}") from None
        raise
    if loaded is not None:
        apply_learned_state(model, loaded)
    model.checkpoint_id = loaded.checkpoint_id if loaded is not None else None
    return model.to(device)
