"""The scoring actor's host pipeline: reduced-scale JPEG decoding, device resizing and JPEG decoding."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps

from headclip.data.decode import decode_image, decode_scaled
from headclip.data.synthetic import make_sample, natural_image
from headclip.data.transforms import resize_square
from headclip.scoring.device_batch import orient
from headclip.scoring.scorer import ScoringOptions, ImageScorer

# Largest change of a joint score between reduced-scale and full JPEG decoding on these images
# (docs/speed.md states the figure measured by jobs.benchmark on the benchmark images).
REDUCED_DECODE_TOLERANCE = 0.02
# Largest change of a joint score between nvjpeg and libjpeg-turbo decoding (measured on an H100).
DEVICE_DECODE_TOLERANCE = 0.03


def _jpeg(array: np.ndarray, orientation: int = 1, quality: int = 92) -> bytes:
    image = Image.fromarray(array)
    exif = image.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


def test_reduced_decode_only_for_large_jpegs():
    """Reduced DCT scale only for a JPEG at least twice the input on both sides; the size reported is
    always the full upright image's. A bug that drafted PNGs, small JPEGs, or reported the reduced size
    (masks stored at the wrong size) fails here."""
    big = _jpeg(natural_image(300, 520, seed=1))
    image, size = decode_scaled(big, reduce_to=64)
    assert size == (520, 300)
    assert image.size == (130, 75)  # 1/4: the smallest scale keeping both sides >= 64
    assert decode_scaled(big)[0].size == (520, 300)  # not allowed: full size
    assert decode_scaled(big, reduce_to=151)[0].size == (520, 300)  # 300 < 2 * 151
    png = io.BytesIO()
    Image.fromarray(natural_image(300, 520, seed=1)).save(png, format="PNG")
    assert decode_scaled(png.getvalue(), reduce_to=64)[0].size == (520, 300)
    rotated, size = decode_scaled(_jpeg(natural_image(300, 520, seed=2), orientation=6), reduce_to=64)
    assert size == (300, 520) and rotated.size == (75, 130)  # upright: portrait


def test_device_resize_is_pil_bicubic_within_one_level():
    """The input resize (torch, antialiased bicubic) against PIL's BICUBIC resize of the same image."""
    array = natural_image(333, 517, seed=3)
    ours = resize_square(Image.fromarray(array), 64).astype(int)
    pil = np.asarray(Image.fromarray(array).resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(ours - pil).max() <= 1
    assert (ours != pil).mean() < 0.02


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_the_device_matches_pil_exif_transpose(orientation):
    array = natural_image(12, 20, seed=orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_jpeg(array, orientation, 100)))))
    decoded = np.asarray(Image.open(io.BytesIO(_jpeg(array, orientation, 100))).convert("RGB"))
    got = orient(torch.from_numpy(decoded.copy()).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def _images(tmp_path) -> pa.Table:
    blobs = {
        "natural.jpg": _jpeg(natural_image(260, 300, seed=4)),
        "texture.jpg": _jpeg(make_sample(5, size=320, defect="random").image),
        "rotated.jpg": _jpeg(natural_image(140, 400, seed=6), orientation=8),
        "small.jpg": _jpeg(natural_image(90, 70, seed=7)),
        "truncated.jpg": _jpeg(natural_image(200, 200, seed=8))[:3000],
        "garbage.jpg": b"\xff\xd8\xff" + b"\x13" * 500 + b"\xff\xd9",
    }
    png = io.BytesIO()
    Image.fromarray(natural_image(150, 150, seed=9)).save(png, format="PNG")
    blobs["plain.png"] = png.getvalue()
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
    names = sorted(blobs)
    return pa.table({"image_id": names, "image_uri": [str(tmp_path / n) for n in names]})


def _score(checkpoint, images, **options):
    scoring = ScoringOptions(batch_size=3, io_threads=2, **options)
    with ImageScorer("test", checkpoint, scoring, torch_threads=2) as scorer:
        return scorer.score_table(images).to_pandas().set_index("image_id")


def test_reduced_decode_moves_scores_within_tolerance(tmp_path, tiny_checkpoint):
    images = _images(tmp_path)
    full = _score(tiny_checkpoint, images, reduced_decode=False)
    reduced = _score(tiny_checkpoint, images, reduced_decode=True)
    assert list(full["status"]) == list(reduced["status"])
    ok = full["status"] == "ok"
    assert ok.sum() == 5
    assert np.abs(full.loc[ok, "score"] - reduced.loc[ok, "score"]).max() <= REDUCED_DECODE_TOLERANCE
    # the rows describe the full image either way
    assert list(full.loc[ok, "width"]) == list(reduced.loc[ok, "width"])
    assert reduced.loc["rotated.jpg", ["width", "height"]].tolist() == [140, 400]


def test_device_decoding_keeps_rows_and_errors(tmp_path, tiny_checkpoint):
    """JPEGs decoded by torchvision on the model's device (the CPU here; nvjpeg on a GPU): the same
    rows as the host decoder, EXIF upright, and a truncated or broken JPEG still an error row."""
    images = _images(tmp_path)
    host = _score(tiny_checkpoint, images, reduced_decode=False)
    device = _score(tiny_checkpoint, images, reduced_decode=False, device_decode=True)
    assert list(host["status"]) == list(device["status"])
    assert device.loc["truncated.jpg", "status"] == "error" and "truncated" in device.loc["truncated.jpg", "error"]
    assert device.loc["garbage.jpg", "status"] == "error"
    ok = host["status"] == "ok"
    assert list(host.loc[ok, "width"]) == list(device.loc[ok, "width"])
    # On the CPU torchvision and PIL both decode with libjpeg-turbo: the same pixels. On a GPU,
    # nvjpeg's IDCT and chroma upsampling differ by a grey level or two (docs/speed.md gives the figure).
    tolerance = 1e-3 if not torch.cuda.is_available() else DEVICE_DECODE_TOLERANCE
    assert np.abs(host.loc[ok, "score"] - device.loc[ok, "score"]).max() < tolerance
    # the reference: the rotated image decoded upright by PIL gives the same score
    upright = decode_image((tmp_path / "rotated.jpg").read_bytes())
    assert upright.size == (140, 400)
