"""The multi-node run of test_cluster_scale.py on Ray Data's streaming executor (``--engine data``).

Its own file, so that the two multi-node runs (mostly waiting on node starts) go to different pytest workers.
"""

from __future__ import annotations

import pytest

from .scoring_helpers import slow_checkpoint
from .test_cluster_scale import check_cluster_run


@pytest.mark.multinode
def test_ray_data_pool_follows_nodes_that_join_and_die(tmp_path):
    """As on Ray core: the pending actor is demand, decoding and encoding run on the CPU-only node, node B
    gets an actor and shards, and dies with work left; each image once. The model is slower (640 px), so
    that the model stage, not decoding, holds the work back: Ray Data grows its pool while its actors are
    busy. Catches: a pool that does not grow onto B, stages fused into the model's actors, shards lost or
    counted twice when B dies."""
    check_cluster_run(tmp_path, slow_checkpoint(tmp_path, image_size=640), "data")
