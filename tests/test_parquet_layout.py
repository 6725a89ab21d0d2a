"""The Parquet layout of scoring output: statistics where they prune, the page index, heat maps
out of scans that do not ask for them (DuckDB's EXPLAIN ANALYZE), and bytes per image."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy import ndimage

from headclip.data.datasets import load_dataset
from headclip.model.assets import DEMO_CHECKPOINT_URI
from headclip.scoring.masks import decode_heatmap, encode_rle, encode_heatmap
from headclip.scoring.scorer import ScoringOptions, ImageScorer
from headclip.scoring.stages import publish_shard
from headclip.storage.schema import result_schema, rows_to_table, table_to_parquet_bytes
from jobs.demo import generate

BLOBS = {"anomaly_map", "mask_rle.counts", "mask_rle.size.list.element", "error"}
PRUNING = {"image_id", "image_uri", "shard", "status", "score", "global_score", "pixel_max", "is_anomalous",
           "mask_area", "checkpoint_id", "scored_at"}


def _smooth_map(rng, side: int = 64) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random((side, side)), 4)
    return (field - field.min()) / (np.ptp(field) + 1e-9)


def _old_png(values: np.ndarray) -> bytes:
    """The 8-bit grayscale PNG of earlier outputs (zlib level 6)."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)).save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def test_heatmap_codec_is_lossless_at_8_bits_and_reads_older_pngs():
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (48, 64), (64, 17), (1, 1)]:
        values = rng.random(shape).astype(np.float32)
        data = encode_heatmap(np.rint(values * 255).astype(np.uint8))
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        decoded = decode_heatmap(data)
        assert decoded.shape == shape and decoded.dtype == np.float32
        assert np.array_equal(decoded * 255, np.rint(values * 255))  # every 8-bit level kept
        assert np.array_equal(decode_heatmap(_old_png(values)), decoded)  # older outputs still decode


def _rows(n: int, start: int, anomalous: bool, rng) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        heat = _smooth_map(rng)
        mask = heat > 0.7
        score = float(rng.uniform(0.6, 1.0) if anomalous and i % 2 else rng.uniform(0.0, 0.4))
        rows.append({"image_id": f"img-{i:05d}", "image_uri": f"s3://bucket/line/img-{i:05d}.png", "shard": 0,
                     "status": "ok", "width": 64, "height": 64, "score": score, "global_score": score,
                     "pixel_max": float(heat.max()), "is_anomalous": score > 0.5, "threshold": 0.5,
                     "mask_threshold": 0.5, "mask_rle": encode_rle(mask), "mask_area": int(mask.sum()),
                     "bbox": None, "anomaly_map": encode_heatmap(np.rint(heat * 255).astype(np.uint8)), "checkpoint_id": "c" * 64,
                     "scored_at": dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)})
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two 256-row shards under run_id=x/: the first without anomalous images, the second with."""
    root = tmp_path_factory.mktemp("layout")
    run = root / "run_id=x"
    run.mkdir()
    rng = np.random.default_rng(1)
    schema = result_schema(run_config={"input": "s3://bucket/line"}, checkpoint_id="c" * 64, run_id="x")
    for index, anomalous in enumerate([False, True]):
        table = rows_to_table(_rows(256, 256 * index, anomalous, rng), schema)
        (run / f"shard-{index:05d}.parquet").write_bytes(table_to_parquet_bytes(table))
    return root


def test_statistics_only_where_they_prune_and_the_page_index(shards):
    for path in sorted(shards.glob("run_id=x/shard-*.parquet")):
        metadata = pq.ParquetFile(path).metadata
        for g in range(metadata.num_row_groups):
            for c in range(metadata.num_columns):
                column = metadata.row_group(g).column(c)
                name = column.path_in_schema
                assert column.is_stats_set == (name in PRUNING), name
                assert column.has_offset_index, name  # the page index locates every page
                assert column.has_column_index == (name in PRUNING), name
                if name in ("anomaly_map", "mask_rle.counts", "image_id", "image_uri"):
                    assert "RLE_DICTIONARY" not in column.encodings, (name, column.encodings)
        assert metadata.serialized_size < 8 * 1024  # no heat-map bytes as min/max in the footer


def _explain(query: str) -> tuple[int, list[dict]]:
    """(bytes read, the table scans) of DuckDB's EXPLAIN ANALYZE of ``query``."""
    profile = json.loads(duckdb.connect().sql("EXPLAIN (ANALYZE, FORMAT json) " + query).fetchall()[0][1])
    scans = []

    def walk(node):
        if node.get("type") == "TABLE_SCAN":
            scans.append(node)
        for child in node.get("children", []):
            walk(child)

    for node in profile["operator"]:
        walk(node)
    return int(profile["io"]["total_bytes_read"]), scans


