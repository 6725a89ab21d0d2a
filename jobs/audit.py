"""Nightly audit: score a day's new images, compare them with the recent past, report, alert.

Scores only images not yet in the history (by URI; a re-run adds no rows) with
the scoring job, into HISTORY/scores/date=<day>/. Then computes the day's
figures (images, errors, anomaly rate, score quantiles, top-N images), compares
them with the trailing baseline (the previous --baseline-days days): the change
in anomaly rate with a 95% confidence interval and a two-sample
Kolmogorov-Smirnov test of the scores. Writes summary.json and report.html
(score histogram against the baseline, anomaly rate over 30 days, a table of
the top-N images, and image strips of the flagged ones) to
HISTORY/_reports/date=<day>/.

An image is scored again when its latest row is an error (unless
--no-rescore-errors) or its file changed (ETag, or size and modification
time); only its newest row stays in the day. A day whose input does not
exist is an error unless --allow-missing-day says an empty day is expected.
One audit of a history and day runs at a time (a lock under HISTORY/_locks/).

Finding what is new reads per-day indexes (HISTORY/_index/date=<day>.arrow),
not the history's shard files. With --prefix-template each day's images live
under that day's own prefix, so only the audited day's index is read and a
night costs what its images cost; with --input every day's index is read
(--lookback-days N bounds it to the N days before the audited one).


Exit codes: 0 no alert, 2 bad input (or another audit of the day is running), 3 an alert condition holds (the summary
and report say why; --alert-exit-code changes it). The last line printed is
"AUDIT ALERT <day>: <reasons> ..." or "AUDIT OK <day>: ...", so a scheduler's
status message (Ray's job status keeps the log's tail) tells an alert from a
failure; summary.json has the same line ("message") and "alert". --webhook
POSTs a message (what alerted, the figures, the report) to a URL when the audit
alerts (or on every run): as Slack-style {"text": ...}, or summary.json with the
message as "text"; credentials in the URL go as an Authorization header, and the
delivery ends within --webhook-timeout seconds, never changing the exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

from .cli import (Parser, UsageError, add_cluster_flags, add_thresholds_flags, apply_thresholds, check_storage_options,
                  days_int, init_ray, load_thresholds_arg, pool_settings, prepare_or_exit, run, seconds_float, top_int,
                  unit_float, warn_uncalibrated)
from .cli import add_reference_flag, apply_reference_arg

EXIT_ALERT = 3
WEBHOOK_ENV = "HEADCLIP_AUDIT_WEBHOOK"
EXAMPLE = """examples:
  python -m jobs.audit --date 2026-11-23 --prefix-template 's3://bucket/line-7/date={date}/' \\
      --history s3://bucket/audit/line-7 --checkpoint s3://bucket/models/headclip.safetensors \\
      --thresholds s3://bucket/audit/thresholds.json --threshold-group line-7
  python -m jobs.audit --input demo-data/images/tiles --date 2026-11-23 --history out/audit \\
      --thresholds out/demo/_thresholds.json --threshold-group tiles
"""

log = logging.getLogger("jobs.audit")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.audit", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--input", default=None, help="the day's images: a prefix or glob")
    p.add_argument("--date", type=iso_date, default=None, help="the day audited, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--prefix-template", default=None,
                   help="input from the date, e.g. 's3://bucket/line-7/date={date}/' (instead of --input)")
    p.add_argument("--history", required=True, help="history location (local or s3://)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged demo model)")
    p.add_argument("--report", default=None, help="where summary.json and report.html go "
                                                  "(default: HISTORY/_reports/date=<day>/)")
    p.add_argument("--baseline-days", type=days_int, default=7, help="trailing days compared (default 7)")
    p.add_argument("--top-n", type=top_int, default=12, help="images in the gallery (default 12)")
    p.add_argument("--alert-rate-increase", type=unit_float, default=0.05,
                   help="alert when the anomaly rate rose by this much, CI above 0 (default 0.05)")
    p.add_argument("--alert-p-value", type=unit_float, default=0.001,
                   help="alert when the KS test of scores against the baseline gives p below this (default 0.001)")
    p.add_argument("--alert-error-rate", type=unit_float, default=0.05,
                   help="alert when more than this share of images fail (default 0.05)")
    p.add_argument("--threshold", type=unit_float, default=None, help="image label threshold (default 0.5)")
    add_thresholds_flags(p)
    p.add_argument("--alert-exit-code", type=exit_code, metavar="CODE", default=EXIT_ALERT,
                   help=f"exit code when an alert holds (default {EXIT_ALERT}; 0 keeps alerts out of a "
                        "scheduler's failures, leaving the summary, the last log line and --webhook to tell)")
    p.add_argument("--webhook", type=webhook_url, default=os.environ.get(WEBHOOK_ENV) or None,
                   help="http(s) URL that receives summary.json as a JSON POST when the audit alerts "
                        f"(default: ${WEBHOOK_ENV}, which keeps it off command lines; never printed or stored)")
    p.add_argument("--webhook-on", choices=["alert", "always"], default="alert",
                   help="POST on alerts only (default) or after every audit")
    p.add_argument("--webhook-format", choices=["auto", "slack", "json"], default="auto",
                   help="slack: {\"text\": message} (Slack, Mattermost, Teams); json: summary.json with the message "
                        "as \"text\"; auto (default): slack for hooks.slack.com, *.webhook.office.com and /hooks/ "
                        "paths, json otherwise")
    p.add_argument("--webhook-timeout", type=seconds_float, default=30.0,
                   help="seconds the whole delivery may take, retries included (default 30)")
    p.add_argument("--allow-missing-day", action="store_true",
                   help="a day whose input does not exist is an empty day, not an error (exit 2)")
    p.add_argument("--no-rescore-errors", action="store_true",
                   help="keep error rows as they are (default: images whose latest row is an error are scored again)")
    p.add_argument("--lookback-days", type=days_int, default=None,
                   help="with --input: look for earlier scores of the day's images only in the N days before it "
                        "(default: every day of the history; with --prefix-template only the audited day)")
    p.add_argument("--lock-stale-after", type=seconds_float, default=6 * 3600.0,
                   help="seconds after which another audit's lock of the day counts as abandoned (default 21600)")
    add_cluster_flags(p)
    add_reference_flag(p)
    return p


def exit_code(text: str) -> int:
    """An exit code a shell passes on unchanged: 0 to 125."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 125:
        raise argparse.ArgumentTypeError(f"must be 0 to 125, got {value}")
    return value


