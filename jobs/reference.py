"""Build a reference bank from known-good images: their map-layer patch features, per group.

Reads the images (a prefix, glob or manifest, as jobs.score takes them), runs them through
the model in this process, keeps each image's patch features of the map layers and
subsamples each group's (--group-column, one bank per group; default one pooled bank) to
--budget patches: greedy k-centre coreset (PatchCore) or random. Writes one safetensors file
whose header records the checkpoint id, backbone, image size, layers, counts, per-group
distance scales and this command (storage options and secrets removed). jobs.score takes it
with --reference; a bank from another checkpoint or image size is refused there.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from headclip.redact import redact_text

from .cli import Parser, UsageError, add_storage_flag, positive_int, redacted_command, run

PROG = "python -m jobs.reference"
EXAMPLE = """examples:
  python -m jobs.reference --input demo-data/known-good.csv --group-column class_name --output out/bank.safetensors
  python -m jobs.reference --input s3://bucket/known-good/manifest.csv --group-column line \\
      --checkpoint s3://bucket/models/headclip.safetensors --output s3://bucket/banks/line.safetensors
"""

log = logging.getLogger("jobs.reference")


def _layers(text: str) -> tuple[int, ...]:
    import argparse

    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated block numbers, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("is empty")
    return layers


def build_parser() -> Parser:
    from headclip.data.decode import IMAGE_EXTENSIONS
    from headclip.reference.build import BankSettings
    from headclip.reference.coreset import METHODS

    defaults = BankSettings()
    p = Parser(prog=PROG, description=__doc__, epilog=EXAMPLE)
    p.add_argument("--input", required=True, help="known-good images: prefix, glob or manifest (CSV/Parquet)")
    p.add_argument("--output", required=True, help="the bank to write (safetensors, local or s3://)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged demo model)")
    p.add_argument("--group-column", default=None,
                   help="manifest column whose values get banks of their own (lines, cameras, classes); "
                        "default: one bank")
    p.add_argument("--budget", type=positive_int, default=defaults.budget,
                   help="patches kept per group (default: %(default)s)")
    p.add_argument("--coreset", choices=METHODS, default=defaults.coreset,
                   help="how patches are kept: greedy k-centre (PatchCore) or random (default: %(default)s)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="comma-separated map layers (block numbers) whose features are used (default: all)")
    p.add_argument("--aggregate", choices=("max", "top1"), default=defaults.aggregate,
                   help="image reference score: the largest patch value or the mean of the top 1%% "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward (default: 16)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                   help="comma-separated file extensions of a prefix or glob --input (default: %(default)s)")
    add_storage_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = redacted_command(PROG, sys.argv[1:] if argv is None else list(argv))
    from headclip.data.listing import InputError, list_images
    from headclip.errors import CheckpointError
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.model.checkpoint import read_checkpoint
    from headclip.reference import BankBuilder, write_bank
    from headclip.reference.build import BankSettings
    from headclip.reference.collect import collect_features
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    checkpoint = args.checkpoint or DEMO_CHECKPOINT_URI
    try:
        checkpoint_id = read_checkpoint(checkpoint, args.storage_options).checkpoint_id
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
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
    settings = BankSettings(budget=args.budget, coreset=args.coreset, layers=args.layers, aggregate=args.aggregate)
    options = ScoringOptions(batch_size=args.batch_size, device=args.device)
    with ImageScorer("reference", checkpoint, options, args.storage_options) as scorer:
        try:
            builder = BankBuilder(scorer.model.vision.map_layers, settings)
        except ValueError as err:
            raise UsageError(str(err)) from None
        added, errors = collect_features(scorer, table.to_pylist(), builder, column)
        if not added:
            raise UsageError(f"none of the {table.num_rows} known-good images could be read")
        model = scorer.model
        bank = builder.build(checkpoint_id, model.config.backbone, model.image_size, model.clip.visual.output_dim,
                             column, command)
    write_bank(bank, args.output, args.storage_options)
    print(f"bank {redact_text(args.output)}: {added} known-good images ({len(errors)} unreadable), "
          f"layers {list(bank.layers)}, {bank.nbytes() / 2**20:.1f} MiB of features")
    for group in bank.groups:
        c = bank.counts[group]
        print(f"  {group}: {c['images']} images, {c['kept']} of {c['patches']} patches kept ({args.coreset}), "
              f"distance scale {bank.scales[group]:.4f}")
    return 0


if __name__ == "__main__":
    run(main, "jobs.reference")
