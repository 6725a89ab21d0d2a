"""Gaussian smoothing of anomaly maps on the model's device.

A separable convolution (one 1-D pass per axis) with the border handled as
``scipy.ndimage.gaussian_filter(mode="reflect", truncate=4.0)`` does: the
image is mirrored about its edge, the edge pixel repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRUNCATE = 4.0


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE, *, device=None, dtype=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)``; shape (2r+1,)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    kernel = kernel / kernel.sum()
    return kernel.to(dtype or torch.float32)


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by ``radius`` with half-sample symmetry."""
    idx = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx < n, idx, period - 1 - idx)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = TRUNCATE) -> torch.Tensor:
    """Smooth a batch of 2-D maps.

    Args:
        maps: (B, H, W) float tensor.
        sigma: standard deviation in pixels; 0 returns the input unchanged.
    Returns:
        (B, H, W) tensor of the same dtype and device.
    """
    if sigma <= 0:
        return maps
    if maps.dim() != 3:
        raise ValueError(f"gaussian_blur expects (B, H, W), got shape {tuple(maps.shape)}")
    batch, height, width = maps.shape
    compute_dtype = torch.float32 if maps.dtype in (torch.float16, torch.bfloat16) else maps.dtype
    kernel = gaussian_kernel1d(sigma, truncate, device=maps.device, dtype=compute_dtype)
    radius = (kernel.numel() - 1) // 2
    x = maps.to(compute_dtype).unsqueeze(1)  # (B, 1, H, W)
    x = x.index_select(3, _reflect_index(width, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _reflect_index(height, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1).to(maps.dtype)
