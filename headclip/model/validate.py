"""Checking a checkpoint against its backbone before any work, without the backbone's weights.

The model is built on PyTorch's meta device (shapes only: no memory, no
weight file read, about a second even for ViT-L), so every structural check
of the real build runs on the driver: the backbone name, the input size (a
multiple of the patch size, at most ``MAX_IMAGE_SIZE``), the first V-V layer
and the map layers, the deep-prompt layers, and each learned tensor's name
and shape. Values are checked when the checkpoint is read (finite tensors,
config ranges). Backbone weights named by a path must exist and look like a
weight file. Every failure is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import logging
from typing import Optional

from ..errors import CheckpointError
from .checkpoint import Checkpoint, apply_learned_state
from .config import HeadCLIPConfig

log = logging.getLogger(__name__)

# The largest input side accepted: a ViT-L/14 at 4096 px already has 85,000
# patch tokens per image, beyond any accelerator's memory for V-V attention.
MAX_IMAGE_SIZE = 4096


def check_checkpoint(checkpoint: Checkpoint, overrides: Optional[dict] = None,
                     storage_options: Optional[dict] = None) -> HeadCLIPConfig:
    """Raise CheckpointError unless ``checkpoint`` (with ``overrides``) builds on its backbone.

    Returns the config the scoring actors will build.
    """
    source = checkpoint.uri or checkpoint.checkpoint_id[:12]
    try:
        config = checkpoint.config.replace(**overrides) if overrides else checkpoint.config
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid config: {err}") from None
    import open_clip

    from .backbone import register_model_configs

    register_model_configs()
    if config.backbone not in open_clip.list_models():
        raise CheckpointError(f"{source}: unknown backbone {config.backbone!r} (not an open_clip model)")
    if config.image_size > MAX_IMAGE_SIZE:
        raise CheckpointError(f"{source}: image_size {config.image_size} exceeds the largest accepted, "
                              f"{MAX_IMAGE_SIZE}")
    check_backbone_weights(config, source, storage_options)
    model = _meta_model(config, source)
    apply_learned_state(model, checkpoint)  # names and shapes; copying onto meta tensors moves no data
    return config


def _meta_model(config: HeadCLIPConfig, source: str):
    import open_clip
    import torch

    from .backbone import _quiet_open_clip
    from .headclip import HeadCLIP

    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(config.backbone, pretrained=None, device="meta",
                                          force_quick_gelu=bool(config.quick_gelu))
            tokenizer = open_clip.get_tokenizer(config.backbone)
        with torch.device("meta"):
            return HeadCLIP(clip, tokenizer, config, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    except ValueError as err:
        raise CheckpointError(f"{source} does not fit backbone {config.backbone}: {err}") from None
    except Exception as err:  # noqa: BLE001 - anything else the build would meet in every actor
        raise CheckpointError(f"{source}: cannot build backbone {config.backbone}: "
                              f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None


def check_backbone_weights(config: HeadCLIPConfig, source: str, storage_options: Optional[dict] = None) -> None:
    """A weight path must name an existing file that starts like a weight file; tags are left to open_clip."""
    from .assets import resolve_asset
    from .backbone import is_pretrained_tag
    from ..storage.fs import describe_error, filesystem

    weights = config.pretrained
    if weights is None or is_pretrained_tag(config.backbone, weights):
        return
    if not str(weights).strip():
        raise CheckpointError(f"{source}: empty backbone weights name (give a pretrained tag, a path or null)")
    uri = resolve_asset(str(weights))
    try:
        fs, path = filesystem(uri, storage_options)
        info = fs.info(path)
        if info.get("type") != "file":
            raise CheckpointError(f"{source}: backbone weights {weights} are not a file")
        with fs.open(path, "rb") as handle:
            head = handle.read(16)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - missing, unreachable, unknown protocol
        raise CheckpointError(f"{source}: backbone weights {weights!r} are neither an open_clip tag for "
                              f"{config.backbone} nor a readable file ({describe_error(err)})") from None
    size = info.get("size") or 0
    header = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    safetensors = 0 < header < size and head[8:9] == b"{"
    if not (safetensors or head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(f"{source}: backbone weights {weights} are not a weight file "
                              f"(safetensors, a torch archive or a torch pickle)")
