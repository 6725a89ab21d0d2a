"""The scoring pipeline's stages: the rows and metric state of in-process scoring, shards kept whole,
published shards left alone, and the public stages in a user's own Ray Data pipeline.

Which node runs each stage is tested on a multi-node Ray in test_cluster_scale.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from headclip import results
from headclip.data.synthetic import make_sample
from headclip.evaluation.metrics import MetricsByClass
from headclip.storage.layout import run_uri
from headclip.storage.schema import BBOX_TYPE

from .scoring_helpers import job, run_job, write_images


def _labelled_set(folder) -> pa.Table:
    """Ten labelled images (five with masks on disk), one corrupt file, one missing file."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(10):
        sample = make_sample(i, size=56 + 8 * (i % 3), defect="random" if i % 2 else None)
        Image.fromarray(sample.image).save(folder / f"{i:02d}.png")
        mask_uri = None
        if i % 2:
            mask_uri = str(folder / f"{i:02d}_mask.png")
            Image.fromarray(sample.mask.astype(np.uint8) * 255).save(mask_uri)
        rows.append({"image_id": f"{i:02d}", "image_uri": str(folder / f"{i:02d}.png"), "label": i % 2,
                     "class_name": "ab"[i % 3 == 0], "has_masks": True, "mask_uri": mask_uri})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    rows.append({"image_id": "corrupt", "image_uri": str(folder / "corrupt.png"), "label": 0, "class_name": "a",
                 "has_masks": True, "mask_uri": None})
    rows.append({"image_id": "missing", "image_uri": str(folder / "missing.png"), "label": 1, "class_name": "b",
                 "has_masks": True, "mask_uri": None})
    return pa.Table.from_pylist(rows)


FLOAT_COLUMNS = ("score", "global_score", "pixel_max")


def _in_process(checkpoint: str, images: pa.Table, shard_size: int):
    """Rows and merged metric state of the scorer run in this process, shard by shard (no Ray)."""
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    extras = [f for f in images.schema if f.name not in ("image_id", "image_uri")]
    options = ScoringOptions(batch_size=4, io_threads=4)
    metrics = MetricsByClass(options.metric_bins)
    with ImageScorer("r", checkpoint, options, extra_fields=extras) as scorer:
        tables = [scorer.score_table(images.slice(start, shard_size), start // shard_size, metrics)
                  for start in range(0, images.num_rows, shard_size)]
    return pa.concat_tables(tables).to_pandas().sort_values("image_id"), metrics


@pytest.mark.parametrize("device_decode", [False, True], ids=["decode-tasks", "decode-in-actor"])
def test_pipeline_gives_the_rows_and_metrics_of_in_process_scoring(ray_cluster, tiny_checkpoint, tmp_path,
                                                                    device_decode):
    """Every column of every row (error rows included) and the metric state equal the scorer's own, run in
    this process with no Ray, whether the decode stage runs as tasks or in the actor. Catches: rows put
    back out of order after a stage, masks or heat maps encoded from another batch's maps, error rows
    dropped between stages, padding rows published, the metric state lost on the way to the publish
    step, images resized differently in the decode stage."""
    from headclip.scoring.scorer import ScoringOptions

    images = _labelled_set(tmp_path / "images")
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, shard_size=5, cpus_per_actor=1,
                 scoring=ScoringOptions(batch_size=4, io_threads=4, device_decode=device_decode))
    plan, summary = run_job(config, images=images)
    frame = results.read_run(run_uri(config.output, plan.run_id)).sort_values("image_id")
    reference, metrics = _in_process(tiny_checkpoint, images, 5)
    assert len(frame) == 12 and frame["image_id"].is_unique and (frame["status"] == "error").sum() == 2
    for column in reference.columns:
        if column in FLOAT_COLUMNS:  # the same forward, batched alike; threads may reorder a sum by an ulp
            assert np.allclose(reference[column].astype(float), frame[column].astype(float), atol=1e-6,
                               equal_nan=True), column
        elif column not in ("scored_at", "bbox"):
            assert [repr(v) for v in reference[column]] == [repr(v) for v in frame[column]], column
    assert [_box(b) for b in reference["bbox"]] == [_box(b) for b in frame["bbox"]]
    got, want = summary.metrics.to_dict(), metrics.to_dict()
    assert sorted(got["classes"]) == sorted(want["classes"])
    for name, state in want["classes"].items():
        for key in ("pixel_pos", "pixel_neg", "n_regions", "n_pixel_images"):
            assert np.array_equal(got["classes"][name][key], state[key]), (name, key)
        assert np.allclose(got["classes"][name]["region_mass"], state["region_mass"])
        assert np.allclose(sorted(got["classes"][name]["image_scores"]), sorted(state["image_scores"]), atol=1e-6)
    assert summary.errors == 2 and summary.shards_scored == 3


