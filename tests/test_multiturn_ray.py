"""Multi-turn rollouts on real Ray: environments that raise, hang (in plain and async steps), return NaN or garbage
never stop a run; their trajectories score reward.failure_score and are counted; a killed environment host is
replaced and its chunk generated again; the transcripts reach the sample records."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray

from tests.conftest import base_config

pytestmark = pytest.mark.slow
TOY_ENVS = str(Path(__file__).parent / "data" / "toy_envs.py")


def test_environments_that_fail_every_way_or_die_never_stop_a_run(ray_local, tiny_model):
    from orchestrator.batching import kl_controller
    from orchestrator.collect import evaluate, sampling_params
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.loop import Run, train_step
    from orchestrator.pools import Pools
    from orchestrator.references import reward_specs

    cfg = JobConfig.model_validate(base_config(
        tiny_model, env={"name": f"{TOY_ENVS}:Flaky", "max_turns": 3, "max_total_tokens": 64, "timeout_s": 1.0,
                         "num_workers": 2},
        rollout={"group_size": 4, "max_new_tokens": 4, "prompts_per_call": 4},
        loop={"steps": 2, "prompts_per_step": 8, "eval_size": 8},
        reward={"functions": [{"name": "rewards.final_answer:hash_answer"}], "failure_score": -1.0},
        logging={"sample_groups": 8}))
    pools = Pools(cfg, tiny_model, reward_specs(cfg))
    try:
        data = load_data(cfg, tiny_model)
        run = Run(cfg, pools, data, kl_controller(cfg.algorithm), sampling_params(cfg))
        m1, samples = train_step(run, version=1)
        os.kill(ray.get(pools.envs[0].pid.remote()), signal.SIGKILL)  # its trajectories' instances die with it
        m2, _ = train_step(run, version=2)
        assert pools.restarts["env"] == 1 and m2["policy_version"] == 2
        evals = evaluate(pools, cfg, data.eval_prompts[:8], log=print)
    finally:
        pools.shutdown()
    assert m1["reward/env/failures"] > 0 and m2["reward/env/failures"] > 0  # some rows misbehaved ...
    assert m1["env/turns_max"] == 3  # ... and the others ran their three turns
    for m in (m1, m2):
        assert m["time/env"] > 0 and m["env/observation_tokens"] > 0 and m["env/failures"] == m["reward/env/failures"]
    assert {"eval/accuracy", "eval/turns_mean", "eval/tool_use_frac"} <= set(evals)
    failed = [s for s in samples if s["reward_parts"]["env"] == -1.0]
    fine = [s for s in samples if s["reward_parts"]["env"] == 1.5]  # 0.5 on each of three turns
    assert failed and fine
    assert [t["observation"] for t in fine[0]["turns"]] == ["=1\n", "=1\n", None]
    assert fine[0]["completion"].count("=1\n") == 2  # the transcript shows the turns and their observations
