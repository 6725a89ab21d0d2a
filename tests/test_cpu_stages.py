"""Decoding and encoding as Ray tasks beside the scoring actors (``--cpu-stages tasks``).

The rows, masks, heat maps and metric state must be those of the actor doing
all three stages itself, on Ray core and on Ray Data (``--engine data``), and a
dying actor must still leave every image once.
Which node runs each stage is tested on a multi-node Ray in test_cluster_scale.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
from PIL import Image

from headclip import results
from headclip.data.synthetic import make_sample
from headclip.storage.layout import run_uri

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


def test_tasks_give_the_rows_and_metrics_of_the_actor(ray_cluster, tiny_checkpoint, tmp_path):
    """Catches: rows put back out of order after the encode task, masks or heat maps encoded from another
    batch's maps, error rows dropped between stages, the metric state lost on the way to the writer,
    images resized differently in the decode task."""
    images = _labelled_set(tmp_path / "images")
    frames, summaries = {}, {}
    for stages, engine in (("actor", "core"), ("tasks", "core"), ("tasks", "data")):
        config = job(str(tmp_path / "images"), str(tmp_path / f"out-{stages}-{engine}"), tiny_checkpoint,
                     shard_size=6, cpus_per_actor=1, cpu_stages=stages, engine=engine)
        plan, summary = run_job(config, images=images)
        frames[stages, engine] = results.read_run(run_uri(config.output, plan.run_id)).sort_values("image_id")
        summaries[stages, engine] = summary
    actor = frames["actor", "core"]
    for other in (("tasks", "core"), ("tasks", "data")):  # the split stages, on Ray core and on Ray Data
        tasks = frames[other]
        assert len(tasks) == 12 and tasks["image_id"].is_unique
        assert (tasks["status"] == "error").sum() == 2
        for column in actor.columns:
            if column != "scored_at":
                assert [repr(v) for v in actor[column]] == [repr(v) for v in tasks[column]], (other, column)
        assert (summaries["actor", "core"].metrics.to_dict(as_lists=True)
                == summaries[other].metrics.to_dict(as_lists=True))
        assert summaries[other].errors == 2 and summaries[other].shards_scored == 2


def test_stages_leave_a_published_shard_alone(tiny_checkpoint, tmp_path):
    """A shard another driver published while it was queued: the decode stage reads none of its images,
    the model and encode stages pass it through, and its file is not rewritten.
    Catches: a decode task without the published-file check (it would fail on the missing images or
    rewrite the file)."""
    from headclip.scoring.scorer import ScoringOptions, ImageScorer, ShardTask
    from headclip.scoring.stages import decode_shard, encode_shard

    output = tmp_path / "shard-00000.parquet"
    output.write_bytes(b"published by another driver")
    images = pa.table({"image_id": ["a", "b"], "image_uri": [str(tmp_path / "gone-a.png"), str(tmp_path / "b.png")]})
    options = ScoringOptions(batch_size=2, io_threads=1)
    decoded = decode_shard(ShardTask(0, str(output), images=images), 64, options)
    assert decoded.skipped and decoded.loaded == []
    with ImageScorer("r", tiny_checkpoint, options) as scorer:
        scored = scorer.score_decoded(decoded)
    result = encode_shard(scored)
    assert scored.skipped and result.skipped and result.images == 2
    assert output.read_bytes() == b"published by another driver"


def test_killed_actor_with_tasks_leaves_every_image_once(ray_cluster, tiny_checkpoint, tmp_path):
    """Catches: shards whose decode or scored data went with the dead actor never run again (missing rows),
    or an actor's death through a downstream task counted as a shard failure (the run would give up)."""
    import ray

    write_images(tmp_path / "images", 12)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, shard_size=2, actors=1,
                 cpus_per_actor=1, cpu_stages="tasks", max_shard_attempts=1)
    killed = []

    def on_event(name, value):
        if name == "actors":
            on_event.names = getattr(on_event, "names", []) + value
        elif name == "shard_done" and not killed:
            ray.kill(ray.get_actor(on_event.names[0]), no_restart=True)
            killed.append(on_event.names[0])

    plan, summary = run_job(config, on_event=on_event)
    assert killed and summary.actor_restarts >= 1
    frame = results.read_run(run_uri(config.output, plan.run_id))
    assert len(frame) == 12 and frame["image_id"].is_unique and (frame["status"] == "ok").all()
    assert summary.images == 12 and summary.shards_scored == 6


def test_default_actors_leave_cpus_to_the_stage_tasks():
    """With the stages as tasks a default-sized actor leaves --stage-cpus of its share free. Catches: a
    2-CPU machine (or a GPU node) whose actor takes every CPU, so the first decode task never starts."""
    from headclip.scoring.placement import actor_layout
    from headclip.scoring.runner import JobConfig

    def layout(resources, share=None, **changes):
        return actor_layout(JobConfig(input="i", output="o", **changes), resources, 100, share)

    assert layout({"CPU": 2.0}) == (1, 0.0, 2.0)  # the actor does its own decoding: it takes both
    assert layout({"CPU": 2.0}, cpu_stages="tasks") == (1, 0.0, 1.0)
    assert layout({"CPU": 16.0}, cpu_stages="tasks") == (3, 0.0, 4.0)  # 15 CPUs for actors of 4
    assert layout({"CPU": 8.0, "GPU": 2.0}, 4.0) == (2, 1.0, 4.0)
    assert layout({"CPU": 8.0, "GPU": 2.0}, 4.0, cpu_stages="tasks", stage_cpus=2.0) == (2, 1.0, 2.0)
    assert layout({"CPU": 2.0}, cpu_stages="tasks", cpus_per_actor=2.0) == (1, 0.0, 2.0)  # as asked
