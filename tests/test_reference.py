"""Reference banks: nearest-neighbour distances, coresets, storage, groups and scoring with a bank."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from headclip.reference import POOLED, BankBuilder, ReferenceScorer, nearest_distances, read_bank, write_bank
from headclip.reference.bank import BankError
from headclip.reference.build import BankSettings
from headclip.reference.coreset import greedy_coreset, random_subset

from .scoring_helpers import write_images


def _cdist_loop(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The nearest distance of each query, one query at a time."""
    flat = queries.reshape(-1, queries.shape[-1])
    out = torch.stack([torch.cdist(q[None].double(), bank.double()).min() for q in flat])
    return out.reshape(queries.shape[:-1]).float()


@pytest.mark.parametrize("chunk", [None, 1, 7, 100, 10_000], ids=["exact", "chunk1", "chunk7", "chunk100", "big"])
def test_nearest_distances_equal_a_cdist_loop(chunk):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 11, 24, generator=generator)
    bank = torch.randn(250, 24, generator=generator)
    bank[-1] = queries[1, 4]  # an exact match in the last row: distance 0, not NaN from rounding below zero
    bank[0] = queries[2, 0]
    got = nearest_distances(queries, bank, chunk)
    assert got.shape == (3, 11)
    torch.testing.assert_close(got, _cdist_loop(queries, bank), rtol=1e-4, atol=5e-3)
    assert float(got[1, 4]) < 5e-3 and float(got[2, 0]) < 5e-3


def test_nearest_distances_refuse_mismatched_widths():
    with pytest.raises(ValueError, match="width"):
        nearest_distances(torch.zeros(2, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="non-empty"):
        nearest_distances(torch.zeros(2, 4), torch.zeros(0, 4))


def _plain_k_centre(x: torch.Tensor, budget: int, first: int) -> list[int]:
    chosen = [first]
    for _ in range(budget - 1):
        far = max(range(len(x)), key=lambda i: min(float((x[i] - x[c]).square().sum()) for c in chosen))
        chosen.append(far)
    return sorted(chosen)


def test_greedy_coreset_equals_a_plain_k_centre_loop_and_covers_better_than_random():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=generator)
    got = greedy_coreset(x, 9, projection=None, seed=3)
    first = int(torch.randint(60, (1,), generator=torch.Generator().manual_seed(3)))
    assert got.tolist() == _plain_k_centre(x, 9, first)
    cover = lambda idx: float(nearest_distances(x, x[idx]).max())  # noqa: E731
    assert cover(got) < cover(random_subset(x, 9, seed=3))
    assert greedy_coreset(x, 100).tolist() == list(range(60))


def _features(n: int, offset: float, seed: int, grid: int = 4, layers: int = 2, dim: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, grid * grid, layers, dim, generator=generator) * 0.1 + offset
    return torch.nn.functional.normalize(x, dim=-1)


def _bank(budget: int = 1000, groups=("a", "b")):
    builder = BankBuilder(map_layers=(3, 4), settings=BankSettings(budget=budget))
    for k, group in enumerate(groups):
        builder.add(_features(3, offset=float(k * 2 - 1), seed=k), [group] * 3)
    return builder.build("c" * 64, "tiny", 64, 8, group_column="line", command="python -m jobs.reference")


def test_bank_round_trips_and_is_refused_for_another_checkpoint_or_size(tmp_path):
    bank = _bank()
    path = str(tmp_path / "bank.safetensors")
    write_bank(bank, path)
    back = read_bank(path)
    assert back.groups == ["a", "b"] and back.layers == (3, 4) and back.group_column == "line"
    assert back.counts["a"] == {"images": 3, "patches": 48, "kept": 48}
    for group in bank.groups:
        assert torch.equal(back.features[group], bank.features[group])
    assert back.scales == pytest.approx(bank.scales) and POOLED in back.scales
    back.check("c" * 64, 64)
    with pytest.raises(BankError, match="built with checkpoint cccccccccccc, not dddddddddddd"):
        back.check("d" * 64, 64)
    with pytest.raises(BankError, match="built for a model scoring at 64px"):
        back.check("c" * 64, 96)
    (tmp_path / "junk").write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")
    with pytest.raises(BankError, match="not a HeadCLIP reference bank"):
        read_bank(str(tmp_path / "junk"))
    with pytest.raises(BankError, match="cannot read reference bank"):
        read_bank(str(tmp_path / "missing"))


def test_budget_keeps_that_many_patches_per_group():
    bank = _bank(budget=10)
    assert {g: t.shape for g, t in bank.features.items()} == {"a": (10, 16), "b": (10, 16)}


class _Model:
    """What ReferenceScorer reads of a model."""

    def __init__(self, grid=4, size=16, layers=(3, 4)):
        self.vision = type("V", (), {"map_layers": layers, "grid": grid})()
        self.image_size, self.image_mean = size, torch.zeros(1)
        self.config = type("C", (), {"sigma": 1.0})()


class _Out:
    def __init__(self, features, seed=0):
        b = features.shape[0]
        generator = torch.Generator().manual_seed(seed)
        self.patch_features = features
        self.joint_score = torch.rand(b, generator=generator)
        self.global_score = torch.rand(b, generator=generator)
        self.anomaly_map = torch.rand(b, 16, 16, generator=generator)


