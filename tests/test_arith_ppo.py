"""examples/arith_ppo.yaml: PPO with a critic whose only training reward is the reward model that
examples/arith_rm.yaml trains, judged by a weight-0 rule verifier; and the `make` target that builds it."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.config import JobConfig, read_config
from orchestrator.offline.config import RewardModelConfig


def test_example_ppo_config_is_reward_model_only_ppo_with_kl_in_the_reward():
    cfg = read_config(JobConfig, "examples/arith_ppo.yaml", [])  # validated; the RM need not exist yet
    rm = read_config(RewardModelConfig, "examples/arith_rm.yaml", [])
    assert cfg.algorithm.estimator == "gae" and cfg.algorithm.kl_placement == "reward" and cfg.algorithm.kl_coef > 0
    trained = [f for f in cfg.reward.functions if f.weight != 0]
    assert [(f.model, f.weight) for f in trained] == [(rm.output_dir, 1.0)]  # the reward model alone trains
    judge = next(f for f in cfg.reward.functions if f.label == cfg.reward.accuracy_label)
    assert judge.weight == 0 and judge.name == "rewards.final_answer:hash_answer"
    assert cfg.critic.init == rm.output_dir  # the value model starts from the reward model (survey 3.2.2)
    assert rm.model.path == cfg.model.path  # the reward model starts from the policy PPO trains


def test_make_target_trains_the_reward_model_when_it_is_missing_then_runs_ppo():
    make = Path("Makefile").read_text()
    rm = read_config(RewardModelConfig, "examples/arith_rm.yaml", [])
    rule = re.search(r"^arith-ppo: (.+)\n\t(.+)$", make, re.M)
    assert rule and rule.group(1).strip() == f"{rm.output_dir}/config.json"
    assert rule.group(2).endswith("raylhf train examples/arith_ppo.yaml")
    build = re.search(rf"^{re.escape(rm.output_dir)}/config.json:.*\n\t(.+)$", make, re.M)
    assert build and build.group(1).endswith("raylhf train-rm examples/arith_rm.yaml")
