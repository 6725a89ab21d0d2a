"""Scale an autoscaling Ray cluster up to N GPUs and wait until they have joined.

The scoring pool of `jobs.score` (and of the audit) follows the cluster: with
`--gpus-per-actor 1` its pending actors are demand the autoscaler acts on, and
it grows as GPU nodes join. Without that flag, a cluster whose GPU workers have
scaled to zero gets CPU actors. Submit this first, as its own job, to start a
run at full width, with N GPU nodes already up:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env cluster/runtime_env.yaml -- python cluster/wait_for_gpus.py --gpus 4

It asks the autoscaler for N one-GPU bundles (ray.autoscaler.sdk.request_resources),
polls ray.cluster_resources() until the cluster has N GPUs, then withdraws the
request: the nodes stay up for the autoscaler's idle timeout (10 minutes in
cluster/), long enough for the scoring job submitted next to place its actors.
Exit 0 once the GPUs are there, 1 on timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/wait_for_gpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1, help="GPUs to wait for (default 1)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait (default 1200)")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks (default 10)")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else auto)")
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error("--gpus must be at least 1")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    start = time.monotonic()
    request_resources(bundles=[{"GPU": 1}] * args.gpus)
    try:
        while True:
            have = ray.cluster_resources().get("GPU", 0.0)
            waited = time.monotonic() - start
            if have >= args.gpus:
                print(f"cluster has {have:g} GPUs (wanted {args.gpus}) after {waited:.0f}s", flush=True)
                return 0
            if waited > args.timeout:
                print(f"timed out after {waited:.0f}s: cluster has {have:g} of {args.gpus} GPUs "
                      "(check max_workers / maxReplicas and the cloud's GPU quota)", file=sys.stderr, flush=True)
                return 1
            print(f"waiting for GPUs: {have:g} of {args.gpus} after {waited:.0f}s", flush=True)
            time.sleep(args.poll)
    finally:
        request_resources(bundles=[])


if __name__ == "__main__":
    sys.exit(main())
