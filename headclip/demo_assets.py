"""The demo model shipped in the package: a tiny backbone and its checkpoint.

The backbone is ``HeadCLIP-Tiny`` with fixed random weights stored in
``assets/demo-backbone.safetensors`` (fp16), so the demo runs offline. Its
config names the weights as ``headclip:demo-backbone.safetensors``, a path
inside the package's assets.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
ASSET_SCHEME = "headclip:"
DEMO_CHECKPOINT = ASSETS / "demo.safetensors"
DEMO_BACKBONE = f"{ASSET_SCHEME}demo-backbone.safetensors"
DEMO_IMAGE_SIZE = 224


def resolve_asset(uri: str) -> str:
    """Map ``headclip:NAME`` to the packaged file; other URIs pass through."""
    if uri.startswith(ASSET_SCHEME):
        return str(ASSETS / uri[len(ASSET_SCHEME):])
    return uri


def demo_config(**changes):
    from .config import HeadCLIPConfig

    base = dict(backbone="HeadCLIP-Tiny", pretrained=DEMO_BACKBONE, image_size=DEMO_IMAGE_SIZE)
    return HeadCLIPConfig(**{**base, **changes})


def write_demo_backbone(seed: int = 0) -> Path:
    """Write the tiny backbone's random weights (seeded) to the assets folder, fp16."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from .backbone import register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.create_model("HeadCLIP-Tiny")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.state_dict().items()}
    path = Path(resolve_asset(DEMO_BACKBONE))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_untrained_demo_checkpoint() -> Path:
    """The demo checkpoint before fitting: random prompts (seeded), head weights 1."""
    from .checkpoint import save_checkpoint
    from .factory import create_model

    model = create_model(demo_config(extra={"provenance": "untrained"}))
    save_checkpoint(model, str(DEMO_CHECKPOINT))
    return DEMO_CHECKPOINT
