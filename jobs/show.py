"""Render result overlays to PNG files: the image with its anomaly mask (red),
its box and a faint heat map, for one image or the top-N of a run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, add_storage_flag, read_run_arg, UsageError, run, side_int, top_int

EXAMPLE = """examples:
  python -m jobs.show --run "$(ls -d out/demo/run_id=* | head -n 1)" --top 5 --output-dir out/overlays
  python -m jobs.show --run "$(ls -d out/demo/run_id=* | head -n 1)" --image-id tiles/spot/00007 --output-dir out/overlays
"""


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.show", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--run", required=True, help="a run directory: OUTPUT/run_id=<id>")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image-id", action="append", help="an image to render (repeatable)")
    which.add_argument("--top", type=top_int, help="render the N highest-scoring images")
    p.add_argument("--output-dir", default="overlays", help="folder for the PNG files (default: overlays)")
    p.add_argument("--max-side", type=side_int, default=768, help="long side of the pictures (default 768)")
    add_storage_flag(p)
    return p


def safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_") or "image"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from headclip.reporting.overlay import row_overlay
    from headclip.storage.schema import STATUS_OK

    rows = read_run_arg(args)
    if args.image_id:
        missing = sorted(set(args.image_id) - set(rows["image_id"]))
        if missing:
            raise UsageError(f"image id {missing[0]!r} is not in {args.run}")
        chosen = rows[rows["image_id"].isin(args.image_id)]
    else:
        chosen = rows[rows["status"] == STATUS_OK].sort_values("score", ascending=False).head(args.top)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rank, (_, row) in enumerate(chosen.iterrows(), start=1):
        record = row.to_dict()
        if record["status"] != STATUS_OK:
            print(f"skipped {record['image_id']}: {record['error']}")
            continue
        path = out / f"{rank:03d}_{safe_name(record['image_id'])}.png"
        row_overlay(record, args.storage_options, max_side=args.max_side).save(path)
        print(f"{path}  score {record['score']:.3f}  {record['image_uri']}")
    return 0


if __name__ == "__main__":
    run(main, "jobs.show")
