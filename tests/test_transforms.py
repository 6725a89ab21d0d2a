"""Preprocessing: every PIL mode becomes 8-bit RGB; the whole image is resized."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import headclip
from headclip.data.transforms import resize_square, to_rgb


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_palette_rgba_gray_cmyk():
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    assert to_rgb(palette).getpixel((1, 1)) == (200, 10, 30)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)


def test_whole_image_is_resized_not_cropped():
    # a wide image with a red right edge: a centre crop would lose it
    array = np.zeros((40, 160, 3), dtype=np.uint8)
    array[:, -20:] = (255, 0, 0)
    out = resize_square(Image.fromarray(array), 32)
    assert out.shape == (32, 32, 3)
    assert out[:, -2:, 0].min() > 200


def test_preprocess_feeds_the_model(tiny_model):
    images = [Image.new("RGB", (50, 30), (i * 40, 0, 0)) for i in range(3)]
    batch = headclip.preprocess(images, tiny_model.image_size)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.uint8
    out = tiny_model.score(batch)
    assert out.anomaly_map.shape == (3, 64, 64)
    resized = headclip.resize_maps(out.anomaly_map[0], 30, 50)
    assert resized.shape == (30, 50)