def iso_date(text: str) -> dt.date:
    """A calendar day written YYYY-MM-DD; a well-formed day that does not exist (2026-02-30) is named as such."""
    import re

    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
        raise argparse.ArgumentTypeError(f"must be YYYY-MM-DD, got {text!r}")
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text} is not a day of the calendar ({err})") from None


def webhook_url(text: str) -> str:
    """An http(s) URL with a host; the error never repeats the URL (it may hold a token)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError("must be an http:// or https:// URL with a host")
    return text


def resolve_input(args) -> tuple[str, dt.date]:
    day = args.date or dt.datetime.now(dt.timezone.utc).date()
    if args.input and args.prefix_template:
        raise UsageError("give --input or --prefix-template, not both")
    if args.prefix_template:
        if "{date}" not in args.prefix_template:
            raise UsageError("--prefix-template must contain {date}")
        rest = args.prefix_template.replace("{date}", "")
        if "{" in rest or "}" in rest:
            found = re.search(r"\{[^{}]*\}|[{}]", rest).group(0)
            raise UsageError(f"--prefix-template may hold only the placeholder {{date}}, found {found!r}")
        return args.prefix_template.replace("{date}", day.isoformat()), day
    if not args.input:
        raise UsageError("give --input, or --date with --prefix-template")
    return args.input, day


def lookup_days(args, day: dt.date) -> Optional[list[dt.date]]:
    """The days whose indexes may hold earlier scores of the day's images (None: every day)."""
    if args.prefix_template:
        return [day]
    if args.lookback_days:
        from headclip.reporting.audit import days_before
        from headclip.storage.history import history_days

        first = days_before(day, args.lookback_days)
        held = history_days(args.history, args.storage_options)  # only days the history holds are read
        return sorted({d for d in held if first <= d < day} | {day})
    return None


def new_images(input_uri: str, history: str, storage_options: Optional[dict], allow_missing: bool = False,
               rescore_errors: bool = True, day: Optional[dt.date] = None, days: Optional[list[dt.date]] = None):
    """(images to score or None, a note): the day's listing less what the history holds already (ids are URIs).

    ``days``: the days whose indexes are looked in (None: all); the audited ``day``'s own index is
    rebuilt from its shards first, so an audit of the day that stopped early is seen whole.
    """
    from headclip.data.listing import list_images
    from headclip.errors import EmptyInputError, InputError, InputNotFoundError
    from headclip.storage.history import build_day_index, images_to_score, scored_images_for

    try:
        listed = list_images(input_uri, storage_options=storage_options)
    except InputNotFoundError:
        if not allow_missing:
            raise UsageError(f"the day's input {input_uri} does not exist (a wrong --prefix-template or bucket? "
                             f"give --allow-missing-day if a day without images is expected)") from None
        return None, f"{input_uri} does not exist (--allow-missing-day)"
    except EmptyInputError:
        return None, f"{input_uri} exists but holds no images"
    except InputError as err:
        raise UsageError(str(err)) from None
    listed = listed.set_column(0, "image_id", listed["image_uri"])
    if day is not None:
        build_day_index(history, day, storage_options=storage_options)
    scored = scored_images_for(history, listed["image_uri"].to_pylist(), days, storage_options)
    todo = images_to_score(listed, scored, rescore_errors)
    if not todo.images.num_rows:
        return None, f"no new images under {input_uri}"
    return todo.images, f"scored {todo.describe()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    input_uri, day = resolve_input(args)
    from headclip.model.assets import DEMO_CHECKPOINT
    from headclip.storage import layout
    from headclip.storage.fs import canonical_uri
    from headclip.storage.history import AuditLock

    options = args.storage_options
    check_storage_options(options, input_uri, args.history)
    calibrated = load_thresholds_arg(args, args.checkpoint or str(DEMO_CHECKPOINT))
    input_uri = canonical_uri(input_uri, options)  # dir and dir/ are one input
    with AuditLock(layout.audit_lock_uri(args.history, day), options, args.lock_stale_after):
        return audit_day(args, input_uri, day, calibrated)


