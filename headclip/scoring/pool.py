"""A pool of scoring actors that follows the cluster: it grows as nodes join and shrinks when idle.

The pool holds between ``min_actors`` and ``max_actors`` actors of one size
(:class:`ActorSize`). Its target is what the live nodes can hold in total (so a
node that joins mid-run gets an actor at the next tick), never more than the
work left. Actors the cluster cannot hold yet stay pending: Ray reports them
to the autoscaler as resource demand, which is how a cluster with no GPU node
scales up. An actor is given shards only once it has loaded its model
(:meth:`ActorPool.ready_refs`); with no shard left to give, idle actors are
stopped at once. A dead actor's slot is started again while the target needs
it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .placement import describe_need, live_nodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSize:
    """What one scoring actor reserves: CPUs, GPUs and custom resources (e.g. an accelerator type).

    ``leave_cpus``: CPUs of the cluster that actors leave free (for the decode
    and encode tasks, with the CPU stages as tasks).
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


@dataclass
class _Slot:
    actor: Any
    name: str
    generation: int
    ready_ref: Any = None
    ready: bool = False
    node: Optional[str] = None


class ActorPool:
    """Scoring actors in numbered slots; the driver loop asks it for targets, readiness and deaths."""

    def __init__(self, remote_cls, init_args: tuple, size: ActorSize, prefix: str, min_actors: int = 1,
                 max_actors: Optional[int] = None, nodes: Callable[[], list[dict]] = live_nodes,
                 autoscaled: Optional[int] = None):
        self.remote_cls, self.init_args, self.size, self.prefix = remote_cls, init_args, size, prefix
        self.min_actors = max(0, min_actors)
        self.max_actors = max_actors
        self.nodes = nodes
        self.autoscaled = autoscaled  # actors the autoscaler's node types can hold at most (None: no autoscaler)
        self.slots: dict[int, _Slot] = {}
        self.generations: dict[int, int] = {}
        self.started = 0  # actors started over the run (restarts included)

    # -- sizing ------------------------------------------------------------------------
    def capacity(self) -> int:
        """Actors the live nodes can hold in total now."""
        return self.size.fits_in_cluster(self.nodes())

    def target(self, work_left: int) -> int:
        """Actors to hold for ``work_left`` shards not yet finished (queued or in flight).

        With an autoscaler that can add nodes for these actors, the target is
        what it can grow to (pending actors are its demand); otherwise what the
        live nodes hold now.
        """
        grow_to = work_left if self.autoscaled == -1 else (self.autoscaled or 0)
        target = max(self.capacity(), grow_to, self.min_actors)
        if self.max_actors is not None:
            target = min(target, self.max_actors)
        return max(0, min(target, work_left))

    # -- starting, stopping --------------------------------------------------------------
    def _start(self, slot: int) -> _Slot:
        generation = self.generations.get(slot, -1) + 1
        self.generations[slot] = generation
        name = f"{self.prefix}-{slot}-{generation}"
        actor = self.remote_cls.options(name=name, num_cpus=self.size.cpus, num_gpus=self.size.gpus,
                                        resources=dict(self.size.resources) or None,
                                        max_restarts=0).remote(*self.init_args)
        entry = _Slot(actor, name, generation, ready_ref=actor.ready.remote())
        self.slots[slot] = entry
        self.started += 1
        return entry

    def scale_to(self, target: int) -> list[str]:
        """Start actors in free slots up to ``target``; the names started."""
        started = []
        slot = 0
        while len(self.slots) < target:
            while slot in self.slots:
                slot += 1
            started.append(self._start(slot).name)
        if started:
            log.info("scoring pool: starting %d actor%s (%s each); %d in the pool", len(started),
                     "s" if len(started) > 1 else "", describe_need(self.size.need()), len(self.slots))
        return started

    def restart(self, slot: int) -> _Slot:
        return self._start(slot)

    def stop(self, slot: int) -> None:
        """Stop a slot's actor: a ready one closes its I/O threads first, a pending one is just removed."""
        entry = self.slots.pop(slot, None)
        if entry is not None:
            _stop(entry.actor, close=entry.ready)

    def forget(self, slot: int) -> None:
        """Drop a slot whose actor died; the next :meth:`scale_to` starts it again if the target needs it."""
        self.slots.pop(slot, None)

    def stop_all(self) -> None:
        for slot in list(self.slots):
            self.stop(slot)

    # -- readiness ---------------------------------------------------------------------
    def ready_refs(self) -> dict[Any, int]:
        """The readiness calls still pending: ref -> slot."""
        return {entry.ready_ref: slot for slot, entry in self.slots.items() if not entry.ready}

    def mark_ready(self, slot: int, node: Optional[str]) -> None:
        entry = self.slots[slot]
        entry.ready, entry.node = True, node

    def ready_slots(self) -> list[int]:
        return sorted(slot for slot, entry in self.slots.items() if entry.ready)

    def pending_slots(self) -> list[int]:
        return sorted(slot for slot, entry in self.slots.items() if not entry.ready)


def _stop(actor, close: bool, timeout: float = 10.0) -> None:
    """Let an actor shut its thread pool down (bounded wait), then kill it."""
    import ray

    if close:
        try:
            ray.wait([actor.close.remote()], timeout=timeout)
        except Exception:  # noqa: BLE001 - a dead actor has nothing to close
            pass
    ray.kill(actor, no_restart=True)
