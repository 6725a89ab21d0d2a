"""The front door: build a HeadCLIP model from a config or a checkpoint."""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch

from .backbone import load_backbone
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    apply_learned_state,
    read_anomalyclip_prompts,
    read_checkpoint,
    save_checkpoint,
)
from .config import HeadCLIPConfig
from .model import HeadCLIP

log = logging.getLogger(__name__)


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


def import_anomalyclip(
    source: str,
    output: str,
    config: Optional[HeadCLIPConfig] = None,
    storage_options: Optional[dict] = None,
) -> str:
    """Convert AnomalyCLIP's prompt-learner checkpoint into a HeadCLIP checkpoint.

    The prompts are taken as they are and head weights are 1, so the result
    scores as AnomalyCLIP does. The model structure is checked on randomly
    initialised backbone weights (no download); the written config still
    names ``config.pretrained``. Returns the new checkpoint's id.
    """
    tensors = read_anomalyclip_prompts(source, storage_options)
    config = config or HeadCLIPConfig()
    n_ctx = tensors["prompt.ctx_normal"].shape[0]
    n_deep, deep_len = tensors["prompt.deep"].shape[:2]
    config = config.replace(
        n_ctx=n_ctx,
        deep_prompt_length=deep_len,
        deep_prompt_end=config.deep_prompt_start + n_deep - 1,
    )
    try:
        model = create_model(config.replace(pretrained=None))
    except ValueError as err:
        raise CheckpointError(f"{source} does not fit backbone {config.backbone}: {err}") from None
    tensors["vision.head_weights"] = torch.ones_like(model.vision.head_weights)
    apply_learned_state(model, Checkpoint(model.config, tensors, "", "", source))
    model.config = model.config.replace(pretrained=config.pretrained, pretrained_sha256=config.pretrained_sha256,
                                        quick_gelu=config.quick_gelu)
    return save_checkpoint(model, output, storage_options)
