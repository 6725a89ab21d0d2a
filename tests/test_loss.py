"""The training loss against its formula, written out image by image in float64, for the
settings a LossConfig holds (pixel weight, focal gamma and smoothing, Dice smoothing)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headclip.model.headclip import HeadCLIPLogits
from headclip.training.loss import LossConfig, headclip_loss

SIZE, GRID, LAYERS = 32, 4, 3


def _dice(p: torch.Tensor, target: torch.Tensor, smooth: float) -> float:
    return (2 * float((p * target).sum()) + smooth) / (float(p.sum()) + float(target.sum()) + smooth)


def _layer_losses(logits: HeadCLIPLogits, masks, mask_valid, config: LossConfig) -> list[float]:
    """Per map layer l, over the images whose mask is known, on the class probabilities
    softmax(patch logits) upsampled (bilinear) to the input:

        L_l = mean over those images and pixels of -(1 - pt)^gamma log pt          (focal)
            + mean over those images of 1 - Dice(p_abnormal, mask)
            + mean over those images of 1 - Dice(p_normal, 1 - mask),

    pt = sum over the two classes of the one-hot target clamped to [s, 1 - s] times the
    probability, plus s (s = focal_smooth, AnomalyCLIP's FocalLoss); Dice(p, t) =
    (2 sum p t + d) / (sum p + sum t + d), d = dice_smooth.
    """
    known = [b for b in range(masks.shape[0]) if mask_valid[b]]
    if not known:
        return []
    s = config.focal_smooth
    losses = []
    for layer in logits.patch_logits:
        probs = F.interpolate(layer.double().softmax(dim=1), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        total = 0.0
        for b in known:
            t = masks[b].double()
            p_normal, p_abnormal = probs[b, 0], probs[b, 1]
            onehot_normal, onehot_abnormal = (1 - t).clamp(s, 1 - s), t.clamp(s, 1 - s)
            pt = onehot_normal * p_normal + onehot_abnormal * p_abnormal + s
            focal = float((-(1 - pt) ** config.focal_gamma * pt.log()).mean())
            total += (focal + (1 - _dice(p_abnormal, t, config.dice_smooth))
                      + (1 - _dice(p_normal, 1 - t, config.dice_smooth)))
        losses.append(total / len(known))
    return losses


def _reference_loss(logits: HeadCLIPLogits, labels, masks, mask_valid, config: LossConfig) -> tuple[float, float, float]:
    """(total, image, pixel): image = mean over images of -log softmax(global logits)[label];
    pixel = the sum of the layer losses; total = image_weight * image + pixel_weight * pixel."""
    images = labels.shape[0]
    image = 0.0
    for b in range(images):
        z = logits.global_logits[b].double()
        image += -(float(z[int(labels[b])]) - math.log(sum(math.exp(float(v)) for v in z)))
    image /= images
    pixel = sum(_layer_losses(logits, masks, mask_valid, config))
    return config.image_weight * image + config.pixel_weight * pixel, image, pixel


def _batch(seed: int = 0):
    """Four images, three map layers of different logits; masks: a blob, empty (normal), a
    blob, and one unknown (an image-label-only class)."""
    generator = torch.Generator().manual_seed(seed)
    global_logits = torch.randn(4, 2, generator=generator) * 3
    patch_logits = [torch.randn(4, 2, GRID, GRID, generator=generator) * scale for scale in (1.0, 3.0, 6.0)]
    masks = torch.zeros(4, SIZE, SIZE, dtype=torch.bool)
    masks[0, 4:12, 6:20] = True
    masks[2, 20:30, 2:9] = True
    masks[3, 0:16, 0:16] = True  # ignored: its mask is marked unknown
    labels = torch.tensor([1, 0, 1, 1])
    mask_valid = torch.tensor([True, True, True, False])
    return HeadCLIPLogits(global_logits, patch_logits), labels, masks, mask_valid


CONFIGS = {
    "default": LossConfig(),  # AnomalyCLIP's: 4 x the sum over layers
    "mean-of-layers": LossConfig(pixel_weight=4.0 / LAYERS),  # 4 x the mean over the three layers
    "weights-gamma-smooth": LossConfig(pixel_weight=1.5, image_weight=0.5, focal_gamma=3.0, focal_smooth=1e-3,
                                       dice_smooth=0.5),
    "no-focal-smoothing": LossConfig(focal_smooth=0.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_equals_its_formula(name):
    """Catches: the normal map's Dice against the mask instead of its complement, Dice over the
    whole batch instead of per image, the focal weight on the wrong class's probability, a gamma
    or smoothing ignored, upsampling the logits instead of the probabilities, a mean instead of
    the sum over map layers, a pixel weight ignored, and images with unknown masks taking pixel
    loss."""
    config = CONFIGS[name]
    logits, labels, masks, mask_valid = _batch()
    parts = headclip_loss(logits, labels, masks, mask_valid, config)
    total, image, pixel = _reference_loss(logits, labels, masks, mask_valid, config)
    assert float(parts.image) == pytest.approx(image, rel=1e-6)
    assert float(parts.pixel) == pytest.approx(pixel, rel=1e-5)
    assert float(parts.total) == pytest.approx(total, rel=1e-5)
    layers = _layer_losses(logits, masks, mask_valid, config)
    assert len(layers) == LAYERS and max(layers) - min(layers) > 0.1  # layers differ: the reduction is checked


def test_mean_over_layers_is_the_weight_divided_by_their_number():
    """4 x the mean over map layers is pixel_weight 4 / layers (README: --pixel-weight 1 with four layers)."""
    logits, labels, masks, mask_valid = _batch(2)
    parts = headclip_loss(logits, labels, masks, mask_valid, CONFIGS["mean-of-layers"])
    layers = _layer_losses(logits, masks, mask_valid, CONFIGS["mean-of-layers"])
    _, image, _ = _reference_loss(logits, labels, masks, mask_valid, CONFIGS["mean-of-layers"])
    assert float(parts.total) == pytest.approx(image + 4.0 * sum(layers) / len(layers), rel=1e-5)


def test_loss_without_known_masks_is_the_image_loss():
    logits, labels, masks, _ = _batch(1)
    unknown = torch.zeros(4, dtype=torch.bool)
    for config in CONFIGS.values():
        parts = headclip_loss(logits, labels, masks, unknown, config)
        total, image, pixel = _reference_loss(logits, labels, masks, unknown, config)
        assert float(parts.pixel) == pixel == 0.0
        assert float(parts.total) == pytest.approx(total, rel=1e-6) and total == pytest.approx(
            config.image_weight * image)
