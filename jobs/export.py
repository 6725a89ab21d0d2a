"""Export scored images for review: COCO instance annotations, Label Studio tasks, a FiftyOne layout.

Chooses images from a run (or an audit day): the top N by score (--top), every flagged image
(--flagged), a stratified random sample of unflagged images per group (--sample, drawn with
--seed; the draw is recorded so that what is estimated from it is honest), or the rows a DuckDB
WHERE clause over the run's columns picks (--where); any combination, as a union. Writes to a
local or s3:// folder: labels.json (COCO, RLE masks, boxes, score, run id and image id
attributes), data/ (the images, with --images copy), label-studio/tasks.json and config.xml,
selection.parquet and sampling.json (what jobs.import_labels matches reviews against).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .cli import Parser, UsageError, add_storage_flag, check_storage_options, positive_int, run

EXAMPLE = """examples:
  python -m jobs.export --run "$(ls -d out/demo/run_id=* | head -n 1)" --top 50 --sample 50 --output out/review/
  python -m jobs.export --run s3://bucket/history/scores/date=2026-12-01 --flagged --sample 200 \\
      --group-column line --images uri --output s3://bucket/review/2026-12-01
  python -m jobs.export --run "$(ls -d out/demo/run_id=* | head -n 1)" --where "class_name = 'wood' AND score > 0.7" \\
      --output out/review-wood/
"""


def build_parser() -> Parser:
    from headclip.review.export import IMAGE_MODES

    p = Parser(prog="python -m jobs.export", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--run", required=True,
                   help="a run directory OUTPUT/run_id=<id>, or an audit day HISTORY/scores/date=<day>")
    p.add_argument("--output", required=True, help="the export folder (local or s3://)")
    p.add_argument("--top", type=positive_int, default=0, help="the N highest-scoring images")
    p.add_argument("--flagged", action="store_true", help="every flagged image (is_anomalous)")
    p.add_argument("--sample", type=positive_int, default=0,
                   help="N unflagged images drawn at random, spread over the groups in proportion to their size")
    p.add_argument("--where", default=None, help="a DuckDB condition over the run's columns, e.g. \"score > 0.8\"")
    p.add_argument("--group-column", default=None,
                   help="column whose values the sample is stratified by (default: class_name if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample's draw (default 0)")
    p.add_argument("--images", choices=IMAGE_MODES, default="copy",
                   help="copy the images into the export's data/ folder (default), or reference them by URI")
    p.add_argument("--image-url-prefix", default=None,
                   help="Label Studio image URL of a copied image: this prefix + its file name, e.g. "
                        "'/data/local-files/?d=review/data/' (default: the image's URI)")
    add_storage_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from headclip.review.export import COCO_FILE, CONFIG_FILE, ExportConfig, TASKS_FILE, write_export
    from headclip.review.selection import Selection, read_rows, select
    from headclip.storage.fs import join

    selection = Selection(top=args.top, flagged=args.flagged, sample=args.sample, where=args.where,
                          group_column=args.group_column, seed=args.seed)
    if selection.empty():
        raise UsageError("choose images to review: --top N, --flagged, --sample N and/or --where CONDITION")
    check_storage_options(args.storage_options, args.run, args.output)
    try:
        rows = read_rows(args.run, args.storage_options)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    chosen, sampling = select(rows, selection)
    if chosen.empty:
        raise UsageError(f"no images of {args.run} match the selection")
    write_export(chosen, sampling, ExportConfig(args.output, args.images, args.image_url_prefix,
                                                args.storage_options))
    counts = chosen["reasons"].str.split(",").explode().value_counts()
    print(f"exported {len(chosen)} images of {sampling.ok_images} ({sampling.flagged_images} flagged): "
          + ", ".join(f"{reason} {counts[reason]}" for reason in ("top", "flagged", "sample", "query")
                      if reason in counts))
    for group, spec in sorted(sampling.groups.items()):
        if spec["drawn"]:
            print(f"  sample of {group}: {spec['drawn']} of {spec['population']} unflagged images (seed {args.seed})")
    print(f"COCO: {join(args.output, COCO_FILE)}; Label Studio: {join(args.output, TASKS_FILE)} with "
          f"{join(args.output, CONFIG_FILE)}")
    return 0


if __name__ == "__main__":
    run(main, "jobs.export")
