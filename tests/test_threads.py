"""`threads: auto`: each actor's torch threads follow the placement (orchestrator/threads.py), worked out by hand
for on-policy and asynchronous jobs, shared and lone nodes, and a multi-node cluster; one real embedded Ray job."""

from __future__ import annotations

import os

import pytest

from orchestrator.config import JobConfig
from orchestrator.pool_specs import config_rewards, omp_wait, placed_threads, pool_specs
from orchestrator.threads import auto_threads, ray_node_cores, resolve_threads
from tests.conftest import base_config

AUTO_ALL = {"rollout": "auto", "scoring": "auto", "trainer": "auto", "critic": "auto"}


def _resolve(nodes, cores, on_policy=True, asked=None, cpus=None):
    asked = {k: v for k, v in (asked or AUTO_ALL).items() if k in nodes}
    cpus = cpus or {}
    return resolve_threads(asked, nodes, {p: [cpus.get(p, 1.0)] * len(w) for p, w in nodes.items()}, cores, on_policy)


def test_on_policy_one_actor_per_pool_takes_every_core_of_its_node_in_its_turn():
    # A 2-core box, one rollout worker and one trainer rank: generation and training take turns, 2 threads each.
    assert _resolve({"rollout": ["a"], "trainer": ["a"]}, {"a": 2}) == {"rollout": [2], "trainer": [2]}


def test_on_policy_actors_of_a_pool_on_one_node_divide_its_cores():
    # 2 rollout workers on a 2-core node: 1 each; on a 5-core node: 5 // 2 = 2 each (never more than the cores).
    assert _resolve({"rollout": ["a", "a"], "trainer": ["a"]}, {"a": 2}) == {"rollout": [1, 1], "trainer": [2]}
    assert _resolve({"rollout": ["a", "a"], "trainer": ["a"]}, {"a": 5}) == {"rollout": [2, 2], "trainer": [5]}


def test_pools_computing_in_the_same_phase_share_the_node():
    # Scoring streams behind generation and the critic trains beside the policy: on an 8-core node, 1 rollout +
    # 1 scoring worker (generate) get 4 each, 1 policy + 1 critic rank (train) 4 each; a reward model counts as a
    # sharer of the generate phase (3 actors: 8 // 3 = 2) though its own threads are not set here.
    nodes = {"rollout": ["a"], "scoring": ["a"], "trainer": ["a"], "critic": ["a"]}
    assert _resolve(nodes, {"a": 8}) == {"rollout": [4], "scoring": [4], "trainer": [4], "critic": [4]}
    nodes["reward_model"] = ["a"]
    assert _resolve(nodes, {"a": 8})["rollout"] == [2]


def test_asynchronous_mode_gives_each_actor_its_reservation_at_least_one():
    # Generation and training overlap: num_cpus 1 -> 1, 0.5 -> 1, 3 -> 3; 4 on a 2-core node -> 2 (the cores).
    nodes = {"rollout": ["a"], "scoring": ["a"], "trainer": ["b"]}
    got = _resolve(nodes, {"a": 8, "b": 2}, on_policy=False, cpus={"rollout": 3.0, "scoring": 0.5, "trainer": 4.0})
    assert got == {"rollout": [3], "scoring": [1], "trainer": [2]}
    assert _resolve({"rollout": ["a"], "trainer": ["a"]}, {"a": 2}, on_policy=False) == {"rollout": [1], "trainer": [1]}
    assert auto_threads(node_cores=16, sharers=4, num_cpus=2.0, on_policy=False) == 2
    assert auto_threads(node_cores=16, sharers=4, num_cpus=2.0, on_policy=True) == 4


def test_an_explicit_int_wins():
    asked = {"rollout": 3, "trainer": "auto"}
    assert _resolve({"rollout": ["a", "a"], "trainer": ["a"]}, {"a": 2}, asked=asked) == {"rollout": [3, 3],
                                                                                          "trainer": [2]}
    assert _resolve({"rollout": ["a"]}, {"a": 8}, on_policy=False, asked={"rollout": 6}) == {"rollout": [6]}


def test_on_a_multi_node_cluster_each_actor_gets_its_own_nodes_count():
    # Rollout workers on an 8-core and a 4-core node, two of them on a 16-core node; two trainer ranks on one 32-core
    # node; a scoring worker colocated with the first rollout worker.
    nodes = {"rollout": ["r8", "r4", "r16", "r16"], "scoring": ["r8"], "trainer": ["t32", "t32"]}
    cores = {"r8": 8, "r4": 4, "r16": 16, "t32": 32}
    assert _resolve(nodes, cores) == {"rollout": [4, 4, 8, 8], "scoring": [4], "trainer": [16, 16]}


