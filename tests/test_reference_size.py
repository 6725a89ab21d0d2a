"""A reference bank at its own input size: a second forward at that side, its images resized from the same
decoded pixels, its map upsampled to the model's side; checked against a model built at that size."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import headclip
from headclip.data.loading import LoadedImage
from headclip.data.transforms import resize_tensor
from headclip.reference import BankBuilder, ReferenceScorer, read_bank, write_bank
from headclip.reference.bank import BankError
from headclip.reference.build import BankSettings
from headclip.reference.combine import upsample_operator
from headclip.scoring.device_batch import DeviceFeeder
from headclip.scoring.scorer import ImageScorer, ScoringOptions
from headclip.scoring.stages import columns_to_loaded, decode_records, loaded_to_columns

from .scoring_helpers import write_images

SIDE = 96  # the tiny model scores at 64 px (16 px patches): the bank's patches come from a 6 x 6 grid


def _images(seed: int, side: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_patch_features_at_the_model_side_are_the_scoring_forwards(tiny_checkpoint):
    model = headclip.create_model(checkpoint=tiny_checkpoint).eval()
    images = _images(0, 64)
    expected = model.score(images, patch_features=True).patch_features
    torch.testing.assert_close(model.patch_features(images), expected, rtol=0, atol=1e-6)


def test_patch_features_at_another_side_are_those_of_a_model_built_at_that_side(tiny_checkpoint):
    model = headclip.create_model(checkpoint=tiny_checkpoint).eval()
    built_there = headclip.create_model(checkpoint=tiny_checkpoint, image_size=SIDE).eval()
    images = _images(1, SIDE)
    got = model.patch_features(images)
    assert got.shape == (2, (SIDE // 16) ** 2, len(model.vision.map_layers), model.clip.visual.output_dim)
    torch.testing.assert_close(got, built_there.score(images, patch_features=True).patch_features, rtol=0,
                               atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.patch_features(_images(2, 72))
    with pytest.raises(ValueError, match="64px inputs"):  # the zero-shot forward still takes only its own side
        model.score(images)


def _bank_at(checkpoint: str, uris, side: int, groups=None):
    """A bank built in this process from ``uris`` read at ``side``."""
    with ImageScorer("ref", checkpoint, ScoringOptions(batch_size=8)) as scorer:
        scorer.read_at(side)
        images = list(scorer.loader.iterate([{"image_uri": str(u), "image_id": str(u)} for u in uris]))
        pixels, errors = scorer.feeder.batch(images)
        assert errors == [None] * len(uris) and pixels.shape[-1] == side
        builder = BankBuilder(scorer.model.vision.map_layers, BankSettings(budget=1000))
        builder.add(scorer.model.patch_features(pixels), groups or [None] * len(uris))
        model = scorer.model
        return builder.build(model.checkpoint_id, model.config.backbone, model.image_size,
                             model.clip.visual.output_dim, reference_size=side)


def test_a_bank_records_its_reference_size_and_old_banks_read_as_the_model_side(tiny_checkpoint, tmp_path):
    paths = write_images(tmp_path / "good", 3)
    bank = _bank_at(tiny_checkpoint, paths, SIDE)
    assert bank.input_size == SIDE and bank.image_size == 64
    write_bank(bank, str(tmp_path / "bank.safetensors"))
    back = read_bank(str(tmp_path / "bank.safetensors"))
    assert back.input_size == SIDE and back.features["*"].shape[0] == 3 * (SIDE // 16) ** 2

    data = (tmp_path / "bank.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])

    def with_meta(change) -> bytes:
        meta = json.loads(header["__metadata__"]["headclip.reference"])
        change(meta)
        edited = {**header, "__metadata__": {"headclip.reference": json.dumps(meta)}}
        text = json.dumps(edited).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data[8 + length:]

    (tmp_path / "old.safetensors").write_bytes(with_meta(lambda m: m.pop("reference_size")))
    assert read_bank(str(tmp_path / "old.safetensors")).input_size == 64  # written before the setting
    for bad in (0, -96, "96", 95.5, True):
        (tmp_path / "bad.safetensors").write_bytes(with_meta(lambda m: m.update(reference_size=bad)))
        with pytest.raises(BankError, match="reference_size"):
            read_bank(str(tmp_path / "bad.safetensors"))


def test_a_reference_size_off_the_patch_grid_is_refused(tiny_checkpoint, tmp_path):
    bank = _bank_at(tiny_checkpoint, write_images(tmp_path / "good", 1), SIDE)
    bank.reference_size = 88
    model = headclip.create_model(checkpoint=tiny_checkpoint)
    with pytest.raises(BankError, match="88px is not a multiple of the model's patch size 16"):
        ReferenceScorer(bank, model)


def test_scoring_with_a_bank_at_its_own_side_is_its_formula(tiny_checkpoint, tmp_path):
    """Each image's reference values come from its pixels resized to the bank's side and run at that side;
    the map is upsampled from that grid to the model's side; the zero-shot part is the bank-free score."""
    good = write_images(tmp_path / "good", 3, start=20)
    bank_path = str(tmp_path / "bank.safetensors")
    write_bank(_bank_at(tiny_checkpoint, good, SIDE), bank_path)
    scored = write_images(tmp_path / "scored", 4, start=40)
    records = [{"image_uri": str(p), "image_id": p.name} for p in scored]
    options = ScoringOptions(batch_size=3)
    with ImageScorer("plain", tiny_checkpoint, options) as plain:
        zero_shot = plain.score_rows(records)
    with ImageScorer("bank", tiny_checkpoint, ScoringOptions(batch_size=3, reference=bank_path)) as scorer:
        assert scorer.reference.own_size == SIDE
        rows = scorer.score_rows(records)
    # the reference: a model built at the bank's side, the images resized by PIL-equivalent host resizing
    there = headclip.create_model(checkpoint=tiny_checkpoint, image_size=SIDE).eval()
    model = headclip.create_model(checkpoint=tiny_checkpoint).eval()
    bank = read_bank(bank_path)
    reference = ReferenceScorer(bank, model)
    from PIL import Image

    from headclip.data.transforms import resize_square

    pixels = torch.stack([torch.from_numpy(resize_square(Image.open(p), SIDE)).permute(2, 0, 1) for p in scored])
    features = there.score(pixels, patch_features=True).patch_features
    patch, used = reference.patch_scores(features, [None] * 4)
    assert used == ["*"] * 4
    for j, row in enumerate(rows):
        assert row["status"] == "ok"
        assert row["zero_shot_score"] == pytest.approx(zero_shot[j]["score"], abs=1e-6)
        assert row["reference_score"] == pytest.approx(float(patch[j].max()), abs=1e-5)
        assert row["score"] == pytest.approx(0.5 * row["zero_shot_score"] + 0.5 * row["reference_score"], abs=1e-6)
    up = upsample_operator(SIDE // 16, 64, model.config.sigma)
    assert up.shape == (64, SIDE // 16)


def test_the_reference_pixels_are_resized_from_the_decoded_image_on_host_and_on_device(tmp_path):
    """The decode stage's copy at the bank's side (host) equals the device feeder's resize of the decoded
    image: the two paths a bank is built and scored on give the same pixels (up to the resize's rounding)."""
    paths = write_images(tmp_path / "img", 2, start=60)
    records = [{"image_uri": str(p), "image_id": p.name} for p in paths]
    options = ScoringOptions(reference_size=SIDE, reduced_decode=False)
    host = decode_records(records, 64, options)
    columns = loaded_to_columns(host, 64, SIDE)
    assert columns["reference_pixels"].shape == (2, SIDE, SIDE, 3)
    travelled = columns_to_loaded(columns)  # as the Ray decode stage sends them
    feeder = DeviceFeeder(torch.device("cpu"), 64, options.max_pixels, SIDE)
    pixels, reference, errors = feeder.batches(travelled)
    assert errors == [None, None] and pixels.shape == (2, 3, 64, 64) and reference.shape == (2, 3, SIDE, SIDE)
    from PIL import Image

    originals = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    undecoded = [LoadedImage(pixels=a, width=a.shape[1], height=a.shape[0]) for a in originals]
    pixels_dev, reference_dev, _ = feeder.batches(undecoded)  # decoded size: resized here, to both sides
    for j, array in enumerate(originals):
        expected = resize_tensor(torch.from_numpy(array.copy()).permute(2, 0, 1), SIDE)
        assert torch.equal(reference[j], expected) and torch.equal(reference_dev[j], expected)
        assert torch.equal(pixels[j], pixels_dev[j])
    # an image resized to the model's side without its copy (decoded for no bank) is refused, not stretched
    without = [LoadedImage(pixels=i.pixels, width=i.width, height=i.height) for i in travelled]
    with pytest.raises(ValueError, match=f"without its {SIDE}px copy"):
        feeder.batches(without)
    assert "reference_pixels" not in loaded_to_columns(host, 64)  # no bank, no second copy
