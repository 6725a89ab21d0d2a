"""The inverted-file index of large reference banks: an upper bound of the exact distances, equal with
every list probed, its recall on clustered data, the exact fallback, storage and its check."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from headclip.reference import (POOLED, BankBuilder, GroupSearch, IndexSettings, ListIndex, ReferenceScorer,
                                build_index, read_bank, write_bank)
from headclip.reference.bank import BankError
from headclip.reference.build import BankSettings

from .test_reference import _Model

# share of queries whose true nearest patch the default nprobe (4 of 141 lists) finds in the clustered data of
# test_recall (0.997 measured; 0.968 with nprobe 1); the demo textures' figures: python -m jobs.benchmark_reference
RECALL = 0.99
SPREAD = 0.8  # noise norm around the unit centres: the clusters overlap


def _clustered(rows: int, clusters: int = 40, width: int = 16, seed: int = 0, spread: float = 0.15,
               centres_seed: int = 0) -> torch.Tensor:
    """Rows around ``clusters`` random unit centres (unit-norm), as patch features cluster by texture and part."""
    generator = torch.Generator().manual_seed(centres_seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, width, generator=generator), dim=-1)
    generator = torch.Generator().manual_seed(1000 + seed)
    pick = torch.randint(clusters, (rows,), generator=generator)
    x = centres[pick] + spread * torch.randn(rows, width, generator=generator) / width ** 0.5
    return torch.nn.functional.normalize(x, dim=-1)


def _cdist_loop(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The exact nearest distance of each query (..., D) by torch.cdist in float64, 256 queries at a time."""
    flat = queries.reshape(-1, queries.shape[-1]).double()
    out = torch.cat([torch.cdist(part, bank.double()).amin(1) for part in flat.split(256)])
    return out.reshape(queries.shape[:-1]).float()


def _search(bank: torch.Tensor, **settings) -> GroupSearch:
    s = IndexSettings(**settings)
    order, index = build_index(bank, s)
    return GroupSearch(bank[order].contiguous(), index, s.nprobe)


def test_lists_partition_the_bank_and_hold_the_rows_nearest_their_centroid():
    bank = _clustered(3000)
    order, index = build_index(bank, IndexSettings(nlist=30))
    assert sorted(order.tolist()) == list(range(3000))
    assert index.offsets[0] == 0 and index.offsets[-1] == 3000 and bool((index.offsets.diff() > 0).all())
    listed = bank[order]
    owner = torch.searchsorted(index.offsets, torch.arange(3000), right=True) - 1
    nearest = torch.cdist(listed.double(), index.centroids.double()).argmin(1)
    assert float((owner == nearest).float().mean()) > 0.999  # ties at float32 rounding aside


@pytest.mark.parametrize("nprobe", [1, 3, 8])
def test_indexed_distances_never_fall_below_the_exact_ones(nprobe):
    bank, queries = _clustered(4000), _clustered(500, seed=1)
    exact = _cdist_loop(queries, bank)
    got = _search(bank, nlist=50, nprobe=nprobe)(queries)
    assert got.shape == (500,)
    assert _search(bank, nlist=50, nprobe=nprobe)(queries[:0]).shape == (0,)
    assert bool((got >= exact - 1e-4).all())
    # each indexed distance is a distance to some bank row: at least one row lies that far or nearer
    assert bool((torch.cdist(queries.double(), bank.double()).min(1).values <= got.double() + 1e-4).all())


def test_probing_every_list_is_the_exact_search():
    bank, queries = _clustered(2000), _clustered(300, seed=2).reshape(3, 100, 16)
    search = _search(bank, nlist=25, nprobe=25)
    assert search.exact
    torch.testing.assert_close(search(queries), _cdist_loop(queries, bank), rtol=1e-4, atol=5e-3)
    # the list-by-list scan itself, every list given: exact too
    scanned = search.scan(queries.reshape(-1, 16), torch.arange(25).repeat(300, 1))
    torch.testing.assert_close(scanned.reshape(3, 100), _cdist_loop(queries, bank), rtol=1e-4, atol=5e-3)


def test_recall_of_the_true_nearest_patch_on_clustered_data():
    bank = _clustered(20_000, clusters=200, width=32, spread=SPREAD)
    queries = _clustered(1000, clusters=200, width=32, spread=SPREAD, seed=1)  # same centres, other points
    exact = _cdist_loop(queries, bank)
    got = _search(bank)(queries)  # the default nprobe and list count
    assert float((got <= exact + 1e-4 * (1 + exact)).float().mean()) >= RECALL
    assert float(_search(bank, nprobe=1)(queries).sub(exact).mean()) > float(got.sub(exact).mean())


def _bank(rows_per_group: int, exact_below: int, nprobe: int = 8):
    builder = BankBuilder(map_layers=(3, 4), settings=BankSettings(
        budget=100_000, coreset="random", index=IndexSettings(exact_below=exact_below, nprobe=nprobe)))
    for k, group in enumerate(("a", "b")):
        x = _clustered(rows_per_group, width=16, seed=k).reshape(-1, 4, 2, 8)
        builder.add(torch.nn.functional.normalize(x, dim=-1), [group] * x.shape[0])
    return builder.build("c" * 64, "tiny", 64, 8, group_column="line")


