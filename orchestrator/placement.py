"""Where a job's actors run: one Ray placement group per pool, or per set of colocated pools.

Each worker of a pool gets its own bundle (its CPUs, GPUs and custom node resources such as
`{"rollout_node": 1}`); colocated pools share one placement group whose bundle i holds worker i of every
pool in the set, so those workers land on the same node and split its resources. Reserving the bundles
before any actor starts makes "not enough resources" a bounded wait with a message naming the pool,
instead of actors queueing forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import (PlacementGroup, placement_group, placement_group_table,
                                      remove_placement_group)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

_EPS = 1e-9
_EMPTY_BUNDLE = {"CPU": 0.01}  # Ray refuses empty bundles; an actor asking for nothing still gets one


class PlacementError(RuntimeError):
    """The cluster cannot place (or start) the actors a pool asks for."""


@dataclass
class PoolDemand:
    """One pool: its name and what each of its workers asks for (CPU, GPU, custom resources), in worker order."""

    name: str
    needs: list[dict[str, float]]

    @property
    def count(self) -> int:
        return len(self.needs)

    @property
    def alike(self) -> bool:
        return all(n == self.needs[0] for n in self.needs)

    def each(self) -> str:
        """What one worker asks for when all ask alike, else the list of asks."""
        return str(self.needs[0]) if self.alike else str(self.needs)

    def describe(self) -> str:
        """'N x {...}' when every worker asks alike, else the list of asks."""
        return f"{self.count} x {self.needs[0]}" if self.alike else str(self.needs)


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def plan_groups(pools: list[PoolDemand], colocate: list[list[str]]) -> list[tuple[list[str], list[dict[str, float]]]]:
    """(pool names, bundles) of every placement group: one group per colocated set (pools without workers
    left out) and one per remaining pool. Bundle i of a set is the sum of what worker i of each of its pools
    asks, so pools of different sizes share the first bundles."""
    by_name = {p.name: p for p in pools if p.count}
    sets = [[n for n in group if n in by_name] for group in colocate]
    sets = [s for s in sets if s]
    grouped = {n for s in sets for n in s}
    sets += [[p.name] for p in pools if p.count and p.name not in grouped]
    plans = []
    for names in sets:
        size = max(by_name[n].count for n in names)
        bundles = [{} for _ in range(size)]
        for n in names:
            for i, need in enumerate(by_name[n].needs):
                bundles[i] = _add(bundles[i], need)
        plans.append((names, [{k: v for k, v in b.items() if v > 0} or dict(_EMPTY_BUNDLE) for b in bundles]))
    return plans


def shortfall(pools: list[PoolDemand], total: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{resource: (asked, cluster total)} for every resource the pools ask more of than the cluster has."""
    demand: dict[str, float] = {}
    for p in pools:
        for need in p.needs:
            demand = _add(demand, need)
    return {k: (v, total.get(k, 0.0)) for k, v in sorted(demand.items()) if v > total.get(k, 0.0) + _EPS}


class Placement:
    """The reserved placement groups of a job; `options(pool, i)` schedules worker i of a pool into its bundle."""

    def __init__(self, pools: list[PoolDemand], colocate: list[list[str]], strategy: str = "PACK",
                 timeout_s: float = 600.0, fail_fast: bool = True, name: str = "raylhf"):
        """Reserve every bundle, waiting at most `timeout_s`. With `fail_fast` (an embedded Ray, which will never
        grow) asking for more than the cluster's total fails at once. PlacementError names the pools that could
        not be placed, what each worker asks for and what the cluster has free; nothing stays reserved then."""
        self.pools = {p.name: p for p in pools}
        short = shortfall(pools, ray.cluster_resources())
        if short and fail_fast:
            asks = "; ".join(f"{p.name}: {p.describe()}" for p in pools if p.count)
            raise PlacementError("the pools ask for more than the cluster has: " + ", ".join(
                f"{k} {v:g} of {have:g}" for k, (v, have) in short.items()) + f" ({asks}); shrink the pools' "
                "num_workers / num_cpus / num_gpus / resources, or add nodes")
        self.groups: dict[str, PlacementGroup] = {}  # pool -> its (possibly shared) group
        self._pgs: list[tuple[list[str], PlacementGroup]] = []
        for names, bundles in plan_groups(pools, colocate):
            pg = placement_group(bundles, strategy=strategy, name=f"{name}-{'+'.join(names)}")
            self._pgs.append((names, pg))
            for n in names:
                self.groups[n] = pg
        self.deadline = time.monotonic() + timeout_s
        refs = {pg.ready(): names for names, pg in self._pgs}
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            waiting = [n for r in pending for n in refs[r]]
            self.remove()
            raise PlacementError(
                f"after {timeout_s:g} s (ray.startup_timeout_s) these pools still wait to be placed: "
                + "; ".join(f"{n} ({self.pools[n].count} actor(s), each {self.pools[n].each()})" for n in waiting)
                + f" (strategy {strategy}); the cluster has free: {ray.available_resources()}. Add nodes that offer "
                "these resources, or shrink the pools")

    def options(self, pool: str, index: int) -> dict:
        """Ray actor options placing worker `index` of `pool` in its bundle (its own resources still asked)."""
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.groups[pool], placement_group_bundle_index=index, placement_group_capture_child_tasks=True)}

    def nodes(self, pool: str) -> list[str]:
        """The Ray node id of each worker's bundle of `pool` (reserved, so already on a node)."""
        where = placement_group_table(self.groups[pool])["bundles_to_node_id"]
        return [where[i] for i in range(self.pools[pool].count)]

    def remaining_s(self) -> float:
        """Seconds left of the start-up budget (actors must be constructed within it too)."""
        return max(0.0, self.deadline - time.monotonic())

    def remove(self) -> None:
        """Give every reserved bundle back."""
        for _, pg in self._pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with its cluster
                pass
        self._pgs = []


def wait_constructed(pools: list[tuple[PoolDemand, list]], timeout_s: float) -> None:
    """Wait at most `timeout_s` for every actor's constructor (model loading) of each (pool, its actors); one
    that failed raises with its traceback, and PlacementError names the pools still loading."""
    refs = {a.__ray_ready__.remote(): d for d, actors in pools for a in actors}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)
    if pending:
        waiting = sorted({refs[r].name: refs[r] for r in pending}.items())
        raise PlacementError(
            "after the ray.startup_timeout_s budget these pools still wait to be placed or to load: "
            + "; ".join(f"{n} ({sum(refs[r] is d for r in pending)} actor(s), each {d.each()})" for n, d in waiting)
            + f"; the cluster has free: {ray.available_resources()}")