def _box(value):
    return tuple(int(value[k]) for k in ("x0", "y0", "x1", "y1")) if isinstance(value, dict) else None


def test_pad_shards_fills_each_shard_to_the_shard_size():
    """A short last shard gets padding rows so that every model batch is one shard. Catches: padding
    in the wrong shard, a shard left short (the model batch would take rows of the next)."""
    from headclip.scoring.pipeline import PAD, pad_shards

    table = pa.table({"image_id": list("abcdefg"), "shard": pa.array([0, 0, 0, 1, 1, 1, 2], pa.int32())})
    padded = pad_shards(table, 3)
    assert padded.num_rows == 9
    assert padded["shard"].to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert padded[PAD].to_pylist() == [False] * 7 + [True, True]


def test_publish_refuses_part_of_a_shard_and_leaves_a_published_one_alone(ray_cluster, tmp_path):
    """The publish step writes only whole shards, and never over a file another try or driver published.
    Catches: a shard split between blocks published short (rows lost for good), a published file rewritten."""
    from headclip.errors import JobError
    from headclip.scoring.pipeline import publish_shards
    from headclip.scoring.plan import StagedPlan
    from headclip.storage.schema import result_schema

    (tmp_path / "work").mkdir()
    staged = StagedPlan(str(tmp_path / "work"), 2)
    staged.add_all([pa.table({"image_id": ["a", "b", "c"], "image_uri": ["a", "b", "c"]})])
    plan = staged.publish("r", str(tmp_path / "out"), {}, "ck")
    schema = result_schema([], {}, "ck", "r")
    part = pa.table({"image_id": ["a"], "shard": pa.array([0], pa.int32())})
    with pytest.raises(JobError, match="shard 0 reached the publish step with 1 of its 2 rows"):
        publish_shards(part, plan, schema, None, 1)
    published = tmp_path / "out" / "run_id=r" / "shard-00001.parquet"
    published.write_bytes(b"published by another driver")
    whole = pa.table({"image_id": ["c"], "shard": pa.array([1], pa.int32())})
    result = publish_shards(whole, plan, schema, None, 1).to_pylist()
    assert result[0]["skipped"] and result[0]["shard"] == 1
    assert published.read_bytes() == b"published by another driver"


def test_a_users_pipeline_of_the_public_stages_gives_the_jobs_scores(ray_cluster, tiny_checkpoint, tmp_path):
    """read_parquet of a manifest -> map_batches(HeadCLIPScorer) -> write_parquet, as docs/internals.md shows, gives
    the rows jobs.score writes for the same images (and the same again with the decode stage as tasks).
    Catches: the public stage scoring differently from the job, pickled columns (write_parquet fails on
    them), a column of the contract missing or of another type."""
    import ray

    from headclip.ray import HeadCLIPScorer, decode_images

    paths = write_images(tmp_path / "images", 9)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_uri": [str(p) for p in paths], "line": [f"l{i % 2}" for i in range(9)]}),
                   manifest)
    config = job(str(manifest), str(tmp_path / "job"), tiny_checkpoint, shard_size=4, cpus_per_actor=1)
    plan, _ = run_job(config)
    expected = results.read_run(run_uri(config.output, plan.run_id)).sort_values("image_uri").reset_index(drop=True)

    scorer = dict(fn_constructor_kwargs={"checkpoint": tiny_checkpoint, "options": {"batch_size": 4}},
                  concurrency=1, num_cpus=1, batch_size=4)
    ray.data.read_parquet(str(manifest)).map_batches(HeadCLIPScorer, **scorer).write_parquet(str(tmp_path / "own"))
    (ray.data.read_parquet(str(manifest))
     .map_batches(decode_images, fn_kwargs={"image_size": 64})
     .map_batches(HeadCLIPScorer, **scorer).write_parquet(str(tmp_path / "own-decoded")))
    for folder in ("own", "own-decoded"):
        table = pq.read_table(str(tmp_path / folder))
        own = table.to_pandas().sort_values("image_uri").reset_index(drop=True)
        assert len(own) == 9 and list(own["image_uri"]) == list(expected["image_uri"])
        for column in ("image_id", "status", "width", "height", "is_anomalous", "mask_area", "anomaly_map", "line"):
            assert [repr(v) for v in own[column]] == [repr(v) for v in expected[column]], (folder, column)
        for column in FLOAT_COLUMNS:
            assert np.allclose(own[column].astype(float), expected[column].astype(float), atol=1e-6), (folder, column)
        assert [m["counts"] for m in own["mask_rle"]] == [m["counts"] for m in expected["mask_rle"]]
        assert table.schema.field("bbox").type == BBOX_TYPE


