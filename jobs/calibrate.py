"""Calibrate alarm thresholds on known-good images at a target false-alarm rate.

Scores the good images with the scoring job (Ray actors; their rows land under --rows) while
every actor keeps, per group and shard, the image scores and a histogram of the normal pixels;
the driver merges them and writes a thresholds file (JSON) with, per group of --group-column
(a manifest column: line, camera, product class) and for all groups pooled (the default):

- the image-score threshold at --target-fpr: an order statistic of the good scores, with the
  exact, distribution-free --confidence interval of the false-alarm rate it will have, and a
  warning when there are too few good images for the target;
- the mask threshold at --target-pixel-fpr, from the merged normal-pixel histograms;
- the counts used, the checkpoint id and this command (storage options and secrets removed).

With labelled defects (--label-column of a manifest, or a labelled data set via --data), it also
reports the detection rate at the threshold, and --rule f1 picks the F1-optimal threshold
instead (anomalib's adaptive threshold). jobs.score, jobs.audit and jobs.evaluate apply the file
with --thresholds; it is refused with any other checkpoint.

With --reference BANK the scores calibrated are those combined with that bank; with
--build-reference BANK_OUT the good images of each group are split (--reference-images K or
--reference-fraction F of them, chosen by the order of sha256("<--split-seed>:<image_id>"), not by
the listing's order): that part's patch features build the bank on the scoring actors (as
jobs.reference does), the rest is scored once with it and the thresholds are calibrated on their
combined scores. Each image is scored once. The thresholds file names the bank (its fingerprint);
jobs.score, jobs.audit and jobs.evaluate refuse it without that bank or with another.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from .cli import (Parser, UsageError, add_cluster_flags, bins_int, check_storage_options, init_ray, load_dataset_arg,
                  open_unit_float, pool_settings, prepare_or_exit, rate_float, redacted_command, run, unit_float)
from .cli import (add_bank_flags, add_reference_flag, apply_reference_arg, bank_settings, check_bank_settings,
                  positive_int, read_bank_once, seed_int)

PROG = "python -m jobs.calibrate"
EXAMPLE = """examples:
  python -m jobs.calibrate --input s3://bucket/known-good/manifest.csv --group-column line \\
      --checkpoint s3://bucket/models/headclip.safetensors --target-fpr 0.01 --output s3://bucket/thresholds.json
  python -m jobs.calibrate --input demo-data/known-good.csv --group-column class_name --target-fpr 0.1 \\
      --output out/thresholds.json
  python -m jobs.calibrate --input demo-data/known-good.csv --group-column class_name \\
      --output out/thresholds-bank.json --build-reference out/bank-16.safetensors --reference-images 16
