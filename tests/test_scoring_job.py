"""The scoring job end to end on a local Ray (2 CPUs): local files and S3."""

from __future__ import annotations

import json

import duckdb
import fsspec
import numpy as np
import pyarrow.parquet as pq
from pycocotools import mask as coco

from headclip import results
from headclip.storage.layout import run_uri
from headclip.scoring.scorer import ScoringOptions

from .scoring_helpers import job, reference_scores, run_job, write_images


def _check_rows(frame, checkpoint, blobs, expected_ids):
    assert len(frame) == len(expected_ids)
    assert sorted(frame["image_id"]) == sorted(expected_ids)
    assert (frame["status"] == "ok").all(), frame["error"].dropna().tolist()
    joint, global_ = reference_scores(checkpoint, blobs)
    np.testing.assert_allclose(frame["score"].to_numpy(), joint, rtol=0, atol=2e-5)
    np.testing.assert_allclose(frame["global_score"].to_numpy(), global_, rtol=0, atol=2e-5)
    assert (frame["is_anomalous"] == (frame["score"] > frame["threshold"])).all()
    for _, row in frame.iterrows():
        rle = {"size": list(row["mask_rle"]["size"]), "counts": row["mask_rle"]["counts"].encode()}
        decoded = coco.decode(rle)
        assert decoded.shape == (row["height"], row["width"])
        assert int(decoded.sum()) == row["mask_area"]
        heat = results.heatmap(row)
        assert max(heat.shape) == min(64, max(row["width"], row["height"]))
        assert 0.0 <= heat.min() <= heat.max() <= 1.0
        assert abs(float(heat.max()) - row["pixel_max"]) < 0.06


def test_local_folder_end_to_end(ray_cluster, tiny_checkpoint, tmp_path):
    paths = write_images(tmp_path / "images" / "line-1", 9) + write_images(tmp_path / "images" / "line-2", 4, 100)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint)
    plan, summary = run_job(config)
    assert summary.images == 13 and summary.shards == 3 and summary.errors == 0
    run_dir = run_uri(config.output, plan.run_id)
    frame = results.read_run(run_dir)
    ids = [str(p.relative_to(tmp_path / "images")) for p in paths]
    blobs = [open(tmp_path / "images" / i, "rb").read() for i in sorted(ids)]
    _check_rows(frame, tiny_checkpoint, blobs, ids)
    assert set(frame["run_id"]) == {plan.run_id}
    assert set(frame["checkpoint_id"]) == {plan.checkpoint_id}
    # zstd and the run's config in the key-value metadata
    shard = results.shard_files(run_dir)[0]
    parquet = pq.ParquetFile(shard)
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    metadata = parquet.schema_arrow.metadata
    assert metadata[b"headclip.checkpoint_id"].decode() == plan.checkpoint_id
    assert json.loads(metadata[b"headclip.run_config"])["shard_size"] == 5
    # the plan was written next to the output
    plan_doc = json.loads((tmp_path / "out" / f"run_id={plan.run_id}" / "_plan" / "plan.json").read_text())
    assert plan_doc["num_shards"] == 3 and plan_doc["listing_hash"] == plan.listing_hash


def test_duckdb_reads_output_with_hive_partitioning(ray_cluster, tiny_checkpoint, tmp_path):
    write_images(tmp_path / "images", 6)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint)
    plan, _ = run_job(config)
    run_job(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, limit=4))
    rows = duckdb.sql(
        f"SELECT run_id, count(*) AS n, count(DISTINCT image_id) AS ids "
        f"FROM read_parquet('{tmp_path}/out/*/*.parquet', hive_partitioning = true) GROUP BY run_id ORDER BY n"
    ).fetchall()
    assert [r[1] for r in rows] == [4, 6] and [r[2] for r in rows] == [4, 6]
    assert plan.run_id in {r[0] for r in rows}


