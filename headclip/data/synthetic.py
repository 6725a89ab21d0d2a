"""Generated images of textured surfaces with known synthetic defects.

Used by the demo, the tests, the benchmark and to fit the demo checkpoint:
no public data set can be downloaded here, and these come with exact masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

TEXTURES = ("wood", "fabric", "concrete", "metal", "tiles", "leather")
# Added later; kept apart so that ``make_sample`` without ``texture_kind``
# still draws from the original six and gives the same images as before.
MORE_TEXTURES = ("marble", "carpet", "mesh", "cork")
ALL_TEXTURES = TEXTURES + MORE_TEXTURES
DEFECTS = ("scratch", "spot", "crack", "hole")


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True on the defect
    texture: str
    defect: Optional[str]  # None for a normal image


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((size // scale + 2, size // scale + 2))
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    t = idx - i0
    rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A (size, size, 3) float image in [0, 1] of one texture kind."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.35, 0.65, 3)
    fine = rng.random((size, size))
    if kind == "wood":
        rings = np.sin((x * rng.uniform(20, 40)) + 3 * _smooth_noise(rng, size, 16))
        value = 0.55 + 0.2 * rings + 0.05 * fine
        color = value[..., None] * np.array([0.85, 0.6, 0.35])
    elif kind == "fabric":
        period = rng.integers(4, 8)
        weave = ((np.arange(size)[:, None] // period + np.arange(size)[None, :] // period) % 2).astype(float)
        value = 0.5 + 0.15 * weave + 0.08 * fine
        color = value[..., None] * base * 1.4
    elif kind == "concrete":
        value = 0.5 + 0.25 * (_smooth_noise(rng, size, 8) - 0.5) + 0.15 * (fine - 0.5)
        color = np.repeat(value[..., None], 3, axis=2)
    elif kind == "metal":
        streaks = _smooth_noise(rng, size, 4)[:, :1] * np.ones((1, size))
        value = 0.6 + 0.15 * (streaks - 0.5) + 0.04 * fine + 0.1 * x
        color = value[..., None] * np.array([0.9, 0.92, 0.95])
    elif kind == "tiles":
        period = rng.integers(24, 40)
        grout = ((np.arange(size) % period) < 3)
        lines = grout[:, None] | grout[None, :]
        value = np.where(lines, 0.3, 0.7) + 0.05 * fine
        color = value[..., None] * base * 1.3
    elif kind == "leather":
        cells = _smooth_noise(rng, size, 3)
        value = 0.45 + 0.2 * (cells > 0.5) + 0.08 * fine
        color = value[..., None] * np.array([0.55, 0.35, 0.25]) * 1.5
    elif kind == "marble":
        # Pale stone with dark, wandering diagonal veins.
        angle = rng.uniform(0, np.pi)
        turbulence = 6 * _smooth_noise(rng, size, 32) + 2 * _smooth_noise(rng, size, 8)
        veins = np.abs(np.sin((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(8, 16) + turbulence))
        value = 0.9 - 0.35 * veins ** 8 - 0.05 * _smooth_noise(rng, size, 24) + 0.03 * fine
        color = value[..., None] * np.array([0.97, 0.95, 0.92])
    elif kind == "carpet":
        # Dense coloured pile: fine fibres over a blotchy two-tone base.
        tint = rng.uniform(0.3, 1.0, 3)
        blotch = _smooth_noise(rng, size, 12)
        fibres = _smooth_noise(rng, size, 2)
        value = 0.35 + 0.25 * fibres + 0.15 * blotch + 0.15 * fine
        color = value[..., None] * tint * 1.2
    elif kind == "mesh":
        # A diagonal wire mesh: thin dark wires on a light backing.
        period = rng.integers(10, 18)
        u = (np.arange(size)[:, None] + np.arange(size)[None, :]) % period
        v = (np.arange(size)[:, None] - np.arange(size)[None, :]) % period
        wires = (u < 2) | (v < 2)
        value = np.where(wires, 0.25, 0.75) + 0.05 * fine
        color = value[..., None] * np.array([0.8, 0.85, 0.9]) * (0.8 + 0.4 * base.mean())
    elif kind == "cork":
        # Tan granules of varied shade, speckled with dark pores.
        granules = _smooth_noise(rng, size, 5)
        pores = rng.random((size, size)) < 0.03
        value = 0.55 + 0.3 * (granules - 0.5) + 0.1 * (fine - 0.5)
        value = np.where(pores, 0.25, value)
        color = value[..., None] * np.array([0.85, 0.65, 0.42]) * 1.2
    else:
        raise ValueError(f"unknown texture {kind!r}; choose from {', '.join(ALL_TEXTURES)}")
    return np.clip(color, 0, 1)


def defect_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A (size, size) bool mask of one defect kind, somewhere inside the image."""
    y, x = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    if kind == "spot":
        r = rng.uniform(0.05, 0.12) * size
        return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    if kind == "hole":
        a, b = rng.uniform(0.04, 0.1, 2) * size
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.5) * size
        dx, dy = np.cos(angle), np.sin(angle)
        along = (x - cx) * dx + (y - cy) * dy
        across = np.abs(-(x - cx) * dy + (y - cy) * dx)
        return (np.abs(along) <= length / 2) & (across <= max(1.5, size * 0.012))
    if kind == "crack":
        mask = np.zeros((size, size), bool)
        px, py = cx, cy
        width = max(1, size // 100)
        for _ in range(int(size * 0.6)):
            px = np.clip(px + rng.normal(1.0, 0.8), 0, size - 1)
            py = np.clip(py + rng.normal(0.0, 1.2), 0, size - 1)
            mask[int(max(0, py - width)):int(py + width + 1), int(max(0, px - width)):int(px + width + 1)] = True
        return mask
    raise ValueError(f"unknown defect {kind!r}; choose from {', '.join(DEFECTS)}")


def make_sample(seed: int, size: int = 256, texture_kind: Optional[str] = None,
                defect: Optional[str] = "random", textures: tuple[str, ...] = TEXTURES) -> Sample:
    """One image; ``defect`` "random" picks one, None gives a normal image."""
    rng = np.random.default_rng(seed)
    kind = texture_kind or textures[rng.integers(len(textures))]
    image = texture(rng, kind, size)
    if defect == "random":
        defect = DEFECTS[rng.integers(len(DEFECTS))]
    mask = np.zeros((size, size), bool)
    if defect is not None:
        mask = defect_mask(rng, defect, size)
        dark = rng.random() < 0.5
        shade = rng.uniform(0.0, 0.15, 3) if dark else rng.uniform(0.85, 1.0, 3)
        if defect == "spot":
            shade = rng.uniform(0, 1, 3)
        image = np.where(mask[..., None], 0.25 * image + 0.75 * shade, image)
    return Sample((np.clip(image, 0, 1) * 255).astype(np.uint8), mask, kind, defect)


def natural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 colour noise with a natural 1/f spectrum (photo-like detail at every scale)."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = np.sqrt(fx ** 2 + fy ** 2)
    falloff[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=falloff.shape) + 1j * rng.normal(size=falloff.shape)) / falloff
        plane = np.fft.irfft2(spectrum, s=(height, width))
        channels.append((plane - plane.mean()) / (plane.std() + 1e-12))
    return np.clip(128.0 + 40.0 * np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