def test_default_actors_leave_cpus_to_the_stage_tasks():
    """A default-sized actor leaves --stage-cpus of its share free. Catches: a 2-CPU machine (or a GPU node)
    whose actor takes every CPU, so the first read/decode task never starts."""
    from headclip.scoring.config import JobConfig
    from headclip.scoring.placement import actor_layout

    def layout(resources, share=None, **changes):
        return actor_layout(JobConfig(input="i", output="o", **changes), resources, 100, share)

    assert layout({"CPU": 2.0}) == (1, 0.0, 1.0)
    assert layout({"CPU": 16.0}) == (3, 0.0, 4.0)  # 15 CPUs for actors of 4
    assert layout({"CPU": 8.0, "GPU": 2.0}, 4.0) == (2, 1.0, 3.0)
    assert layout({"CPU": 8.0, "GPU": 2.0}, 4.0, stage_cpus=2.0) == (2, 1.0, 2.0)
    assert layout({"CPU": 2.0}, cpus_per_actor=2.0) == (1, 0.0, 2.0)  # as asked


@pytest.mark.own_ray
def test_a_job_through_its_cli_logs_no_pickled_columns(tiny_checkpoint, tmp_path):
    """jobs.score as a user runs it (its own local Ray): every stage hands Arrow columns to the next, so
    Ray Data never falls back to pickling Python objects, which it says in the job's log. Catches: a stage
    returning Python objects (dataclasses, dicts of arrays) in a column."""
    import subprocess
    import sys
    from pathlib import Path

    write_images(tmp_path / "images", 4)
    result = subprocess.run([sys.executable, "-m", "jobs.score", "--input", str(tmp_path / "images"), "--output",
                             str(tmp_path / "out"), "--checkpoint", tiny_checkpoint, "--shard-size", "2",
                             "--batch-size", "2"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 images in 2 shards" in result.stdout + result.stderr
    assert "pickle" not in (result.stdout + result.stderr).lower()


def test_a_shard_reported_twice_is_counted_once(tmp_path):
    """A publish step Ray Data runs again (its first try's result already reached the driver) reports its
    shard again: the summary counts it once, and a shard found published is counted from its file.
    Catches: the counted-once guard dropped (images and shards counted twice)."""
    from headclip.scoring.config import JobConfig
    from headclip.scoring.pipeline import _result_row, count_results
    from headclip.scoring.plan import StagedPlan
    from headclip.scoring.progress import Progress
    from headclip.scoring.summary import JobSummary
    from headclip.scoring.tasks import ShardResult

    (tmp_path / "work").mkdir()
    staged = StagedPlan(str(tmp_path / "work"), 2)
    staged.add_all([pa.table({"image_id": list("abc"), "image_uri": list("abc")})])
    plan = staged.publish("r", str(tmp_path / "out"), {}, "ck")
    first, second = ShardResult(0, images=2, anomalous=1), ShardResult(1, images=1, errors=1)
    rows = [_result_row(r) for r in (first, first, second, first)]
    summary, progress, seen = JobSummary("r", str(tmp_path / "out"), shards=2), Progress(2, 3), []
    count_results(rows, plan, JobConfig(input="i", output="o"), summary, progress,
                  lambda name, value: seen.append(value.index))
    assert (summary.images, summary.anomalous, summary.errors, summary.shards_scored) == (3, 1, 1, 2)
    assert seen == [0, 1]


def test_gpu_actors_take_the_share_of_the_smallest_gpu_node():
    """On GPU nodes of mixed sizes a default GPU actor takes the fewest CPUs per GPU of any live GPU node, so it
    fits on every one of them; dead and CPU-only nodes do not count. Catches: the largest share taken (actors
    that fit only on the big nodes), dead or CPU-only nodes counted."""
    from headclip.scoring.config import JobConfig
    from headclip.scoring.placement import actor_layout, cpus_per_gpu

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},  # 8 CPUs per GPU
             {"Alive": True, "Resources": {"CPU": 12.0, "GPU": 4.0}},  # 3
             {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 2.0}},  # 1, but dead
             {"Alive": True, "Resources": {"CPU": 64.0}}]
    assert cpus_per_gpu(nodes) == 3.0
    assert cpus_per_gpu(nodes[3:]) is None
    share = cpus_per_gpu(nodes)
    config = JobConfig(input="i", output="o")
    assert actor_layout(config, {"CPU": 92.0, "GPU": 6.0}, 100, share) == (6, 1.0, 2.0)  # 3 less 1 for the tasks


