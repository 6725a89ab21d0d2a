"""Pre-training the tiny demo backbone (HeadCLIP-Tiny) CLIP-style on generated surfaces.

A miniature of CLIP's own pre-training: every weight of the tiny open_clip
model (both towers, the projections and the logit scale) is trained with a
symmetric image-text contrastive loss on captioned generated images
(:mod:`headclip.training.captions`). Two additions make the backbone useful
to HeadCLIP, which reads it in two places of its own:

* ``raw_cls_weight``: the same loss on the class token projected without
  ``ln_post``, the way HeadCLIP's global score reads it;
* ``patch_weight``: each patch token of the V-V path that HeadCLIP's anomaly
  map reads (the library's :class:`DualPathVisionEncoder`, head weights off)
  is pulled towards its image's flawless or defect caption, by whether the
  generated defect mask covers it.

With both at 0 this is plain CLIP pre-training. Deterministic for a given
seed and thread count.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ..data.synthetic import ALL_TEXTURES
from ..model.backbone import TINY_BACKBONE, register_model_configs
from ..model.config import HeadCLIPConfig
from ..model.vision import DualPathVisionEncoder
from .captions import DAMAGED_TEMPLATES, DEFECT_TEMPLATES, NORMAL_TEMPLATES, compatible, make_batch

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Pre-training settings; the defaults made ``headclip/assets/demo-backbone.safetensors``."""

    seed: int = 0  # seed of the initial weights and of the data
    epochs: int = 16
    images_per_epoch: int = 2048  # freshly generated images per epoch
    batch_size: int = 64
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_crop: float = 0.35  # smallest crop, as a fraction of the image side (1 = no crops)
    generic_captions: float = 0.25  # share of captions that name no texture
    patch_weight: float = 2.0  # patch-level caption loss; 0 = plain CLIP
    raw_cls_weight: float = 1.0  # the loss on the class token without ln_post
    textures: tuple[str, ...] = ALL_TEXTURES
    threads: int = 2  # torch CPU threads


# -- model -----------------------------------------------------------------------------


def build_clip(seed: int):
    """A randomly initialised HeadCLIP-Tiny open_clip model and its tokenizer."""
    register_model_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_BACKBONE), open_clip.get_tokenizer(TINY_BACKBONE)


def vision_encoder(clip) -> DualPathVisionEncoder:
    """The library's dual-path encoder over ``clip.visual``, its V-V path read at the last layer."""
    visual = clip.visual
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    depth = len(visual.transformer.resblocks)
    config = HeadCLIPConfig(backbone=TINY_BACKBONE, pretrained=None, image_size=size, map_layers=(depth,),
                            head_weights=False)
    return DualPathVisionEncoder(visual, config)


def encode_text(clip, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text`` on tokens cut after the longest caption; (T, D).

    The text tower is causal and reads the end-of-text token, so dropping the
    padding after it leaves the features unchanged and saves most of the work.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = clip.token_embedding(tokens[:, :length]) + clip.positional_embedding[:length]
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    return x @ clip.text_projection


def encode_image(encoder: DualPathVisionEncoder, images: torch.Tensor):
    """(pooled, raw_cls, patches) for normalised images (B, 3, S, S).

    pooled: the CLIP image embedding (class token, ln_post, projection), (B, D).
    raw_cls: the class token projected without ln_post, as HeadCLIP reads it, (B, D).
    patches: projected V-V path patch embeddings of the last layer, (B, N, D).
    """
    features = encoder(images)
    pooled = encoder.project(features.class_token)
    raw_cls = encoder.project(features.class_token, layernorm=False)
    return pooled, raw_cls, encoder.project(features.patch_tokens[-1])


# -- losses ----------------------------------------------------------------------------


def multi_positive_clip_loss(image_features, text_features, positives, logit_scale):
    """Symmetric InfoNCE where every compatible (image, caption) pair is a positive.

    positives: (B, T) bool; targets are uniform over each row's (column's) positives.
    """
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    pos = positives.float()
    rows = pos.sum(1) > 0
    cols = pos.sum(0) > 0
    image_loss = -(logits[rows].log_softmax(1) * pos[rows] / pos[rows].sum(1, keepdim=True)).sum(1).mean()
    text_loss = -(logits.t()[cols].log_softmax(1) * pos.t()[cols] / pos.t()[cols].sum(1, keepdim=True)).sum(1).mean()
    return (image_loss + text_loss) / 2


def patch_caption_loss(patch_features, patch_cover, normal_text, defect_text, logit_scale):
    """Pull each patch towards its image's flawless or defect caption by the defect cover under it.

    patch_features: (B, N, D); patch_cover: (B, N) in [0, 1]; *_text: (B, D) caption features.
    A two-way softmax per patch, defective where more than a quarter of the patch is covered;
    the two classes are weighted equally within the batch.
    """
    patches = F.normalize(patch_features, dim=-1)
    texts = F.normalize(torch.stack([normal_text, defect_text], dim=1), dim=-1)  # (B, 2, D)
    logits = logit_scale * torch.einsum("bnd,bkd->bnk", patches, texts)
    target = (patch_cover > 0.25).long()
    losses = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1), reduction="none")
    target = target.reshape(-1)
    parts = [losses[target == k].mean() for k in (0, 1) if bool((target == k).any())]
    return torch.stack(parts).mean()


