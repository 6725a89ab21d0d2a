"""Scale benchmarks of the driver: planning a large manifest, and a night's audit against a year of history.

Prints figures; asserts nothing. ``plan`` writes a manifest of N rows in
shuffled order (so the listing must be sorted out of memory) and runs
``jobs.score --plan-only`` on it in a child process, printing the child's
wall time and peak RSS. ``audit`` builds a simulated history of D days of M
images each and prints what finding a new night's images costs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .cli import days_int, positive_int

EXAMPLE = """examples:
  python -m jobs.benchmark_scale plan --rows 10000000
  python -m jobs.benchmark_scale audit --days 365 --per-day 20000
"""

REPO = Path(__file__).resolve().parents[1]


def image_uris(indices: np.ndarray) -> pa.Array:
    """Object-store-like URIs for image numbers (camera, day and image parts)."""
    return pa.array([f"s3://plant-archive/line-7/cam-{i % 8}/day-{i // 100_000:04d}/img-{i:010d}.jpg"
                     for i in indices.tolist()], pa.string())


def write_manifest(path: Path, rows: int, seed: int = 0, group_rows: int = 500_000) -> None:
    """A Parquet manifest of ``rows`` images (image_uri, class_name) in shuffled order."""
    order = np.random.default_rng(seed).permutation(rows)
    schema = pa.schema([("image_uri", pa.string()), ("class_name", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, group_rows):
            chunk = order[start:start + group_rows]
            classes = pa.array([f"part-{i % 5}" for i in chunk.tolist()], pa.string())
            writer.write_table(pa.table({"image_uri": image_uris(chunk), "class_name": classes}, schema=schema))


def bench_plan(args) -> None:
    with tempfile.TemporaryDirectory(prefix="headclip-bench-plan-") as tmp:
        manifest = Path(tmp) / "manifest.parquet"
        start = time.perf_counter()
        write_manifest(manifest, args.rows)
        print(f"manifest: {args.rows:,} rows, {manifest.stat().st_size / 1e6:.0f} MB, "
              f"written in {time.perf_counter() - start:.1f}s")
        command = [sys.executable, "-m", "jobs.score", "--input", str(manifest), "--output", str(Path(tmp) / "out"),
                   "--plan-only", "--shard-size", str(args.shard_size)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if result.returncode != 0:
            print(result.stderr[-2000:], file=sys.stderr)
            raise SystemExit(1)
        print(result.stdout.strip())
        plan_bytes = sum(p.stat().st_size for p in (Path(tmp) / "out").rglob("*") if p.is_file())
        print(f"plan-only: {seconds:.1f}s wall, driver peak RSS {peak / 1024:.0f} MB"
              f"{'' if peak > before else ' (at most; an earlier child peaked higher)'}, "
              f"plan {plan_bytes / 1e6:.0f} MB")
        print(f"targets for 10M rows: <= 120 s and <= 1536 MB; per million rows: "
              f"{seconds / args.rows * 1e6:.1f}s")


def bench_audit(args) -> None:
    from headclip.storage.history import build_day_index, scored_images_for
    from headclip.storage.layout import day_index_uri

    with tempfile.TemporaryDirectory(prefix="headclip-bench-audit-") as tmp:
        history = str(Path(tmp) / "history")
        first = dt.date(2025, 1, 1)
        start = time.perf_counter()
        for day in range(args.days):
            date = first + dt.timedelta(days=day)
            base = day * args.per_day
            uris = image_uris(np.arange(base, base + args.per_day))
            table = pa.table({"image_uri": uris, "status": pa.array(["ok"] * args.per_day),
                              "source_version": pa.array(["etag"] * args.per_day),
                              "scored_at": pa.array([dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)] * args.per_day,
                                                    pa.timestamp("us", tz="UTC"))})
            build_day_index(history, date, table)
        index_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        print(f"history: {args.days} days x {args.per_day:,} images ({args.days * args.per_day:,} ids), indexes "
              f"{index_bytes / 1e6:.0f} MB, built in {time.perf_counter() - start:.1f}s")
        night = first + dt.timedelta(days=args.days)
        tonight = image_uris(np.arange(args.days * args.per_day, (args.days + 1) * args.per_day))
        for scope, days in (("the night's day", [night]), ("the whole history", None)):
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            found = scored_images_for(history, tonight.to_pylist(), days=days)
            seconds = time.perf_counter() - start
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
            print(f"finding {args.per_day:,} new images against {scope}: {seconds:.2f}s, "
                  f"{len(found)} already scored, peak RSS grew {grown / 1024:.0f} MB")
        print(f"(index of one day: {day_index_uri(history, night)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark_scale", description=__doc__, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    plan = sub.add_parser("plan", help="plan a large shuffled manifest with --plan-only")
    plan.add_argument("--rows", type=positive_int, default=10_000_000)
    plan.add_argument("--shard-size", type=positive_int, default=256)
    audit = sub.add_parser("audit", help="a night's audit planning against a simulated history")
    audit.add_argument("--days", type=days_int, default=365)
    audit.add_argument("--per-day", type=positive_int, default=20_000)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(REPO))
    bench_plan(args) if args.what == "plan" else bench_audit(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