def test_numpy_batches_with_images_of_several_sizes_become_arrow():
    """map_batches' default numpy format gives read_images' images of several sizes as an object array: the
    public stages take it as a tensor column of each image's own shape. Catches: stacking such images (it
    fails) or pickling them."""
    from headclip.ray import _numpy, _table

    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((4, 5, 3), np.uint8), np.full((6, 2, 3), 7, np.uint8)
    table = _table({"image": images, "path": np.array(["a", "b"], dtype=object)})
    back = _numpy(table["image"])
    assert [image.shape for image in back] == [(4, 5, 3), (6, 2, 3)] and int(back[1][0, 0, 0]) == 7
    assert table["path"].to_pylist() == ["a", "b"]


def test_progress_counts_images_as_forward_batches_finish(ray_cluster, tmp_path, caplog):
    """One shard of 12 images scored in forward batches of 2: the progress lines count images before the
    shard is published (the scoring actor reports each batch). Catches: progress that moves only when a
    shard is published ("0/12" until the end), a batch count lost between the actor and the driver."""
    import logging

    from headclip.scoring.scorer import ScoringOptions

    from .scoring_helpers import slow_checkpoint

    write_images(tmp_path / "images", 12)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), slow_checkpoint(tmp_path, image_size=448),
                 shard_size=12, progress_interval=0.1, scoring=ScoringOptions(batch_size=2, io_threads=2))
    with caplog.at_level(logging.INFO, logger="headclip.scoring.progress"):
        run_job(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "headclip.scoring.progress"]
    within = [line for line in lines if "(0 in 0/1 published shards" in line and "images 0/" not in line]
    assert within, lines  # images counted while the only shard was still being scored
    assert all(int(line.split("images ")[1].split("/")[0]) % 2 == 0 for line in within), within  # whole batches
    assert lines[-1].startswith("progress: images 12/12 (12 in 1/1 published shards"), lines


def test_scorer_reports_each_forward_batch():
    """ImageScorer.score_rows calls on_batch with each forward batch's image count; unreadable images are
    not counted. Catches: a batch reported twice, or error rows counted as scored."""
    from headclip.data.loading import LoadedImage
    from headclip.model.assets import DEMO_CHECKPOINT_URI
    from headclip.scoring.scorer import ImageScorer, ScoringOptions

    with ImageScorer("r", DEMO_CHECKPOINT_URI, ScoringOptions(batch_size=2)) as scorer:
        side = scorer.image_size
        loaded = [LoadedImage(pixels=make_sample(i, size=side, defect=None).image, width=side, height=side)
                  for i in range(5)]
        loaded.insert(2, LoadedImage(width=10, height=10, error="corrupt"))
        records = [{"image_id": str(i), "image_uri": f"x/{i}.png"} for i in range(6)]
        seen = []
        rows = scorer.score_rows(records, loaded, on_batch=seen.append)
    assert seen == [2, 2, 1] and sum(row["status"] == "ok" for row in rows) == 5
