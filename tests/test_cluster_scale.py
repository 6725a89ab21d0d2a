"""The scoring pipeline on a local multi-node Ray: scale-up from no accelerator node, a node that joins
mid-run, a node that dies mid-run. The run itself is tests/cluster_run.py, in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headclip import results

from .scoring_helpers import slow_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]
IMAGES = 60  # one per shard; the driver paces them so that node B joins and dies with work left


@pytest.mark.multinode
def test_pool_follows_nodes_that_join_and_die(tmp_path):
    """The pending actor is demand, reading, decoding and publishing run on the CPU-only node, node B gets
    an actor and shards, and dies with work left; each image once. The model is slow (640 px), so that
    the model stage, not decoding, holds the work back: Ray Data grows its pool while its actors are
    busy. Catches: a pool that does not grow onto B, actors started on a CPU-only node (the pending
    demand would be empty and shards would be scored before A joins), stages fused into the model's
    actors (the stage nodes would be A or B), shards lost or written twice when B dies."""
    checkpoint = slow_checkpoint(tmp_path, image_size=640)
    write_images(tmp_path / "images", IMAGES)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "tests.cluster_run", str(tmp_path / "images"), str(out),
                          checkpoint], cwd=REPO, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, run.stderr[-4000:]
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    seen = json.loads(line[len("RESULT "):])
    # 1. with no accelerator node, the actor is demand for one, and nothing is scored on the head
    assert {"accelerator": 1.0, "CPU": 1.0} in seen["demand"] and seen["done_before_a"] == 0
    nodes = {d["node"] for d in seen["done"]}
    assert seen["head"] not in nodes and nodes <= {seen["node_a"], seen["node_b"]}
    # the model ran on the accelerator nodes; every shard was decoded and encoded on the CPU-only node
    assert {d["decode_node"] for d in seen["done"]} == {seen["cpu_node"]}
    assert {d["encode_node"] for d in seen["done"]} == {seen["cpu_node"]}
    # 2./3. both accelerator nodes got an actor and scored shards; B only after it joined
    assert sum(1 for d in seen["done"] if d["node"] == seen["node_b"]) >= 2
    # 4. B died with work left: the run still scored every image exactly once
    assert seen["left_when_b_removed"] > 0
    frame = results.read_run(str(out / f"run_id={seen['run_id']}"))
    assert len(frame) == IMAGES and frame["image_id"].is_unique
    assert seen["images"] == IMAGES and sorted(d["shard"] for d in seen["done"]) == list(range(IMAGES))


def test_pool_bounds_follow_live_nodes_bounds_and_the_autoscaler(monkeypatch):
    """The pool's sizing against node lists (no Ray). Catches: counting CPUs but not the custom
    resource, a maximum or the work left not applied, an autoscaler's room ignored."""
    from headclip.errors import PlacementError
    from headclip.scoring import placement
    from headclip.scoring.config import JobConfig
    from headclip.scoring.placement import ActorSize, pool_bounds

    size = ActorSize(cpus=2, gpus=1, resources={"accelerator": 1})
    assert size.fits_in({"CPU": 8, "GPU": 4, "accelerator": 1}) == 1
    assert size.fits_in({"CPU": 8, "GPU": 4, "accelerator": 4}) == 4
    assert size.fits_in({"CPU": 7, "GPU": 4, "accelerator": 4}) == 3
    assert size.fits_in({"CPU": 64}) == 0
    leaving = ActorSize(cpus=1, leave_cpus=1)  # CPU actors beside the stage tasks: one CPU of the cluster left
    assert leaving.fits_in_cluster([{"CPU": 2}]) == 1 and leaving.fits_in_cluster([{"CPU": 1}]) == 0
    assert leaving.fits_in_cluster([{"CPU": 2}, {"CPU": 2}]) == 3
    accelerated = ActorSize(cpus=1, resources={"accelerator": 1}, leave_cpus=1)  # a CPU node holds the tasks
    assert accelerated.fits_in_cluster([{"CPU": 4}, {"CPU": 1, "accelerator": 1}, {"CPU": 1, "accelerator": 1}]) == 2
    nodes = [{"CPU": 16}, {"CPU": 8, "GPU": 2, "accelerator": 2}]
    autoscaled = {"value": None}
    monkeypatch.setattr(placement, "live_nodes", lambda: nodes)
    monkeypatch.setattr(placement, "autoscaler_capacity", lambda fits_in: autoscaled["value"])

    def bounds(work, **changes):
        return pool_bounds(JobConfig(input="i", output="o", **changes), size, work)

    assert bounds(100) == (1, 100)  # no autoscaler config: a node that joins mid-run gets an actor
    assert bounds(1) == (1, 1)
    assert bounds(100, max_actors=1) == (1, 1)
    assert bounds(100, min_actors=3) == (3, 100)  # pending ones are demand
    assert bounds(100, actors=4) == (4, 4) and bounds(2, actors=4) == (2, 2)
    autoscaled["value"] = 10
    assert bounds(100) == (1, 10)
    autoscaled["value"] = 0  # the autoscaler adds nothing for it: what the live nodes hold
    assert bounds(100) == (1, 2)
    nodes.append({"CPU": 8, "GPU": 2, "accelerator": 2})  # a node joins
    assert bounds(100) == (1, 4)
    autoscaled["value"] = -1
    assert bounds(100, max_actors=50) == (1, 50)
    assert bounds(7) == (1, 7)
    # CPU actors on a cluster that cannot grow: held to what leaves the stage tasks their CPUs
    cpu_actors = ActorSize(cpus=1, leave_cpus=1)
    autoscaled["value"] = None
    nodes[:] = [{"CPU": 2}]
    assert pool_bounds(JobConfig(input="i", output="o", actors=2), cpu_actors, 10) == (1, 1)
    assert pool_bounds(JobConfig(input="i", output="o"), cpu_actors, 10) == (1, 1)
    nodes[:] = [{"CPU": 5}]
    assert pool_bounds(JobConfig(input="i", output="o", min_actors=2), cpu_actors, 10) == (2, 4)
    nodes[:] = [{"CPU": 1}]
    with pytest.raises(PlacementError, match="beside a read/decode task"):
        pool_bounds(JobConfig(input="i", output="o"), cpu_actors, 10)
    autoscaled["value"] = 10  # an autoscaler adds nodes: the request stands
    assert pool_bounds(JobConfig(input="i", output="o", actors=2), cpu_actors, 10) == (2, 2)
