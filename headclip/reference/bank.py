"""A reference bank: per group, known-good patch features of a checkpoint's map layers.

Stored as one safetensors file: tensor ``bank.<i>`` (M_i, layers * embed_dim) float32
is group ``groups[i]``; a group with an index (see :mod:`.index`) also has
``index.<i>.centroids`` (nlist, layers * embed_dim) float32 and ``index.<i>.offsets``
(nlist + 1,) int64, its rows then stored list by list; the header's ``headclip.reference`` entry (JSON) names the
checkpoint id, backbone, image size (the model's), reference size (the side the bank's images were
resized to: the reference path's input), layers, per-group counts and distance scales,
the settings it was built with and the redacted command that built it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import HeadCLIPError
from .index import ListIndex, check_index

FORMAT = "headclip-reference-1"
METADATA_KEY = "headclip.reference"
POOLED = "*"  # the bank of all groups together: images of a group without a bank of its own use it


class BankError(HeadCLIPError):
    """A reference bank that cannot be read, or does not fit the checkpoint it is used with."""


@dataclass
class ReferenceBank:
    """Known-good patch features per group.

    features: group -> (M, len(layers) * embed_dim) float32, each layer's part L2-normalised.
    scales: group -> the distance a known-good patch rarely exceeds (the quantile
        ``scale_quantile`` of leave-one-image-out nearest distances); the reference
        map is ``d / (d + scale)``, 0.5 at that distance.
    image_size: the model's input side the bank is for (the zero-shot path's).
    reference_size: the side images are resized to for the reference path's features (its
        own forward when it differs from ``image_size``); None: ``image_size``.
    layers: the map layers (block numbers) whose features are concatenated.
    indexes: group -> its inverted-file index, for groups large enough to have one; that
        group's features are then in list order. Groups without one are searched exactly.
    """

    features: dict[str, torch.Tensor]
    scales: dict[str, float]
    checkpoint_id: str
    backbone: str
    image_size: int
    layers: tuple[int, ...]
    embed_dim: int
    group_column: Optional[str] = None
    counts: dict[str, dict] = field(default_factory=dict)  # group -> images, patches, kept
    settings: dict = field(default_factory=dict)  # budget, coreset, aggregate, scale_quantile
    command: str = ""
    indexes: dict[str, ListIndex] = field(default_factory=dict)
    reference_size: Optional[int] = None

    @property
    def input_size(self) -> int:
        """The side of the reference path's images (pixels)."""
        return int(self.reference_size or self.image_size)

    @property
    def own_size(self) -> Optional[int]:
        """The reference size where it differs from the model's input size (scoring then runs a second
        forward at that side), else None (the zero-shot forward's patch features are used)."""
        return self.input_size if self.input_size != self.image_size else None

    @property
    def groups(self) -> list[str]:
        return sorted(self.features)

    def group_of(self, group) -> str:
        """The bank an image's group value uses: its own, else the pooled one (``*``)."""
        key = None if group is None else str(group)
        return key if key in self.features else POOLED

    def bank_for(self, group) -> tuple[str, torch.Tensor, float]:
        """(group used, features, scale) for an image's group value: its own bank, else the pooled one."""
        key = None if group is None else str(group)
        if key in self.features:
            return key, self.features[key], self.scales[key]
        return POOLED, self.pooled_features(), self.scales[POOLED]

    def pooled_features(self) -> torch.Tensor:
        if POOLED in self.features:
            return self.features[POOLED]
        cached = getattr(self, "_pooled", None)
        if cached is None:
            cached = torch.cat([self.features[g] for g in self.groups])
            self._pooled = cached
        return cached

    def to(self, device) -> "ReferenceBank":
        """The same bank with its features and indexes on ``device``."""
        moved = dict(self.__dict__)
        moved.pop("_pooled", None)
        moved["features"] = {g: t.to(device) for g, t in self.features.items()}
        moved["indexes"] = {g: i.to(device) for g, i in self.indexes.items()}
        return ReferenceBank(**moved)

    def nbytes(self) -> int:
        """Bytes of the features and indexes (the pooled bank is searched group by group: no copy)."""
        return (sum(t.numel() * t.element_size() for t in self.features.values())
                + sum(i.nbytes() for i in self.indexes.values()))

    def check(self, checkpoint_id: str, image_size: int, source: str = "reference bank") -> None:
        """BankError (one line) unless the bank was built with this checkpoint and input size."""
        if checkpoint_id != self.checkpoint_id:
            raise BankError(f"{source} was built with checkpoint {self.checkpoint_id[:12]}, not "
                            f"{checkpoint_id[:12]}: build a bank with this checkpoint (python -m jobs.reference)")
        if int(image_size) != self.image_size:
            raise BankError(f"{source} was built for a model scoring at {self.image_size}px, this one scores at "
                            f"{image_size}px: build a bank at this image size")

    def metadata(self) -> dict:
        return {"format": FORMAT, "groups": self.groups, "scales": dict(sorted(self.scales.items())),
                "checkpoint_id": self.checkpoint_id, "backbone": self.backbone, "image_size": self.image_size,
                "reference_size": self.input_size, "layers": list(self.layers), "embed_dim": self.embed_dim, "group_column": self.group_column,
                "counts": self.counts, "settings": self.settings, "command": self.command}


