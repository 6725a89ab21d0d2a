"""Faults around a running scoring job: two drivers, unplaceable actors, broken shards, full and
read-only disks, actors that cannot start, Ctrl-C. Real processes, signals and filesystems."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from headclip import results
from headclip.scoring.runner import execute, prepare
from headclip.scoring.scorer import ScoringOptions
from headclip.storage.layout import run_uri

from .scoring_helpers import job, run_job, slow_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]


def _score_args(images, output, checkpoint, ray_address, *extra):
    return [sys.executable, "-m", "jobs.score", "--input", str(images), "--output", str(output), "--checkpoint",
            checkpoint, "--shard-size", "2", "--batch-size", "2", "--actors", "1", "--ray-address", ray_address,
            "--progress-interval", "0.5", *extra]


def _file_counts(run_dir: Path) -> dict:
    frame = results.read_run(str(run_dir))
    return {"images": len(frame), "errors": int((frame["status"] != "ok").sum()),
            "anomalous": int(frame["is_anomalous"].fillna(False).sum())}


# -- 6. two drivers on one run -------------------------------------------------------------------


def test_shards_another_driver_published_are_counted_from_their_files(ray_cluster, tiny_checkpoint, tmp_path):
    write_images(tmp_path / "images", 12)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    options = dict(shard_size=3, scoring=ScoringOptions(threshold=0.0, batch_size=3))  # every ok row is anomalous
    other = job(str(tmp_path / "images"), str(tmp_path / "other"), tiny_checkpoint, **options)
    other_plan, _ = run_job(other)  # the other driver's run, published elsewhere first
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, **options)
    plan = prepare(config)
    assert plan.run_id == other_plan.run_id
    theirs = Path(run_uri(other.output, plan.run_id))
    ours = Path(run_uri(config.output, plan.run_id))

    def publish_as_the_other_driver(name, value):
        # after this driver listed its finished shards, the other one publishes shards 0 and 2
        if name == "actors":
            for index in (0, 2):
                shutil.copy(theirs / f"shard-{index:05d}.parquet", ours / f"shard-{index:05d}.parquet")

    summary = execute(plan, config, on_event=publish_as_the_other_driver)
    counts = _file_counts(ours)
    assert counts == {"images": 13, "errors": 1, "anomalous": 12}
    assert (summary.images, summary.errors, summary.anomalous) == (13, 1, 12)
    stored = json.loads((ours / "_summary.json").read_text())
    assert (stored["images"], stored["errors"], stored["anomalous"]) == (13, 1, 12)


@pytest.mark.processes
def test_two_drivers_at_once_agree_with_the_files(ray_cluster, tiny_checkpoint, tmp_path):
    """A driver process and this one score the same run together: each image once, both summaries right."""
    write_images(tmp_path / "images", 16)
    out = tmp_path / "out"
    # half a CPU per actor and per stage task: both drivers' pipelines fit the session's 2 CPUs together
    command = _score_args(tmp_path / "images", out, tiny_checkpoint, ray_cluster, "--run-id", "shared",
                          "--threshold", "0", "--cpus-per-actor", "0.5", "--stage-cpus", "0.5")
    other = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        config = job(str(tmp_path / "images"), str(out), tiny_checkpoint, run_id="shared", shard_size=2,
                     cpus_per_actor=0.5, stage_cpus=0.5, scoring=ScoringOptions(threshold=0.0, batch_size=2))
        deadline = time.time() + 120  # start once the other driver has planned the run
        while not (out / "run_id=shared" / "_plan" / "plan.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        _, ours = run_job(config)
        stdout, stderr = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, stderr[-3000:]
    frame = results.read_run(str(out / "run_id=shared"))
    assert len(frame) == 16 and frame["image_id"].is_unique
    counts = _file_counts(out / "run_id=shared")
    assert (ours.images, ours.errors, ours.anomalous) == (16, counts["errors"], counts["anomalous"])
    assert "run shared: 16 images in 8 shards" in stdout
    assert f"{counts['errors']} errors, {counts['anomalous']} anomalous" in stdout, stdout
    stored = json.loads((out / "run_id=shared" / "_summary.json").read_text())
    assert (stored["images"], stored["anomalous"]) == (16, counts["anomalous"])


# -- 12. actors no node can hold -----------------------------------------------------------------


def test_an_actor_no_node_can_hold_fails_in_one_line_after_a_bounded_wait(ray_cluster, tiny_checkpoint, tmp_path):
    write_images(tmp_path / "images", 2)
    start = time.perf_counter()
    result = subprocess.run(_score_args(tmp_path / "images", tmp_path / "out", tiny_checkpoint, ray_cluster,
                                        "--cpus-per-actor", "64", "--placement-timeout", "3"),
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "no node can hold a scoring actor needing 64 CPU" in result.stderr  # said at once, before the wait
    last = result.stderr.strip().splitlines()[-1]
    assert "gave up after 3s (--placement-timeout)" in last and "largest node has 2 CPU" in last, last
    assert elapsed < 200


def test_gpu_actors_on_a_cluster_without_gpus_fail_after_the_wait(ray_cluster, tiny_checkpoint, tmp_path):
    write_images(tmp_path / "images", 2)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, gpus_per_actor=1.0,
                 placement_timeout=2.0)
    from headclip.errors import PlacementError

    plan = prepare(config)
    start = time.perf_counter()
    with pytest.raises(PlacementError, match="needing .* and 1 GPU .*0 GPU.*gave up after 2s"):
        execute(plan, config)
    assert time.perf_counter() - start < 30


def test_stage_tasks_wait_for_a_node_to_join_and_name_the_autoscaler(monkeypatch, caplog):
    """The wait for a node that can hold a read/decode or publish task, against a node list that changes:
    a node that fits joins; an autoscaler that can add one is left to do it (the tasks are its demand);
    one that cannot refuses at once; no node within --placement-timeout is one line."""
    from headclip.errors import PlacementError
    from headclip.scoring import placement
    from headclip.scoring.config import JobConfig

    config = JobConfig(input="i", output="o", stage_cpus=4, placement_timeout=30)
    calls = []

    def nodes():  # a 4-CPU node joins on the fourth look
        calls.append(1)
        return [{"CPU": 2.0}] + ([{"CPU": 8.0}] if len(calls) >= 4 else [])

    monkeypatch.setattr(placement, "_autoscaler_can_add", lambda need: None)
    placement.wait_for_stage_nodes(config, poll=0.01, nodes=nodes)
    assert len(calls) >= 4 and "waiting up to 30s for one to join" in caplog.text
    monkeypatch.setattr(placement, "_autoscaler_can_add", lambda need: True)
    placement.wait_for_stage_nodes(config, poll=0.01, nodes=lambda: [{"CPU": 2.0}])
    assert "waiting up to 30s for the autoscaler to add one" in caplog.text
    monkeypatch.setattr(placement, "_autoscaler_can_add", lambda need: False)
    start = time.perf_counter()
    with pytest.raises(PlacementError, match="no node type of the cluster's autoscaler provides it"):
        placement.wait_for_stage_nodes(config, poll=0.01, nodes=lambda: [{"CPU": 2.0}])
    monkeypatch.setattr(placement, "_autoscaler_can_add", lambda need: None)
    short = JobConfig(input="i", output="o", stage_cpus=4, placement_timeout=0.2)
    with pytest.raises(PlacementError, match="needing 4 CPU .*gave up after 0.2s .*--stage-cpus"):
        placement.wait_for_stage_nodes(short, poll=0.01, nodes=lambda: [{"CPU": 2.0}])
    assert time.perf_counter() - start < 5


def test_stage_tasks_no_node_can_hold_end_the_run_after_the_placement_timeout(ray_cluster, tiny_checkpoint,
                                                                             tmp_path):
    """--stage-cpus 64 on a 2-CPU Ray: one line once --placement-timeout passes. Catches: a run whose
    read/decode tasks pend for ever."""
    from headclip.errors import PlacementError

    write_images(tmp_path / "images", 2)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, stage_cpus=64.0,
                 placement_timeout=2.0)
    start = time.perf_counter()
    with pytest.raises(PlacementError, match="read, decode or publish task needing 64 CPU .*gave up after 2s"):
        execute(prepare(config), config)
    assert time.perf_counter() - start < 60


# -- 13 (the same class). actors whose model cannot load ----------------------------------------


def test_actors_that_cannot_load_their_model_end_the_run_in_one_line(ray_cluster, tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save as save_safetensors
    import torch

    # backbone weights that look like a weight file but do not fit the backbone: found only when loading
    weights = tmp_path / "wrong-weights.safetensors"
    weights.write_bytes(save_safetensors({"visual.conv1.weight": torch.zeros(2, 2)}))
    with safe_open(tiny_checkpoint, "pt") as handle:
        payload = json.loads(handle.metadata()["headclip"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    payload["config"]["pretrained"] = str(weights)
    checkpoint = tmp_path / "bad-weights.safetensors"
    checkpoint.write_bytes(save_safetensors(tensors, metadata={"headclip": json.dumps(payload)}))
    write_images(tmp_path / "images", 4)
    from headclip.errors import JobError

    config = job(str(tmp_path / "images"), str(tmp_path / "out"), str(checkpoint), max_init_failures=1)
    plan = prepare(config)
    start = time.perf_counter()
    with pytest.raises(JobError) as caught:
        execute(plan, config)
    assert "scoring actors cannot start" in str(caught.value) and "does not fit" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert time.perf_counter() - start < 90


# -- 16. broken shard files ----------------------------------------------------------------------


def test_a_truncated_shard_is_scored_again_and_reports_still_work(ray_cluster, tiny_checkpoint, tmp_path, caplog):
    from jobs import report as report_job

    write_images(tmp_path / "images", 9)
    config = job(str(tmp_path / "images"), str(tmp_path / "out"), tiny_checkpoint, shard_size=3)
    plan, _ = run_job(config)
    run_dir = Path(run_uri(config.output, plan.run_id))
    reference = results.read_run(str(run_dir))
    shard = run_dir / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    (run_dir / "shard-00002.parquet").write_bytes(b"PAR1 not parquet at all PAR1")
    # a report of the damaged run skips what does not read back, with a warning
    assert report_job.main(["--run", str(run_dir), "--output", str(tmp_path / "r.html")]) == 0
    assert "skipped a shard file that does not read back" in caplog.text
    assert (tmp_path / "r.html").stat().st_size > 0
    # what a writer killed mid-write leaves behind
    orphan = run_dir / ".shard-00001.parquet.0123456789abcdef.tmp"
    orphan.write_bytes(b"partial")
    # a rerun scores the broken shards again, and removes the orphan once the run is complete
    plan2, summary = run_job(config)
    assert not orphan.exists()
    assert plan2.resumed and summary.shards_skipped == 1 and summary.shards_scored == 2
    repaired = results.read_run(str(run_dir))
    assert len(repaired) == 9 and list(repaired["image_id"]) == list(reference["image_id"])
    assert repaired["score"].tolist() == pytest.approx(reference["score"].tolist(), abs=2e-5)
    for path in run_dir.glob("shard-*.parquet"):
        pq.read_metadata(path)


# -- 17. full and read-only disks ----------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.mark.processes
def test_a_full_disk_ends_the_run_in_one_line_and_leaves_no_temporary_files(ray_cluster, tiny_checkpoint,
                                                                              tmp_path, small_disk):
    write_images(tmp_path / "images", 6)
    out = small_disk / "out"
    command = _score_args(tmp_path / "images", out, tiny_checkpoint, ray_cluster, "--run-id", "full")
    prepare(job(str(tmp_path / "images"), str(out), tiny_checkpoint, run_id="full", shard_size=2,
                scoring=ScoringOptions(batch_size=2)))
    filler = _fill(small_disk)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last and re.search(r"shard \d+ failed 3 times", last), last
    assert _leftovers(small_disk) == []
    filler.unlink()  # space again: the same run completes
    _, summary = run_job(job(str(tmp_path / "images"), str(out), tiny_checkpoint, run_id="full", shard_size=2,
                             scoring=ScoringOptions(batch_size=2)))
    assert summary.images == 6 and summary.shards_scored == 3
    assert len(results.read_run(str(out / "run_id=full"))) == 6 and _leftovers(small_disk) == []


def test_a_read_only_output_is_one_line(ray_cluster, tiny_checkpoint, tmp_path, small_disk):
    from headclip.errors import JobError

    write_images(tmp_path / "images", 4)
    out = small_disk / "out"
    config = job(str(tmp_path / "images"), str(out), tiny_checkpoint, run_id="ro", shard_size=2,
                 scoring=ScoringOptions(batch_size=2))
    plan = prepare(config)
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {remounted.stderr.strip()}")
    # a planned run whose output turned read-only: the shards cannot be written
    with pytest.raises(JobError, match=r"shard \d+ failed 3 times: OSError: .*Read-only file system") as caught:
        execute(plan, config)
    assert "\n" not in str(caught.value)
    # a new run there is refused before any work
    from jobs.cli import UsageError, prepare_or_exit

    with pytest.raises(UsageError, match="cannot use output .*Read-only file system"):
        prepare_or_exit(job(str(tmp_path / "images"), str(out), tiny_checkpoint, run_id="new"))


# -- 18. Ctrl-C ----------------------------------------------------------------------------------


@pytest.mark.processes
def test_ctrl_c_ends_the_driver_with_one_line_and_the_run_resumes(ray_cluster, tmp_path):
    checkpoint = slow_checkpoint(tmp_path)
    write_images(tmp_path / "images", 60)  # 30 shards: work is left when the first one is published
    out = tmp_path / "out"
    process = subprocess.Popen(_score_args(tmp_path / "images", out, checkpoint, ray_cluster), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(out.glob("run_id=*/shard-*.parquet")):
            assert process.poll() is None, "the job ended before it could be interrupted"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "jobs.score: interrupted; run the same command to resume"
    done = len(list(out.glob("run_id=*/shard-*.parquet")))
    assert 1 <= done < 30
    plan, summary = run_job(job(str(tmp_path / "images"), str(out), checkpoint, shard_size=2,
                                scoring=ScoringOptions(batch_size=2)))
    assert plan.resumed and summary.shards_skipped == done and summary.images == 60
    assert len(results.read_run(run_uri(str(out), plan.run_id))) == 60


# What Ray Data's iterators do when they are collected after the driver stopped Ray: log a failed metric
# update with its stack trace, call Ray (which would start a new local Ray), and raise. The object is kept
# alive by the interrupt's traceback, as the pipeline's iterators are, so it goes after the run's line.
_TEARDOWN_AFTER_CTRL_C = '''
import logging, sys
import ray, ray.data
from jobs.cli import run

RAY_DATA = {"__name__": "ray.data._internal.execution.streaming_executor"}
exec("""
import logging, sys, ray
class Iterator:
    def __del__(self):
        logging.getLogger("ray.data").warning("update_execution_metrics failed", exc_info=ValueError("gone"))
        try:
            ray.put(0)
        finally:
            if ray.is_initialized():
                print("a new Ray started", file=sys.stderr)
""", RAY_DATA)

class Other:
    def __del__(self):
        raise RuntimeError("not a Ray destructor")

def main(argv):
    iterator = RAY_DATA["Iterator"]()
    other = Other() if sys.argv[1:] == ["other"] else None
    raise KeyboardInterrupt

run(main, "jobs.demo", [])
'''


@pytest.mark.parametrize("other", [False, True])
def test_ray_teardown_after_ctrl_c_prints_nothing_after_the_line(other):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_AUTO_CONNECT")}
    done = subprocess.run([sys.executable, "-c", _TEARDOWN_AFTER_CTRL_C, *(["other"] if other else [])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-3000:]
    line = "jobs.demo: interrupted; run the same command to resume"
    if other:  # an exception of anyone else's destructor is reported as before, and only it
        assert done.stderr.startswith(line + "\nException ignored in: <function Other.__del__"), done.stderr[-3000:]
        assert done.stderr.count("Traceback") == 1 and "RuntimeError: not a Ray destructor" in done.stderr
        assert "a new Ray started" not in done.stderr
    else:
        assert done.stderr.strip().splitlines() == [line], done.stderr[-3000:]
