"""Pre-train the tiny demo backbone (HeadCLIP-Tiny) CLIP-style on generated surfaces.

A miniature of CLIP's own pre-training: every weight of the tiny open_clip
model (both towers, the projections and the logit scale) is trained with a
symmetric image-text contrastive loss on freshly generated images from
``headclip.synthetic`` (all ten textures, half with a defect), each paired
with a caption that names the texture and, for a defective image, the damage
and the defect ("a photo of a damaged wood surface with a scratch."); a
quarter of the captions name no texture ("a photo of a damaged object.").
Images are random square crops of the generated surface (flipped at random),
so defects are seen at varied scales and positions; a crop that misses the
defect is captioned as flawless. Every caption that describes an image of the
batch (same texture and defect, or a less specific caption) counts as a
positive for it.

Two additions to plain CLIP make the backbone useful to HeadCLIP, which reads
it in two places of its own:

* ``--raw-cls-weight``: the same contrastive loss on the class token projected
  without ``ln_post``, the way HeadCLIP's global score reads it;
* ``--patch-weight``: a light patch-level signal. Each patch token of the V-V
  attention path that HeadCLIP's anomaly map reads (``headclip.vision``, head
  weights 1) is pulled towards its own image's flawless or defect caption,
  by whether the generated defect mask covers it. This uses the synthetic
  masks of all textures, the demo textures included.

With both set to 0 this is plain CLIP pre-training. The result is written as
an fp16 safetensors state dict, the format of
``headclip/assets/demo-backbone.safetensors``; HeadCLIP keeps it frozen and
fits only prompts and head weights on top. Deterministic for a given seed and
thread count; about 8 minutes on 2 idle CPU cores with the defaults.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, UsageError, positive_int, run, unit_float

EXAMPLE = """examples:
  python -m jobs.pretrain_demo_backbone                       # writes /tmp/demo-backbone-candidate.safetensors
  python -m jobs.pretrain_demo_backbone --epochs 2 --images-per-epoch 512 --output /tmp/quick.safetensors
  # then build HeadCLIP over it:
  #   headclip.create_model(demo_config(pretrained="/tmp/demo-backbone-candidate.safetensors"))
