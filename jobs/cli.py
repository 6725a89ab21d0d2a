"""What every entry point shares: argument parsing with one-line errors."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Optional, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input detected before any work starts; reported as one line, exit 2."""


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
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray is started)")


def add_dataset_flags(p: argparse.ArgumentParser, split_help: str) -> None:
    """--data, --layout, --split and --classes of the jobs that read a labelled data set."""
    p.add_argument("--data", required=True, help="labelled data set root or manifest (local or s3://)")
    p.add_argument("--layout", default="auto", help="mvtec, visa, meta, manifest or auto (default)")
    p.add_argument("--split", default="test", help=split_help)
    p.add_argument("--classes", default=None, help="comma-separated classes to use (default: all)")


def load_dataset_arg(args):
    """The data set the flags of :func:`add_dataset_flags` name; errors become one line."""
    from headclip.datasets import DatasetError, load_dataset

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