"""
RULE_HELP = ("quantile: the order statistic whose expected false-alarm rate is at most the target (default); "
             "bound: the one whose rate is below the target with --confidence; "
             "f1: the F1-optimal threshold over good images and labelled defects")

log = logging.getLogger("jobs.calibrate")


def build_parser() -> Parser:
    from headclip.data.decode import IMAGE_EXTENSIONS
    from headclip.evaluation.calibration import RULES

    p = Parser(prog=PROG, description=__doc__, epilog=EXAMPLE)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="known-good images: prefix, glob or manifest (CSV/Parquet with image_uri)")
    source.add_argument("--data", help="a labelled data set (mvtec, visa, meta or manifest layout): label 0 images "
                                       "are the good ones, label 1 the defects")
    p.add_argument("--layout", default="auto", help="layout of --data (default: auto)")
    p.add_argument("--split", default="test", help="split of --data (default: test)")
    p.add_argument("--classes", default=None, help="comma-separated classes of --data (default: all)")
    p.add_argument("--output", required=True, help="the thresholds file to write (JSON, local or s3://)")
    p.add_argument("--rows", default=None, help="where the calibration's scoring rows go "
                                                "(default: beside --output, <name>-rows)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged demo model)")
    p.add_argument("--group-column", default=None,
                   help="column whose values are calibrated apart (lines, cameras, classes); default: one group")
    p.add_argument("--label-column", default=None,
                   help="manifest column of 0 (good) / 1 (defect) labels: defects give detection rates")
    p.add_argument("--target-fpr", type=rate_float, default=0.01,
                   help="false-alarm rate on good images to aim for (default 0.01)")
    p.add_argument("--target-pixel-fpr", type=unit_float, default=0.001,
                   help="share of normal pixels the mask may mark (default 0.001)")
    p.add_argument("--confidence", type=open_unit_float, default=0.95, help="confidence of intervals (default 0.95)")
    p.add_argument("--rule", choices=RULES, default="quantile", help=RULE_HELP)
    p.add_argument("--pixel-bins", type=bins_int, default=10_000,
                   help="bins of the normal-pixel histogram, the mask threshold's resolution (default 10000)")
    p.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                   help="comma-separated file extensions of a prefix or glob --input (default: %(default)s)")
    p.add_argument("--device", default="auto", help="torch device in each actor (default: cuda if available)")
    add_cluster_flags(p)
    add_reference_flag(p)
    p.add_argument("--build-reference", metavar="BANK_OUT", default=None,
                   help="also build a reference bank (safetensors, local or s3://) from part of each group's good "
                        "images and calibrate on the rest, scored with it")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--reference-images", type=positive_int, default=None,
                       help="with --build-reference: good images per group that build the bank")
    split.add_argument("--reference-fraction", type=open_unit_float, default=None,
                       help="with --build-reference: share of each group's good images that build the bank "
                            "(default 0.5)")
    p.add_argument("--split-seed", type=seed_int, default=None,
                   help="with --build-reference: seed of the split between bank and calibration images (default 0)")
    add_bank_flags(p)
    return p


def read_images(args):
    """The images to calibrate on: the listing of --input, or the data set of --data."""
    if args.data:
        return load_dataset_arg(args)
    from headclip.data.listing import InputError, list_images

    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
    if not extensions:
        raise UsageError("--extensions is empty")
    try:
        return list_images(args.input, extensions, args.storage_options)
    except InputError as err:
        raise UsageError(str(err)) from None


def _labels(table, column: Optional[str]) -> list[int]:
    if column is None:
        return [0] * table.num_rows
    if column not in table.column_names:
        raise UsageError(f"no column {column!r} in the input (columns: {', '.join(table.column_names)})")
    labels = []
    for value in table[column].to_pylist():
        if value not in (0, 1) or value is None:  # True/False compare equal to 1/0
            raise UsageError(f"--label-column {column} must hold 0 (good) or 1 (defect), found {value!r}")
        labels.append(int(value))
    return labels


def _mask_uris(table, args) -> list[Optional[str]]:
    """Defect masks: the data set's, or a manifest's mask_uri column resolved like its image_uri."""
    if "mask_uri" not in table.column_names:
        return [None] * table.num_rows
    values = table["mask_uri"].to_pylist()
    if args.data:
        return values
    import posixpath

    from headclip.storage.fs import filesystem, resolve_relative

    fs, path = filesystem(args.input, args.storage_options)
    return [resolve_relative(fs, args.input, posixpath.dirname(path), v) for v in values]


def split_images(table, args):
    """(good, defects or None) tables carrying the group as class_name; problems are one line."""
    import pyarrow as pa

    from headclip.evaluation.calibration import UNGROUPED, state_table
    from headclip.evaluation.thresholds import group_key

    column = args.group_column
    if column is not None and column not in table.column_names:
        raise UsageError(f"no column {column!r} in the input (columns: {', '.join(table.column_names)})")
    if column is not None:
        keys = [group_key(k) for k in table[column].to_pylist()]
        if all(k is None for k in keys):
            raise UsageError(f"no image has a value in column {column!r}")
        if any(k is None for k in keys):
            log.warning("%d images have no value in column %r (empty, blank or missing): they count in the pooled "
                        "default only, and images scored without a value get the default", keys.count(None), column)
        keys = [UNGROUPED if k is None else k for k in keys]
    elif "class_name" in table.column_names:  # one group, but metric state kept per class
        keys = [str(k) for k in table["class_name"].to_pylist()]
    else:
        keys = ["all"] * table.num_rows
    labels = _labels(table, "label" if args.data and args.label_column is None else args.label_column)
    masks = _mask_uris(table, args)
    good = [i for i, y in enumerate(labels) if y == 0]
    bad = [i for i, y in enumerate(labels) if y == 1]
    if not good:
        raise UsageError("no good images in the input")
    if column is not None:
        missing = sorted({keys[i] for i in bad} - {keys[i] for i in good} - {UNGROUPED})
        if missing:
            raise UsageError(f"group {missing[0]!r} has defects but no good images")
    if args.rule == "f1":
        lacking = sorted({keys[i] for i in good} - {keys[i] for i in bad} - {UNGROUPED}) if column is not None else []
        if not bad or lacking:
            where = f"group {lacking[0]!r} has" if lacking else "the input has"
            raise UsageError(f"--rule f1 needs labelled defects: {where} none (give --label-column or --data)")
    if "mask_uri" in table.column_names:
        table = table.drop_columns(["mask_uri"])
    table = table.append_column("mask_uri", pa.array(masks, pa.string()))

    def part(rows: list[int], label: int, has_masks: list[bool]):
        picked = table.take(pa.array(rows, pa.int64()))
        return state_table(picked, [keys[i] for i in rows], label, has_masks)

    unmasked = {keys[i] for i in bad if not masks[i]}  # groups whose defects lack masks: image level only
    defects = part(bad, 1, [keys[i] not in unmasked for i in bad]) if bad else None
    return part(good, 0, [True] * len(good)), defects


def hold_out(good, args):
    """(bank part, held-out part) of the good images for --build-reference, and the bank part's groups."""
    from headclip.evaluation.calibration import UNGROUPED, reference_split

    if args.reference:
        raise UsageError("give --reference (a bank to use) or --build-reference (a bank to build), not both")
    keys = good["class_name"].to_pylist()
    if args.group_column is not None and UNGROUPED in keys:
        raise UsageError(f"--build-reference: {keys.count(UNGROUPED)} good images have no value in column "
                         f"{args.group_column!r}, so no bank of theirs")
    ids = good["image_id" if "image_id" in good.column_names else "image_uri"].to_pylist()
    fraction = 0.5 if args.reference_images is None and args.reference_fraction is None else args.reference_fraction
    try:
        chosen = reference_split(keys, [str(i) for i in ids], args.reference_images, fraction,
                                 args.split_seed or 0)
    except ValueError as err:
        raise UsageError(str(err)) from None
    import pyarrow as pa

    mask = pa.array(chosen)
    bank_part, held = good.filter(mask), good.filter(pa.compute.invert(mask))
    groups = bank_part["class_name"].to_pylist() if args.group_column is not None else [None] * bank_part.num_rows
    return bank_part, held, groups


