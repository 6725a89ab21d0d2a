"""HeadCLIP's training loss (the method's defaults, as in AnomalyCLIP).

image loss: cross-entropy of the global (class-token) logits against the image label.
pixel loss, per map layer, on the two-class probability map upsampled to the input:
    focal loss (gamma 2) + Dice(abnormal map, mask) + Dice(normal map, 1 - mask),
averaged over layers and weighted by ``pixel_weight`` (4; AnomalyCLIP sums the
pixel loss over its four feature layers, which this weight reproduces).
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
    pixel_weight: float = 4.0
    image_weight: float = 1.0
    dice_smooth: float = 1.0


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """probs: (B, 2, H, W) class probabilities; target: (B, H, W) in {0, 1}. Mean over pixels."""
    picked = probs.gather(1, target.long().unsqueeze(1)).squeeze(1).clamp(eps, 1.0)
    return (-(1.0 - picked) ** gamma * picked.log()).mean()


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
                focal_loss(probs, target, config.focal_gamma)
                + dice_loss(probs[:, 1], target, config.dice_smooth)
                + dice_loss(probs[:, 0], 1.0 - target, config.dice_smooth)
            )
        pixel = torch.stack(layer_losses).mean()
    total = config.image_weight * image + config.pixel_weight * pixel
    return LossParts(total, image.detach(), pixel.detach())
