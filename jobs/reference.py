"""Build a reference bank from known-good images: their map-layer patch features, per group.

Reads the images (a prefix, glob or manifest, as jobs.score takes them) and runs them
through the scoring job's stages on Ray (decode tasks, then a pool of model actors: a local
Ray on a laptop, the cluster's under `ray job submit`); the actors send back each image's
patch features of the bank's layers, and this process subsamples each group's
(--group-column, one bank per group; default one pooled bank) to --budget patches: greedy
k-centre coreset (PatchCore) or random; unreadable images are left out and counted. The images are
resized to the model's input side, or to --reference-size: scoring with such a bank then resizes each
image to that side too and runs a second forward of the map layers there. Writes one safetensors file
whose header records the checkpoint id, backbone, image size, reference size, layers, counts, per-group
distance scales and this command (storage options and secrets removed). jobs.score takes it
with --reference; a bank from another checkpoint or image size is refused there.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from headclip.redact import redact_text

from .cli import (Parser, UsageError, add_bank_flags, add_cluster_flags, bank_settings, check_bank_settings,
                  check_storage_options, init_ray, pool_settings, redacted_command, run)

PROG = "python -m jobs.reference"
EXAMPLE = """examples:
  python -m jobs.reference --input demo-data/known-good.csv --group-column class_name --output out/bank.safetensors
  ray job submit --working-dir . -- python -m jobs.reference \\
      --input s3://bucket/known-good/manifest.csv --group-column line --gpus-per-actor 1 \\
      --checkpoint s3://bucket/models/headclip.safetensors --output s3://bucket/banks/line.safetensors
"""

log = logging.getLogger("jobs.reference")


def build_parser() -> Parser:
    from headclip.data.decode import IMAGE_EXTENSIONS

    p = Parser(prog=PROG, description=__doc__, epilog=EXAMPLE)
    p.add_argument("--input", required=True, help="known-good images: prefix, glob or manifest (CSV/Parquet)")
    p.add_argument("--output", required=True, help="the bank to write (safetensors, local or s3://)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged demo model)")
    p.add_argument("--group-column", default=None,
                   help="manifest column whose values get banks of their own (lines, cameras, classes); "
                        "default: one bank")
    add_bank_flags(p)
    p.add_argument("--device", default="auto", help="torch device in each actor (default: cuda if available)")
    p.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                   help="comma-separated file extensions of a prefix or glob --input (default: %(default)s)")
    add_cluster_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = redacted_command(PROG, sys.argv[1:] if argv is None else list(argv))
    from headclip.data.listing import InputError, list_images
    from headclip.errors import CheckpointError
    from headclip.model.checkpoint import read_checkpoint
    from headclip.reference import write_bank
    from headclip.reference.collect import build_bank
    from headclip.scoring.runner import JobConfig
    from headclip.scoring.scorer import ScoringOptions

    config = JobConfig(input=args.input, output=args.output, checkpoint=args.checkpoint, shard_size=args.shard_size,
                       **pool_settings(args), storage_options=args.storage_options,
                       scoring=ScoringOptions(batch_size=args.batch_size, device=args.device),
                       placement_timeout=args.placement_timeout)
    check_storage_options(args.storage_options, args.input, args.output, config.checkpoint_uri)
    settings = bank_settings(args)
    try:
        check_bank_settings(read_checkpoint(config.checkpoint_uri, args.storage_options), settings)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
    if not extensions:
        raise UsageError("--extensions is empty")
    try:
        table = list_images(args.input, extensions, args.storage_options)
    except InputError as err:
        raise UsageError(str(err)) from None
    column = args.group_column
    if column is not None:
        if column not in table.column_names:
            raise UsageError(f"no column {column!r} in the input (columns: {', '.join(table.column_names)})")
        missing = sum(v is None for v in table[column].to_pylist())
        if missing:
            raise UsageError(f"{missing} images have no value in column {column!r}")
    groups = table[column].to_pylist() if column else [None] * table.num_rows
    init_ray(args.ray_address)
    try:
        bank, collected = build_bank(table, groups, config, settings, column, command)
    except ValueError as err:
        raise UsageError(str(err)) from None
    write_bank(bank, args.output, args.storage_options)
    print_bank(bank, args.output, collected, args.coreset)
    return 0


def print_bank(bank, output: str, collected, coreset: str) -> None:
    """What was built: images, unreadable ones, layers, size, and per group the patches kept."""
    print(f"bank {redact_text(output)}: {len(collected.features)} known-good images ({len(collected.errors)} "
          f"unreadable) at {bank.input_size}px (the model scores at {bank.image_size}px), layers "
          f"{list(bank.layers)}, {bank.nbytes() / 2**20:.1f} MiB of features; "
          f"{collected.sent_bytes / 2**20:.1f} MiB sent by the actors in {collected.seconds:.1f}s")
    for group in bank.groups:
        c = bank.counts[group]
        print(f"  {group}: {c['images']} images, {c['kept']} of {c['patches']} patches kept ({coreset}), "
              f"distance scale {bank.scales[group]:.4f}")


if __name__ == "__main__":
    run(main, "jobs.reference")