def default_rows(output: str) -> str:
    """Where the calibration rows go by default: ``thresholds.json`` -> ``thresholds-rows``."""
    base = output[:-5] if output.lower().endswith(".json") else output
    return base.rstrip("/") + "-rows"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = redacted_command(PROG, sys.argv[1:] if argv is None else list(argv))
    import dataclasses

    from headclip.errors import CheckpointError
    from headclip.evaluation.thresholds import calibrate, write_thresholds
    from headclip.model.checkpoint import read_checkpoint
    from headclip.redact import redact_text
    from headclip.reference import write_bank
    from headclip.reference.collect import build_bank
    from headclip.reference.fingerprint import bank_fingerprint
    from headclip.scoring.runner import JobConfig, execute
    from headclip.scoring.scorer import ScoringOptions

    build = args.build_reference
    unused = [flag for flag, value in (("--reference-images", args.reference_images),
                                       ("--reference-fraction", args.reference_fraction),
                                       ("--split-seed", args.split_seed)) if value is not None]
    if unused and not build:
        raise UsageError(f"{unused[0]} needs --build-reference")
    good, defects = split_images(read_images(args), args)
    if build:
        bank_part, good, bank_groups = hold_out(good, args)
    config = JobConfig(input=args.input or args.data, output=args.rows or default_rows(args.output),
                       checkpoint=args.checkpoint, shard_size=args.shard_size, **pool_settings(args),
                       storage_options=args.storage_options,
                       scoring=ScoringOptions(batch_size=args.batch_size, device=args.device,
                                              metric_bins=args.pixel_bins))
    apply_reference_arg(args, config)
    reference = None
    if args.reference:
        reference = {"bank": redact_text(args.reference),
                     "fingerprint": bank_fingerprint(read_bank_once(args.reference, args.storage_options))}
    if build:
        settings = bank_settings(args)
        try:
            own = check_bank_settings(read_checkpoint(config.checkpoint_uri, args.storage_options), settings)
        except CheckpointError as err:
            raise UsageError(str(err)) from None
        check_storage_options(args.storage_options, build)
        config.scoring = dataclasses.replace(config.scoring, reference=build, reference_size=own)
    plans = [prepare_or_exit(config, table) for table in (good, defects) if table is not None]
    if build and any(plan.resumed for plan in plans):  # its rows were scored with an earlier bank
        raise UsageError(f"calibration rows of these images exist under {redact_text(config.output)} (run "
                         f"{next(p.run_id for p in plans if p.resumed)}), scored with an earlier --build-reference "
                         f"bank; give another --rows or remove them")
    init_ray(args.ray_address)
    if build:  # the bank first: the held-out images are scored with it
        try:
            bank, collected = build_bank(bank_part, bank_groups, config, settings, args.group_column, command)
        except ValueError as err:
            raise UsageError(str(err)) from None
        write_bank(bank, build, args.storage_options)
        print_bank_part(bank, build, collected, bank_part.num_rows, good.num_rows)
        reference = {"bank": redact_text(build), "fingerprint": bank_fingerprint(bank),
                     "bank_images": len(collected.features), "held_out_images": good.num_rows,
                     "split": split_rule(args)}
    summaries = [execute(plan, config) for plan in plans]
    from headclip.storage.layout import run_uri

    for what, summary in zip(("good images", "defects"), summaries):
        print(f"scored {summary.images} {what} ({summary.errors} errors) in {summary.seconds:.1f}s; rows: "
              f"{run_uri(summary.output, summary.run_id)}")
    errors = summaries[0].errors
    if errors:
        log.warning("%d of the %d good images could not be scored (error rows under %s); calibrated on the rest",
                    errors, good.num_rows, config.output)
    scored = set(summaries[0].metrics or ())
    lost = sorted(set(good["class_name"].to_pylist()) - scored - {""})  # "": no group value, pooled only
    if lost:
        raise UsageError(f"none of the good images of group {lost[0]!r} could be scored")
    try:
        thresholds = calibrate(summaries[0].metrics, summaries[1].metrics if len(summaries) > 1 else None,
                               summaries[0].checkpoint_id, args.group_column, args.rule, args.target_fpr,
                               args.target_pixel_fpr, args.confidence, checkpoint=redact_text(config.checkpoint_uri),
                               command=command)
    except ValueError as err:
        raise UsageError(str(err)) from None
    thresholds.reference = reference
    write_thresholds(thresholds, args.output, args.storage_options)
    print_thresholds(thresholds)
    print(f"wrote {args.output}")
    return 0