def test_groups_use_their_own_banks_and_unknown_groups_the_pooled_one():
    bank = _bank()
    scorer = ReferenceScorer(bank, _Model())
    features = torch.cat([_features(1, -1.0, 7), _features(1, 1.0, 8), _features(1, 1.0, 9)])
    patch, used = scorer.patch_scores(features, ["a", "b", "elsewhere"])
    assert used == ["a", "b", POOLED]
    flat = features.flatten(2)
    for i, (group, bank_features) in enumerate([("a", bank.features["a"]), ("b", bank.features["b"]),
                                                 (POOLED, torch.cat([bank.features["a"], bank.features["b"]]))]):
        d = _cdist_loop(flat[i], bank_features)
        torch.testing.assert_close(patch[i], d / (d + bank.scales[group]), rtol=1e-4, atol=1e-4)
    # an image of texture b compared with bank a is far from it: its own bank matters
    wrong, _ = scorer.patch_scores(features[1:2], ["a"])
    assert float(wrong.mean()) > float(patch[1].mean()) + 0.2


def test_combined_map_and_scores_stay_in_the_unit_interval():
    bank = _bank()
    scorer = ReferenceScorer(bank, _Model())
    features = torch.cat([_features(2, -1.0, 7), _features(2, 1.0, 8)])
    features[1, :3] = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)  # an odd patch: far off
    out = _Out(features)
    ref = scorer.apply(out, ["a", "a", "b", None])
    assert ref.anomaly_map.shape == (4, 16, 16)
    for tensor in (ref.anomaly_map, ref.joint_score, ref.reference_score):
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    torch.testing.assert_close(ref.joint_score, 0.5 * out.joint_score + 0.5 * ref.reference_score)
    assert float(ref.reference_score[1]) > float(ref.reference_score[0])
    assert ref.groups == ["a", "a", "b", POOLED]


def test_scoring_with_a_bank_keeps_both_scores_and_masks_decode(tiny_checkpoint, tmp_path):
    from pycocotools import mask as coco

    from headclip.model.checkpoint import read_checkpoint
    from headclip.reference.collect import collect_features
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    paths = write_images(tmp_path / "img", 8)
    records = [{"image_id": p.name, "image_uri": str(p), "line": "L1" if i < 4 else "L2"} for i, p in enumerate(paths)]
    records.append({"image_id": "broken", "image_uri": str(tmp_path / "missing.png"), "line": "L1"})
    options = ScoringOptions(batch_size=3, io_threads=2, mask_threshold=0.3)
    with ImageScorer("r", tiny_checkpoint, options) as scorer:
        builder = BankBuilder(scorer.model.vision.map_layers, BankSettings(budget=40))
        added, errors = collect_features(scorer, records[:3] + records[4:6] + records[-1:], builder, "line")
        assert added == 5 and [e[0] for e in errors] == ["broken"]
        checkpoint_id = read_checkpoint(tiny_checkpoint).checkpoint_id
        bank = builder.build(checkpoint_id, "tiny", scorer.image_size, scorer.model.clip.visual.output_dim, "line")
        plain = {r["image_id"]: r for r in scorer.score_table(pa.Table.from_pylist(records)).to_pylist()}
    write_bank(bank, str(tmp_path / "bank.safetensors"))
    records.append({"image_id": "other-line", "image_uri": str(paths[0]), "line": "L9"})
    extras = [pa.field("line", pa.string())]
    with_bank = ScoringOptions(batch_size=3, io_threads=2, mask_threshold=0.3, reference=str(tmp_path / "bank.safetensors"))
    with ImageScorer("r", tiny_checkpoint, with_bank, extra_fields=extras) as scorer:
        table = scorer.score_table(pa.Table.from_pylist(records))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert rows["broken"]["status"] == "error" and rows["broken"]["reference_score"] is None
    assert plain[paths[0].name]["zero_shot_score"] is None  # without a bank the columns are null
    for path, record in zip(paths, records):
        row = rows[path.name]
        assert row["reference_group"] == record["line"]
        assert row["zero_shot_score"] == pytest.approx(plain[path.name]["score"], abs=1e-6)
        assert 0.0 <= row["reference_score"] <= 1.0
        assert row["score"] == pytest.approx(0.5 * row["zero_shot_score"] + 0.5 * row["reference_score"], abs=1e-5)
        assert 0.0 <= row["pixel_max"] <= 1.0
        mask = coco.decode({"size": row["mask_rle"]["size"], "counts": row["mask_rle"]["counts"].encode()})
        assert mask.shape == (row["height"], row["width"]) and int(mask.sum()) == row["mask_area"]
    assert rows["other-line"]["reference_group"] == POOLED


def test_scale_is_the_quantile_of_leave_one_image_out_distances():
    builder = BankBuilder(map_layers=(3, 4), settings=BankSettings(budget=1000, scale_quantile=0.9))
    images = _features(4, 0.5, seed=3)
    builder.add(images, ["a"] * 4)
    bank = builder.build("c" * 64, "tiny", 64, 8)
    flat = images.flatten(2)
    distances = torch.cat([_cdist_loop(flat[i], torch.cat([flat[j] for j in range(4) if j != i])) for i in range(4)])
    assert bank.scales["a"] == pytest.approx(float(torch.quantile(distances, 0.9)), rel=1e-3)