# -- training --------------------------------------------------------------------------


def make_optimizer(clip, config: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (not on embeddings, norms and biases)."""
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, total_steps: int, config: PretrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def local_captions(attrs, seed: int) -> list[tuple[str, str]]:
    """A flawless and a damaged caption of each image's own texture, for the patch loss."""
    rng = np.random.default_rng([seed, 2])
    pairs = []
    for texture, defect in attrs:
        normal = NORMAL_TEMPLATES[rng.integers(len(NORMAL_TEMPLATES))].format(t=texture)
        if defect is None:
            damaged = DAMAGED_TEMPLATES[rng.integers(len(DAMAGED_TEMPLATES))].format(t=texture)
        else:
            damaged = DEFECT_TEMPLATES[rng.integers(len(DEFECT_TEMPLATES))].format(t=texture, d=defect)
        pairs.append((normal, damaged))
    return pairs


def batch_loss(clip, tokenizer, encoder, config: PretrainConfig, images, attrs, texts, keys, cover, seed: int):
    """(total loss, (clip loss, raw-cls loss, patch loss)) of one batch.

    Each distinct caption is encoded once, plus both of each image's local
    captions when the patch loss is on.
    """
    local = local_captions(attrs, seed) if config.patch_weight > 0 else []
    unique = sorted(set(texts) | {t for pair in local for t in pair})
    index = {t: j for j, t in enumerate(unique)}
    positives = torch.tensor([[compatible(keys[texts.index(t)], *a) if t in texts else False for t in unique]
                              for a in attrs])
    pooled, raw_cls, patches = encode_image(encoder, images)
    text_features = encode_text(clip, tokenizer(unique))
    scale = clip.logit_scale.exp()
    in_batch = torch.tensor([t in texts for t in unique])
    clip_loss = multi_positive_clip_loss(pooled, text_features[in_batch], positives[:, in_batch], scale)
    loss = clip_loss
    raw_loss = patch_loss = torch.zeros(())
    if config.raw_cls_weight > 0:
        raw_loss = multi_positive_clip_loss(raw_cls, text_features[in_batch], positives[:, in_batch], scale)
        loss = loss + config.raw_cls_weight * raw_loss
    if config.patch_weight > 0:
        normal_text = text_features[[index[a] for a, _ in local]]
        defect_text = text_features[[index[b] for _, b in local]]
        patch_loss = patch_caption_loss(patches, cover.flatten(1), normal_text, defect_text, scale)
        loss = loss + config.patch_weight * patch_loss
    return loss, (clip_loss, raw_loss, patch_loss)


def pretrain(config: PretrainConfig):
    """Train every weight of a fresh HeadCLIP-Tiny; returns the model in eval mode."""
    torch.set_num_threads(config.threads)
    clip, tokenizer = build_clip(config.seed)
    clip.train()
    encoder = vision_encoder(clip)
    size, grid = encoder.grid * encoder.patch_size, encoder.grid
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    optimizer = make_optimizer(clip, config)
    steps_per_epoch = math.ceil(config.images_per_epoch / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    log.info("HeadCLIP-Tiny, %d parameters; %d textures; %d epochs x %d steps of %d images",
             sum(p.numel() for p in clip.parameters()), len(config.textures), config.epochs, steps_per_epoch,
             config.batch_size)
    start = time.time()
    step = 0
    for epoch in range(config.epochs):
        totals, count = np.zeros(3), 0
        for i in range(steps_per_epoch):
            first = config.seed * 100_000_000 + epoch * config.images_per_epoch + i * config.batch_size
            n = min(config.batch_size, config.images_per_epoch - i * config.batch_size)
            images, attrs, texts, keys, cover = make_batch(range(first, first + n), config.textures, size,
                                                           config.min_crop, config.generic_captions, grid)
            x = (images.float() / 255.0 - mean) / std
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, config)
            loss, parts = batch_loss(clip, tokenizer, encoder, config, x, attrs, texts, keys, cover, first)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            totals += np.array([p.item() for p in parts]) * n
            count += n
            step += 1
        log.info("epoch %d/%d: clip loss %.4f, raw-cls loss %.4f, patch loss %.4f, logit scale %.1f, %.0fs",
                 epoch + 1, config.epochs, *(totals / count), clip.logit_scale.exp().item(), time.time() - start)
    clip.eval()
    return clip


def save_weights(clip, path: str) -> Path:
    """fp16 safetensors state dict, the format of ``headclip/assets/demo-backbone.safetensors``."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.state_dict().items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


def check_textures(names: Optional[str]) -> tuple[str, ...]:
    """Comma-separated texture names as a tuple (all textures for None); ValueError names unknown ones."""
    if not names:
        return ALL_TEXTURES
    textures = tuple(t.strip() for t in names.split(",") if t.strip())
    unknown = [t for t in textures if t not in ALL_TEXTURES]
    if unknown:
        raise ValueError(f"unknown textures {', '.join(unknown)}; choose from {', '.join(ALL_TEXTURES)}")
    return textures
