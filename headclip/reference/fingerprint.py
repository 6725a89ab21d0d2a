"""A reference bank's fingerprint: what thresholds calibrated with the bank record to name it."""

from __future__ import annotations

import hashlib
import json

import torch


def bank_fingerprint(bank) -> str:
    """sha256 (hex) of a :class:`~headclip.reference.bank.ReferenceBank`'s header (checkpoint, layers,
    counts, scales, settings, command) and its features (float32, groups in order); the same for the
    bank in memory and read back from its file."""
    digest = hashlib.sha256(json.dumps(bank.metadata(), sort_keys=True).encode())
    for group in bank.groups:
        features = bank.features[group].detach().to("cpu", torch.float32).contiguous()
        digest.update(group.encode() + b"\0")
        digest.update(features.numpy().data)
    return digest.hexdigest()