def test_manifest_with_extra_columns(ray_cluster, tiny_checkpoint, tmp_path):
    paths = write_images(tmp_path / "images", 5)
    manifest = tmp_path / "manifest.csv"
    lines = ["image_uri,image_id,station,lot"] + [f"images/{p.name},part-{i},{'A' if i % 2 else 'B'},{100 + i}"
                                                 for i, p in enumerate(paths)]
    manifest.write_text("\n".join(lines) + "\n")
    plan, summary = run_job(job(str(manifest), str(tmp_path / "out"), tiny_checkpoint))
    frame = results.read_run(run_uri(str(tmp_path / "out"), plan.run_id))
    assert sorted(frame["image_id"]) == [f"part-{i}" for i in range(5)]
    assert set(frame["station"]) == {"A", "B"}
    assert frame.sort_values("image_id")["lot"].tolist() == [100, 101, 102, 103, 104]


def test_s3_input_and_output(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path):
    bucket, options = s3_bucket
    paths = write_images(tmp_path / "images", 7)
    blobs = []
    for path in paths:
        data = path.read_bytes()
        blobs.append(data)
        with fsspec.open(f"{bucket}/archive/day-1/{path.name}", "wb", **options) as handle:
            handle.write(data)
    fs = fsspec.filesystem("s3", **options)
    fs.put(tiny_checkpoint, f"{bucket[5:]}/models/tiny.safetensors")
    config = job(f"{bucket}/archive/", f"{bucket}/scores", f"{bucket}/models/tiny.safetensors",
                 storage_options=options)
    plan, summary = run_job(config)
    assert summary.images == 7 and summary.errors == 0
    frame = results.read_run(run_uri(config.output, plan.run_id), storage_options=options)
    assert frame["image_uri"].str.startswith(f"{bucket}/archive/day-1/").all()
    _check_rows(frame, tiny_checkpoint, blobs, [f"day-1/{p.name}" for p in paths])
    assert len(results.shard_files(run_uri(config.output, plan.run_id), options)) == 2


def test_finished_run_is_skipped_on_rerun(ray_cluster, tiny_checkpoint, tmp_path):
    write_images(tmp_path / "images", 6)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint)
    plan, first = run_job(config)
    shard_paths = sorted((tmp_path / "out" / f"run_id={plan.run_id}").glob("shard-*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in shard_paths]
    plan2, second = run_job(config)
    assert plan2.run_id == plan.run_id and plan2.resumed
    assert second.shards_skipped == 2 and second.shards_scored == 0
    assert second.images == 6 and second.anomalous == first.anomalous
    assert [p.stat().st_mtime_ns for p in shard_paths] == stamps
    # a new image changes the listing, and with it the default run id
    write_images(tmp_path / "images", 1, start=50)
    plan3, third = run_job(config)
    assert plan3.run_id != plan.run_id and third.images == 7 and third.shards_skipped == 0
    # an explicit run id keeps to its stored plan
    plan4, fourth = run_job(job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint,
                                run_id=plan.run_id))
    assert plan4.images.num_rows == 6 and fourth.shards_skipped == 2


def test_thresholds_shape_rows(ray_cluster, tiny_checkpoint, tmp_path):
    write_images(tmp_path / "images", 4)
    low = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint,
              scoring=ScoringOptions(threshold=0.0, mask_threshold=0.0, batch_size=3))
    plan, summary = run_job(low)
    frame = results.read_run(run_uri(low.output, plan.run_id))
    assert frame["is_anomalous"].all() and summary.anomalous == 4
    assert (frame["mask_area"] == frame["width"] * frame["height"]).all()
    high = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint,
               scoring=ScoringOptions(threshold=1.0, mask_threshold=1.0, batch_size=3))
    plan_high, _ = run_job(high)
    assert plan_high.run_id != plan.run_id
    frame = results.read_run(run_uri(high.output, plan_high.run_id))
    assert not frame["is_anomalous"].any() and (frame["mask_area"] == 0).all() and frame["bbox"].isna().all()
