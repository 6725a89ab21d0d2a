"""The nightly audit under hostile conditions: missing days, concurrent audits, repaired and replaced
files, foreign and broken files under the history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import audit as audit_job
from jobs.cli import UsageError

from .scoring_helpers import write_images

REPO = Path(__file__).resolve().parents[1]
DAY = "2026-11-23"


def _args(prefix: str, history: Path, checkpoint: str, day: str = DAY, *extra) -> list[str]:
    return ["--date", day, "--prefix-template", prefix, "--history", str(history), "--checkpoint", checkpoint,
            "--shard-size", "4", "--batch-size", "4", "--alert-error-rate", "1", *extra]


def _summary(history: Path, day: str = DAY) -> dict:
    return json.loads((history / "_reports" / f"date={day}" / "summary.json").read_text())


def _day_rows(history: Path, day: str = DAY):
    return duckdb.sql(f"SELECT image_uri, status, error, score, width, height FROM "
                      f"read_parquet('{history}/scores/date={day}/*/shard-*.parquet') ORDER BY image_uri").df()


# -- 8. a day whose input does not exist -----------------------------------------------------------


def test_a_missing_day_is_an_error_unless_an_empty_day_is_expected(tiny_checkpoint, tmp_path):
    archive, history = tmp_path / "archive", tmp_path / "history"
    (archive / f"date={DAY}").mkdir(parents=True)
    prefix = f"{archive}/date={{date}}/"
    with pytest.raises(UsageError, match="the day's input .*date=2026-11-24 does not exist .*--allow-missing-day"):
        audit_job.main(_args(prefix, history, tiny_checkpoint, "2026-11-24"))
    assert not (history / "_reports" / "date=2026-11-24").exists()
    # a typo in the template is the same error
    with pytest.raises(UsageError, match="does not exist"):
        audit_job.main(_args(f"{archive}/dat={{date}}/", history, tiny_checkpoint))
    assert audit_job.main(_args(prefix, history, tiny_checkpoint, "2026-11-24", "--allow-missing-day")) == 0
    assert "does not exist (--allow-missing-day)" in _summary(history, "2026-11-24")["note"]
    # a day whose prefix exists but is empty is reported as such
    assert audit_job.main(_args(prefix, history, tiny_checkpoint)) == 0
    summary = _summary(history)
    assert summary["new_images"] == 0 and "exists but holds no images" in summary["note"]


def test_a_missing_bucket_is_an_error(tiny_checkpoint, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    with pytest.raises(UsageError, match="does not exist"):
        audit_job.main(_args("s3://hostile-no-such-bucket/date={date}/", tmp_path / "history", tiny_checkpoint,
                             DAY, "--storage-options", json.dumps(options)))


def test_the_audit_lock_is_exclusive_on_s3(s3_bucket):
    """Two audits of one day on S3: the lock is a conditional PUT, so only one can create it."""
    from headclip.errors import LockedError
    from headclip.storage.history import AuditLock

    bucket, options = s3_bucket
    uri = f"{bucket}/history/_locks/date={DAY}.lock"
    first, second = AuditLock(uri, options), AuditLock(uri, options)
    first.acquire()
    with pytest.raises(LockedError, match="another audit of this day is running"):
        second.acquire()
    second.release()  # not its lock: nothing happens
    assert first.holder()["token"] == first.token
    first.release()
    assert first.holder() is None
    with second:
        assert second.holder()["token"] == second.token
    assert second.holder() is None


# -- 7. one audit of a history and day at a time -------------------------------------------------


def test_a_live_lock_refuses_a_second_audit_and_a_stale_one_is_taken_over(tiny_checkpoint, tmp_path):
    import socket

    from headclip.errors import LockedError

    archive, history = tmp_path / "archive", tmp_path / "history"
    write_images(archive / f"date={DAY}", 2)
    lock = history / "_locks" / f"date={DAY}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                "token": "other"}))
    with pytest.raises(LockedError, match=f"another audit of this day is running \\(pid {os.getpid()}"):
        audit_job.main(_args(f"{archive}/date={{date}}/", history, tiny_checkpoint))
    assert not (history / "scores").exists() and lock.exists()
    # the same lock from a process that is gone is stale: the audit takes it over, and releases it
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": time.time(),
                                "token": "other"}))
    (archive / "empty").mkdir()
    assert audit_job.main(["--date", DAY, "--input", str(archive / "empty"), "--history", str(history),
                           "--checkpoint", tiny_checkpoint]) == 0
    assert not lock.exists()


def test_two_audits_of_one_day_do_not_both_write(ray_cluster, tiny_checkpoint, tmp_path):
    from headclip.errors import LockedError

    archive, history = tmp_path / "archive", tmp_path / "history"
    write_images(archive / "day", 8)
    lock = history / "_locks" / f"date={DAY}.lock"
    base = ["--date", DAY, "--history", str(history), "--checkpoint", tiny_checkpoint, "--shard-size", "4",
            "--batch-size", "4"]
    other = subprocess.Popen([sys.executable, "-m", "jobs.audit", "--input", str(archive / "day"), *base,
                              "--ray-address", ray_cluster], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not lock.exists() and other.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # the same day, the input spelled with a trailing '/', while the other audit runs
        with pytest.raises(LockedError, match="another audit of this day is running"):
            audit_job.main(["--input", str(archive / "day") + "/", *base])
        _, stderr = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, stderr[-3000:]
    assert len(_day_rows(history)) == 8
    # run again afterwards (as 'dir/'): nothing new, no rows added
    assert audit_job.main(["--input", str(archive / "day") + "/", *base]) == 0
    assert len(_day_rows(history)) == 8 and _summary(history)["new_images"] == 0
    assert not lock.exists()


# -- 9, 10, 16. repaired, replaced, foreign and broken files ---------------------------------------


def test_repaired_and_replaced_files_are_scored_again_and_foreign_files_skipped(ray_cluster, tiny_checkpoint,
                                                                                  tmp_path, caplog):
    import io

    archive, history = tmp_path / "archive", tmp_path / "history"
    day = archive / f"date={DAY}"
    paths = write_images(day, 4)
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (100, 120, 140)).save(buffer, format="PNG")
    good = buffer.getvalue()
    corrupt = good[:40] + b"\0" * (len(good) - 60) + good[-20:]  # same size, data zeroed
    target = day / "repaired.png"
    target.write_bytes(corrupt)
    stamp = target.stat().st_mtime_ns
    prefix = f"{archive}/date={{date}}/"
    assert audit_job.main(_args(prefix, history, tiny_checkpoint)) == 0
    rows = _day_rows(history)
    assert len(rows) == 5 and (rows["status"] == "error").sum() == 1

    # files that are not shards of this history: a foreign Parquet file and a truncated one
    foreign = history / "scores" / f"date={DAY}" / "run_id=foreign" / "shard-00000.parquet"
    foreign.parent.mkdir(parents=True)
    pq.write_table(pa.table({"something": [1, 2, 3]}), foreign)
    broken = history / "scores" / f"date={DAY}" / "run_id=broken" / "shard-00000.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(next((history / "scores" / f"date={DAY}").glob("run_id=[0-9a-f]*/shard-00000.parquet"))
                       .read_bytes()[:300])
    # without re-scoring errors, the error row stays
    assert audit_job.main(_args(prefix, history, tiny_checkpoint, DAY, "--no-rescore-errors")) == 0
    assert _summary(history)["new_images"] == 0 and _summary(history)["figures"]["errors"] == 1
    assert "not a readable shard" in caplog.text

    # the file is repaired in place (same size and modification time, so only its error row says so):
    # by default the error row is scored again, and only the new row stays
    target.write_bytes(good)
    os.utime(target, ns=(stamp, stamp))
    assert audit_job.main(_args(prefix, history, tiny_checkpoint)) == 0
    foreign.unlink()
    broken.unlink()
    rows = _day_rows(history)
    assert len(rows) == 5 and rows["image_uri"].is_unique and (rows["status"] == "ok").all()
    repaired = rows[rows["image_uri"] == str(target)].iloc[0]
    assert (repaired["width"], repaired["height"]) == (30, 20)
    assert _summary(history)["new_images"] == 1 and "1 error rows re-scored" in _summary(history)["note"]

    # a file replaced under the same name is scored again
    Image.new("RGB", (44, 36), (200, 30, 30)).save(paths[2])
    assert audit_job.main(_args(prefix, history, tiny_checkpoint)) == 0
    rows = _day_rows(history)
    assert len(rows) == 5 and rows["image_uri"].is_unique
    replaced = rows[rows["image_uri"] == str(paths[2])].iloc[0]
    assert (replaced["width"], replaced["height"]) == (44, 36)
    assert "1 changed files re-scored" in _summary(history)["note"]
    # an unchanged day adds nothing
    assert audit_job.main(_args(prefix, history, tiny_checkpoint)) == 0
    assert _summary(history)["new_images"] == 0 and len(_day_rows(history)) == 5