"""

DEFAULT_OUTPUT = "headclip/assets/demo-backbone.safetensors"
GENERATED_SIZE = 256  # side of the generated surfaces; crops are resized to the model's input

log = logging.getLogger("jobs.pretrain_demo_backbone")

NORMAL_TEMPLATES = (
    "a photo of a {t} surface.",
    "a photo of a flawless {t} surface.",
    "a close-up photo of a clean {t} surface.",
    "a {t} surface without defects.",
    "a photo of a perfect {t} texture.",
    "a photo of an intact {t} surface.",
)
DEFECT_TEMPLATES = (
    "a photo of a damaged {t} surface with a {d}.",
    "a photo of a {t} surface with a {d} defect.",
    "a close-up photo of a defective {t} surface with a {d}.",
    "a {d} on a damaged {t} surface.",
    "a photo of a broken {t} surface with a {d}.",
    "a photo of a flawed {t} texture with a {d}.",
)
# Captions that name the damage but not the defect kind.
DAMAGED_TEMPLATES = (
    "a photo of a damaged {t} surface.",
    "a close-up photo of a defective {t} surface.",
)
# Captions that name no texture (HeadCLIP's own prompts end in "object." / "damaged object.").
GENERIC_NORMAL = ("a photo of a flawless object.", "a photo of an object.", "a photo of a good object.")
GENERIC_DAMAGED = ("a photo of a damaged object.", "a photo of a defective object.",
                   "a photo of an object with a defect.")
GENERIC_DEFECT = "a photo of a damaged object with a {d}."

ANY_DEFECT = "*"  # caption key: some defect, kind unspecified


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.pretrain_demo_backbone", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="weights file to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the data (default: 0)")
    p.add_argument("--epochs", type=positive_int, default=16, help="epochs (default: %(default)s)")
    p.add_argument("--images-per-epoch", type=positive_int, default=2048,
                   help="freshly generated images per epoch (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--min-crop", type=float, default=0.35,
                   help="smallest crop, as a fraction of the image side (default: %(default)s; 1 = no crops)")
    p.add_argument("--generic-captions", type=unit_float, default=0.25,
                   help="share of captions that name no texture (default: %(default)s)")
    p.add_argument("--patch-weight", type=float, default=2.0,
                   help="weight of the patch-level caption loss, 0 = plain CLIP (default: %(default)s)")
    p.add_argument("--raw-cls-weight", type=float, default=1.0,
                   help="weight of the same loss on the class token projected without ln_post, as HeadCLIP "
                        "reads it (default: %(default)s)")
    p.add_argument("--textures", default=None,
                   help="comma-separated textures to train on (default: all of headclip.data.synthetic.ALL_TEXTURES)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    return p


# -- data ------------------------------------------------------------------------------


def caption_for(rng, texture: Optional[str], defect: Optional[str], generic_share: float):
    """A caption for an image of ``texture`` with ``defect`` (None: flawless).

    Returns (text, key), key = (texture or None when unnamed, defect / ANY_DEFECT / None).
    """
    generic = rng.random() < generic_share
    if defect is None:
        if generic:
            return GENERIC_NORMAL[rng.integers(len(GENERIC_NORMAL))], (None, None)
        return NORMAL_TEMPLATES[rng.integers(len(NORMAL_TEMPLATES))].format(t=texture), (texture, None)
    if generic:
        if rng.random() < 0.5:
            return GENERIC_DAMAGED[rng.integers(len(GENERIC_DAMAGED))], (None, ANY_DEFECT)
        return GENERIC_DEFECT.format(d=defect), (None, defect)
    if rng.random() < 0.2:
        return DAMAGED_TEMPLATES[rng.integers(len(DAMAGED_TEMPLATES))].format(t=texture), (texture, ANY_DEFECT)
    return DEFECT_TEMPLATES[rng.integers(len(DEFECT_TEMPLATES))].format(t=texture, d=defect), (texture, defect)


def compatible(caption_key, texture: str, defect: Optional[str]) -> bool:
    """Whether a caption with ``caption_key`` describes an image of ``texture`` with ``defect``."""
    cap_texture, cap_defect = caption_key
    if cap_texture is not None and cap_texture != texture:
        return False
    if cap_defect is None or defect is None:
        return cap_defect is None and defect is None
    return cap_defect == ANY_DEFECT or cap_defect == defect


def generate_example(seed: int, texture: str, defective: bool, out_size: int, min_crop: float,
                     generic_share: float, grid: int):
    """One training example: (uint8 (S, S, 3) crop, texture, defect or None, caption, key, patch mask)."""
    import numpy as np
    from PIL import Image

    from headclip.data.synthetic import make_sample

    sample = make_sample(seed, GENERATED_SIZE, texture_kind=texture, defect="random" if defective else None)
    rng = np.random.default_rng([seed, 1])
    side = GENERATED_SIZE
    crop = side if min_crop >= 1.0 else int(round(side * rng.uniform(min_crop, 1.0)))
    top, left = rng.integers(0, side - crop + 1, 2)
    image = sample.image[top:top + crop, left:left + crop]
    mask = sample.mask[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    defect = sample.defect
    if defect is not None:
        seen, total = int(mask.sum()), int(sample.mask.sum())
        if seen < min(40, 0.5 * total):  # the crop (mostly) misses the defect
            defect = None
    pil = Image.fromarray(np.ascontiguousarray(image))
    if crop != out_size:
        pil = pil.resize((out_size, out_size), Image.BICUBIC)
    # Patch labels: share of each patch covered by the defect.
    cover = Image.fromarray(np.ascontiguousarray(mask).astype(np.float32)).resize((grid, grid), Image.BOX)
    patch = np.asarray(cover) if defect is not None else np.zeros((grid, grid), np.float32)
    text, key = caption_for(rng, texture, defect, generic_share)
    return np.asarray(pil), texture, defect, text, key, patch


def make_batch(seeds, textures, out_size, min_crop, generic_share, grid):
    import numpy as np
    import torch

    images, attrs, texts, keys, patches = [], [], [], [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, 0])
        texture = textures[rng.integers(len(textures))]
        defective = bool(rng.random() < 0.5)
        image, texture, defect, text, key, patch = generate_example(
            seed, texture, defective, out_size, min_crop, generic_share, grid)
        images.append(image)
        attrs.append((texture, defect))
        texts.append(text)
        keys.append(key)
        patches.append(patch)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, attrs, texts, keys, torch.from_numpy(np.stack(patches))


# -- model -----------------------------------------------------------------------------


def encode_text(clip, tokens):
    """``clip.encode_text`` on tokens cut after the longest caption.

    The text tower is causal and reads the end-of-text token, so dropping the
    padding after it leaves the features unchanged and saves most of the work.
    """
    import torch

    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = clip.token_embedding(tokens[:, :length]) + clip.positional_embedding[:length]
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    return x @ clip.text_projection


def encode_image(clip, images, vv_start: Optional[int] = None):
    """Run the vision tower; returns (pooled, raw_cls, patches).

    pooled: the CLIP image embedding (class token, ln_post, projection), (B, D).
    raw_cls: the class token projected without ln_post, as HeadCLIP reads it, (B, D).
    patches: projected patch embeddings (B, N, D): of the last layer's tokens, or
        with ``vv_start`` of the V-V path that HeadCLIP's anomaly map reads
        (see ``headclip.vision``; head weights 1), which adds each block's
        ``softmax(V V^T) V`` attention from layer ``vv_start`` (1-based) on.
    """
    import torch
    import torch.nn.functional as F

    visual = clip.visual
    x = visual._embeds(images)
    x_vv = None
    for layer, block in enumerate(visual.transformer.resblocks, start=1):
        if vv_start is None or layer < vv_start:
            x = block(x)
            continue
        attn = block.attn
        batch, tokens, width = x.shape
        heads = attn.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        both = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
        both = attn.out_proj(both.transpose(1, 2).reshape(2 * batch, tokens, width))
        out, out_vv = both.chunk(2)
        x_vv = (x if x_vv is None else x_vv) + block.ls_1(out_vv)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    raw_cls = x[:, 0] @ visual.proj
    pooled = visual.ln_post(x[:, 0]) @ visual.proj
    patches = x[:, 1:] if x_vv is None else x_vv[:, 1:]
    return pooled, raw_cls, visual.ln_post(patches) @ visual.proj


def multi_positive_clip_loss(image_features, text_features, positives, logit_scale):
    """Symmetric InfoNCE where every compatible (image, caption) pair is a positive.

    positives: (B, T) bool; targets are uniform over each row's (column's) positives.
    """
    import torch.nn.functional as F

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
    import torch
    import torch.nn.functional as F

    patches = F.normalize(patch_features, dim=-1)
    texts = F.normalize(torch.stack([normal_text, defect_text], dim=1), dim=-1)  # (B, 2, D)
    logits = logit_scale * torch.einsum("bnd,bkd->bnk", patches, texts)
    target = (patch_cover > 0.25).long()
    losses = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1), reduction="none")
    target = target.reshape(-1)
    parts = [losses[target == k].mean() for k in (0, 1) if bool((target == k).any())]
    return torch.stack(parts).mean()


def build_clip(seed: int):
    import open_clip
    import torch

    from headclip.model.backbone import TINY_BACKBONE, register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    clip = open_clip.create_model(TINY_BACKBONE)
    tokenizer = open_clip.get_tokenizer(TINY_BACKBONE)
    return clip, tokenizer


def train(args):
    import numpy as np
    import open_clip
    import torch

    from headclip.model.config import default_vv_start_layer
    from headclip.data.synthetic import ALL_TEXTURES

    torch.set_num_threads(args.threads)
    textures = ALL_TEXTURES
    if args.textures:
        textures = tuple(t.strip() for t in args.textures.split(",") if t.strip())
        unknown = [t for t in textures if t not in ALL_TEXTURES]
        if unknown:
            raise UsageError(f"unknown textures {', '.join(unknown)}; choose from {', '.join(ALL_TEXTURES)}")
    clip, tokenizer = build_clip(args.seed)
    clip.train()
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    patch = clip.visual.patch_size[0] if isinstance(clip.visual.patch_size, tuple) else clip.visual.patch_size
    grid = size // patch
    vv_start = default_vv_start_layer(len(clip.visual.transformer.resblocks))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = math.ceil(args.images_per_epoch / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    log.info("HeadCLIP-Tiny, %d parameters; %d textures; %d epochs x %d steps of %d images",
             sum(p.numel() for p in clip.parameters()), len(textures), args.epochs, steps_per_epoch,
             args.batch_size)
    start = time.time()
    step = 0
    for epoch in range(args.epochs):
        totals = np.zeros(3)
        count = 0
        for i in range(steps_per_epoch):
            first = args.seed * 100_000_000 + epoch * args.images_per_epoch + i * args.batch_size
            n = min(args.batch_size, args.images_per_epoch - i * args.batch_size)
            images, attrs, texts, keys, cover = make_batch(range(first, first + n), textures, size,
                                                           args.min_crop, args.generic_captions, grid)
            x = (images.float() / 255.0 - mean) / std

            # Encode each distinct caption once, plus both of each image's local
            # captions when the patch loss is on.
            local = []
            if args.patch_weight > 0:
                rng = np.random.default_rng([first, 2])
                for texture, defect in attrs:
                    normal = NORMAL_TEMPLATES[rng.integers(len(NORMAL_TEMPLATES))].format(t=texture)
                    if defect is None:
                        damaged = DAMAGED_TEMPLATES[rng.integers(len(DAMAGED_TEMPLATES))].format(t=texture)
                    else:
                        damaged = DEFECT_TEMPLATES[rng.integers(len(DEFECT_TEMPLATES))].format(t=texture, d=defect)
                    local.append((normal, damaged))
            unique = sorted(set(texts) | {t for pair in local for t in pair})
            index = {t: j for j, t in enumerate(unique)}
            positives = torch.tensor([[compatible(keys[texts.index(t)], *a) if t in texts else False
                                       for t in unique] for a in attrs])

            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            pooled, raw_cls, patches = encode_image(clip, x, vv_start if args.patch_weight > 0 else None)
            text_features = encode_text(clip, tokenizer(unique))
            scale = clip.logit_scale.exp()
            in_batch = torch.tensor([t in texts for t in unique])
            clip_loss = multi_positive_clip_loss(pooled, text_features[in_batch], positives[:, in_batch], scale)
            loss = clip_loss
            raw_loss = patch_loss = torch.zeros(())
            if args.raw_cls_weight > 0:
                raw_loss = multi_positive_clip_loss(raw_cls, text_features[in_batch], positives[:, in_batch], scale)
                loss = loss + args.raw_cls_weight * raw_loss
            if args.patch_weight > 0:
                normal_text = text_features[[index[a] for a, _ in local]]
                defect_text = text_features[[index[b] for _, b in local]]
                patch_loss = patch_caption_loss(patches, cover.flatten(1), normal_text, defect_text, scale)
                loss = loss + args.patch_weight * patch_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, math.log(100))
            totals += np.array([clip_loss.item(), raw_loss.item(), patch_loss.item()]) * n
            count += n
            step += 1
        mean_loss = totals / count
        log.info("epoch %d/%d: clip loss %.4f, raw-cls loss %.4f, patch loss %.4f, logit scale %.1f, %.0fs",
                 epoch + 1, args.epochs, *mean_loss, clip.logit_scale.exp().item(), time.time() - start)
    clip.eval()
    return clip


def save_weights(clip, path: str) -> Path:
    """fp16 safetensors state dict, the format of ``headclip/assets/demo-backbone.safetensors``."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.state_dict().items()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


def check_args(args) -> None:
    if not 0.0 < args.min_crop <= 1.0:
        raise UsageError(f"--min-crop must be in (0, 1], got {args.min_crop}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    for name in ("weight_decay", "patch_weight", "raw_cls_weight", "warmup_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    clip = train(args)
    path = save_weights(clip, args.output)
    log.info("wrote %s", path)
    print(path)
    return 0


if __name__ == "__main__":
    run(main, "jobs.pretrain_demo_backbone")
