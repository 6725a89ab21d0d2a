"""Write an HTML report of any scoring run: figures, score histogram, the worst
images with their masks, and the errors."""

from __future__ import annotations

from typing import Optional, Sequence

from .cli import Parser, add_storage_flag, read_run_arg, run, top_int

EXAMPLE = """examples:
  python -m jobs.report --run "$(ls -d out/demo/run_id=* | head -n 1)"     # make demo's run: writes RUN/_report.html
  python -m jobs.report --run s3://bucket/scores/run_id=abc --output s3://bucket/reports/abc.html
"""


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.report", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--run", required=True, help="a run directory: OUTPUT/run_id=<id>")
    p.add_argument("--output", default=None, help="the HTML file to write (default: RUN/_report.html)")
    p.add_argument("--top-n", type=top_int, default=12, help="images in the gallery (default 12)")
    add_storage_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from headclip.reporting.html import run_report
    from headclip.storage.fs import write_bytes_atomic
    from headclip.storage.layout import run_report_uri

    from headclip.redact import redact_text
    from headclip.storage.results import run_config

    rows = read_run_arg(args)
    output = args.output or run_report_uri(args.run)
    config = run_config(args.run, args.storage_options)
    report = run_report(rows, f"Scoring run {args.run}", args.top_n, args.storage_options,
                        group_column=config.get("group_column"),
                        checkpoint=redact_text(str(config.get("checkpoint", ""))))
    write_bytes_atomic(output, report.html().encode(), args.storage_options)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    run(main, "jobs.report")
