"""Placing scoring actors: their size, the pool's bounds, and whether the cluster can hold one at all.

Ray keeps an actor whose resources no node has pending forever. Before the
pipeline starts, the driver compares one actor's request (CPUs, GPUs) with each
live node's total resources. When none fits it says so at once: that it waits
for the autoscaler to add a node (when the cluster reports an autoscaler
whose node types can provide it), or that no node can hold it; Ray Data then
waits up to ``--placement-timeout`` seconds for the pool's first actor.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..errors import PlacementError
from .config import DEFAULT_PLACEMENT_TIMEOUT as DEFAULT_TIMEOUT
from .config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSize:
    """What one scoring actor reserves: CPUs, GPUs and custom resources (e.g. an accelerator type).

    ``leave_cpus``: CPUs of the cluster that actors leave free (for the read,
    decode and publish tasks).
    """

    cpus: float
    gpus: float = 0.0
    resources: dict = field(default_factory=dict)
    leave_cpus: float = 0.0

    def need(self) -> dict[str, float]:
        need = {"CPU": float(self.cpus), "GPU": float(self.gpus)}
        need.update({name: float(amount) for name, amount in self.resources.items()})
        return {name: amount for name, amount in need.items() if amount > 0}

    def fits_in(self, node: dict[str, float]) -> int:
        """How many such actors a node with total ``node`` resources holds."""
        need = self.need()
        if not need:
            return 0
        return int(min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in need.items()))

    def fits_in_cluster(self, nodes: list[dict[str, float]]) -> int:
        """How many such actors live ``nodes`` hold together, ``leave_cpus`` of their CPUs left free."""
        count = sum(self.fits_in(node) for node in nodes)
        if self.leave_cpus and self.cpus:
            free = sum(node.get("CPU", 0.0) for node in nodes) - self.leave_cpus
            count = min(count, max(0, int(math.floor(free / self.cpus + 1e-9))))
        return count


def _fits(resources: dict, need: dict[str, float]) -> bool:
    return all(resources.get(name, 0.0) >= amount for name, amount in need.items() if amount > 0)


def node_can_hold(need: dict[str, float], nodes: Optional[list[dict]] = None) -> bool:
    """Whether some live node (of ``nodes``, default the cluster's now) has the resources ``need`` in total."""
    return any(_fits(node, need) for node in (live_nodes() if nodes is None else nodes))


def live_nodes() -> list[dict]:
    """Each live node's total resources."""
    import ray

    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def _autoscaler_groups() -> Optional[list]:
    """The autoscaler's node groups (resources, max_count), or None without an autoscaler config."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or differently built Ray: treat as no autoscaler
        return None
    if config is None or not config.node_group_configs:
        return None
    return list(config.node_group_configs)


def _autoscaler_can_add(need: dict[str, float]) -> Optional[bool]:
    """True/False: whether an autoscaler node type provides ``need``; None without an autoscaler config."""
    groups = _autoscaler_groups()
    if groups is None:
        return None
    return any(group.max_count != 0 and _fits(dict(group.resources), need) for group in groups)


def describe_need(need: dict[str, float]) -> str:
    return " and ".join(f"{amount:g} {name}" for name, amount in need.items())


def check_placement(cpus: float, gpus: float, resources: Optional[dict] = None, timeout: float = DEFAULT_TIMEOUT,
                    nodes: Callable[[], list[dict]] = live_nodes, what: str = "a scoring actor") -> bool:
    """True when some live node can hold ``what`` of ``cpus``/``gpus`` (and custom ``resources``) now.

    Otherwise PlacementError at once when the cluster's autoscaler has no node
    type that provides it; else False, with a warning that the run waits up to
    ``timeout`` seconds for such a node.
    """
    need = _need(cpus, gpus, resources)
    if any(_fits(node, need) for node in nodes()):
        return True
    have = largest_node(nodes())
    autoscaler = _autoscaler_can_add(need)
    if autoscaler is False:
        raise PlacementError(f"no node can hold {what} needing {describe_need(need)} ({have}), and no "
                             f"node type of the cluster's autoscaler provides it")
    if autoscaler:
        log.warning("no node can hold %s needing %s yet (%s); waiting up to %gs for the autoscaler "
                    "to add one", what, describe_need(need), have, timeout)
    else:
        log.warning("no node can hold %s needing %s (%s); waiting up to %gs for one to join "
                    "(--placement-timeout)", what, describe_need(need), have, timeout)
    return False


def wait_for_node(cpus: float, gpus: float, resources: Optional[dict], timeout: float, what: str, advice: str,
                  poll: float = 1.0, nodes: Callable[[], list[dict]] = live_nodes) -> None:
    """Return once a live node can hold ``what``, or an autoscaler can add one (the pending work is the
    demand it acts on); PlacementError at once when the autoscaler has no node type for it, and after
    ``timeout`` seconds when the cluster has no autoscaler and no such node joined."""
    if check_placement(cpus, gpus, resources, timeout, nodes, what):
        return
    need = _need(cpus, gpus, resources)
    if _autoscaler_can_add(need):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        if any(_fits(node, need) for node in nodes()):
            log.info("a node that can hold %s has joined", what)
            return
    raise PlacementError(f"no node can hold {what} needing {describe_need(need)} ({largest_node(nodes())}); gave up "
                         f"after {timeout:g}s (--placement-timeout); {advice}")


def wait_for_stage_nodes(config: JobConfig, poll: float = 1.0, nodes: Callable[[], list[dict]] = live_nodes) -> None:
    """:func:`wait_for_node` for a read/decode or publish task."""
    wait_for_node(config.stage_cpus, 0.0, config.stage_resources, config.placement_timeout,
                  "a read, decode or publish task", "lower --stage-cpus or --stage-resources, or add nodes", poll, nodes)


def _need(cpus: float, gpus: float, resources: Optional[dict]) -> dict[str, float]:
    return {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in (resources or {}).items()}}


def largest_node(nodes: list[dict]) -> str:
    """'the largest node has N CPU and M GPU', of live ``nodes``."""
    largest = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    return f"the largest node has {largest.get('CPU', 0.0):g} CPU and {largest.get('GPU', 0.0):g} GPU"


def autoscaler_capacity(fits_in: Callable[[dict], int]) -> Optional[int]:
    """How many actors the autoscaler's node types can hold at their maximum counts; None without an
    autoscaler config, or -1 when a fitting node type has no maximum."""
    groups = _autoscaler_groups()
    if groups is None:
        return None
    total = 0
    for group in groups:
        each = fits_in(dict(group.resources))
        if each and group.max_count < 0:
            return -1
        total += each * max(0, group.max_count)
    return total


def pool_bounds(config: JobConfig, size: ActorSize, work: int) -> tuple[int, int]:
    """(min, max) actors for ``work`` shards: ``--actors`` fixes both; else at most what the autoscaler can add
    (or the live nodes hold, when that is more) and never more than the work. Without an autoscaler config the
    maximum is the work, so a node that joins mid-run gets an actor.

    CPU actors on a cluster without an autoscaler are held to what its live nodes hold with ``--stage-cpus``
    left free: more would take the CPUs the read/decode and publish tasks wait for, and the run would stall.
    """
    if config.actors:
        low, high = min(config.actors, work), min(config.actors, work)
    else:
        autoscaled = autoscaler_capacity(size.fits_in)
        live = size.fits_in_cluster(live_nodes())
        high = work if autoscaled in (None, -1) else max(autoscaled, live)
        if config.max_actors is not None:
            high = min(high, config.max_actors)
        high = max(1, min(high, work))
        low = max(1, min(config.min_actors, high))
    nodes = live_nodes()
    alone = sum(size.fits_in(node) for node in nodes)  # 0: no node holds one yet, the placement wait decides
    if alone and not size.gpus and not size.resources and autoscaler_capacity(size.fits_in) is None:
        room = size.fits_in_cluster(nodes)
        if room < 1:
            raise PlacementError(f"no node can hold a scoring actor of {size.cpus:g} CPU beside a read/decode task "
                                 f"of {size.leave_cpus:g} CPU ({largest_node(nodes)}); lower --cpus-per-actor "
                                 f"or --stage-cpus")
        if high > room and (config.actors or config.max_actors or config.min_actors > room):  # asked for more
            log.warning("the cluster holds %d CPU actors of %g CPU beside the read/decode and publish tasks: the "
                        "pool is held to %d (asked: %d)", room, size.cpus, room, high)
        low, high = min(low, room), min(high, room)
    return low, high


def cpus_per_gpu(nodes: Sequence[dict]) -> Optional[float]:
    """The fewest CPUs per GPU on any live GPU node (``ray.nodes()`` entries), or None without GPU nodes."""
    shares = [node["Resources"].get("CPU", 0.0) / node["Resources"]["GPU"] for node in nodes
              if node.get("Alive", True) and node.get("Resources", {}).get("GPU", 0) > 0]
    return min(shares) if shares else None


def actor_layout(config: JobConfig, resources: dict[str, float], num_shards: int,
                 gpu_node_cpus_per_gpu: Optional[float] = None) -> tuple[int, float, float]:
    """(actors, gpus per actor, cpus per actor) for a cluster with ``resources`` now.

    An explicit ``gpus_per_actor > 0`` requests GPU actors even when the
    cluster has no GPU yet (an autoscaler adds them); 0 forces CPU actors. A
    GPU actor takes its GPUs' share of the CPUs of a GPU node
    (``gpu_node_cpus_per_gpu``, from :func:`cpus_per_gpu`; 4 per GPU when no
    GPU node is up yet), less ``stage_cpus``: a default-sized actor leaves
    those to the read, decode and publish tasks, so that on one machine the
    actors do not take every CPU and leave those tasks waiting for ever.
    """
    gpus, cpus = resources.get("GPU", 0.0), max(1.0, resources.get("CPU", 1.0))
    reserve = float(config.stage_cpus)
    explicit = config.gpus_per_actor
    if explicit is not None and explicit > 0 or explicit is None and gpus > 0:
        per_actor = explicit or 1.0
        actors = config.actors or max(1, int(gpus // per_actor))
        share = gpu_node_cpus_per_gpu if gpu_node_cpus_per_gpu is not None else 4.0
        cpus_per_actor = config.cpus_per_actor or max(1.0, float(int(share * per_actor - reserve)))
        return max(1, min(actors, num_shards)), per_actor, cpus_per_actor
    cpus = max(1.0, cpus - reserve)
    default_cpus = cpus if cpus <= 4 else 4.0
    cpus_per_actor = config.cpus_per_actor or (max(1.0, float(int(cpus // config.actors))) if config.actors
                                               else default_cpus)
    actors = config.actors or max(1, int(cpus // cpus_per_actor))
    return max(1, min(actors, num_shards)), 0.0, cpus_per_actor
