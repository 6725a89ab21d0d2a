"""Captioned training examples for pre-training the tiny demo backbone CLIP-style.

Each example is a random square crop (flipped at random) of a generated
surface (:mod:`headclip.data.synthetic`), paired with a caption naming the
texture and, for a defective image, the damage and the defect ("a photo of a
damaged wood surface with a scratch."); some captions name no texture ("a
photo of a damaged object."). A crop that misses the defect is captioned as
flawless. Every caption that describes an image (same texture and defect, or
a less specific caption) counts as a positive for it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..data.synthetic import make_sample

GENERATED_SIZE = 256  # side of the generated surfaces; crops are resized to the model's input

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