def audit_day(args, input_uri: str, day: dt.date, calibrated) -> int:
    """Score the day's new images, compare, report; the caller holds the day's lock."""
    from headclip.redact import redact_text
    from headclip.reporting import audit
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.reporting.groups import ALL_IMAGES
    from headclip.reporting.html import audit_report
    from headclip.scoring.runner import JobConfig, execute
    from headclip.scoring.scorer import ScoringOptions
    from headclip.storage import layout
    from headclip.storage.fs import join, write_bytes_atomic
    from headclip.storage.history import build_day_index, drop_superseded

    options = args.storage_options
    todo, note = new_images(input_uri, args.history, options, args.allow_missing_day, not args.no_rescore_errors,
                            day, lookup_days(args, day))
    if todo is None:
        log.info(redact_text(note))
    else:
        log.info("scoring %d images: %s", todo.num_rows, redact_text(note.removeprefix("scored ")))
        config = JobConfig(input=input_uri, output=layout.day_output(args.history, day), checkpoint=args.checkpoint,
                           shard_size=args.shard_size, **pool_settings(args),
                           storage_options=options, placement_timeout=args.placement_timeout,
                           scoring=ScoringOptions(threshold=0.5 if args.threshold is None else args.threshold,
                                                  batch_size=args.batch_size))
        apply_thresholds(config, calibrated)
        apply_reference_arg(args, config)
        plan = prepare_or_exit(config, todo)
        warn_uncalibrated(plan, calibrated, config.storage_options)
        init_ray(args.ray_address)
        execute(plan, config)
        drop_superseded(args.history, day, options)
        build_day_index(args.history, day, storage_options=options)
        log.info(redact_text(note))  # "scored N new", once they are

    day_rows = audit.read_day(args.history, day, options)
    baseline, used = audit.baseline_rows(args.history, day, args.baseline_days, options)
    figures = audit.day_figures(day_rows)
    comparison = audit.compare(day_rows, baseline, used)
    thresholds = audit.Thresholds(args.alert_rate_increase, args.alert_p_value, args.alert_error_rate)
    reasons = audit.alert_reasons(figures, comparison, thresholds)
    top = audit.top_images(day_rows, args.top_n)
    report_dir = args.report or layout.day_report_dir(args.history, day)
    summary = audit.AuditSummary(
        date=day.isoformat(), new_images=0 if todo is None else todo.num_rows, figures=figures,
        comparison=comparison, alert=bool(reasons), reasons=reasons,
        top_images=[{"image_id": r.image_id, "image_uri": r.image_uri, "score": float(r.score),
                     "is_anomalous": bool(r.is_anomalous)} for r in top.itertuples()],
        report=join(report_dir, layout.AUDIT_REPORT_FILE), note=redact_text(note),
        thresholds=None if calibrated is None else calibrated.summary() + (
            f" (group {args.threshold_group})" if args.threshold_group else ""))
    report = audit_report(summary, day_rows, baseline, audit.trend(args.history, day, 30, options),
                          thresholds.rate_increase, args.top_n, options,
                          group_column=calibrated.group_column if calibrated is not None else None,
                          checkpoint=redact_text(args.checkpoint or DEMO_CHECKPOINT_URI),
                          single_name=args.threshold_group or ALL_IMAGES)
    write_bytes_atomic(join(report_dir, layout.AUDIT_REPORT_FILE), report.html().encode(), options)
    document = summary.to_dict()
    write_bytes_atomic(join(report_dir, layout.AUDIT_SUMMARY_FILE), json.dumps(document, indent=2).encode(), options)
    for reason in reasons:
        print(f"ALERT: {reason}")
    if args.webhook and (summary.alert or args.webhook_on == "always"):
        from headclip.reporting.notify import post_alert

        delivered, outcome = post_alert(args.webhook, summary.text, document, args.webhook_format,
                                        args.webhook_timeout)
        print(f"webhook {outcome}", file=sys.stdout if delivered else sys.stderr)
    print(summary.message, flush=True)  # the last line: what a scheduler's status message shows
    return args.alert_exit_code if reasons else 0


if __name__ == "__main__":
    run(main, "jobs.audit")
