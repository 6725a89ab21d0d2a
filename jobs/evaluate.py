"""Measure detection quality on a labelled data set with the scoring actors.

Scores the data set like ``jobs.score`` (rows land in Parquet under
OUTPUT/run_id=<id>/), while every actor accumulates per-class metric state
per shard; the driver merges the states (no anomaly map is gathered) and
writes a per-class table: image AUROC, AP, F1-max; pixel AUROC, AP, F1-max,
AUPRO; and mAD, as Parquet and Markdown under OUTPUT/run_id=<id>/_eval/, and
prints it.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from .cli import (Parser, add_cluster_flags, add_dataset_flags, add_thresholds_flags, apply_thresholds, init_ray,
                  bins_int, load_dataset_arg, load_thresholds_arg, pool_settings, prepare_or_exit, run,
                  warn_uncalibrated)
from .cli import add_reference_flag, apply_reference_arg

EXAMPLE = """examples:
  ray job submit --working-dir . -- python -m jobs.evaluate --data s3://bucket/visa --layout visa \\
      --checkpoint s3://bucket/models/headclip-mvtec.safetensors --output s3://bucket/eval/visa
  python -m jobs.evaluate --data demo-data/manifest.csv --thresholds out/demo/_thresholds.json --output out/eval
"""

log = logging.getLogger("jobs.evaluate")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.evaluate", description=__doc__, epilog=EXAMPLE)
    add_dataset_flags(p, "split to evaluate (default: test)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged demo model)")
    p.add_argument("--output", required=True, help="where rows and the metrics table go")
    p.add_argument("--metric-bins", type=bins_int, default=1000,
                   help="pixel-metric histogram bins; the error bound shrinks as they grow (default 1000)")
    add_thresholds_flags(p)
    add_cluster_flags(p)
    add_reference_flag(p)
    return p


def metrics_markdown(table) -> str:
    """A Markdown table of fractions as percentages with one decimal."""
    columns = list(table.columns)
    lines = ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.iterrows():
        cells = ["n/a" if row[c] != row[c] else f"{100 * row[c]:.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bounds_line(metrics) -> str:
    """The largest binning error of each pixel metric over the classes, in percentage points.

    It bounds every class's value and their mean; F1-max is only ever under its exact value.
    """
    worst: dict[str, float] = {}
    for name in metrics:
        for key, value in metrics[name].bounds().items():
            if value == value:  # NaN where a class has no pixel ground truth
                worst[key] = max(worst.get(key, 0.0), value)
    if not worst:
        return "pixel metrics: no pixel ground truth"
    cells = ", ".join(f"{key.removeprefix('pixel_')} {100 * value:.3f}" for key, value in worst.items())
    return f"pixel metrics from {metrics.n_bins}-bin histograms; binning error at most (points): {cells}"


def write_metrics(table, run_dir: str, storage_options: Optional[dict]) -> tuple[str, str]:
    import pyarrow as pa

    from headclip.storage.schema import table_to_parquet_bytes
    from headclip.storage.fs import write_bytes_atomic
    from headclip.storage.layout import eval_uris

    parquet_uri, markdown_uri = eval_uris(run_dir)
    frame = table.reset_index()  # one row per class (column "class"), then "mean"
    write_bytes_atomic(parquet_uri, table_to_parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False)),
                       storage_options)
    write_bytes_atomic(markdown_uri, metrics_markdown(table).encode(), storage_options)
    return parquet_uri, markdown_uri


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    table = load_dataset_arg(args)
    summary, run_dir = evaluate_table(table, args)
    metrics = summary.metrics.table()
    parquet_uri, markdown_uri = write_metrics(metrics, run_dir, args.storage_options)
    print(metrics_markdown(metrics))
    print(bounds_line(summary.metrics))
    print(f"metrics: {parquet_uri} and {markdown_uri}")
    print_alarm_rates(run_dir, args.storage_options)
    return 0


def print_alarm_rates(run_dir: str, storage_options: Optional[dict]) -> None:
    """False-alarm and detection rates per class at the thresholds the rows record."""
    from headclip import results
    from headclip.evaluation.calibration import alarm_rates
    from headclip.storage.schema import STATUS_OK

    rows = results.read_run(run_dir, storage_options,
                            ["image_uri", "status", "class_name", "label", "is_anomalous", "threshold"])
    ok = rows[rows["status"] == STATUS_OK]
    rates = alarm_rates(ok["class_name"], ok["label"], ok["is_anomalous"])
    thresholds = sorted(set(ok["threshold"].round(4)))
    print(f"\nat the image thresholds used ({', '.join(f'{t:g}' for t in thresholds[:8])}"
          f"{' ...' if len(thresholds) > 8 else ''}):")
    print(rates.to_string(float_format=lambda v: f"{v:.3f}"))


def evaluate_table(table, args):
    """Score a labelled table with the scoring job; returns (summary, run directory)."""
    from headclip.storage.layout import run_uri
    from headclip.scoring.runner import JobConfig, execute
    from headclip.scoring.scorer import ScoringOptions

    config = JobConfig(input=args.data, output=args.output, checkpoint=args.checkpoint, shard_size=args.shard_size,
                       **pool_settings(args), storage_options=args.storage_options,
                       placement_timeout=args.placement_timeout,
                       scoring=ScoringOptions(batch_size=args.batch_size, metric_bins=args.metric_bins))
    thresholds = load_thresholds_arg(args, config.checkpoint_uri)
    apply_thresholds(config, thresholds)
    apply_reference_arg(args, config)
    plan = prepare_or_exit(config, table)
    warn_uncalibrated(plan, thresholds, config.storage_options)
    init_ray(args.ray_address)
    summary = execute(plan, config)
    for line in summary.lines():
        print(line)
    return summary, run_uri(args.output, plan.run_id)


if __name__ == "__main__":
    run(main, "jobs.evaluate")