def serialize(bank: ReferenceBank) -> bytes:
    from safetensors.torch import save

    tensors = {f"bank.{i}": bank.features[g].detach().to("cpu", torch.float32).contiguous()
               for i, g in enumerate(bank.groups)}
    for i, g in enumerate(bank.groups):
        if g in bank.indexes:
            tensors[f"index.{i}.centroids"] = bank.indexes[g].centroids.detach().to("cpu", torch.float32).contiguous()
            tensors[f"index.{i}.offsets"] = bank.indexes[g].offsets.detach().to("cpu", torch.int64).contiguous()
    return save(tensors, metadata={METADATA_KEY: json.dumps(bank.metadata(), sort_keys=True)})


def parse(data: bytes, source: str = "reference bank") -> ReferenceBank:
    """A bank from its bytes; BankError (one line) for anything malformed."""
    from safetensors.torch import load

    meta = _metadata(data, source)
    try:
        tensors = load(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type on malformed data
        raise BankError(f"{source}: malformed tensor data: {' '.join(str(err).split())[:200]}") from None
    groups = meta["groups"]
    width = len(meta["layers"]) * int(meta["embed_dim"])
    features, indexes = {}, {}
    for i, group in enumerate(groups):
        tensor = tensors.get(f"bank.{i}")
        if tensor is None or tensor.ndim != 2 or tensor.shape[1] != width or tensor.shape[0] == 0:
            raise BankError(f"{source}: group {group!r} has no (M, {width}) feature tensor")
        if not bool(torch.isfinite(tensor).all()):
            raise BankError(f"{source}: group {group!r} holds NaN or infinite features")
        features[group] = tensor
        parts = [tensors.get(f"index.{i}.{name}") for name in ("centroids", "offsets")]
        if any(p is not None for p in parts):  # banks written without an index have neither: exact search
            if any(p is None for p in parts):
                raise BankError(f"{source}: group {group!r} has an incomplete index (centroids and offsets needed)")
            index = ListIndex(*parts)
            problem = check_index(tensor, index)
            if problem:
                raise BankError(f"{source}: group {group!r}'s index does not fit its features: {problem}")
            indexes[group] = index
    scales = {g: float(s) for g, s in meta["scales"].items()}
    if not (set(groups) | {POOLED}) <= set(scales):
        raise BankError(f"{source}: distance scales missing for {sorted(set(groups) | {POOLED} - set(scales))}")
    return ReferenceBank(features=features, scales=scales, checkpoint_id=meta["checkpoint_id"],
                         backbone=meta["backbone"], image_size=int(meta["image_size"]),
                         layers=tuple(int(l) for l in meta["layers"]), embed_dim=int(meta["embed_dim"]),
                         group_column=meta.get("group_column"), counts=meta.get("counts", {}),
                         settings=meta.get("settings", {}), command=meta.get("command", ""), indexes=indexes,
                         reference_size=_reference_size(meta, source))


def _reference_size(meta: dict, source: str) -> int:
    """The header's reference size (banks written before it had none: the model's image size)."""
    value = meta.get("reference_size", meta["image_size"])
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BankError(f"{source}: reference_size {value!r} is not a positive whole number of pixels")
    return value


def _metadata(data: bytes, source: str) -> dict:
    import struct

    if len(data) < 8:
        raise BankError(f"{source}: not a safetensors file ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + length]) if 0 < length <= len(data) - 8 else None
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError):
        raise BankError(f"{source}: not a HeadCLIP reference bank (no {METADATA_KEY} header)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BankError(f"{source}: unsupported reference bank format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    missing = [k for k in ("groups", "scales", "checkpoint_id", "backbone", "image_size", "layers", "embed_dim")
               if k not in meta]
    if missing:
        raise BankError(f"{source}: reference bank header lacks {', '.join(missing)}")
    return meta


def read_bank(uri: str, storage_options: Optional[dict] = None) -> ReferenceBank:
    """Read a bank from a local path or fsspec URL; BankError (one line) on any failure."""
    from ..redact import redact_uri
    from ..storage.fs import describe_error, read_bytes

    source = redact_uri(uri)
    try:
        data = read_bytes(uri, storage_options)
    except Exception as err:  # noqa: BLE001 - missing, unreachable, unknown protocol: one line each
        raise BankError(f"cannot read reference bank {source}: {describe_error(err)}") from None
    return parse(data, source)


def write_bank(bank: ReferenceBank, uri: str, storage_options: Optional[dict] = None) -> None:
    from ..storage.fs import write_bytes_atomic

    write_bytes_atomic(uri, serialize(bank), storage_options)
