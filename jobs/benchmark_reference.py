"""Known-good references on the demo textures: accuracy against zero-shot, the settings, and the cost.

Needs make demo's data (python -m jobs.demo writes it; --data names the folder): the
240-image archive (manifest.csv, with defect masks) and the known-good images
(known-good.csv), which the archive does not contain. Every image runs through the model
once; banks are built per texture from the first K known-good images of that texture and
applied to the stored outputs, so the settings are compared on the same forward passes.

Prints, per texture and as the mean: image AUROC (sklearn) of the zero-shot joint score,
the reference score alone and their combination, and pixel AUROC of the zero-shot and the
combined map; the same for known-good counts 1, 4, 16 and 64 (known-good images beyond the
demo's are generated as the demo generates them, same seeds); the aggregation (max vs top
1 %), the coreset (greedy vs random at several budgets) and the layers. Then the reference
size: the same with the bank's images at 1x, 1.5x and 2x the model's side (a second forward),
with the time of scoring with each bank against none, in one run. Then the index
(headclip.reference.index): recall of the true nearest patch, the distances' excess and the
AUROC with exact vs indexed search on the demo's banks (index forced on, nprobe swept) and
on one large bank of all other images' patches. Then the cost: the time to score the
archive's images (read, decode, model, encode) without a bank and with a 100k-patch bank,
exact and indexed, in one run, and the memory and nearest-neighbour time per image of 10k,
100k and 1M-patch banks at ViT-B-16 and ViT-L-14 widths, exact and indexed.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, UsageError, positive_int, run
from .reference_cost import cost

EXAMPLE = """example:
  python -m jobs.demo && python -m jobs.benchmark_reference --data demo-data
