"""HeadCLIP checkpoints: the learned tensors in safetensors, the config as JSON.

One ``.safetensors`` file holds the learned parameters (prompts, deep
prompts, head weights) and, in its header metadata, the JSON config that
rebuilds the model. Nothing is unpickled on load. A checkpoint's id is the
sha256 of its bytes; the bytes are deterministic for a given model state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import __version__
from .config import HeadCLIPConfig
from ..errors import CheckpointError
from ..redact import redact_config
from ..storage.fs import describe_error, read_bytes, write_bytes_atomic
from .assets import resolve_asset

FORMAT = "headclip-checkpoint/1"
METADATA_KEY = "headclip"
# Checkpoints written before the setting existed were fitted with bicubic
# position-embedding interpolation and keep it.
LEGACY_POS_INTERPOLATION = "bicubic"

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A checkpoint read from storage."""

    config: HeadCLIPConfig
    tensors: dict[str, torch.Tensor]
    checkpoint_id: str
    headclip_version: str
    uri: Optional[str] = None


def checkpoint_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolved_config(model) -> HeadCLIPConfig:
    """The model's config with every derived default written out."""
    return model.config.replace(
        vv_start_layer=model.vision.vv_start_layer,
        map_layers=tuple(model.vision.map_layers),
    )


def serialize(model) -> bytes:
    """The checkpoint bytes of ``model``'s learned state and config."""
    tensors = {
        name: param.detach().to("cpu", torch.float32).contiguous().clone()
        for name, param in model.learnable_parameters().items()
    }
    config = resolved_config(model).to_dict()
    config["extra"] = redact_config(config.get("extra") or {})  # provenance without credentials
    payload = {
        "format": FORMAT,
        "headclip_version": __version__,
        "config": config,
    }
    # A single metadata entry keeps the header's byte order fixed.
    metadata = {METADATA_KEY: json.dumps(payload, sort_keys=True)}
    return save_safetensors(tensors, metadata=metadata)


def save_checkpoint(model, uri: str, storage_options: Optional[dict] = None) -> str:
    """Write ``model``'s checkpoint to ``uri`` (local path or fsspec URL); returns its id."""
    data = serialize(model)
    write_bytes_atomic(uri, data, storage_options)
    return checkpoint_id(data)


def _header_metadata(data: bytes, source: str) -> dict:
    """The HeadCLIP payload of a safetensors header; CheckpointError for anything malformed."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len <= 0 or 8 + header_len > len(data):
        raise CheckpointError(f"{source}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + header_len])
    except ValueError:
        raise CheckpointError(f"{source}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: not a safetensors file (header is a JSON {type(header).__name__})")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise CheckpointError(f"{source}: safetensors file without a HeadCLIP config")
    try:
        payload = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: its HeadCLIP config is not valid JSON") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{source}: its HeadCLIP config is a JSON {type(payload).__name__}, not an object")
    return payload


def parse_checkpoint(data: bytes, source: str = "checkpoint") -> Checkpoint:
    payload = _header_metadata(data, source)
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{source}: unsupported checkpoint format {payload.get('format')!r}")
    if not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"{source}: checkpoint without a config")
    fields = dict(payload["config"])
    if "pos_embedding_interpolation" not in fields:
        fields["pos_embedding_interpolation"] = LEGACY_POS_INTERPOLATION
        log.info("%s was written before pos_embedding_interpolation existed: its position embeddings are "
                 "resized %s, as when it was fitted", source, LEGACY_POS_INTERPOLATION)
    try:
        config = HeadCLIPConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid config: {err}") from None
    tensors = _load_tensors(data, source)
    return Checkpoint(config, tensors, checkpoint_id(data), payload.get("headclip_version", "?"), source)


def _load_tensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The learned tensors; refused when the data is malformed or any value is NaN or infinite."""
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type on malformed data
        raise CheckpointError(f"{source}: malformed tensor data: {' '.join(str(err).split())[:200]}") from None
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} holds {tensor.dtype} values, not floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN or infinite values")
    return tensors


def read_checkpoint(uri: str, storage_options: Optional[dict] = None) -> Checkpoint:
    """Read a checkpoint from a local path, fsspec URL or packaged asset (``headclip:NAME``)."""
    try:
        data = read_bytes(resolve_asset(uri), storage_options)
    except Exception as err:  # noqa: BLE001 - missing, unreachable, unknown protocol: one line each
        raise CheckpointError(f"cannot read checkpoint {uri}: {describe_error(err)}") from None
    return parse_checkpoint(data, uri)


def apply_learned_state(model, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's tensors into ``model``, refusing any shape mismatch."""
    params = model.learnable_parameters()
    source = checkpoint.uri or checkpoint.checkpoint_id[:12]
    missing = sorted(set(params) - set(checkpoint.tensors))
    unexpected = sorted(set(checkpoint.tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing {missing} / unexpected {unexpected} tensors")
    backbone = model.config.backbone
    for name, param in params.items():
        tensor = checkpoint.tensors[name]
        if tensor.shape != param.shape:
            raise CheckpointError(f"{source} does not match backbone {backbone}: {_describe(name, tensor.shape, param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(checkpoint.tensors[name].to(param.device, param.dtype))


def _describe(name: str, got: torch.Size, want: torch.Size) -> str:
    if name == "vision.head_weights":
        return (f"head weights cover {got[0]} layers x {got[1]} heads, "
                f"the backbone has {want[0]} adapted layers x {want[1]} heads")
    if name == "prompt.deep":
        return (f"deep prompts of {got[0]} layers x {got[1]} tokens x width {got[2]}, "
                f"expected {want[0]} x {want[1]} x width {want[2]}")
    return f"{name} has width {got[-1]} and {got[0]} vectors, the text tower expects width {want[-1]} and {want[0]}"
