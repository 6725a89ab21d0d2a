"""Known-good references on the demo textures: accuracy against zero-shot, the settings, and the cost.

Needs make demo's data (python -m jobs.demo writes it; --data names the folder): the
240-image archive (manifest.csv, with defect masks) and the known-good images
(known-good.csv), which the archive does not contain. Every image runs through the model
once; banks are built per texture from the first K known-good images of that texture and
applied to the stored outputs, so the settings are compared on the same forward passes.

Prints, per texture and as the mean: image AUROC (sklearn) of the zero-shot joint score,
the reference score alone and their combination, and pixel AUROC of the zero-shot and the
combined map; the same for known-good counts 1, 4, 16 and all; the aggregation (max vs top
1 %), the coreset (greedy vs random at several budgets) and the layers. Then the cost: the
time to score the archive's images (read, decode, model, encode) without a bank and with a
100k-patch bank, in one run, and the memory and nearest-neighbour time per image of 10k,
100k and 1M-patch banks at ViT-B-16 and ViT-L-14 widths.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, UsageError, positive_int, run

EXAMPLE = """example:
  python -m jobs.demo && python -m jobs.benchmark_reference --data demo-data
"""

# (backbone, embed_dim, patches per image at its usual input size)
WIDTHS = (("ViT-B-16", 512, 14 * 14), ("ViT-L-14-336 at 518 px", 768, 37 * 37))
MAP_LAYERS = 4


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.benchmark_reference", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--data", default="demo-data", help="make demo's data folder (default: demo-data)")
    p.add_argument("--good", type=positive_int, default=16, help="known-good images per texture (default: 16)")
    p.add_argument("--cost-images", type=positive_int, default=64, help="images timed for the cost (default: 64)")
    p.add_argument("--skip-cost", action="store_true", help="accuracy only")
    return p


class _Out:
    """The parts of a ScoreOutput that ReferenceScorer.apply reads, for a subset of images."""

    def __init__(self, joint, anomaly_map, features):
        self.joint_score, self.anomaly_map, self.patch_features = joint, anomaly_map, features


def _forward(scorer, records: list[dict]):
    """joint (B,), anomaly maps (B, S, S) and patch features (B, N, L, E) of ``records``, on the CPU."""
    import torch

    joint, maps, features = [], [], []
    images = list(scorer.loader.iterate(records))
    for start in range(0, len(images), 32):
        pixels, errors = scorer.feeder.batch(images[start:start + 32])
        if any(errors):
            raise UsageError(f"an image could not be read: {next(e for e in errors if e)}")
        out = scorer.model.score(pixels, patch_features=True)
        joint.append(out.joint_score.float())
        maps.append(out.anomaly_map.float())
        features.append(out.patch_features)
    return torch.cat(joint), torch.cat(maps), torch.cat(features)


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
        archive = list(csv.DictReader(open(folder / "manifest.csv")))
        good = list(csv.DictReader(open(folder / "known-good.csv")))
        for rows in (archive, good):
            for row in rows:
                row["image_uri"] = str(folder / row["image_uri"])
        self.textures = sorted({r["class_name"] for r in archive})
        self.archive, self.good = archive, good
        self.labels = np.array([int(r["label"]) for r in archive])
        self.classes = np.array([r["class_name"] for r in archive])
        self.joint, self.maps, self.features = _forward(scorer, archive)
        _, _, self.good_features = _forward(scorer, good)
        self.good_classes = [r["class_name"] for r in good]
        self.masks = _masks(folder, archive, scorer.image_size)

    def bank(self, per_texture: int, budget: int = 10_000, coreset: str = "greedy", layers=None,
             aggregate: str = "max"):
        from headclip.reference import BankBuilder
        from headclip.reference.build import BankSettings

        builder = BankBuilder(self.scorer.model.vision.map_layers,
                              BankSettings(budget=budget, coreset=coreset, layers=layers, aggregate=aggregate))
        for texture in self.textures:
            rows = [i for i, c in enumerate(self.good_classes) if c == texture][:per_texture]
            builder.add(self.good_features[rows], [texture] * len(rows))
        model = self.scorer.model
        return builder.build("bench", model.config.backbone, model.image_size, model.clip.visual.output_dim,
                             "class_name")

    def evaluate(self, bank) -> dict[str, dict[str, float]]:
        """Per texture: image AUROC of zero-shot, reference and combined; pixel AUROC of zero-shot and combined."""
        import numpy as np

        from headclip.reference import ReferenceScorer

        scorer = ReferenceScorer(bank, self.scorer.model)
        result = {}
        for texture in self.textures:
            rows = np.flatnonzero(self.classes == texture)
            ref = scorer.apply(_Out(self.joint[rows], self.maps[rows], self.features[rows]), [texture] * len(rows))
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
    trials = [(f"known-good {k}", dict(per_texture=k)) for k in (1, 4, 16, 40)]
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


def cost(folder: Path, scorer, images: int) -> None:
    """Scoring time without a bank and with a 100k-patch bank (random unit features), in one run."""
    import pyarrow as pa
    import torch

    from headclip.reference import ReferenceBank, ReferenceScorer, nearest_distances

    records = list(csv.DictReader(open(folder / "manifest.csv")))[:images]
    for r in records:
        r["image_uri"] = str(folder / r["image_uri"])
    table = pa.Table.from_pylist([{"image_id": r["image_id"], "image_uri": r["image_uri"]} for r in records])
    model = scorer.model
    layers, dim = len(model.vision.map_layers), model.clip.visual.output_dim
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(100_000, layers, dim, generator=generator), dim=-1)
    bank = ReferenceBank({"*": features.flatten(1)}, {"*": 1.0}, model.checkpoint_id or "untrained",
                         model.config.backbone, model.image_size, tuple(model.vision.map_layers), dim)
    scorer.score_table(table.slice(0, 8))  # warm up
    times = {}
    banked_scorer = ReferenceScorer(bank, model)
    for name in ("without", "with", "without again", "with again"):
        scorer.reference = banked_scorer if name.startswith("with") and not name.startswith("without") else None
        start = time.perf_counter()
        scorer.score_table(table)
        times[name] = time.perf_counter() - start
    scorer.reference = None
    plain = min(times["without"], times["without again"])
    banked = min(times["with"], times["with again"])
    print(f"\ncost on this CPU ({torch.get_num_threads()} threads), {images} archive images read, decoded, scored and "
          f"encoded: {plain:.2f}s without a bank, {banked:.2f}s with a 100,000-patch bank (width {layers} x {dim}): "
          f"{banked / plain:.2f}x (target <= 1.3x: {'met' if banked / plain <= 1.3 else 'NOT met'})")
    print("\nbank memory (float32, 4 map layers) and nearest-neighbour time per image on this CPU "
          "(1M: ten 100k chunks, timed as one 100k bank x 10):")
    for backbone, width, patches in WIDTHS:
        for size in (10_000, 100_000, 1_000_000):
            nbytes = size * MAP_LAYERS * width * 4
            measured = min(size, 100_000)
            bank_t = torch.nn.functional.normalize(torch.randn(measured, MAP_LAYERS * width), dim=-1)
            queries = torch.nn.functional.normalize(torch.randn(patches, MAP_LAYERS * width), dim=-1)
            start = time.perf_counter()
            nearest_distances(queries, bank_t)
            seconds = (time.perf_counter() - start) * size / measured
            flops = 2 * patches * size * MAP_LAYERS * width
            print(f"  {backbone:<24} {size:>9,} patches: {nbytes / 2**30:6.2f} GiB, {flops / 1e12:7.2f} TFLOP and "
                  f"{seconds * 1e3:9.0f} ms per image ({patches} patches)")
            del bank_t


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.data)
    for name in ("manifest.csv", "known-good.csv"):
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name} is missing: run python -m jobs.demo --data {folder} first")
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    with ImageScorer("bench", DEMO_CHECKPOINT_URI, ScoringOptions(batch_size=32)) as scorer:
        start = time.perf_counter()
        bench = Bench(folder, scorer)
        print(f"{len(bench.archive)} archive and {len(bench.good)} known-good images through the demo model in "
              f"{time.perf_counter() - start:.1f}s; input {scorer.image_size}px, map layers "
              f"{list(scorer.model.vision.map_layers)}, {bench.features.shape[1]} patches per image")
        accuracy(bench, args.good)
        choices(bench, args.good)
        if not args.skip_cost:
            cost(folder, scorer, args.cost_images)
    return 0


if __name__ == "__main__":
    run(main, "jobs.benchmark_reference")
