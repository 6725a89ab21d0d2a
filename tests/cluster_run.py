"""One scoring run on a local multi-node Ray (``ray.cluster_utils.Cluster``), driven step by step.

Run by tests/test_cluster_scale.py in its own process (a Cluster cannot share the
test session's Ray). Nodes with the custom resource ``accelerator`` stand in for
GPU nodes; one CPU-only node reads, decodes and publishes (the stage tasks), and
the head holds no CPU, so that no work can land there. The run:

1. starts with no accelerator node: the pool's first actor pends, and the
   autoscaler's view of the cluster shows it as resource demand;
2. node A joins: its actor loads and scores, the CPU node decodes and encodes;
3. node B joins mid-run: the pool grows onto it and B scores shards;
4. node B is removed while it holds shards: the run still ends with every image once.

Prints one JSON object of what it saw. The driver is slowed on purpose (each
finished shard's callback sleeps until node B is removed) so that the run outlasts node starts.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from headclip.scoring.runner import JobConfig, execute, prepare
from headclip.scoring.scorer import ScoringOptions

ACCELERATOR = {"accelerator": 1.0}
# the CPU node offers a resource the stage tasks ask for (--stage-resources): an accelerator node whose
# actor was stopped as idle would otherwise take a stage task on its freed CPU, as it may
CPU_STAGE_NODE = {"cpu_stage": 100.0}


def demand_bundles(address: str) -> list[dict]:
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(address)
    return [dict(request.bundle) for demand in status.resource_demands.ray_task_actor_demand
            for request in demand.bundles_by_count for _ in range(request.count)]


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def main(images: str, output: str, checkpoint: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    cpu_node = cluster.add_node(num_cpus=4, resources=CPU_STAGE_NODE)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    seen = {"done": [], "demand": None}
    lock = threading.Lock()

    def on_event(name, value):
        with lock:
            if name == "shard_done":
                seen["done"].append({"shard": value.index, "node": value.node, "decode_node": value.decode_node,
                                     "encode_node": value.encode_node, "at": time.time()})
        if name == "shard_done":
            if "b_removed_at" not in seen:
                time.sleep(0.5)  # a slow driver until B is gone: the run outlasts node starts

    config = JobConfig(input=images, output=output, checkpoint=checkpoint, shard_size=1, gpus_per_actor=0.0,
                       cpus_per_actor=1.0, actor_resources=ACCELERATOR, placement_timeout=120.0,
                       progress_interval=0.5, shards_per_actor=2, stage_resources={"cpu_stage": 1.0},
                       scoring=ScoringOptions(batch_size=1, threshold=0.0))
    plan = prepare(config)
    summary = {}
    job = threading.Thread(target=lambda: summary.update(result=execute(plan, config, on_event)))
    job.start()
    # 1. no accelerator node: the actor is demand, nothing is scored
    seen["demand"] = wait_for(lambda: [b for b in demand_bundles(cluster.address) if b.get("accelerator")], 60,
                              "the pending actor's resource demand")
    seen["done_before_a"] = len(seen["done"])
    # 2. node A joins
    node_a = cluster.add_node(num_cpus=1, resources=ACCELERATOR)
    wait_for(lambda: len(seen["done"]) >= 2, 120, "shards scored on node A")
    # 3. node B joins mid-run
    node_b = cluster.add_node(num_cpus=1, resources=ACCELERATOR)
    b_id = node_b.node_id
    wait_for(lambda: sum(1 for d in seen["done"] if d["node"] == b_id) >= 2, 120, "shards scored on node B")
    seen["left_when_b_removed"] = plan.num_shards - len(seen["done"])
    # 4. node B dies while it holds shards
    cluster.remove_node(node_b, allow_graceful=False)
    seen["b_removed_at"] = time.time()
    job.join(timeout=300)
    result = summary["result"]
    print("RESULT " + json.dumps({"node_a": node_a.node_id, "node_b": b_id, "head": cluster.head_node.node_id,
                      "cpu_node": cpu_node.node_id,
                      "images": result.images, "shards": plan.num_shards,
                      "run_id": plan.run_id, **seen}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
