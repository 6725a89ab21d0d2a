"""Loading the frozen open_clip backbone: by name, with weights by tag or file.

Weights are an open_clip pretrained tag, a local path or fsspec URL of a
weight file (safetensors, a torch state dict, or OpenAI's TorchScript
archive), or None for seeded random weights. OpenAI-trained weights need
QuickGELU; it is selected automatically for the tag "openai" (and any tag
open_clip marks as QuickGELU) and for files in OpenAI's layout or with the
sha256 of a released OpenAI file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
import torch.nn as nn

from .config import HeadCLIPConfig
from .assets import resolve_asset
from ..storage.fs import open_file

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "configs"
TINY_BACKBONE = "HeadCLIP-Tiny"
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
_SHA256_IN_URL = re.compile(r"/([0-9a-f]{64})/")


def register_model_configs() -> None:
    """Make the package's own open_clip configs (the tiny test backbone) known by name."""
    if TINY_BACKBONE not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class Backbone:
    """A frozen open_clip CLIP model and what goes with it."""

    clip: nn.Module
    tokenizer: Any
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    quick_gelu: bool
    weights_sha256: Optional[str]


def is_pretrained_tag(name: str, tag: Optional[str]) -> bool:
    return bool(tag) and bool(open_clip.get_pretrained_cfg(name, tag))


def quickgelu_sha256s() -> set[str]:
    """sha256 digests of released weight files trained with QuickGELU (OpenAI's)."""
    digests = set()
    for name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if cfg.get("quick_gelu"):
            match = _SHA256_IN_URL.search(cfg.get("url", ""))
            if match:
                digests.add(match.group(1))
    return digests


def needs_quick_gelu(name: str, pretrained: Optional[str], openai_layout: bool = False,
                     weights_sha256: Optional[str] = None, explicit: Optional[bool] = None) -> bool:
    """Whether the backbone must use QuickGELU.

    ``explicit`` wins when given. Otherwise: a model config that already
    uses it, a tag open_clip marks as QuickGELU-trained ("openai"), a file in
    OpenAI's layout, or a file whose sha256 is that of such a released file.
    """
    if explicit is not None:
        return explicit
    if open_clip.get_model_config(name) and open_clip.get_model_config(name).get("quick_gelu"):
        return True
    if pretrained is None:
        return False
    if is_pretrained_tag(name, pretrained):
        return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    return openai_layout or (weights_sha256 is not None and weights_sha256 in quickgelu_sha256s())


def read_weight_file(uri: str, storage_options: Optional[dict] = None) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Read a weight file through fsspec without unpickling code.

    Returns (state_dict, sha256, openai_layout). ``openai_layout`` is True for
    OpenAI's TorchScript archives and state dicts that carry their extra keys.
    """
    with open_file(resolve_asset(uri), "rb", storage_options) as handle:
        data = handle.read()
    digest = hashlib.sha256(data).hexdigest()
    openai_layout = False
    if data[:8] and not data.startswith(b"PK") and _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    elif data.startswith(b"PK") and _is_torchscript(data):
        state = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
        openai_layout = True
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(key in state for key in OPENAI_ONLY_KEYS):
        openai_layout = True
        for key in OPENAI_ONLY_KEYS:
            state.pop(key, None)
    return state, digest, openai_layout


def _looks_like_safetensors(data: bytes) -> bool:
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def _is_torchscript(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def load_backbone(config: HeadCLIPConfig, storage_options: Optional[dict] = None,
                  cache_dir: Optional[str] = None) -> Backbone:
    """Build the frozen backbone described by ``config``."""
    register_model_configs()
    name = config.backbone
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}")
    pretrained = config.pretrained
    state = digest = None
    openai_layout = False
    if pretrained is not None and not is_pretrained_tag(name, pretrained):
        state, digest, openai_layout = read_weight_file(pretrained, storage_options)
        if config.pretrained_sha256 and digest != config.pretrained_sha256:
            raise ValueError(
                f"backbone weights {pretrained} have sha256 {digest[:12]}..., "
                f"the checkpoint expects {config.pretrained_sha256[:12]}..."
            )
    quick_gelu = needs_quick_gelu(name, pretrained, openai_layout, digest, config.quick_gelu)

    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(config.init_seed)
        if pretrained is not None and state is None:
            clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                          cache_dir=cache_dir)
        else:
            clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    if state is not None:
        _load_state(clip, state, pretrained)
    for param in clip.parameters():
        param.requires_grad_(False)
    clip.eval()

    preprocess = open_clip.get_model_preprocess_cfg(clip)
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    with _quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(name)
    log.info("backbone %s (weights %s, quick_gelu=%s)", name, pretrained or "random", quick_gelu)
    return Backbone(clip, tokenizer, mean, std, quick_gelu, digest)


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's INFO lines (it logs them on the root logger) and its random-init warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_open_clip = f"{os.sep}open_clip{os.sep}" in record.pathname
        if from_open_clip and record.levelno <= logging.INFO:
            return False
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs each step of a model load at INFO on the root logger, and warns of random
    init even when weights are loaded from a file right after: neither reaches the user's log."""
    root = logging.getLogger()
    dropper = _QuietOpenClip()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def _load_state(clip: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    from open_clip.factory import resize_pos_embed, resize_text_pos_embed

    resize_pos_embed(state, clip)
    resize_text_pos_embed(state, clip)
    if "logit_scale" in state and clip.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    try:
        result = clip.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"{uri} does not fit the backbone: {detail}") from None
    missing = [k for k in result.missing_keys if k != "logit_bias"]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise ValueError(
            f"{uri} does not fit {type(clip).__name__}: {len(missing)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (first: {first})"
        )