class _FakePlacement:
    def __init__(self, nodes: dict[str, list[str]]):
        self._nodes = nodes

    def nodes(self, pool: str) -> list[str]:
        return self._nodes[pool]


def test_resolved_threads_reach_every_actors_constructor_arguments(tiny_model, monkeypatch):
    """PPO (a critic) with a reference to score: the rollout and scoring workers get `threads`, the policy and
    critic ranks `trainer["threads"]`; the reward workers are left as they were."""
    cfg = JobConfig.model_validate(base_config(tiny_model, algorithm={"estimator": "gae", "kl_coef": 0.1},
                                               rollout={"num_workers": 2}, scoring={"threads": 3}))
    specs = pool_specs(cfg, tiny_model, config_rewards(cfg))
    where = {s.name: ["n"] * len(s.needs) for s in specs}
    monkeypatch.setattr("orchestrator.pool_specs.ray_node_cores", lambda: {"n": 8})
    out = {s.name: s for s in placed_threads(cfg, specs, _FakePlacement(where))}
    # generate phase on node n: 2 rollout + 1 scoring = 3 sharers -> 8 // 3 = 2; train: policy + critic -> 4
    assert [kw["threads"] for kw in out["rollout"].kwargs] == [2, 2]
    assert [kw["threads"] for kw in out["scoring"].kwargs] == [3]  # explicit
    assert [kw["trainer"]["threads"] for kw in out["trainer"].kwargs] == [4]
    assert [kw["trainer"]["threads"] for kw in out["critic"].kwargs] == [4]
    assert out["reward"].kwargs == {s.name: s for s in specs}["reward"].kwargs and out["reward"].kwargs
    assert all(kw["threads"] == "auto" for kw in {s.name: s for s in specs}["rollout"].kwargs)  # specs not mutated


def test_cpu_actors_openmp_threads_wait_passively_unless_the_driver_says_otherwise(tiny_model):
    assert omp_wait({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert omp_wait({"OMP_WAIT_POLICY": "ACTIVE", "X": "1"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert omp_wait({"GOMP_SPINCOUNT": "300000"}) == {"GOMP_SPINCOUNT": "300000"}  # libgomp's default spin again
    cfg = JobConfig.model_validate(base_config(tiny_model, algorithm={"kl_coef": 0.1}))
    envs = {s.name: s.runtime_env for s in pool_specs(cfg, tiny_model, config_rewards(cfg))}
    for pool in ("rollout", "scoring", "trainer", "reward"):
        assert envs[pool]["env_vars"].items() >= omp_wait(dict(os.environ)).items(), pool


@pytest.mark.slow
def test_actors_built_with_the_default_run_the_resolved_threads(ray_local, tiny_model):
    """The session's embedded Ray offers 8 logical CPUs whatever the machine, so its node counts as the cores this
    process may run on (no more). An on-policy job with 2 rollout workers and 1 trainer rank there: the rollout
    workers divide the cores, the trainer rank takes them all, as `torch.get_num_threads()` in each actor reports
    (on 2 cores: 1, 1 and 2, where an unresolved "auto" would give every actor 2)."""
    import torch

    from orchestrator.pools import Pools

    cores = min(8, len(os.sched_getaffinity(0)))
    assert ray_node_cores()[ray_local.get_runtime_context().get_node_id()] == cores
    cfg = JobConfig.model_validate(base_config(tiny_model, rollout={"num_workers": 2}))
    pools = Pools(cfg, tiny_model, [("hash", "rewards.final_answer:hash_answer", 1.0)])
    try:
        threads = [ray_local.get(a.__ray_call__.remote(lambda self: torch.get_num_threads()))
                   for a in (*pools.rollout, *pools.trainers)]
        wait = ray_local.get(pools.trainers[0].__ray_call__.remote(lambda self: os.environ.get("OMP_WAIT_POLICY")))
    finally:
        pools.shutdown()
    assert threads == [max(1, cores // 2)] * 2 + [cores]
    assert wait == os.environ.get("OMP_WAIT_POLICY", "PASSIVE" if "GOMP_SPINCOUNT" not in os.environ else None)
