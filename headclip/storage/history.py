"""An audit history's bookkeeping: what is scored already, one audit per day at a time, superseded rows.

- :func:`scored_images_for`: the latest row of each image of a night's listing,
  with the version (ETag, or size and mtime) its file had when its run was
  planned, read from per-day indexes (``HISTORY/_index/date=<day>.arrow``), one day
  at a time and only the days asked for, so a night costs what its images
  and the days it looks at cost, not the whole history's shard files.
  :func:`build_day_index` writes a day's index after the day is scored; a
  day without one is indexed from its shards when first needed.
- :func:`images_to_score`: of a day's listing, the images never scored, those
  whose latest row is an error (a repaired file), and those whose file changed.
- :class:`AuditLock`: an audit of one history and day holds
  ``HISTORY/_locks/date=<day>.lock``, created atomically (O_EXCL locally, a
  conditional PUT on S3) with its pid, host and start time; a second audit
  refuses to start. A lock is stale, and taken over, when its process is gone
  (same host) or it is older than ``stale_after`` seconds.
- :func:`drop_superseded`: after a day is scored again, only each image's
  latest row stays in that day's shard files.

Unreadable or foreign Parquet files under the history are skipped with a
warning.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import LockedError
from .fs import as_uri, create_exclusive, delete, filesystem, join, read_bytes, write_bytes_atomic
from .layout import (INDEX_DIR, LEGACY_INDEX_DIR, PLAN_DIR, PLAN_IMAGES_FILE, PLAN_PIECE_GLOB, VERSION_COLUMN,
                     day_index_uri, day_output, day_shard_glob, history_scores)
from .results import BrokenShard, read_shard_table
from .schema import STATUS_OK, table_to_parquet_bytes

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 6 * 3600.0  # seconds after which any audit lock counts as abandoned


@dataclass
class Scored:
    """The latest row of an image in the history."""

    status: str
    version: Optional[str]
    scored_at: object


def _plan_versions(fs, run_dir: str) -> dict[str, Optional[str]]:
    """image_uri -> listed version, from a run's plan pieces (empty for runs planned without versions)."""
    plan_dir = posixpath.join(run_dir, PLAN_DIR)
    versions: dict[str, Optional[str]] = {}
    try:
        paths = sorted(fs.glob(posixpath.join(plan_dir, PLAN_PIECE_GLOB))) or [posixpath.join(plan_dir, PLAN_IMAGES_FILE)]
        for path in paths:
            with fs.open(path, "rb") as handle:
                table = pa.ipc.open_file(pa.BufferReader(handle.read())).read_all()
            if VERSION_COLUMN not in table.column_names:
                return {}
            versions.update(zip(table["image_uri"].to_pylist(), table[VERSION_COLUMN].to_pylist()))
    except Exception:  # noqa: BLE001 - a run without a readable plan tells no versions
        return {}
    return versions


INDEX_SCHEMA = pa.schema([("image_uri", pa.string()), ("status", pa.string()), (VERSION_COLUMN, pa.string()),
                          ("scored_at", pa.timestamp("us", tz="UTC"))])


def _day_latest(history: str, day: dt.date, storage_options: Optional[dict] = None) -> pa.Table:
    """The latest row of every image scored on ``day`` (INDEX_SCHEMA), from the day's shard files."""
    fs, root = filesystem(day_output(history, day), storage_options)
    latest: dict[str, Scored] = {}
    versions: dict[str, dict] = {}
    for path in sorted(fs.glob(day_shard_glob(root))) if fs.exists(root) else []:
        try:
            table = read_shard_table(fs, path, ["image_uri", "status", "scored_at"])
        except BrokenShard as err:
            log.warning("skipped a file under the history that is not a readable shard: %s", err)
            continue
        run_dir = posixpath.dirname(path)
        if run_dir not in versions:
            versions[run_dir] = _plan_versions(fs, run_dir)
        for uri, status, at in zip(table["image_uri"].to_pylist(), table["status"].to_pylist(),
                                   table["scored_at"].to_pylist()):
            if uri not in latest or at >= latest[uri].scored_at:
                latest[uri] = Scored(status, versions[run_dir].get(uri), at)
    uris = sorted(latest)
    return pa.table({"image_uri": uris, "status": [latest[u].status for u in uris],
                     VERSION_COLUMN: [latest[u].version for u in uris],
                     "scored_at": [latest[u].scored_at for u in uris]}, schema=INDEX_SCHEMA)


