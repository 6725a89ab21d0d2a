"""Whether the cluster can hold a scoring actor at all, said within seconds, with a bounded wait.

Ray keeps an actor whose resources no node has pending forever. Before the
actors start, the driver compares one actor's request (CPUs, GPUs) with each
live node's total resources. When none fits it says so at once: that it waits
for the autoscaler to add a node (when the cluster reports an autoscaler
whose node types can provide it), or that no node can hold it. It then waits
up to ``timeout`` seconds for such a node and fails with one line.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from ..errors import PlacementError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds; a cloud GPU node usually joins within a few minutes


def _fits(resources: dict, need: dict[str, float]) -> bool:
    return all(resources.get(name, 0.0) >= amount for name, amount in need.items() if amount > 0)


def _live_nodes() -> list[dict]:
    import ray

    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def _autoscaler_can_add(need: dict[str, float]) -> Optional[bool]:
    """True/False: whether an autoscaler node type provides ``need``; None without an autoscaler config."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or differently built Ray: treat as no autoscaler
        return None
    if config is None or not config.node_group_configs:
        return None
    return any(group.max_count != 0 and _fits(dict(group.resources), need) for group in config.node_group_configs)


def _describe(need: dict[str, float]) -> str:
    return " and ".join(f"{amount:g} {name}" for name, amount in need.items())


def wait_for_placement(cpus: float, gpus: float, timeout: float = DEFAULT_TIMEOUT, poll: float = 1.0,
                       nodes: Callable[[], list[dict]] = _live_nodes) -> None:
    """Return once some live node can hold an actor of ``cpus``/``gpus``; PlacementError after ``timeout``."""
    need = {"CPU": float(cpus), "GPU": float(gpus)}
    if any(_fits(resources, need) for resources in nodes()):
        return
    largest = max(nodes(), key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    have = f"the largest node has {largest.get('CPU', 0.0):g} CPU and {largest.get('GPU', 0.0):g} GPU"
    autoscaler = _autoscaler_can_add(need)
    if autoscaler is False:
        raise PlacementError(f"no node can hold a scoring actor needing {_describe(need)} ({have}), and no "
                             f"node type of the cluster's autoscaler provides it")
    if autoscaler:
        log.warning("no node can hold a scoring actor needing %s yet (%s); waiting up to %gs for the autoscaler "
                    "to add one", _describe(need), have, timeout)
    else:
        log.warning("no node can hold a scoring actor needing %s (%s); waiting up to %gs for one to join "
                    "(--placement-timeout)", _describe(need), have, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        if any(_fits(resources, need) for resources in nodes()):
            log.info("a node that can hold the scoring actors has joined")
            return
    raise PlacementError(f"no node can hold a scoring actor needing {_describe(need)} ({have}); gave up after "
                         f"{timeout:g}s (--placement-timeout); lower --cpus-per-actor/--gpus-per-actor or add nodes")