def _projections(scan: dict) -> set[str]:
    value = scan["extra_info"].get("Projections", [])
    return {value} if isinstance(value, str) else set(value)


def test_duckdb_reads_only_what_a_query_needs(shards):
    heat_bytes = 0
    for path in sorted(shards.glob("run_id=x/shard-*.parquet")):
        metadata = pq.ParquetFile(path).metadata
        heat_bytes += sum(metadata.row_group(g).column(c).total_compressed_size
                          for g in range(metadata.num_row_groups) for c in range(metadata.num_columns)
                          if metadata.row_group(g).column(c).path_in_schema == "anomaly_map")
    source = f"read_parquet('{shards}/*/*.parquet', hive_partitioning = true)"

    flagged, scans = _explain(f"SELECT image_uri, score FROM {source} WHERE is_anomalous")
    assert all("anomaly_map" not in _projections(s) for s in scans)
    assert flagged < heat_bytes / 4, (flagged, heat_bytes)
    # min/max statistics of the flag skip the shard without anomalous images
    assert sum(s["row_groups_scanned"] for s in scans) == 1
    assert sum(s["total_row_groups_to_scan"] for s in scans) == 2

    top, scans = _explain(f"SELECT image_uri, score, mask_area FROM {source} ORDER BY score DESC LIMIT 10")
    assert all("anomaly_map" not in _projections(s) for s in scans)
    assert top < heat_bytes / 4, (top, heat_bytes)

    # the same measure sees the heat maps when a query asks for them
    maps, scans = _explain(f"SELECT image_uri, anomaly_map FROM {source} ORDER BY score DESC LIMIT 10")
    assert any("anomaly_map" in _projections(s) for s in scans) and maps > heat_bytes / 2, (maps, heat_bytes)


def test_bytes_per_image_under_2kb_on_demo_images(tmp_path):
    """64 of the demo's 256 px images scored by the demo model into one shard (the demo's shard size)."""
    torch.set_num_threads(2)
    labelled = load_dataset(str(generate(tmp_path / "demo-data", 64, 256)))
    extras = [f for f in labelled.schema if f.name not in ("image_id", "image_uri")]
    shard = tmp_path / "run_id=demo" / "shard-00000.parquet"
    options = ScoringOptions(batch_size=32, io_threads=2)
    with ImageScorer("demo", DEMO_CHECKPOINT_URI, options, extra_fields=extras) as scorer:
        result = publish_shard(0, str(shard), scorer.score_table(labelled), None)
    assert result.images == 64 and result.errors == 0
    per_image = shard.stat().st_size / 64
    maps = pq.read_table(shard, columns=["anomaly_map"])["anomaly_map"].to_pylist()
    webp = np.mean([len(m) for m in maps])
    png = np.mean([len(_old_png(decode_heatmap(m))) for m in maps])
    print(f"bytes per image {per_image:.0f}; heat map {webp:.0f} bytes (as the older PNG: {png:.0f})")
    assert per_image < 2048
    assert webp < 0.9 * png
    assert decode_heatmap(maps[0]).shape == (64, 64)  # the same 64 px long side
