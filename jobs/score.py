"""Score an image archive with HeadCLIP: one Parquet row per image.

Lists the input once, cuts it into shards and scores them on Ray Data: Ray tasks
on any node (CPU-only nodes too) read and decode the images and publish the
results, a pool of Ray actors that follows the cluster (one per GPU, or CPU
actors when there is none) runs the model. One zstd Parquet file per shard lands
under OUTPUT/run_id=<id>/. Re-running the same command resumes the run.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from .cli import (Parser, add_reference_flag, add_scoring_flags, apply_reference_arg, apply_thresholds, init_ray,
                  job_config, load_thresholds_arg, prepare_or_exit, run, warn_uncalibrated)

EXAMPLE = """examples:
  python -m jobs.score --input demo-data/images --output out/scores
  ray job submit --working-dir . -- python -m jobs.score \\
      --input s3://bucket/line-7/ --output s3://bucket/scores/ \\
      --checkpoint s3://bucket/models/headclip.safetensors --gpus-per-actor 1
  python -m jobs.score --input line-7/manifest.csv --output out/scores --thresholds thresholds.json
  python -m jobs.score --input line-7/manifest.csv --output out/scores --reference bank.safetensors
  python -m jobs.score --input s3://bucket/inventory/manifest.parquet --output s3://bucket/scores/ --plan-only
"""

log = logging.getLogger("jobs.score")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.score", description=__doc__, epilog=EXAMPLE)
    add_scoring_flags(p)
    add_reference_flag(p)
    p.add_argument("--plan-only", action="store_true",
                   help="write the run's plan (or read back a stored one), print its run id and counts, and "
                        "exit before starting Ray")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = job_config(args)
    thresholds = load_thresholds_arg(args, config.checkpoint_uri)
    apply_thresholds(config, thresholds)
    apply_reference_arg(args, config)
    plan = prepare_or_exit(config)
    if args.plan_only:
        from headclip.redact import redact_text
        from headclip.storage.layout import plan_file_uri

        print(f"run {plan.run_id}: {plan.num_images} images in {plan.num_shards} shards "
              f"({plan.num_pieces} plan pieces, {'read back' if plan.resumed else 'written'})")
        print(f"plan: {redact_text(plan_file_uri(plan.output, plan.run_id))}")
        return 0
    warn_uncalibrated(plan, thresholds, config.storage_options)
    from headclip.scoring.runner import execute

    init_ray(args.ray_address)
    summary = execute(plan, config)
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    run(main, "jobs.score")
