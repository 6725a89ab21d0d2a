"""Converting AnomalyCLIP's released prompt-learner checkpoints into HeadCLIP checkpoints.

AnomalyCLIP (github zqhang/AnomalyCLIP) saves its prompt learner as a torch
pickle: ``ctx_pos``/``ctx_neg`` (the learnable "normal"/"abnormal" context)
and ``compound_prompts_text.N`` (the deep text prompts). They are read with
``torch.load(weights_only=True)``, which refuses code, and written out as a
safetensors checkpoint with head weights of 1.
"""

from __future__ import annotations

import io
from typing import Optional

import torch

from ..errors import CheckpointError
from ..storage.fs import open_file
from .checkpoint import Checkpoint, apply_learned_state, save_checkpoint
from .config import HeadCLIPConfig
from .factory import create_model


def read_anomalyclip_prompts(uri: str, storage_options: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Read AnomalyCLIP's released prompt-learner checkpoint (a torch pickle).

    Loaded with ``torch.load(weights_only=True)``, which refuses code objects.
    Returns HeadCLIP tensors: prompt.ctx_normal, prompt.ctx_abnormal, prompt.deep.
    """
    with open_file(uri, "rb", storage_options) as handle:
        data = handle.read()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad pickles
        raise CheckpointError(f"{uri}: not a weights-only torch file: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "prompt_learner" in state:
        state = state["prompt_learner"]
    if not isinstance(state, dict) or "ctx_pos" not in state or "ctx_neg" not in state:
        raise CheckpointError(f"{uri}: no AnomalyCLIP prompt_learner state (ctx_pos, ctx_neg) found")

    def vectors(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.float()
        while tensor.dim() > 2 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 2:
            raise CheckpointError(f"{uri}: unexpected prompt tensor shape {tuple(tensor.shape)}")
        return tensor

    prefix = "compound_prompts_text."
    deep_keys = sorted((k for k in state if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
    if not deep_keys:
        raise CheckpointError(f"{uri}: no compound_prompts_text.N deep prompts found")
    return {
        "prompt.ctx_normal": vectors(state["ctx_pos"]),
        "prompt.ctx_abnormal": vectors(state["ctx_neg"]),
        "prompt.deep": torch.stack([vectors(state[k]) for k in deep_keys]),
    }


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
