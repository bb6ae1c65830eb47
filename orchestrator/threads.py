"""Torch threads per actor when a pool's `threads` is "auto": the cores its node offers the pool while the pool
computes, shared with the actors that compute at the same time on that node (docs/performance.md, Threads).

In strict on-policy mode (`loop.max_staleness: 0`) a step generates, then trains: the rollout workers, and the
scoring workers and reward models that stream behind them chunk by chunk (`Pools.submit_groups`), compute together
while the trainer ranks wait; then the trainer ranks and the critic ranks beside them compute while the rest wait. So
an actor gets its node's cores divided by the actors of its phase on that node. In asynchronous mode every pool
computes at once, and an actor gets what it reserved (`num_cpus`, at least 1). An int in the config wins.
"""

from __future__ import annotations

import math
import os
from collections import Counter

AUTO = "auto"
# The pools that compute together in strict on-policy mode. Rule-based reward workers and environment hosts are
# light Python and keep their own settings; a reward model computes beside generation, so it counts as a sharer.
PHASES = {"rollout": "generate", "scoring": "generate", "reward_model": "generate",
          "trainer": "train", "critic": "train"}


def auto_threads(node_cores: int, sharers: int, num_cpus: float, on_policy: bool) -> int:
    """Threads for one actor: on-policy, its node's `node_cores` over the `sharers` actors (itself included) that
    compute there at the same time; asynchronous, its own reservation `num_cpus` (at most the node's cores).
    At least 1 either way."""
    if on_policy:
        return max(1, node_cores // max(1, sharers))
    return max(1, min(math.floor(num_cpus + 1e-9), node_cores))


def resolve_threads(asked: dict[str, int | str], nodes: dict[str, list[str]], num_cpus: dict[str, list[float]],
                    node_cores: dict[str, int], on_policy: bool) -> dict[str, list[int]]:
    """Threads of every worker of each pool in `asked` ({pool: int or "auto"}). `nodes`: {pool: the node id of each
    worker}, for every pool that computes with torch (sharers are counted over all of them); `num_cpus`: {pool: each
    worker's reservation}; `node_cores`: {node id: the cores it offers}."""
    sharers = Counter((PHASES[pool], node) for pool, where in nodes.items() if pool in PHASES for node in where)
    out = {}
    for pool, threads in asked.items():
        if threads != AUTO:
            out[pool] = [int(threads)] * len(nodes.get(pool, []))
            continue
        out[pool] = [auto_threads(node_cores[node], sharers[PHASES[pool], node], cpus, on_policy)
                     for node, cpus in zip(nodes[pool], num_cpus[pool])]
    return out


def ray_node_cores() -> dict[str, int]:
    """{node id: cores} of the live Ray nodes: the CPUs Ray offers there (what the node was started with, which Ray
    detects from the machine or its container's limit), and on the driver's own node at most the cores this process
    may run on (an embedded Ray may offer more logical CPUs than there are cores, to fit the pools)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    cores = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}
    if here in cores:
        cores[here] = min(cores[here], len(os.sched_getaffinity(0)))
    return {node: max(1, c) for node, c in cores.items()}
