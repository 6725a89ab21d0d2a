"""HeadCLIP's training loss: AnomalyCLIP's (``train.py``, ``loss.py``), the method's default.

image loss: cross-entropy of the global (class-token) logits against the image label.
pixel loss, per map layer, on the two-class probability map upsampled (bilinear) to the input:
    focal loss (gamma 2) + Dice(abnormal map, mask) + Dice(normal map, 1 - mask),
summed over the map layers (four by default) and weighted by ``pixel_weight``:
    total = image + 4 * sum over layers (focal + dice + dice),
AnomalyCLIP's ``loss = lam * loss`` with ``lam = 4``. For the mean over layers
instead, divide ``pixel_weight`` by the number of layers.
Images whose mask is unknown (image-label-only data) take no pixel loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..model.headclip import HeadCLIPLogits


@dataclass
class LossConfig:
    focal_gamma: float = 2.0
    focal_smooth: float = 1e-5  # label smoothing of AnomalyCLIP's FocalLoss
    pixel_weight: float = 4.0  # times the pixel loss summed over map layers
    image_weight: float = 1.0
    dice_smooth: float = 1.0


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """probs: (B, C, H, W) class probabilities; target: (B, H, W) class ids. Mean over pixels.

    ``-(1 - pt)^gamma * log(pt)`` with ``pt = sum_c onehot_c * p_c + smooth`` and the one-hot
    target clamped to [smooth / (C - 1), 1 - smooth], as AnomalyCLIP's FocalLoss (alpha 1).
    """
    low, high = smooth / (probs.shape[1] - 1), 1.0 - smooth  # the clamped one-hot's two values
    picked = probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    pt = low * probs.sum(1) + (high - low) * picked + smooth
    return (-(1.0 - pt) ** gamma * pt.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """probs, target: (B, H, W). 1 - Dice per image, averaged over the batch."""
    p = probs.flatten(1)
    t = target.flatten(1).to(p.dtype)
    dice = (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1.0 - dice).mean()


@dataclass
class LossParts:
    total: torch.Tensor
    image: torch.Tensor
    pixel: torch.Tensor


def headclip_loss(logits: HeadCLIPLogits, labels: torch.Tensor, masks: Optional[torch.Tensor],
                  mask_valid: Optional[torch.Tensor], config: LossConfig = LossConfig()) -> LossParts:
    """The training loss.

    Args:
        logits: the model's forward output for a batch.
        labels: (B,) 0 normal / 1 anomalous.
        masks: (B, S, S) binary ground truth at the input size, or None.
        mask_valid: (B,) bool, False where the mask is unknown.
    """
    image = F.cross_entropy(logits.global_logits.float(), labels.long())
    pixel = image.new_zeros(())
    if masks is not None and (mask_valid is None or bool(mask_valid.any())):
        keep = mask_valid if mask_valid is not None else torch.ones_like(labels, dtype=torch.bool)
        target = masks[keep].float()
        size = target.shape[-2:]
        layer_losses = []
        for layer_logits in logits.patch_logits:
            probs = F.interpolate(layer_logits[keep].float().softmax(dim=1), size=size, mode="bilinear",
                                  align_corners=False)
            layer_losses.append(
                focal_loss(probs, target, config.focal_gamma, config.focal_smooth)
                + dice_loss(probs[:, 1], target, config.dice_smooth)
                + dice_loss(probs[:, 0], 1.0 - target, config.dice_smooth)
            )
        pixel = torch.stack(layer_losses).sum()
    total = config.image_weight * image + config.pixel_weight * pixel
    return LossParts(total, image.detach(), pixel.detach())