"""

CURVE = (1, 4, 16, 64)  # known-good images per texture, measured
SIDES = (1.0, 1.5, 2.0)  # reference sizes measured, times the model's side


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.benchmark_reference", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--data", default="demo-data", help="make demo's data folder (default: demo-data)")
    p.add_argument("--good", type=positive_int, default=16, help="known-good images per texture (default: 16)")
    p.add_argument("--cost-images", type=positive_int, default=64, help="images timed for the cost (default: 64)")
    p.add_argument("--skip-cost", action="store_true", help="accuracy only")
    p.add_argument("--skip-choices", action="store_true",
                   help="no settings sweep (known-good counts, coreset, layers, reference size)")
    p.add_argument("--cost-only", action="store_true", help="the cost only (no accuracy, no forward of every image)")
    return p


class _Out:
    """The parts of a ScoreOutput that ReferenceScorer.apply reads, for a subset of images."""

    def __init__(self, joint, anomaly_map, features):
        self.joint_score, self.anomaly_map, self.patch_features = joint, anomaly_map, features


def _forward(scorer, records: list[dict], features_only: bool = False):
    """joint (B,), anomaly maps (B, S, S) and patch features (B, N, L, E) of ``records``, on the CPU;
    ``features_only``: the patch features alone, of the images at the side the scorer reads at."""
    import torch

    joint, maps, features = [], [], []
    images = list(scorer.loader.iterate(records))
    for start in range(0, len(images), 32):
        pixels, errors = scorer.feeder.batch(images[start:start + 32])
        if any(errors):
            raise UsageError(f"an image could not be read: {next(e for e in errors if e)}")
        if features_only:
            features.append(scorer.model.patch_features(pixels))
            continue
        out = scorer.model.score(pixels, patch_features=True)
        joint.append(out.joint_score.float())
        maps.append(out.anomaly_map.float())
        features.append(out.patch_features)
    if features_only:
        return torch.cat(features)
    return torch.cat(joint), torch.cat(maps), torch.cat(features)


def _rows(folder: Path, name: str) -> list[dict]:
    rows = list(csv.DictReader(open(folder / name)))
    for row in rows:
        row["image_uri"] = str(folder / row["image_uri"])
    return rows


def _more_good(folder: Path, count: int) -> list[dict]:
    """``count`` known-good images as the demo writes them (the same seeds: the demo's own come first), in
    ``folder``/_known-good-<count> (written once; listings skip "_" folders)."""
    from .demo import generate_good

    size = _image_side(folder)
    extra = folder / f"_known-good-{count}"
    generate_good(extra, count, size)
    return _rows(extra, "known-good.csv")


def _image_side(folder: Path) -> int:
    from PIL import Image

    first = _rows(folder, "known-good.csv")[0]["image_uri"]
    with Image.open(first) as image:
        return image.width


def _masks(folder: Path, rows: list[dict], size: int):
    import numpy as np
    from PIL import Image

    masks = np.zeros((len(rows), size, size), bool)
    for i, row in enumerate(rows):
        if row["mask_uri"]:
            mask = Image.open(folder / row["mask_uri"]).convert("L").resize((size, size), Image.NEAREST)
            masks[i] = np.asarray(mask) > 127
    return masks


def _auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


class Bench:
    def __init__(self, folder: Path, scorer):
        import numpy as np

        self.scorer = scorer
        archive, good = _rows(folder, "manifest.csv"), _rows(folder, "known-good.csv")
        self.textures = sorted({r["class_name"] for r in archive})
        if min(sum(r["class_name"] == t for r in good) for t in self.textures) < max(CURVE):
            good = _more_good(folder, max(CURVE) * len(self.textures))
        self.archive, self.good = archive, good
        self.labels = np.array([int(r["label"]) for r in archive])
        self.classes = np.array([r["class_name"] for r in archive])
        self.joint, self.maps, self.features = _forward(scorer, archive)
        _, _, self.good_features = _forward(scorer, good)
        self.good_classes = [r["class_name"] for r in good]
        self.masks = _masks(folder, archive, scorer.image_size)
        self.at_side = {scorer.image_size: (self.features, self.good_features)}

    def features_at(self, side: int):
        """(archive, known-good) patch features of the images resized to ``side`` (a second forward)."""
        if side not in self.at_side:
            from headclip.scoring.scorer import ImageScorer, ScoringOptions

            with ImageScorer("bench", None, ScoringOptions(batch_size=32), model=self.scorer.model) as reader:
                reader.read_at(side)
                self.at_side[side] = (_forward(reader, self.archive, features_only=True),
                                      _forward(reader, self.good, features_only=True))
        return self.at_side[side]

    def bank(self, per_texture: int, budget: int = 10_000, coreset: str = "greedy", layers=None,
             aggregate: str = "max", index=None, side: Optional[int] = None):
        from headclip.reference import BankBuilder, IndexSettings
        from headclip.reference.build import BankSettings

        settings = BankSettings(budget=budget, coreset=coreset, layers=layers, aggregate=aggregate,
                                index=index or IndexSettings())
        builder = BankBuilder(self.scorer.model.vision.map_layers, settings)
        good_features = self.features_at(side or self.scorer.image_size)[1]
        for texture in self.textures:
            rows = [i for i, c in enumerate(self.good_classes) if c == texture][:per_texture]
            builder.add(good_features[rows], [texture] * len(rows))
        model = self.scorer.model
        return builder.build(model.checkpoint_id or "untrained", model.config.backbone, model.image_size,
                             model.clip.visual.output_dim, "class_name", reference_size=side)

    def evaluate(self, bank, nprobe=None) -> dict[str, dict[str, float]]:
        """Per texture: image AUROC of zero-shot, reference and combined; pixel AUROC of zero-shot and combined."""
        import numpy as np

        from headclip.reference import ReferenceScorer

        scorer = ReferenceScorer(bank, self.scorer.model, nprobe=nprobe)
        features = self.features_at(bank.input_size)[0]
        result = {}
        for texture in self.textures:
            rows = np.flatnonzero(self.classes == texture)
            ref = scorer.apply(_Out(self.joint[rows], self.maps[rows], self.features[rows]), [texture] * len(rows),
                               features[rows] if scorer.own_size else None)
            labels, masks = self.labels[rows], self.masks[rows].ravel()
            result[texture] = {
                "zero-shot": _auroc(labels, self.joint[rows].numpy()),
                "reference": _auroc(labels, ref.reference_score.numpy()),
                "combined": _auroc(labels, ref.joint_score.numpy()),
                "pixel zero-shot": _auroc(masks, self.maps[rows].numpy().ravel()),
                "pixel combined": _auroc(masks, ref.anomaly_map.numpy().ravel()),
            }
        result["mean"] = {k: float(np.mean([result[t][k] for t in self.textures])) for k in result[self.textures[0]]}
        return result


def _row(name: str, figures: dict[str, float]) -> str:
    return f"  {name:<34}" + "".join(f"{v:>14.3f}" for v in figures.values())


def _header(figures: dict[str, float]) -> str:
    return f"  {'':<34}" + "".join(f"{k.replace('pixel ', 'px '):>14}" for k in figures)


def accuracy(bench: Bench, good: int) -> dict:
    result = bench.evaluate(bench.bank(good))
    print(f"\n{good} known-good images per texture (greedy coreset, budget 10000, all map layers, max); "
          "image and pixel AUROC:")
    print(_header(result["mean"]))
    for name, figures in result.items():
        print(_row(name, figures))
    mean = result["mean"]
    print(f"targets: mean image AUROC {mean['combined']:.3f} (>= 0.93: {'met' if mean['combined'] >= 0.93 else 'NOT met'}); "
          f"mean pixel AUROC {mean['pixel combined']:.3f} against zero-shot {mean['pixel zero-shot']:.3f} "
          f"({'above' if mean['pixel combined'] > mean['pixel zero-shot'] else 'NOT above'})")
    return result


def choices(bench: Bench, good: int) -> None:
    print("\nsettings (mean over textures):")
    first = True
    trials = [(f"known-good {k}", dict(per_texture=k)) for k in CURVE]
    trials += [("aggregate max", dict(per_texture=good)), ("aggregate top 1 %", dict(per_texture=good, aggregate="top1"))]
    patches = good * bench.features.shape[1]
    for fraction in (0.01, 0.1, 0.25):
        budget = max(1, int(patches * fraction))
        trials += [(f"greedy {budget} ({fraction:.0%})", dict(per_texture=good, budget=budget)),
                   (f"random {budget} ({fraction:.0%})", dict(per_texture=good, budget=budget, coreset="random"))]
    layers = bench.scorer.model.vision.map_layers
    trials += [(f"layer {l} only", dict(per_texture=good, layers=(l,))) for l in layers]
    trials += [(f"layers {list(layers[1:])}", dict(per_texture=good, layers=tuple(layers[1:])))]
    for name, kwargs in trials:
        mean = bench.evaluate(bench.bank(**kwargs))["mean"]
        if first:
            print(_header(mean))
            first = False
        print(_row(name, mean))


def reference_sizes(bench: Bench, good: int, images: int) -> None:
    """Accuracy and scoring time with the bank's images at 1x, 1.5x and 2x the model's side."""
    import tempfile

    import pyarrow as pa

    from headclip.reference import write_bank
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    model = bench.scorer.model
    side, patch = model.image_size, model.vision.patch_size
    sides = sorted({int(round(side * f / patch)) * patch for f in SIDES})
    table = pa.Table.from_pylist([{"image_id": r["image_id"], "image_uri": r["image_uri"], "class_name": r["class_name"]}
                                  for r in bench.archive[:images]])  # each image against its texture's bank
    means, kept, scorers = {}, {}, {0: bench.scorer}
    with tempfile.TemporaryDirectory() as folder:
        for s in sides:
            bank = bench.bank(good, side=s)
            means[s] = bench.evaluate(bank)["mean"]
            kept[s] = bank.counts[bench.textures[0]]["kept"]
            write_bank(bank, f"{folder}/bank-{s}.safetensors")
            scorers[s] = ImageScorer("bench", None, ScoringOptions(batch_size=32,
                                     reference=f"{folder}/bank-{s}.safetensors"), model=model)
        times = {}
        for _ in range(3):
            for s, scorer in scorers.items():
                start = time.perf_counter()
                scorer.score_table(table)
                times[s] = min(times.get(s, float("inf")), time.perf_counter() - start)
        for s in sides:
            scorers[s].close()
    print(f"\nreference size ({good} known-good images per texture, the model at {side}px; mean over textures; time to "
          f"score {images} archive images, each against its texture's bank (searched exactly), read to encoded, best of 3 "
          f"interleaved, against "
          f"{times[0]:.2f}s without one):")
    print(_header(means[side]) + f"{'bank patches':>14}{'seconds':>10}{'x no bank':>11}")
    for s in sides:
        name = f"{s}px" + (" (the model's: one forward)" if s == side else " (a second forward)")
        print(_row(name, means[s]) + f"{kept[s]:>14}{times[s]:>10.2f}{times[s] / times[0]:>11.2f}")


def _recall(exact, approx) -> tuple[float, float]:
    """(share of queries whose indexed distance is the exact one, mean relative excess), to float32 rounding."""
    tolerance = 1e-4 * (1 + exact)
    assert bool((approx >= exact - tolerance).all()), "an indexed distance below the exact one"
    return float((approx <= exact + tolerance).float().mean()), float((approx / exact.clamp(min=1e-6) - 1).mean())


def index_accuracy(bench: Bench, good: int) -> None:
    """Exact vs indexed search on the demo's banks (index forced on) and on one large bank of real patches."""
    import dataclasses

    import torch

    from headclip.reference import GroupSearch, IndexSettings, ReferenceScorer, build_index

    defaults = IndexSettings()
    print(f"\nindex settings (defaults): {defaults.to_dict()}; lists per group: round(sqrt(rows)), at most "
          "rows // 8")
    exact_bank = bench.bank(good)
    exact = bench.evaluate(exact_bank)["mean"]
    scorer = ReferenceScorer(exact_bank, bench.scorer.model)
    chosen = bench.features[:, :, scorer.index].flatten(2)
    truth = {t: scorer.distances(chosen[bench.classes == t], t) for t in bench.textures}
    print(f"{good} known-good images per texture ({exact_bank.counts[bench.textures[0]]['kept']} patches per group), "
          "archive patches against their texture's bank; recall = share of patches whose nearest patch is found:")
    print(f"  {'search':<24}{'recall':>10}{'excess':>10}{'image':>10}{'pixel':>10}")
    print(f"  {'exact':<24}{1:>10.3f}{0:>10.4f}{exact['combined']:>10.3f}{exact['pixel combined']:>10.3f}")
    bank = bench.bank(good, index=dataclasses.replace(defaults, exact_below=0))
    for nprobe in (1, 2, 4, 8, 16):
        mean = bench.evaluate(bank, nprobe)["mean"]
        indexed = ReferenceScorer(bank, bench.scorer.model, nprobe=nprobe)
        got = torch.cat([indexed.distances(chosen[bench.classes == t], t) for t in bench.textures])
        recall, excess = _recall(torch.cat([truth[t] for t in bench.textures]), got)
        lists = bank.indexes[bench.textures[0]].nlist
        print(f"  {f'nprobe {nprobe} of {lists} lists':<24}{recall:>10.3f}{excess:>10.4f}{mean['combined']:>10.3f}"
              f"{mean['pixel combined']:>10.3f}")
    # one large bank: every patch of the known-good images and of the archive but the 32 query images
    queries = chosen[:32].flatten(0, 1)
    good_chosen = bench.good_features[:, :, scorer.index].flatten(2)
    rows = torch.cat([good_chosen.flatten(0, 1), chosen[32:].flatten(0, 1)])
    start = time.perf_counter()
    order, index = build_index(rows, defaults)
    built = time.perf_counter() - start
    search = GroupSearch(rows[order].contiguous(), index, defaults.nprobe)
    exact_search = GroupSearch(rows)
    start = time.perf_counter()
    truth = exact_search(queries)
    exact_s = time.perf_counter() - start
    print(f"one bank of {rows.shape[0]:,} real patches (all other images), {queries.shape[0]:,} query patches of 32 "
          f"archive images; index built in {built:.1f}s ({index.nlist} lists); exact search {exact_s:.2f}s:")
    for nprobe in (1, 2, 4, 8, 16):
        search.nprobe = nprobe
        start = time.perf_counter()
        got = search(queries)
        seconds = time.perf_counter() - start
        recall, excess = _recall(truth, got)
        print(f"  nprobe {nprobe:>2}: recall {recall:.3f}, mean excess {excess:.4f}, {seconds:.2f}s "
              f"({exact_s / seconds:.0f}x faster)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.data)
    for name in ("manifest.csv", "known-good.csv"):
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name} is missing: run python -m jobs.demo --data {folder} first")
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    with ImageScorer("bench", DEMO_CHECKPOINT_URI, ScoringOptions(batch_size=32)) as scorer:
        if args.cost_only:
            cost(folder, scorer, args.cost_images)
            return 0
        start = time.perf_counter()
        bench = Bench(folder, scorer)
        print(f"{len(bench.archive)} archive and {len(bench.good)} known-good images through the demo model in "
              f"{time.perf_counter() - start:.1f}s; input {scorer.image_size}px, map layers "
              f"{list(scorer.model.vision.map_layers)}, {bench.features.shape[1]} patches per image")
        accuracy(bench, args.good)
        if not args.skip_choices:
            choices(bench, args.good)
            reference_sizes(bench, args.good, args.cost_images)
        index_accuracy(bench, args.good)
        if not args.skip_cost:
            cost(folder, scorer, args.cost_images)
    return 0


if __name__ == "__main__":
    run(main, "jobs.benchmark_reference")