def test_small_groups_and_banks_without_an_index_are_searched_exactly(tmp_path):
    bank = _bank(400, exact_below=1000)
    assert bank.indexes == {} and bank.settings["index"]["exact_below"] == 1000
    scorer = ReferenceScorer(bank, _Model())
    assert all(search.exact for search in scorer.searches.values())
    big = _bank(2000, exact_below=1000, nprobe=1)
    assert set(big.indexes) == {"a", "b"} and big.counts["a"]["lists"] == big.indexes["a"].nlist
    unindexed = dataclasses.replace(big, indexes={})  # as a bank written before the index was stored
    write_bank(unindexed, str(tmp_path / "old.safetensors"))
    old = read_bank(str(tmp_path / "old.safetensors"))
    assert old.indexes == {}
    queries = _clustered(64, width=16, seed=9).reshape(4, 16, 2, 8)
    patch, used = ReferenceScorer(old, _Model()).patch_scores(queries, ["a", "b", "x", None])
    assert used == ["a", "b", POOLED, POOLED]
    pooled = torch.cat([old.features["a"], old.features["b"]])
    for i, group in enumerate(("a", "b", POOLED, POOLED)):
        d = _cdist_loop(queries[i].flatten(1), pooled if group == POOLED else old.features[group])
        torch.testing.assert_close(patch[i], d / (d + old.scales[group]), rtol=1e-4, atol=1e-4)
    indexed, _ = ReferenceScorer(big, _Model()).patch_scores(queries, ["a", "b", "x", None])
    assert bool((indexed >= patch - 1e-5).all())  # an upper bound, group by group and pooled


def test_an_index_is_written_read_back_and_checked(tmp_path):
    bank = _bank(2000, exact_below=1000)
    path = str(tmp_path / "bank.safetensors")
    write_bank(bank, path)
    back = read_bank(path)
    assert set(back.indexes) == {"a", "b"}
    assert back.settings["index"] == IndexSettings(exact_below=1000, nprobe=8).to_dict()
    for group in ("a", "b"):
        assert torch.equal(back.features[group], bank.features[group])
        assert torch.equal(back.indexes[group].centroids, bank.indexes[group].centroids)
        assert torch.equal(back.indexes[group].offsets, bank.indexes[group].offsets)
    queries = _clustered(50, width=16, seed=4).reshape(50, 2, 8).reshape(1, 50, 2, 8)
    q = queries.flatten(2)
    torch.testing.assert_close(ReferenceScorer(back, _Model()).distances(q, "a"),
                               ReferenceScorer(bank, _Model()).distances(q, "a"))

    def broken(**change) -> str:
        mutated = dataclasses.replace(bank, **change)
        target = str(tmp_path / "broken.safetensors")
        write_bank(mutated, target)
        with pytest.raises(BankError) as info:
            read_bank(target)
        return str(info.value)

    a = bank.features["a"]
    shuffled = a[torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(0))]
    assert "not in the list of their nearest centroid" in broken(features={**bank.features, "a": shuffled})
    swapped = dict(bank.indexes, a=ListIndex(bank.indexes["a"].centroids.flip(0), bank.indexes["a"].offsets))
    assert "not in the list of their nearest centroid" in broken(indexes=swapped)
    offsets = bank.indexes["a"].offsets.clone()
    offsets[-1] += 1
    assert "do not rise from 0" in broken(indexes=dict(bank.indexes, a=ListIndex(bank.indexes["a"].centroids, offsets)))
    narrow = ListIndex(bank.indexes["a"].centroids[:, :8], bank.indexes["a"].offsets)
    assert "centroids of shape" in broken(indexes=dict(bank.indexes, a=narrow))


@pytest.mark.parametrize("sigma", [0.0, 1.0, 4.0])
def test_reference_map_is_the_bilinear_upsampling_then_the_blur_of_the_patch_values(sigma):
    import torch.nn.functional as F

    from headclip.model.smoothing import gaussian_blur

    from .test_reference import _bank as small_bank
    from .test_reference import _features, _Out

    model = _Model(grid=4, size=16)
    model.config.sigma = sigma
    scorer = ReferenceScorer(small_bank(), model)
    out = _Out(torch.cat([_features(2, -1.0, 7), _features(2, 1.0, 8)]))
    ref = scorer.apply(out, ["a", "a", "b", None])
    patch, _ = scorer.patch_scores(out.patch_features, ["a", "a", "b", None])
    up = F.interpolate(patch.reshape(-1, 1, 4, 4), size=(16, 16), mode="bilinear", align_corners=False).squeeze(1)
    expected = 0.5 * out.anomaly_map + 0.5 * gaussian_blur(up, sigma).clamp(0.0, 1.0)
    torch.testing.assert_close(ref.anomaly_map, expected.clamp(0.0, 1.0), rtol=0, atol=1e-5)