def split_rule(args) -> str:
    """The --build-reference split, as the thresholds file records it."""
    if args.reference_images is not None:
        part = f"the first {args.reference_images} images"
    else:
        part = f"the first round({args.reference_fraction or 0.5:g} x n) images (at least 1, at most n - 1)"
    return (f"per group, images ordered by sha256('{args.split_seed or 0}:<image_id>'): {part} build the bank, "
            f"the rest are calibrated on")


def print_bank_part(bank, output: str, collected, images: int, held_out: int) -> None:
    from headclip.redact import redact_text

    print(f"reference bank {redact_text(output)}: built from {len(collected.features)} of {images} good images "
          f"({len(collected.errors)} unreadable) at {bank.input_size}px; {held_out} other good images are calibrated on, scored with it")
    for group in bank.groups:
        c = bank.counts[group]
        print(f"  {group}: {c['images']} images, {c['kept']} of {c['patches']} patches kept, "
              f"distance scale {bank.scales[group]:.4f}")


def print_thresholds(thresholds) -> None:
    """A table of the thresholds per group, then every warning on its own line."""
    print(f"\nthresholds for checkpoint {thresholds.checkpoint_id[:12]} ({thresholds.rule} rule, target false-alarm "
          f"rate {thresholds.target_fpr:g}, pixel {thresholds.target_pixel_fpr:g}, "
          f"{thresholds.confidence:.0%} intervals)")
    header = f"{'group':<16} {'good':>6} {'threshold':>10} {'mask':>7} {'expected FPR':>12}  {'FPR interval':<17} defects"
    print(header)
    named = [(name, g) for name, g in sorted(thresholds.groups.items())] + [("(default: all)", thresholds.default)]
    for name, g in named:
        low, high = g.fpr_interval
        detection = ""
        if g.defects:
            d = g.defects
            a, b = d["detection_interval"]
            detection = f"{d['detected']}/{d['images']} detected, {d['detection_rate']:.3f} ({a:.3f}-{b:.3f})"
        print(f"{name[:16]:<16} {g.good_images:>6} {g.threshold:>10.4f} {g.mask_threshold:>7.4f} "
              f"{g.expected_fpr:>12.4f}  {low:.4f}-{high:.4f}     {detection}")
    if thresholds.reference is not None:
        print(f"calibrated on scores combined with reference bank {thresholds.reference['bank']} "
              f"({thresholds.reference['fingerprint'][:12]}): apply them with --reference and that bank")
    for name, g in named:
        for warning in g.warnings:
            print(f"WARNING: {name}: {warning}")


if __name__ == "__main__":
    run(main, PROG)
