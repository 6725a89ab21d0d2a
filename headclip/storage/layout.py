"""Every path of a run's and an audit history's layout, in one place.

The Parquet tree of an output location holds shard files only: every other file or
folder in it starts with ``_`` (or ``.`` while being written), which pandas, pyarrow
and Ray Data skip; DuckDB and Polars read it through a glob of the shard files. The
run id is the ``run_id=`` hive partition (not a column of the files).

A scoring run (``OUTPUT`` is the job's ``--output``)::

    OUTPUT/run_id=<id>/
        _plan/plan.json            config, checkpoint id, listing hash, counts (written last)
        _plan/images-NNNNN.arrow   the sorted image list in pieces, one record batch per shard
        shard-NNNNN.parquet        one per shard, published atomically
        _metrics/shard-NNNNN.json  per-class metric state (labelled inputs)
        _eval/metrics.parquet|md   merged metrics (jobs.evaluate)
        _summary.json              the run summary
        _report.html               the run report (jobs.report's default)

An audit history reads like an output location: its Parquet files are the scoring rows
under ``scores/``, and the rest lies under ``_`` folders, the day indexes as Arrow IPC files
(not ``.parquet``, so a ``HISTORY/**/*.parquet`` glob finds shards only)::

    HISTORY/scores/date=YYYY-MM-DD/run_id=<id>/...   a scoring output per day
    HISTORY/_reports/date=YYYY-MM-DD/summary.json, report.html
    HISTORY/_locks/date=YYYY-MM-DD.lock              held while an audit of the day runs
    HISTORY/_index/date=YYYY-MM-DD.arrow             the day's images: uri, status, version, scored_at

Histories written before kept ``reports/``, ``locks/`` and ``index/date=...parquet``: audits of
them work (a day without an ``_index`` file is indexed again from its shards), and moving
those three folders out of the history (or deleting ``index/`` and ``locks/``) makes the root
readable as a whole.
"""

from __future__ import annotations

import datetime as dt
import posixpath

from .fs import join

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
PLAN_IMAGES_FILE = "images.arrow"  # the one-piece image list of plans written before pieces
PLAN_PIECE_GLOB = "images-*.arrow"
VERSION_COLUMN = "source_version"  # a listed file's ETag or size and mtime, in the plan's image list only
METRICS_DIR = "_metrics"
EVAL_DIR = "_eval"
SUMMARY_FILE = "_summary.json"
RUN_REPORT_FILE = "_report.html"
SHARD_GLOB = "shard-*.parquet"
AUDIT_SUMMARY_FILE = "summary.json"
INDEX_DIR = "_index"
LEGACY_INDEX_DIR = "index"  # histories written before: date=YYYY-MM-DD.parquet, no longer read
REPORTS_DIR = "_reports"
LOCKS_DIR = "_locks"
AUDIT_REPORT_FILE = "report.html"


# -- a scoring run ---------------------------------------------------------------------


def run_uri(output: str, run_id: str) -> str:
    """The run's directory: ``OUTPUT/run_id=<id>``."""
    return join(output, f"run_id={run_id}")


def shard_uri(output: str, run_id: str, index: int) -> str:
    return join(run_uri(output, run_id), f"shard-{index:05d}.parquet")


def plan_file_uri(output: str, run_id: str) -> str:
    return join(run_uri(output, run_id), PLAN_DIR, PLAN_FILE)


def plan_images_uri(output: str, run_id: str) -> str:
    return join(run_uri(output, run_id), PLAN_DIR, PLAN_IMAGES_FILE)


def plan_piece_uri(output: str, run_id: str, piece: int) -> str:
    return join(run_uri(output, run_id), PLAN_DIR, f"images-{piece:05d}.arrow")


def metrics_uri(shard: str) -> str:
    """Where a labelled shard's metric state is kept: ``_metrics/shard-NNNNN.json`` beside it."""
    parent, name = posixpath.split(shard)
    return f"{parent}/{METRICS_DIR}/{name.replace('.parquet', '.json')}"


def summary_uri(run: str) -> str:
    """The summary of the run directory ``run``."""
    return join(run, SUMMARY_FILE)


def eval_uris(run: str) -> tuple[str, str]:
    """(metrics.parquet, metrics.md) of the run directory ``run``."""
    return join(run, EVAL_DIR, "metrics.parquet"), join(run, EVAL_DIR, "metrics.md")


def run_report_uri(run: str) -> str:
    return join(run, RUN_REPORT_FILE)


def shard_glob(run_path: str) -> str:
    """Glob of a run directory's shard files (a path without protocol)."""
    return run_path.rstrip("/") + "/" + SHARD_GLOB


# -- an audit history -------------------------------------------------------------------


def history_scores(history: str) -> str:
    return join(history, "scores")


def day_output(history: str, day: dt.date) -> str:
    """The scoring output location of one day: ``HISTORY/scores/date=<day>``."""
    return join(history_scores(history), f"date={day.isoformat()}")


def day_report_dir(history: str, day: dt.date) -> str:
    """Where a day's summary.json and report.html go: ``HISTORY/_reports/date=<day>``."""
    return join(history, REPORTS_DIR, f"date={day.isoformat()}")


def day_index_uri(history: str, day: dt.date) -> str:
    """A day's image index (latest row per image scored that day): ``HISTORY/_index/date=<day>.arrow``."""
    return join(history, INDEX_DIR, f"date={day.isoformat()}.arrow")


def day_shard_glob(day_path: str) -> str:
    """Glob of every shard file of one day (a path without protocol)."""
    return day_path.rstrip("/") + "/run_id=*/" + SHARD_GLOB


def partition_value(path: str, key: str):
    """The value of the last ``key=<value>`` directory in ``path``, or None."""
    for part in reversed(path.rstrip("/").split("/")):
        if part.startswith(f"{key}="):
            return part[len(key) + 1:]
    return None


def day_of_partition(name: str):
    """The date of a ``date=YYYY-MM-DD`` partition name, or None."""
    if not name.startswith("date="):
        return None
    try:
        return dt.date.fromisoformat(name[5:])
    except ValueError:
        return None


def audit_lock_uri(history: str, day: dt.date) -> str:
    """The lock an audit of ``day`` holds while it runs: ``HISTORY/_locks/date=<day>.lock``."""
    return join(history, LOCKS_DIR, f"date={day.isoformat()}.lock")
