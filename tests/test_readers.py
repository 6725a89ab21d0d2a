"""The output as the usual tools read it: pandas, pyarrow.dataset, DuckDB, Polars and Ray Data.

Each reader gets the natural call on three locations (an output root holding two
runs, one run directory, an audit history's scores) and must return the rows the
library's own readers return (results.read_run, reporting.audit.read_day).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest

from headclip import results
from headclip.reporting import audit as audit_lib
from headclip.storage.layout import run_uri
from jobs import audit as audit_job
from jobs import demo as demo_job
from jobs import report as report_job
from tests.scoring_helpers import write_images

COMPARED = ["image_id", "image_uri", "shard", "status", "score", "global_score", "is_anomalous", "mask_area",
            "anomaly_map", "checkpoint_id", "scored_at"]
DAYS = ["2026-11-21", "2026-11-22"]


@pytest.fixture(scope="module")
def outputs(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """(output root with two runs, their run ids, audit history), written by the jobs.

    The audit history's first day is scored twice (images arrive after the first
    audit), so that day's folder is an output root holding two runs.
    """
    root = tmp_path_factory.mktemp("readers")
    history = root / "history"

    def audit(day: str) -> None:
        code = audit_job.main(["--date", day, "--prefix-template", f"{root}/archive/date={{date}}/",
                               "--history", str(history), "--checkpoint", tiny_checkpoint, "--shard-size", "2"])
        assert code == 0

    write_images(root / "archive" / f"date={DAYS[0]}", 4)
    audit(DAYS[0])
    write_images(root / "archive" / f"date={DAYS[0]}", 3, start=20)
    audit(DAYS[0])
    write_images(root / "archive" / f"date={DAYS[1]}", 3, start=10)
    audit(DAYS[1])
    out = history / "scores" / f"date={DAYS[0]}"
    runs = sorted(out.glob("run_id=*"), key=lambda run: len(results.read_run(str(run))), reverse=True)
    run_ids = [run.name[len("run_id="):] for run in runs]  # the first run (4 images, 2 shards) first
    # the run report (jobs.report's default, RUN/_report.html) and a report at the root, as the demo writes one
    assert report_job.main(["--run", run_uri(str(out), run_ids[0])]) == 0
    assert report_job.main(["--run", run_uri(str(out), run_ids[0]), "--output", str(out / "_report.html")]) == 0
    return out, run_ids, history


def _pandas(path: Path, glob: str) -> pd.DataFrame:
    return pd.read_parquet(path)


def _pyarrow(path: Path, glob: str) -> pd.DataFrame:
    return ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pandas()


def _duckdb(path: Path, glob: str) -> pd.DataFrame:
    relation = duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    return pd.DataFrame(relation.fetchall(), columns=relation.columns)  # TIMESTAMPTZ into Python: pytz


def _polars(path: Path, glob: str) -> pd.DataFrame:
    return pl.read_parquet(glob, hive_partitioning=True).to_pandas()


def _ray_data(path: Path, glob: str) -> pd.DataFrame:
    import ray

    return ray.data.read_parquet(str(path)).to_pandas()


READERS = {"pandas": _pandas, "pyarrow.dataset": _pyarrow, "duckdb": _duckdb, "polars": _polars,
           "ray.data": _ray_data}


def _normalised(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The compared columns in comparable types, sorted; partition keys as strings."""
    out = pd.DataFrame({
        "image_id": frame["image_id"].astype(str), "image_uri": frame["image_uri"].astype(str),
        "shard": frame["shard"].astype(int), "status": frame["status"].astype(str),
        "score": frame["score"].astype(float), "global_score": frame["global_score"].astype(float),
        "is_anomalous": frame["is_anomalous"].astype(object), "mask_area": frame["mask_area"].astype(float),
        "anomaly_map": [None if v is None else bytes(v) for v in frame["anomaly_map"]],
        "checkpoint_id": frame["checkpoint_id"].astype(str),
        "scored_at": pd.to_datetime(frame["scored_at"], utc=True).astype("datetime64[us, UTC]"),
    })
    for key in keys:
        out[key] = [str(v)[:10] if key == "date" else str(v) for v in frame[key]]
    return out.sort_values(keys + ["image_uri"]).reset_index(drop=True)


def _check_same_rows(expected: pd.DataFrame, path: Path, glob: str, partitions: list[str]) -> None:
    want = _normalised(expected, partitions)
    for name, reader in READERS.items():
        frame = reader(path, glob)
        # a reader pointed at one run directory knows the run from the path only if it parses it
        keys = [k for k in partitions if k in frame.columns]
        assert set(partitions) - set(keys) <= {"run_id"}, (name, frame.columns)
        got = _normalised(frame, keys)
        pd.testing.assert_frame_equal(got, want[got.columns.tolist()].sort_values(keys + ["image_uri"])
                                      .reset_index(drop=True), check_exact=True, obj=name)


