"""HeadCLIP: zero-shot image anomaly detection with adapted attention heads.

The public surface::

    model = headclip.create_model(checkpoint="s3://bucket/models/headclip.safetensors")
    out = model.score(headclip.preprocess(pil_images, model.image_size))
    out.joint_score, out.global_score, out.anomaly_map
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint  # noqa: E402
from .config import HeadCLIPConfig  # noqa: E402
from .factory import create_model, import_anomalyclip  # noqa: E402
from .model import HeadCLIP, ScoreOutput, resize_maps  # noqa: E402
from .transforms import preprocess  # noqa: E402

__all__ = [
    "CheckpointError",
    "HeadCLIP",
    "HeadCLIPConfig",
    "ScoreOutput",
    "create_model",
    "import_anomalyclip",
    "preprocess",
    "read_checkpoint",
    "resize_maps",
    "save_checkpoint",
]
