"""The demo: generate a small archive of textured surfaces with known defects,
calibrate alarm thresholds per texture on separate known-good images, score the
archive with the packaged demo model on a local Ray, and query the result.

The demo model is a toy: a tiny backbone pre-trained on generated surfaces only.
It shows the pipeline end to end offline; it is not a detector for real
photographs (see TOY_MODEL_NOTE, printed at the start and the end).

The archive's labels are known, so the demo prints each texture's false-alarm
rate (on the archive's good images, which calibration never saw) and detection
rate at the fixed threshold 0.5 and at the calibrated one.

Runs offline in one to two minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli import (Parser, add_scoring_flags, apply_thresholds, init_ray, job_config, positive_int, rate_float, side_int,
                  prepare_or_exit, redacted_command, run)

EXAMPLE = """example:
  python -m jobs.demo                      # what `make demo` runs
  python -m jobs.demo --images 400 --data demo-data --output out/demo
"""

DEMO_TEXTURES = ("wood", "fabric", "concrete", "tiles")

TOY_MODEL_NOTE = """\
The demo model is a toy: a tiny backbone (HeadCLIP-Tiny) trained on generated surfaces only.
It flags real photographs as anomalous (scores about 0.99) and ranks real defects no better
than chance. For real use, fit HeadCLIP on real CLIP weights, then score with that checkpoint:
  python -m jobs.train --data /data/mvtec_anomaly_detection --layout mvtec --pretrained openai --output models/headclip.safetensors
  python -m jobs.score --input IMAGES --output out/scores --checkpoint models/headclip.safetensors
--pretrained openai downloads OpenAI's ViT-L-14-336 weights; offline, name a weight file instead:
--pretrained /weights/ViT-L-14-336px.pt or --pretrained s3://bucket/weights/ViT-L-14-336px.pt."""

log = logging.getLogger("jobs.demo")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.demo", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--images", type=positive_int, default=240, help="images to generate (default: 240)")
    p.add_argument("--size", type=side_int, default=256, help="side of the generated images (default: 256)")
    p.add_argument("--data", default="demo-data", help="folder for the generated images (default: demo-data)")
    p.add_argument("--output", default="out/demo", help="where the scores go (default: out/demo)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged demo model)")
    p.add_argument("--good-images", type=positive_int, default=160,
                   help="known-good images to calibrate the thresholds on, spread over the textures (default: 160)")
    p.add_argument("--reference-images", type=positive_int, default=16,
                   help="known-good images per texture in the reference bank of the second run (default: 16)")
    p.add_argument("--target-fpr", type=rate_float, default=0.1,
                   help="false-alarm rate the calibrated thresholds aim for (default: 0.1)")
    return p