def test_every_reader_reads_an_output_root(outputs):
    out, run_ids, _ = outputs
    expected = pd.concat([results.read_run(run_uri(str(out), r)) for r in run_ids], ignore_index=True)
    assert len(expected) == 7 and len(run_ids) == 2 and sorted(set(expected["run_id"])) == sorted(run_ids)
    _check_same_rows(expected, out, f"{out}/*/*.parquet", ["run_id"])


def test_every_reader_reads_one_run(outputs):
    out, run_ids, _ = outputs
    run = Path(run_uri(str(out), run_ids[0]))
    assert (run / "_report.html").exists() and (run / "_summary.json").exists() and (run / "_plan").is_dir()
    expected = results.read_run(str(run))
    assert len(expected) == 4 and set(expected["run_id"]) == {run_ids[0]}
    _check_same_rows(expected, run, f"{run}/*.parquet", ["run_id"])


def test_every_reader_reads_an_audit_history(outputs):
    _, _, history = outputs
    expected = pd.concat([audit_lib.read_day(str(history), dt.date.fromisoformat(d)) for d in DAYS],
                         ignore_index=True)
    assert len(expected) == 10 and sorted(set(expected["date"])) == DAYS and expected["run_id"].nunique() == 3
    assert expected["run_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    _check_same_rows(expected, history / "scores", f"{history}/scores/*/*/*.parquet", ["date", "run_id"])


def test_every_reader_reads_an_audit_history_root(outputs):
    """The history root itself reads like an output root: reports, locks and day indexes sit in
    ``_`` folders, and the indexes are not ``.parquet`` files, so ``HISTORY/**/*.parquet`` finds shards only."""
    _, _, history = outputs
    assert (history / "_reports").is_dir() and (history / "_index").is_dir()
    assert all(p.relative_to(history).parts[0] == "scores" for p in history.glob("**/*.parquet"))
    expected = pd.concat([audit_lib.read_day(str(history), dt.date.fromisoformat(d)) for d in DAYS],
                         ignore_index=True)
    _check_same_rows(expected, history, f"{history}/**/*.parquet", ["date", "run_id"])


def test_bbox_reads_back_as_integers(tmp_path):
    """A shard with a box and an empty mask's null box: every reader gives the box as integers."""
    from headclip.storage.schema import result_schema, rows_to_table, table_to_parquet_bytes

    base = {"image_uri": "u", "shard": 0, "status": "ok", "threshold": 0.5, "mask_threshold": 0.5,
            "checkpoint_id": "c", "scored_at": dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)}
    rows = [{**base, "image_id": "a", "bbox": {"x0": 1, "y0": 2, "x1": 30, "y1": 40}}, {**base, "image_id": "b"}]
    path = tmp_path / "shard-00000.parquet"
    path.write_bytes(table_to_parquet_bytes(rows_to_table(rows, result_schema())))
    boxes = {
        "pandas": pd.read_parquet(path)["bbox"].tolist(),
        "duckdb": duckdb.sql(f"SELECT bbox FROM read_parquet('{path}') ORDER BY image_id").df()["bbox"].tolist(),
        "polars": pl.read_parquet(path)["bbox"].to_list(),
    }
    for name, (box, empty) in boxes.items():
        assert box == {"x0": 1, "y0": 2, "x1": 30, "y1": 40}, name
        assert all(type(v) is int for v in box.values()), (name, box)
        assert empty is None or pd.isna(empty), (name, empty)


def test_run_id_lives_in_the_path_and_the_file_metadata(outputs):
    import pyarrow.parquet as pq

    out, run_ids, _ = outputs
    shard = sorted(Path(run_uri(str(out), run_ids[0])).glob("shard-*.parquet"))[0]
    parquet = pq.ParquetFile(shard)
    assert "run_id" not in parquet.schema_arrow.names
    assert parquet.schema_arrow.metadata[b"headclip.run_id"].decode() == run_ids[0]


@pytest.mark.demo
def test_demo_output_reads_and_says_what_the_model_is(ray_cluster, tmp_path, capsys):
    data, out = tmp_path / "demo-data", tmp_path / "demo"
    assert demo_job.main(["--images", "8", "--size", "64", "--data", str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "toy" in printed and "--pretrained openai" in printed and "jobs.train" in printed
    assert "zero-shot against a reference bank of 16 known-good images per texture" in printed
    assert (out / "_reference.safetensors").exists() and (out / "_with-reference").is_dir()
    assert (out / "_report.html").exists() and not (out / "report.html").exists()
    frame = pd.read_parquet(out)
    assert len(frame) == 8 and frame["run_id"].nunique() == 1
    assert len(pl.read_parquet(f"{out}/*/*.parquet", hive_partitioning=True)) == 8
    plan = json.loads(next(out.glob("run_id=*/_plan/plan.json")).read_text())
    assert plan["config"]["checkpoint"] == "headclip:demo.safetensors"
    assert np.isfinite(frame["score"]).all()
