"""Score an image archive with HeadCLIP: one Parquet row per image.

Lists the input once, cuts it into shards, scores them on Ray actors (one per
GPU, or CPU actors when there is none) and writes one zstd Parquet file per
shard under OUTPUT/run_id=<id>/. Re-running the same command resumes the run.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from .cli import Parser, add_cluster_flags, UsageError, positive_int, run, unit_float

EXAMPLE = """examples:
  python -m jobs.score --input demo-data/images --output out/scores
  ray job submit --working-dir . -- python -m jobs.score \\
      --input s3://bucket/line-7/ --output s3://bucket/scores/ \\
      --checkpoint s3://bucket/models/headclip.safetensors
"""

log = logging.getLogger("jobs.score")


def build_parser() -> Parser:
    from headclip.imageio import IMAGE_EXTENSIONS

    p = Parser(prog="python -m jobs.score", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--input", required=True,
                   help="prefix, glob or manifest (CSV/Parquet with image_uri) on any fsspec filesystem")
    p.add_argument("--output", required=True, help="where results go (local path, file:// or s3://)")
    p.add_argument("--checkpoint", default=None, help="HeadCLIP checkpoint (default: the packaged demo model)")
    p.add_argument("--run-id", default=None,
                   help="run id (default: derived from input, listing, checkpoint and settings, so a rerun resumes)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs each actor reserves")
    p.add_argument("--threshold", type=unit_float, default=0.5, help="image label: score > threshold (default 0.5)")
    p.add_argument("--mask-threshold", type=unit_float, default=0.5,
                   help="mask pixels: anomaly map > this (default 0.5)")
    p.add_argument("--mask-max-side", type=positive_int, default=2048,
                   help="masks of larger images are stored scaled to this long side (default 2048)")
    p.add_argument("--max-pixels", type=positive_int, default=None,
                   help="images with more pixels are refused as decompression bombs")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N images of the listing")
    p.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                   help="comma-separated file extensions to take (default: %(default)s)")
    p.add_argument("--device", default="auto", help="torch device in each actor (default: cuda if available)")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    add_cluster_flags(p)
    return p


def job_config(args):
    from headclip.runner import JobConfig
    from headclip.scorer import ScoringOptions

    scoring = ScoringOptions(threshold=args.threshold, mask_threshold=args.mask_threshold,
                             mask_max_side=args.mask_max_side, batch_size=args.batch_size, device=args.device)
    if args.max_pixels:
        scoring.max_pixels = args.max_pixels
    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
    if not extensions:
        raise UsageError("--extensions is empty")
    return JobConfig(input=args.input, output=args.output, checkpoint=args.checkpoint, run_id=args.run_id,
                     shard_size=args.shard_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                     cpus_per_actor=args.cpus_per_actor, limit=args.limit, extensions=extensions,
                     storage_options=args.storage_options, scoring=scoring,
                     progress_interval=args.progress_interval)


def prepare_or_exit(config, images=None):
    """Plan the run; every input problem becomes a UsageError (one line, exit 2)."""
    from headclip.checkpoint import CheckpointError
    from headclip.listing import InputError
    from headclip.runner import prepare

    try:
        return prepare(config, images)
    except CheckpointError:
        raise
    except InputError as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot use output {config.output}: {' '.join(str(err).split())}") from None


def init_ray(address: Optional[str]) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = job_config(args)
    plan = prepare_or_exit(config)
    from headclip.runner import execute

    init_ray(args.ray_address)
    summary = execute(plan, config)
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    run(main, "jobs.score")
