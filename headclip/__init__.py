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
    "CheckpointError": "errors",
    "read_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "HeadCLIPConfig": "model.config",
    "create_model": "model.factory",
    "import_anomalyclip": "model.anomalyclip",
    "HeadCLIP": "model.headclip",
    "ScoreOutput": "model.headclip",
    "resize_maps": "model.headclip",
    "preprocess": "data.transforms",
}
# Modules reachable as attributes: ``from headclip import results``.
_MODULES = {"results": "storage.results"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES)

if TYPE_CHECKING:  # pragma: no cover
    from .errors import CheckpointError
    from .model.anomalyclip import import_anomalyclip
    from .model.checkpoint import read_checkpoint, save_checkpoint
    from .model.config import HeadCLIPConfig
    from .model.factory import create_model
    from .model.headclip import HeadCLIP, ScoreOutput, resize_maps
    from .data.transforms import preprocess


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headclip' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