def generate(folder: Path, count: int, size: int) -> Path:
    """Write ``count`` images (half with a defect) and their masks; returns the manifest path."""
    import numpy as np
    from PIL import Image

    from headclip.data.synthetic import make_sample

    manifest = folder / "manifest.csv"
    if manifest.exists() and sum(1 for _ in open(manifest)) == count + 1:
        return manifest
    rows = []
    for i in range(count):
        texture = DEMO_TEXTURES[i % len(DEMO_TEXTURES)]
        defective = (i // len(DEMO_TEXTURES)) % 2 == 1
        sample = make_sample(10_000 + i, size=size, texture_kind=texture, defect="random" if defective else None)
        label = "good" if sample.defect is None else sample.defect
        image_path = folder / "images" / texture / label / f"{i:05d}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.image).save(image_path)
        mask_uri = ""
        if sample.defect is not None:
            mask_path = folder / "masks" / texture / label / f"{i:05d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((sample.mask * 255).astype(np.uint8)).save(mask_path)
            mask_uri = str(mask_path.relative_to(folder))
        rows.append({"image_uri": str(image_path.relative_to(folder)), "image_id": f"{texture}/{label}/{i:05d}",
                     "class_name": texture, "label": int(sample.defect is not None), "defect": label,
                     "mask_uri": mask_uri})
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def generate_good(folder: Path, count: int, size: int) -> Path:
    """Write ``count`` defect-free images, apart from the archive; returns their manifest."""
    from PIL import Image

    from headclip.data.synthetic import make_sample

    manifest = folder / "known-good.csv"
    if manifest.exists() and sum(1 for _ in open(manifest)) == count + 1:
        return manifest
    lines = ["image_uri,image_id,class_name"]
    for i in range(count):
        texture = DEMO_TEXTURES[i % len(DEMO_TEXTURES)]
        sample = make_sample(20_000 + i, size=size, texture_kind=texture, defect=None)
        path = folder / "known-good" / texture / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.image).save(path)
        lines.append(f"{path.relative_to(folder)},{texture}/{i:05d},{texture}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def calibrate(manifest: Path, checkpoint: str, output: str, target_fpr: float, command: str):
    """Per-texture thresholds from the known-good images, on the scoring actors (as jobs.calibrate)."""
    from headclip.data.listing import list_images
    from headclip.evaluation.calibration import state_table
    from headclip.evaluation.thresholds import calibrate as fit, write_thresholds
    from headclip.scoring.runner import JobConfig, execute
    from headclip.scoring.scorer import ScoringOptions

    listed = list_images(str(manifest))
    good = state_table(listed, listed["class_name"].to_pylist(), 0, [True] * listed.num_rows)
    config = JobConfig(input=str(manifest), output=f"{output}/_calibration", checkpoint=checkpoint, shard_size=64,
                       progress_interval=2.0, scoring=ScoringOptions(batch_size=32, metric_bins=10_000))
    plan = prepare_or_exit(config, good)
    init_ray(None)
    summary = execute(plan, config)
    thresholds = fit(summary.metrics, None, summary.checkpoint_id, "class_name", "quantile", target_fpr,
                     checkpoint=checkpoint, command=command)
    write_thresholds(thresholds, f"{output}/_thresholds.json")
    return thresholds


def reference_bank(good_manifest: Path, checkpoint: str, output: str, per_texture: int, command: str) -> str:
    """A bank from the first ``per_texture`` known-good images of each texture (as jobs.reference); its URI."""
    from headclip.data.listing import list_images
    from headclip.model.checkpoint import read_checkpoint
    from headclip.reference import BankBuilder, write_bank
    from headclip.reference.collect import collect_features
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    records, taken = [], {}
    for record in list_images(str(good_manifest)).to_pylist():
        if taken.get(record["class_name"], 0) < per_texture:
            taken[record["class_name"]] = taken.get(record["class_name"], 0) + 1
            records.append(record)
    with ImageScorer("reference", checkpoint, ScoringOptions(batch_size=32)) as scorer:
        builder = BankBuilder(scorer.model.vision.map_layers)
        collect_features(scorer, records, builder, "class_name")
        model = scorer.model
        bank = builder.build(read_checkpoint(checkpoint).checkpoint_id, model.config.backbone, model.image_size,
                             model.clip.visual.output_dim, "class_name", command)
    uri = f"{output}/_reference.safetensors"
    write_bank(bank, uri)
    return uri


def side_by_side(zero_shot, referenced, good: int) -> None:
    """Per texture: image and pixel AUROC of the zero-shot run and of the run with a reference bank."""
    a, b = zero_shot.table(), referenced.table()
    print(f"\nzero-shot against a reference bank of {good} known-good images per texture (image / pixel AUROC):")
    print(f"  {'texture':<10}{'zero-shot':>20}{'with reference':>20}")
    for name in a.index:
        print(f"  {name:<10}{a.loc[name, 'image_auroc']:>11.3f} / {a.loc[name, 'pixel_auroc']:.3f}"
              f"{b.loc[name, 'image_auroc']:>11.3f} / {b.loc[name, 'pixel_auroc']:.3f}")


def report(output: str, run_id: str) -> None:
    import duckdb

    from headclip.storage.layout import run_uri, shard_glob

    glob = shard_glob(run_uri(output, run_id))
    query = f"""
SELECT class_name,
       count(*)                                   AS images,
       sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
       round(avg(CASE WHEN is_anomalous THEN 1 ELSE 0 END), 3) AS anomaly_rate,
       round(avg(score) FILTER (WHERE label = 1), 3) AS mean_score_defect,
       round(avg(score) FILTER (WHERE label = 0), 3) AS mean_score_good
FROM read_parquet('{glob}', hive_partitioning = true)
GROUP BY class_name ORDER BY class_name"""
    print("\nDuckDB:" + query + "\n")
    print(duckdb.sql(query))
    top = f"SELECT image_id, round(score, 3) AS score, mask_area FROM read_parquet('{glob}') ORDER BY score DESC LIMIT 5"
    print(top + "\n")
    print(duckdb.sql(top))


def compare_thresholds(output: str, run_id: str, thresholds) -> None:
    """Fixed 0.5 against the calibrated thresholds, per texture, on the archive's labelled images."""
    import duckdb

    from headclip.evaluation.calibration import held_out_interval
    from headclip.storage.layout import run_uri, shard_glob

    glob = shard_glob(run_uri(output, run_id))
    query = f"""
SELECT class_name,
       round(any_value(threshold), 3)                                 AS calibrated,
       count(*) FILTER (WHERE label = 0)                              AS good,
       round(avg((score > 0.5)::INT) FILTER (WHERE label = 0), 3)      AS fpr_at_0_5,
       round(avg(is_anomalous::INT) FILTER (WHERE label = 0), 3)      AS fpr_calibrated,
       round(avg((score > 0.5)::INT) FILTER (WHERE label = 1), 3)      AS detected_at_0_5,
       round(avg(is_anomalous::INT) FILTER (WHERE label = 1), 3)      AS detected_calibrated
FROM read_parquet('{glob}') WHERE status = 'ok'
GROUP BY class_name ORDER BY class_name"""
    frame = duckdb.sql(query).df()
    print(f"\nfixed threshold 0.5 against thresholds calibrated per texture at a false-alarm rate of "
          f"{thresholds.target_fpr:g} on {thresholds.default.good_images} separate known-good images; false-alarm "
          f"rates are measured on the archive's good images, which calibration never saw:" + query + "\n")
    print(duckdb.sql(query))
    for row in frame.itertuples():
        if not row.good:
            continue
        group = thresholds.for_group(row.class_name)
        low, high = held_out_interval(group.good_images, group.rank, int(row.good), thresholds.confidence)
        print(f"{row.class_name}: threshold {group.threshold:.3f} from {group.good_images} known-good images; "
              f"false alarms on the archive's {int(row.good)} good images: "
              f"{int(round(row.fpr_calibrated * row.good))} ({thresholds.confidence:.0%} range for this many: "
              f"{low} to {high}), at 0.5: {int(round(row.fpr_at_0_5 * row.good))}")
    for name, group in sorted(thresholds.groups.items()):
        for warning in group.warnings:
            print(f"note: {name}: {warning}")


def provenance(checkpoint: str) -> str:
    """The command that made ``checkpoint``, without credentials (older checkpoints may hold some)."""
    from headclip.model.checkpoint import read_checkpoint
    from headclip.redact import redact_command_line

    return redact_command_line(str(read_checkpoint(checkpoint).config.extra.get("provenance", "unknown")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from headclip.model.assets import DEMO_CHECKPOINT_URI


    data = Path(args.data)
    manifest = generate(data, args.images, args.size)
    good_manifest = generate_good(data, args.good_images, args.size)
    checkpoint = args.checkpoint or DEMO_CHECKPOINT_URI
    if args.checkpoint is None:
        print(TOY_MODEL_NOTE + "\n")
    print(f"demo checkpoint, made by: {provenance(checkpoint)}")
    thresholds = calibrate(good_manifest, checkpoint, args.output, args.target_fpr,
                           redacted_command("python -m jobs.demo", list(argv) if argv is not None else sys.argv[1:]))
    print(f"\ncalibrated on {good_manifest}: {thresholds.summary()}; written to {args.output}/_thresholds.json")
    score_parser = Parser(prog="python -m jobs.demo")
    add_scoring_flags(score_parser)
    score_args = score_parser.parse_args(["--input", str(manifest), "--output", args.output,
                                            "--checkpoint", checkpoint, "--shard-size", "64",
                                            "--batch-size", "32", "--progress-interval", "2"])
    config = job_config(score_args)
    apply_thresholds(config, thresholds)
    from headclip.data.datasets import load_dataset

    plan = prepare_or_exit(config, load_dataset(str(manifest)))
    init_ray(None)
    from headclip.scoring.runner import execute

    summary = execute(plan, config)
    print()
    for line in summary.lines():
        print(line)
    report(args.output, plan.run_id)
    compare_thresholds(args.output, plan.run_id, thresholds)
    from headclip import results
    from headclip.redact import redact_text
    from headclip.reporting.html import run_report
    from headclip.storage.layout import run_uri

    # "_" keeps the report out of the Parquet tree for pandas, pyarrow and Ray Data readers
    report_path = Path(args.output) / "_report.html"
    rows = results.read_run(run_uri(args.output, plan.run_id))
    report_path.write_text(run_report(rows, f"Demo run {plan.run_id}", group_column=thresholds.group_column,
                                      checkpoint=redact_text(config.checkpoint_uri)).html())
    print(f"\nreport with the worst images, their heat maps, masks and ground truth: {report_path} "
          f"(open it in a browser)")
    if summary.metrics is not None:
        mean = summary.metrics.table().loc["mean"]
        print(f"\ndetection quality on the demo images (their masks are known): "
              f"image AUROC {mean['image_auroc']:.3f}, pixel AUROC {mean['pixel_auroc']:.3f}")
        command = redacted_command("python -m jobs.demo", list(argv) if argv is not None else sys.argv[1:])
        bank = reference_bank(good_manifest, checkpoint, args.output, args.reference_images, command)
        print(f"\nscoring again with a reference bank ({bank}, as python -m jobs.reference builds) ...")
        # "_" keeps the second run out of the first one's Parquet tree for readers of --output
        config = dataclasses.replace(config, output=f"{args.output}/_with-reference",
                                     scoring=dataclasses.replace(config.scoring, reference=bank))
        referenced = execute(prepare_or_exit(config, load_dataset(str(manifest))), config)
        side_by_side(summary.metrics, referenced.metrics, args.reference_images)
    if args.checkpoint is None:
        print("\n" + TOY_MODEL_NOTE)
    return 0


if __name__ == "__main__":
    run(main, "jobs.demo")
