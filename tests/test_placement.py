"""Placement of the pools: bundles per worker, colocation, custom node resources on a multi-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, JobConfig, read_config
from orchestrator.placement import PoolDemand, plan_groups, shortfall
from orchestrator.pool_specs import custom_resources_needed, job_demands, logical_cpus_needed
from tests.conftest import base_config

ROOT = Path(__file__).resolve().parents[1]


def test_each_pool_gets_one_bundle_per_worker_and_colocated_pools_share_summed_bundles():
    pools = [PoolDemand("rollout", [{"CPU": 1, "rollout_node": 1}] * 3), PoolDemand("reward", [{"CPU": 0.5}]),
             PoolDemand("scoring", [{"CPU": 0.5, "GPU": 0.25}] * 2), PoolDemand("critic", []),
             PoolDemand("trainer", [{"CPU": 2, "trainer_node": 1}] * 2)]
    plans = plan_groups(pools, [["scoring", "rollout"], ["critic"]])
    assert plans == [
        (["scoring", "rollout"], [{"CPU": 1.5, "GPU": 0.25, "rollout_node": 1}] * 2 + [{"CPU": 1, "rollout_node": 1}]),
        (["reward"], [{"CPU": 0.5}]),
        (["trainer"], [{"CPU": 2, "trainer_node": 1}] * 2),
    ]  # the critic has no workers: no group; a worker asking for nothing still gets a (tiny) bundle:
    assert plan_groups([PoolDemand("reward", [{}])], []) == [(["reward"], [{"CPU": 0.01}])]
    assert shortfall(pools, {"CPU": 8.5, "rollout_node": 2, "GPU": 1}) == {"rollout_node": (3, 2), "trainer_node": (2, 0)}


def test_config_pools_ask_for_their_resources_and_an_embedded_ray_offers_them(tiny_model):
    cfg = JobConfig.model_validate(base_config(
        tiny_model, rollout={"num_workers": 2, "num_cpus": 1, "resources": {"rollout_node": 1}},
        trainer={"num_workers": 2, "num_cpus": 2, "resources": {"trainer_node": 0.5}},
        reward={"num_cpus": 0.5, "resources": {"cpu_node": 1}, "functions": [{"name": "rewards.final_answer:hash_answer"}]},
        algorithm={"kl_coef": 0.01}))  # a reference to score: one scoring worker
    demands = {d.name: d.needs for d in job_demands(cfg)}
    assert demands["rollout"] == [{"CPU": 1, "rollout_node": 1}] * 2
    assert demands["trainer"] == [{"CPU": 2, "trainer_node": 0.5}] * 2
    assert demands["reward"] == [{"CPU": 0.5, "cpu_node": 1}] and demands["reward_model"] == []
    assert demands["scoring"] == [{"CPU": 0.5}] and demands["critic"] == []  # GRPO has no critic
    assert custom_resources_needed(cfg) == {"rollout_node": 2, "trainer_node": 1, "cpu_node": 1}
    assert logical_cpus_needed(cfg) == 2 * 1 + 0.5 + 0.5 + 2 * 2


@pytest.mark.parametrize("sections, message", [
    ({"rollout": {"resources": {"GPU": 1}}}, "rollout.resources: 'GPU' is set by num_cpus / num_gpus"),
    ({"trainer": {"resources": {"trainer_node": 0}}}, "trainer.resources: trainer_node must be > 0"),
    ({"placement": {"colocate": [["rollout", "scorer"]]}}, "unknown pool 'scorer'"),
    ({"placement": {"colocate": [["rollout", "scoring"], ["scoring"]]}}, "pool 'scoring' is named twice"),
    ({"rollout": {"engine": "vllm"}}, "rollout.num_gpus: the vllm engine runs on GPUs"),
    ({"rollout": {"engine": "vllm", "num_gpus": 1, "vllm": {"tensor_parallel_size": 2}}},
     "a tensor-parallel engine needs one whole GPU per shard"),
    ({"rollout": {"engine": "vllm", "num_gpus": 1, "vllm": {"weight_sync": "nccl"}}},
     "nccl broadcasts from a GPU trainer into vLLM"),
])
def test_bad_placement_settings_are_config_errors_naming_the_field(tiny_model, sections, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_config(JobConfig, None, [f"{k}={json.dumps(v)}" for k, v in _flatten(base_config(tiny_model, **sections))])


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("resources", "kwargs"):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# A 3-node cluster in one process tree (its own Ray, apart from the session's): two rollout nodes offering one
# rollout_node each (one is the head), one trainer node offering two trainer_node. The pools ask for those resources;
# scoring is colocated with rollout, so scoring worker i must sit with rollout worker i, on different nodes.
_CLUSTER_PROBE = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray.cluster_utils import Cluster
    from orchestrator.config import JobConfig
    from orchestrator.placement import PlacementError
    from orchestrator.pools import Pools

    cfg_dict = json.loads(sys.argv[1])
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 3, "resources": {"rollout_node": 1}, "node_ip_address": "127.0.0.1"})
    nodes = {"rollout_a": cluster.head_node.node_id}
    for name, args in (("rollout_b", {"num_cpus": 2, "resources": {"rollout_node": 1}}),
                       ("trainer", {"num_cpus": 3, "resources": {"trainer_node": 2}})):
        nodes[name] = cluster.add_node(node_ip_address="127.0.0.1", **args).node_id
    cluster.wait_for_nodes()
    cfg_dict["ray"] = {"address": cluster.address, "startup_timeout_s": 120}
    t1 = time.monotonic()
    where = lambda actor: ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    pools = Pools(JobConfig.model_validate(cfg_dict), cfg_dict["model"]["path"], [("hash", "rewards.final_answer:hash_answer", 1.0)])
    out = {"nodes": nodes, "actors": {name: [where(a) for a in getattr(pools, name)]
                                      for name in ("rollout", "scoring", "reward", "trainers")}}
    out["served"] = sorted(set(pools.sync_weights(1)))  # the pools work across nodes
    out["seconds"] = {"cluster": t1 - t0, "pools": time.monotonic() - t1}
    pools.shutdown()
    time.sleep(1)
    out["groups_left"] = sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())
    cfg_dict["rollout"]["resources"] = {"gpu_node": 1}  # no node offers it: a bounded wait, then an error
    cfg_dict["ray"]["startup_timeout_s"] = 3
    start = time.monotonic()
    try:
        Pools(JobConfig.model_validate(cfg_dict), cfg_dict["model"]["path"], [("hash", "rewards.final_answer:hash_answer", 1.0)])
    except PlacementError as e:
        out["error"], out["error_after_s"] = str(e), time.monotonic() - start
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_on_a_multi_node_cluster_every_actor_lands_on_the_node_type_its_pool_asks_for(tiny_model):
    cfg = base_config(
        tiny_model, rollout={"num_workers": 2, "num_cpus": 1, "resources": {"rollout_node": 1}},
        scoring={"num_workers": 2, "num_cpus": 0.5}, trainer={"num_workers": 2, "num_cpus": 1,
                                                             "resources": {"trainer_node": 1}},
        placement={"colocate": [["rollout", "scoring"]]},
        algorithm={"kl_coef": 0.01})  # a reference to score: the scoring pool has work
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray resolves 127.0.0.1 to itself instead of this host's outward address,
    # so every node and the driver stay on loopback.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-c", _CLUSTER_PROBE, json.dumps(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    print(f"seconds: {out['seconds']}, error after {out.get('error_after_s')}")
    nodes, actors = out["nodes"], out["actors"]
    assert sorted(actors["rollout"]) == sorted([nodes["rollout_a"], nodes["rollout_b"]])  # one per rollout node
    assert actors["scoring"] == actors["rollout"]  # colocated: scoring worker i on rollout worker i's node
    assert actors["trainers"] == [nodes["trainer"]] * 2
    assert actors["reward"][0] in nodes.values()
    assert out["served"] == [1]
    assert out["groups_left"] == 0  # shutdown gave every bundle back
    assert out["error_after_s"] < 60
    assert "rollout (2 actor(s), each {'CPU': 1.0, 'gpu_node': 1.0})" in out["error"], out["error"]


def test_the_cluster_job_config_asks_only_for_what_the_deploy_node_types_offer():
    """deploy/job_grpo.yaml against deploy/cluster.yaml: every custom resource its pools ask for is offered by a
    node type, in the amount one placement group needs (PACK puts a group's bundles on as few nodes as possible)."""
    import yaml

    from orchestrator.config import load_config

    cfg = load_config(ROOT / "deploy/job_grpo.yaml", check_paths=False)
    types = yaml.safe_load((ROOT / "deploy/cluster.yaml").read_text())["available_node_types"]
    offered = {k: v["resources"][k] * v.get("max_workers", 1) for v in types.values() for k in v["resources"]}
    for names, bundles in plan_groups(job_demands(cfg), cfg.placement.colocate):
        for key in {k for b in bundles for k in b} - {"CPU", "GPU"}:
            assert sum(b.get(key, 0) for b in bundles) <= offered.get(key, 0), (names, key, offered)
    assert offered.keys() >= custom_resources_needed(cfg).keys()