def build_day_index(history: str, day: dt.date, table: Optional[pa.Table] = None,
                    storage_options: Optional[dict] = None) -> pa.Table:
    """Write ``day``'s index (``table``, or the day's latest rows read from its shards); returns it."""
    if table is None:
        table = _day_latest(history, day, storage_options)
    table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, INDEX_SCHEMA) as writer:
        writer.write_table(table)
    write_bytes_atomic(day_index_uri(history, day), sink.getvalue().to_pybytes(), storage_options)
    return table


def history_days(history: str, storage_options: Optional[dict] = None) -> list[dt.date]:
    """The days the history holds scores or an index for, oldest first."""
    days = set()
    for uri, pattern in ((history_scores(history), "date="), (join(history, INDEX_DIR), "date="),
                         (join(history, LEGACY_INDEX_DIR), "date=")):
        fs, root = filesystem(uri, storage_options)
        if not fs.exists(root):
            continue
        for path in fs.ls(root, detail=False):
            name = posixpath.basename(path.rstrip("/")).removesuffix(".parquet").removesuffix(".arrow")
            if name.startswith(pattern):
                try:
                    days.add(dt.date.fromisoformat(name[len(pattern):]))
                except ValueError:
                    continue
    return sorted(days)


def _day_index(history: str, day: dt.date, storage_options: Optional[dict] = None) -> pa.Table:
    uri = day_index_uri(history, day)
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        try:
            with fs.open(path, "rb") as handle:
                table = pa.ipc.open_file(pa.BufferReader(handle.read())).read_all().select(INDEX_SCHEMA.names)
            wrong = [f"{f.name} ({f.type})" for f in table.schema if f.type != INDEX_SCHEMA.field(f.name).type]
            if not wrong:
                return table
            log.warning("the index of %s has columns of the wrong type (%s) and is built again", day.isoformat(),
                        ", ".join(wrong))
        except Exception as err:  # noqa: BLE001 - truncated, foreign or of another schema: built again
            log.warning("the index of %s is unreadable and is built again: %s: %s", day.isoformat(),
                        type(err).__name__, " ".join(str(err).split())[:200])
    return build_day_index(history, day, storage_options=storage_options)


def scored_images_for(history: str, uris, days: Optional[list[dt.date]] = None,
                      storage_options: Optional[dict] = None) -> dict[str, Scored]:
    """image_uri -> its latest row, for the images ``uris`` only, over ``days`` (None: every day).

    Reads one day's index at a time and keeps only the rows of ``uris``.
    """
    wanted = pa.array(sorted(set(uris)), pa.string())
    latest: dict[str, Scored] = {}
    for day in history_days(history, storage_options) if days is None else days:
        index = _day_index(history, day, storage_options)
        hits = index.filter(pc.is_in(index["image_uri"], value_set=wanted))
        for uri, status, version, at in zip(*(hits[name].to_pylist() for name in INDEX_SCHEMA.names)):
            if uri not in latest or at >= latest[uri].scored_at:
                latest[uri] = Scored(status, version, at)
    return latest


@dataclass
class ToScore:
    """A day's images to score, and why: never scored, last scored with an error, or changed since."""

    images: pa.Table
    new: int = 0
    errors: int = 0
    changed: int = 0

    def describe(self) -> str:
        parts = [f"{self.new} new"]
        if self.errors:
            parts.append(f"{self.errors} error rows re-scored")
        if self.changed:
            parts.append(f"{self.changed} changed files re-scored")
        return ", ".join(parts)


