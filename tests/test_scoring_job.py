"""The scoring job end to end on a local Ray (2 CPUs): local files and S3."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.nn.functional as F
from pycocotools import mask as coco

import headclip
from headclip import results
from headclip.data.decode import decode_image
from headclip.storage.layout import run_uri
from headclip.scoring.scorer import ScoringOptions

from .scoring_helpers import job, reference_scores, run_job, write_images

REPO = Path(__file__).resolve().parents[1]


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
    assert plan4.num_images == 6 and fourth.shards_skipped == 2


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


def _readme_type(text: str) -> pa.DataType:
    """A type as the schema table (docs/output-schema.md) writes it, e.g. ``struct<x0, y0, x1, y1: int32>``."""
    text = text.strip()
    simple = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(),
              "bool": pa.bool_(), "binary": pa.binary()}
    if text in simple:
        return simple[text]
    stamp = re.fullmatch(r"timestamp\[(\w+), (\w+)\]", text)
    if stamp:
        return pa.timestamp(stamp.group(1), tz=stamp.group(2))
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(_readme_type(text[5:-1]))
    if text.startswith("struct<") and text.endswith(">"):
        parts, depth, start, body = [], 0, 0, text[7:-1]
        for i, char in enumerate(body + ","):
            depth += {"<": 1, ">": -1}.get(char, 0)
            if char == "," and depth == 0:
                parts.append(body[start:i].strip())
                start = i + 1
        fields, untyped = [], []
        for part in parts:  # "a, b: int32" gives both names the type; "int32 not null": fields never null
            name, _, kind = part.partition(":")
            untyped.append(name.strip())
            if kind:
                required = kind.strip().endswith(" not null")
                kind = kind.strip().removesuffix(" not null")
                fields += [pa.field(n, _readme_type(kind), nullable=not required) for n in untyped]
                untyped = []
        assert not untyped, text
        return pa.struct(fields)
    raise AssertionError(f"schema table type not understood: {text!r}")


def _readme_schema() -> tuple[list[tuple[str, pa.DataType]], set[str]]:
    """(column, type) rows of the documented output schema table (docs/output-schema.md), and the
    columns it says are never null."""
    text = (REPO / "docs" / "output-schema.md").read_text()
    section = text.split("# Output schema (a contract)")[1].split("\nReading results back")[0]
    columns = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            type_cell = cells[1].strip("`")
            columns += [(name, _readme_type(type_cell)) for name in re.findall(r"`([^`]+)`", cells[0])]
    never_null = re.search(r"Never null: (.*?)\.\s", section, re.S)
    assert columns and never_null, "docs/output-schema.md's schema table or its 'Never null' line is missing"
    return columns, set(re.findall(r"`([^`]+)`", never_null.group(1)))


def _plain_bbox(mask: np.ndarray, width: int, height: int):
    """Box of a mask of another size in image pixels (x1, y1 exclusive), by a plain loop."""
    xs = [x for y in range(mask.shape[0]) for x in range(mask.shape[1]) if mask[y, x]]
    ys = [y for y in range(mask.shape[0]) for x in range(mask.shape[1]) if mask[y, x]]
    if not xs:
        return None
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    return {"x0": math.floor(min(xs) * sx), "y0": math.floor(min(ys) * sy),
            "x1": math.ceil((max(xs) + 1) * sx), "y1": math.ceil((max(ys) + 1) * sy)}


def test_rows_follow_readme_schema_and_masks_are_thresholded_maps(ray_cluster, tiny_checkpoint, tmp_path):
    """End to end, at a mask threshold in between (0.62, image threshold 0.5) and with masks of
    the larger images scaled (--mask-max-side 60):

    * ``mask_rle`` is ``resize(map, mask size) > 0.62`` of the in-process model's map, and
      ``mask_area`` its pixel count; pixels within 1e-4 of the threshold may differ (batched
      against single-image forward, 2e-5). Catches the image threshold used for masks, a
      threshold on the 8-bit heat map (one bin off), thresholding before resizing, and
      width and height swapped.
    * ``bbox`` is the box of the decoded mask in image pixels (plain loop). Catches swapped or
      inclusive coordinates and boxes left in mask pixels.
    * The Parquet schema (order, types, nullability) is docs/output-schema.md's table, parsed here,
      and the data honour it: nulls only where the page allows them, ``scored_at`` in UTC.
    """
    paths = write_images(tmp_path / "images", 8)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    threshold = 0.62
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, shard_size=4,
                 scoring=ScoringOptions(mask_threshold=threshold, mask_max_side=60, batch_size=3, io_threads=4))
    started = datetime.now(timezone.utc)
    plan, summary = run_job(config)
    finished = datetime.now(timezone.utc)
    run_dir = run_uri(config.output, plan.run_id)
    frame = results.read_run(run_dir).set_index("image_id")
    assert len(frame) == 9 and summary.errors == 1 and frame.loc["broken.png", "status"] == "error"

    model = headclip.create_model(checkpoint=tiny_checkpoint)
    partial, scaled, empty = 0, 0, 0
    for path in paths:
        row = frame.loc[path.name]
        image = decode_image(path.read_bytes())
        assert (row["width"], row["height"]) == image.size
        anomaly_map = model.score(headclip.preprocess([image], model.image_size)).anomaly_map[0]
        long_side = max(image.size)
        if long_side > 60:
            size = (round(image.height * 60 / long_side), round(image.width * 60 / long_side))
            scaled += 1
        else:
            size = (image.height, image.width)
        resized = F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        expected = (resized > threshold).numpy()
        mask = results.mask(row)
        assert mask.shape == size, path.name
        clear = (resized - threshold).abs().numpy() > 1e-4
        assert np.array_equal(mask[clear], expected[clear]), (path.name, int((mask != expected)[clear].sum()))
        assert clear.mean() > 0.95
        assert row["mask_area"] == int(mask.sum())
        assert row["pixel_max"] == pytest.approx(float(resized.max()), abs=2e-5)
        box = _plain_bbox(mask, row["width"], row["height"])
        assert row["bbox"] == box, path.name
        partial += 0 < mask.sum() < mask.size
        empty += box is None
    assert partial >= 3 and scaled >= 2 and empty >= 1  # the threshold is in between, some masks scaled

    columns, never_null = _readme_schema()
    for shard in results.shard_files(run_dir):
        schema = pq.read_schema(shard)
        assert [(f.name, f.type) for f in schema] == columns
        assert {f.name for f in schema if not f.nullable} == never_null
    assert not frame.reset_index()[sorted(never_null)].isna().any().any()
    ok = frame[frame["status"] == "ok"]
    assert ok["error"].isna().all() and ok["score"].notna().all() and ok["mask_rle"].notna().all()
    assert (ok["bbox"].isna() == (ok["mask_area"] == 0)).all()
    assert frame.loc["broken.png", ["score", "global_score", "pixel_max", "is_anomalous", "mask_rle", "mask_area",
                                    "bbox", "anomaly_map"]].isna().all()
    assert str(frame["scored_at"].dt.tz) == "UTC"
    assert ((frame["scored_at"] >= started) & (frame["scored_at"] <= finished)).all()
