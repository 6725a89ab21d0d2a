"""Import reviewed labels: COCO JSON (as CVAT or FiftyOne export it) or a Label Studio JSON export.

Matches each review to the export it came from (--export, written by jobs.export) and writes,
to a local or s3:// folder, manifest.csv (image_uri, image_id, label, class_name, mask_uri with
the reviewed masks as PNGs under masks/, reviewer fields) that jobs.evaluate, jobs.calibrate and
jobs.train take as --data, and disagreements.csv (missed defects, false alarms). Prints the
disagreement counts, the precision of the flagged images and the defect rate among unflagged
ones estimated from the export's sample, with intervals. Any fault in the review files (unknown
images, masks of the wrong size, duplicated reviews, missing images) is one line each, and exit
code 2 with nothing written.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .cli import Parser, UsageError, add_storage_flag, check_storage_options, open_unit_float, run

EXAMPLE = """examples:
  python -m jobs.import_labels --export out/review/ --labels out/review/reviewed.json --output out/reviewed/
  python -m jobs.import_labels --export s3://bucket/review/2026-12-01 --labels project-3-export.json \\
      --format label-studio --output s3://bucket/reviewed/2026-12-01
"""


def build_parser() -> Parser:
    from headclip.review.importing import FORMATS

    p = Parser(prog="python -m jobs.import_labels", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--export", required=True, help="the export folder the images were reviewed from (jobs.export)")
    p.add_argument("--labels", required=True, action="append",
                   help="a review file: COCO JSON or a Label Studio JSON export (repeatable)")
    p.add_argument("--output", required=True, help="folder for manifest.csv, masks/ and disagreements.csv")
    p.add_argument("--format", choices=FORMATS, default="auto", help="format of --labels (default: auto)")
    p.add_argument("--reviewer", default=None, help="reviewer name for files that do not record one (COCO)")
    p.add_argument("--allow-partial", action="store_true",
                   help="import even if some exported images have no review (they are left out)")
    p.add_argument("--confidence", type=open_unit_float, default=0.95, help="confidence of intervals (default 0.95)")
    add_storage_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from headclip.errors import ReviewError
    from headclip.redact import redact_text
    from headclip.review.estimates import summary_lines
    from headclip.review.export import read_export
    from headclip.review.importing import FALSE_ALARM, MISSED, read_reviews, write_manifest

    check_storage_options(args.storage_options, args.export, args.output, *args.labels)
    records, sampling = read_export(args.export, args.storage_options)
    try:
        reviews = read_reviews(args.labels, records, args.format, args.reviewer, args.allow_partial,
                               args.storage_options)
    except ReviewError as err:
        for line in err.problems:
            print(f"jobs.import_labels: {redact_text(line)}", file=sys.stderr)
        raise UsageError(str(err)) from None
    manifest, frame, differ = write_manifest(reviews, args.output, args.storage_options)
    counts = differ["disagreement"].value_counts()
    print(f"imported {len(frame)} reviews ({int(frame['label'].sum())} defects): {manifest}")
    print(f"disagreements with the model: {counts.get(MISSED, 0)} missed defects, {counts.get(FALSE_ALARM, 0)} "
          f"false alarms")
    for row in differ.head(20).itertuples():
        print(f"  {row.disagreement}: {row.image_id} (score {row.model_score:.3f})")
    if len(differ) > 20:
        print(f"  ... {len(differ) - 20} more in disagreements.csv")
    for line in summary_lines(frame, sampling, args.confidence):
        print(line)
    return 0


if __name__ == "__main__":
    run(main, "jobs.import_labels")
