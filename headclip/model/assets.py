"""The demo model shipped in the package: a tiny backbone and its checkpoint.

The backbone is ``HeadCLIP-Tiny`` with weights pre-trained on generated
surfaces (``python -m jobs.pretrain_demo_backbone``), stored in
``assets/demo-backbone.safetensors`` (fp16) so the demo runs offline; the
checkpoint ``assets/demo.safetensors`` is fitted on it with ``jobs.train``
(``make demo-assets`` rebuilds both). Configs name the weights as
``headclip:demo-backbone.safetensors`` and runs name the checkpoint as
``headclip:demo.safetensors``: names of files inside the package's assets that
read the same wherever the package is unpacked (a ``ray job submit`` working
directory, a container), so provenance never records a session-local path.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ASSET_SCHEME = "headclip:"
DEMO_CHECKPOINT = ASSETS / "demo.safetensors"
DEMO_CHECKPOINT_URI = f"{ASSET_SCHEME}demo.safetensors"
DEMO_BACKBONE = f"{ASSET_SCHEME}demo-backbone.safetensors"
DEMO_IMAGE_SIZE = 224


def resolve_asset(uri: str) -> str:
    """Map ``headclip:NAME`` to the packaged file; other URIs pass through."""
    if uri.startswith(ASSET_SCHEME):
        return str(ASSETS / uri[len(ASSET_SCHEME):])
    return uri