def images_to_score(listed: pa.Table, scored: dict[str, Scored], rescore_errors: bool = True) -> ToScore:
    """The rows of ``listed`` (image_uri, optional source_version) that need scoring."""
    versions = listed[VERSION_COLUMN].to_pylist() if VERSION_COLUMN in listed.column_names else [None] * len(listed)
    keep, counts = [], {"new": 0, "errors": 0, "changed": 0}
    for uri, version in zip(listed["image_uri"].to_pylist(), versions):
        known = scored.get(uri)
        reason = None
        if known is None:
            reason = "new"
        elif known.version is not None and version is not None and known.version != version:
            reason = "changed"
        elif rescore_errors and known.status != STATUS_OK:
            reason = "errors"
        keep.append(reason is not None)
        if reason:
            counts[reason] += 1
    return ToScore(listed.filter(pa.array(keep, pa.bool_())), **counts)


def drop_superseded(history: str, day: dt.date, storage_options: Optional[dict] = None) -> int:
    """Keep only each image's latest row among a day's shard files; returns the rows removed."""
    fs, root = filesystem(day_output(history, day), storage_options)
    if not fs.exists(root):
        return 0
    tables = {}
    for path in sorted(fs.glob(day_shard_glob(root))):
        try:
            tables[path] = read_shard_table(fs, path)
        except BrokenShard as err:
            log.warning("skipped a file under the history that is not a readable shard: %s", err)
    latest: dict[str, tuple] = {}
    for path, table in tables.items():
        for i, (uri, at) in enumerate(zip(table["image_uri"].to_pylist(), table["scored_at"].to_pylist())):
            if uri not in latest or at > latest[uri][0]:
                latest[uri] = (at, path, i)
    removed = 0
    for path, table in tables.items():
        keep = [latest[uri][1:] == (path, i) for i, uri in enumerate(table["image_uri"].to_pylist())]
        if all(keep):
            continue
        removed += keep.count(False)
        uri = as_uri(fs, path, history)
        kept = table.filter(pa.array(keep, pa.bool_()))
        if kept.num_rows:
            write_bytes_atomic(uri, table_to_parquet_bytes(kept), storage_options)
        else:
            delete(uri, storage_options)
    if removed:
        log.info("%s: dropped %d rows superseded by newer scores of the same images", day.isoformat(), removed)
    return removed


def lock_started(holder: dict) -> Optional[float]:
    """A lock record's start (seconds since the epoch), or None when it is missing, not a number, not finite,
    or later than tomorrow (a damaged record: the lock then counts as abandoned)."""
    value = holder.get("started")
    if isinstance(value, bool):
        return None
    try:
        started = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(started) or not 0 <= started <= time.time() + 86400:
        return None
    return started


@dataclass
class AuditLock:
    """The lock of one audit of a history and day (see the module doc); a context manager."""

    uri: str
    storage_options: Optional[dict] = None
    stale_after: float = DEFAULT_STALE_AFTER
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "token": self.token}).encode()

    def holder(self) -> Optional[dict]:
        """The lock's record, or None if there is none (or it cannot be read)."""
        try:
            record = json.loads(read_bytes(self.uri, self.storage_options))
        except Exception:  # noqa: BLE001 - gone or unreadable
            return None
        return record if isinstance(record, dict) else None

    def _is_stale(self, holder: dict) -> bool:
        """Whether the lock is abandoned: too old, its process gone, or a start time that cannot be read."""
        started = lock_started(holder)
        if started is None or time.time() - started > self.stale_after:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, TypeError, OverflowError):
                return False
        return False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; LockedError while a live audit holds it."""
        for _ in range(3):
            if create_exclusive(self.uri, self._record(), self.storage_options):
                return
            holder = self.holder()
            if holder is not None and not self._is_stale(holder):
                started = dt.datetime.fromtimestamp(lock_started(holder), dt.timezone.utc)
                raise LockedError(f"another audit of this day is running (pid {holder.get('pid')!r} on "
                                  f"{holder.get('host')!r} since {started:%Y-%m-%d %H:%M:%S} UTC); it holds "
                                  f"{self.uri}, which can be removed if that audit is gone")
            log.warning("taking over a stale audit lock %s (%s)", self.uri, holder)
            delete(self.uri, self.storage_options)
        raise LockedError(f"cannot take the audit lock {self.uri}: other audits keep taking it")

    def release(self) -> None:
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:
            delete(self.uri, self.storage_options)

    def __enter__(self) -> "AuditLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
