"""The scoring pipeline keeps the run's contract when actors die, cannot start or cannot be placed.

Rows equal to in-process scoring are checked in test_pipeline_stages; which node runs each
stage, a node that joins and a node that dies, in test_cluster_scale.
"""

from __future__ import annotations

import os
import signal

import pytest

from headclip import results
from headclip.errors import JobError, PlacementError
from headclip.storage.layout import run_uri

from .scoring_helpers import job, run_job, slow_checkpoint, write_images


SHARDS = 24  # of one image each: work is left when the first is published


def _model_actor_pids() -> list[int]:
    """Process ids of the live actors of Ray Data's pools (the scoring actors)."""
    from ray._private.state import actors

    return [info["Pid"] for info in actors().values()
            if "MapWorker" in info.get("ActorClassName", "") and info.get("State") == "ALIVE" and info.get("Pid")]


def test_killed_actor_leaves_every_image_once_and_a_rerun_skips_them(ray_cluster, tmp_path):
    """A scoring actor killed (SIGKILL) once the first shard is published, with shards left: Ray Data
    restarts it and runs its shards again. Catches: a shard counted or written twice, a shard lost with
    the actor, a rerun that scores published shards again."""
    import threading
    import time

    checkpoint = slow_checkpoint(tmp_path)
    write_images(tmp_path / "images", SHARDS)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), checkpoint, shard_size=1,
                 cpus_per_actor=1)
    killed, stop = {}, threading.Event()

    def killer():  # watches the output, as an operator would: the driver's events may trail the actors
        while not stop.is_set():
            published = len(list((tmp_path / "out").glob("run_id=*/shard-*.parquet")))
            pids = _model_actor_pids() if published else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed["published_before"] = published
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        plan, summary = run_job(config)
    finally:
        stop.set()
        thread.join()
    assert killed, "no live scoring actor was seen once a shard was published"
    assert killed["published_before"] < SHARDS  # killed with work left
    assert summary.images == SHARDS and summary.shards_scored + summary.shards_skipped == SHARDS
    frame = results.read_run(run_uri(config.output, plan.run_id))
    assert len(frame) == SHARDS and frame["image_id"].is_unique
    _, again = run_job(config)
    assert again.shards_skipped == SHARDS and again.shards_scored == 0 and again.images == SHARDS
    assert len(results.read_run(run_uri(config.output, plan.run_id))) == SHARDS


def test_an_actor_that_keeps_dying_ends_the_run_with_one_line(ray_cluster, tmp_path):
    """Every scoring actor killed (SIGKILL) as soon as it is alive, past --max-actor-restarts' bound (1
    here): the run ends with one line that says a worker died, that published shards are kept and how to
    resume. Catches: a run restarting a dying actor for ever, or Ray's multi-line report as the error."""
    import threading
    import time

    checkpoint = slow_checkpoint(tmp_path)
    write_images(tmp_path / "images", 4)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), checkpoint, shard_size=1, cpus_per_actor=1,
                 actors=1, max_actor_restarts=1)
    kills, stop = [], threading.Event()

    def killer():
        deadline = time.monotonic() + 150  # then the run may finish, and the test fails on it
        while not stop.is_set() and time.monotonic() < deadline:
            for pid in _model_actor_pids():
                if pid not in kills:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(JobError) as failure:
            run_job(config)
    finally:
        stop.set()
        thread.join()
    message = str(failure.value)
    assert len(kills) >= 2, kills
    assert message.startswith("a Ray worker of the run died") and "\n" not in message, message
    assert "run the same command to resume" in message and "1 actor restarts" in message, message


def test_actors_that_cannot_start_end_the_run_with_one_line(ray_cluster, tiny_checkpoint, tmp_path):
    """Every scoring actor fails to load its model (CUDA asked for on a machine without it). Catches: a
    run that waits for ever on actors Ray Data keeps replacing, or a multi-line Ray traceback."""
    from headclip.scoring.scorer import ScoringOptions

    write_images(tmp_path / "images", 2)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint,
                 scoring=ScoringOptions(batch_size=2, io_threads=1, device="cuda"))
    with pytest.raises(JobError) as failure:
        run_job(config)
    message = str(failure.value)
    assert message.startswith("scoring actors cannot start: ") and "\n" not in message, message
    assert "CUDA" in message or "NVIDIA" in message or "cuda" in message, message


def test_no_node_for_the_actors_ends_the_run_after_the_placement_timeout(ray_cluster, tiny_checkpoint, tmp_path):
    """Actors that ask for a resource no node has: PlacementError once --placement-timeout passes.
    Catches: a run that pends for ever."""
    write_images(tmp_path / "images", 2)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint,
                 actor_resources={"no_such_accelerator": 1.0}, placement_timeout=3.0)
    with pytest.raises(PlacementError, match="no_such_accelerator|placement-timeout"):
        run_job(config)


def test_s3_in_and_out_on_ray_data_writes_no_secret_to_rays_logs(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path):
    """Images read from S3 and shards written to S3 by Ray Data's tasks (the storage options travel to
    them), and the secret key appears in none of the session's log files (Ray Data logs its plans and
    operator metrics there). Catches: storage options lost on the way to the stages (the reads fail),
    a secret in Ray Data's logs."""
    import fsspec
    import ray

    bucket, options = s3_bucket
    secret = "s3cr3t-ray-data-7f1c"  # the test server takes any key
    options = {**options, "secret": secret}
    fs = fsspec.filesystem("s3", **options)
    for path in write_images(tmp_path / "images", 4):
        fs.pipe(f"{bucket[5:]}/in/{path.name}", path.read_bytes())
    config = job(f"{bucket}/in/", f"{bucket}/out", tiny_checkpoint, shard_size=2,
                 storage_options=options)
    plan, summary = run_job(config)
    assert summary.images == 4 and summary.errors == 0
    assert len(fs.glob(f"{bucket[5:]}/out/run_id={plan.run_id}/shard-*.parquet")) == 2
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    leaking = []
    for folder, _, files in os.walk(logs):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                if secret.encode() in handle.read():
                    leaking.append(name)
    assert not leaking, leaking
