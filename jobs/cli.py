"""What the entry points share: one-line argument errors, flag groups, planning and Ray start-up.

No job imports another job; what two jobs need lives here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from headclip.errors import UsageError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def storage_options_arg(text: str) -> dict:
    """Parse ``--storage-options`` JSON into a dict."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _parse(text: str, cast, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def unit_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", type=storage_options_arg, default=None,
                   help="fsspec options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'")


def add_cluster_flags(p: argparse.ArgumentParser, batch_size: int = 16, shard_size: int = 256) -> None:
    """Flags of every job that scores on the actor pool, plus --storage-options and --ray-address."""
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"images per forward call (default: {batch_size})")
    p.add_argument("--shard-size", type=positive_int, default=shard_size,
                   help=f"images per shard and output file (default: {shard_size})")
    p.add_argument("--actors", type=positive_int, default=None,
                   help="scoring actors (default: one per GPU, or CPU actors when there is none)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each actor reserves (default: 1 if the cluster has GPUs, else CPU actors); "
                        "a value given is requested even before an autoscaler adds GPU nodes; fractions share a GPU")
    add_storage_flag(p)
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join: host:port, or 'auto' for the one `ray start` runs on this machine "
                        "(default: RAY_ADDRESS, else a private local Ray is started, even if one is running)")


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``jobs.score`` (input, output, checkpoint, row shaping, cluster)."""
    from headclip.data.decode import IMAGE_EXTENSIONS

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


def job_config(args):
    """The scoring job's config from the flags of :func:`add_scoring_flags`."""
    from headclip.scoring.runner import JobConfig
    from headclip.scoring.scorer import ScoringOptions

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
    from headclip.errors import CheckpointError, InputError
    from headclip.scoring.runner import prepare

    try:
        return prepare(config, images)
    except CheckpointError:
        raise
    except InputError as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot use output {config.output}: {' '.join(str(err).split())}") from None


def init_ray(address: Optional[str]) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a private local Ray; nothing if Ray is up.

    Without an address Ray's own default would join a cluster that ``ray start``
    runs on this machine; ``address="local"`` starts a fresh one instead.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def add_dataset_flags(p: argparse.ArgumentParser, split_help: str) -> None:
    """--data, --layout, --split and --classes of the jobs that read a labelled data set."""
    p.add_argument("--data", required=True, help="labelled data set root or manifest (local or s3://)")
    p.add_argument("--layout", default="auto", help="mvtec, visa, meta, manifest or auto (default)")
    p.add_argument("--split", default="test", help=split_help)
    p.add_argument("--classes", default=None, help="comma-separated classes to use (default: all)")


def load_dataset_arg(args):
    """The data set the flags of :func:`add_dataset_flags` name; errors become one line."""
    from headclip.data.datasets import DatasetError, load_dataset

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        return load_dataset(args.data, args.layout, args.split, classes, args.storage_options)
    except DatasetError as err:
        raise UsageError(str(err)) from None


def read_run_arg(args):
    """The rows of the run ``--run`` names, as pandas; a missing run becomes one line."""
    from headclip import results

    try:
        return results.read_run(args.run, args.storage_options)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None


def run(main: Callable[[Optional[Sequence[str]]], int], prog: str, argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main`` and exit with its code; known input errors become one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from headclip.errors import CheckpointError

    try:
        code = main(argv)
    except (UsageError, CheckpointError, FileNotFoundError, PermissionError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code)
