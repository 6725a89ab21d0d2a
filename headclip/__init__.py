"""HeadCLIP: zero-shot image anomaly detection with adapted attention heads.

The public surface::

    model = headclip.create_model(checkpoint="s3://bucket/models/headclip.safetensors")
    out = model.score(headclip.preprocess(pil_images, model.image_size))
    out.joint_score, out.global_score, out.anomaly_map

Names are imported on first use, so ``import headclip`` (and command-line
help) stays fast; torch and open_clip load when a model is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "read_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "HeadCLIPConfig": "config",
    "create_model": "factory",
    "import_anomalyclip": "factory",
    "HeadCLIP": "model",
    "ScoreOutput": "model",
    "resize_maps": "model",
    "preprocess": "transforms",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
    from .config import HeadCLIPConfig
    from .factory import create_model, import_anomalyclip
    from .model import HeadCLIP, ScoreOutput, resize_maps
    from .transforms import preprocess


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headclip' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
