"""End to end on real Ray, real DeepSpeed and a real Hugging Face model built from code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import base_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_two_step_run_through_the_cli(tmp_path, tiny_model, tiny_reward_model):
    """`raylhf train` with an embedded Ray: exit 0 and a complete run directory. It starts where a start-up was
    killed while DeepSpeed loaded its op (`tests.test_startup.locks_a_killed_startup_leaves`): before
    `actors.deepspeed_ops`, every later run waited on torch's stale lock file forever."""
    from tests.test_startup import locks_a_killed_startup_leaves

    cfg_path = tmp_path / "job.yaml"
    functions = [{"name": "rewards.final_answer:hash_answer"},
                 {"name": "tests/data/toy_rewards.py:length_reward", "weight": 0.1},  # a file path, as users write
                 {"model": tiny_reward_model, "weight": 0.01, "batch_size": 4}]  # a reward model
    cfg = base_config(tiny_model, algorithm={"kl_coef": 0.05}, reward={"functions": functions})
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(cfg_path), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, **locks_a_killed_startup_leaves(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out greedy accuracy" in proc.stdout
    assert "reward/length_reward (mean over steps)" in proc.stdout and "reward failures: none" in proc.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[2]
    for r in records[1:]:
        for key in ("reward/mean", "reward/std", "accuracy", "response_length/mean", "kl", "entropy", "clip_frac",
                    "time/generate", "time/reward", "time/score", "time/train", "time/sync", "tokens_per_s"):
            assert key in r, key
        assert r["kl"] >= 0 and r["entropy"] > 0
        assert all(0 < r[f"utilization/{p}"] <= 1 for p in ("rollout", "reward", "scoring", "trainer"))
        critical = r["time/rollout"] + r["time/train_forward_backward"] + r["time/optimizer"] + r["time/sync"]
        assert r["time/overhead"] == pytest.approx(r["time/step"] - critical) and r["time/overhead"] >= 0
        assert r["time/train_forward_backward"] > 0 and r["time/optimizer"] > 0 and r["staleness"] == 0
        # pi_old is the rollout's log-probs (no old-policy scoring): the trainer's first forward pass agrees
        assert r["mismatch/tokens"] > 0 and r["mismatch/logprob_abs_max"] < 1e-4
        assert r["reward/length_reward"] > 0  # each reward's mean, logged on its own
        assert "reward/tiny-rm" in r and r["reward/tiny-rm/failures"] == 0 and r["reward/hash_answer/failures"] == 0
    assert records[2]["policy_version"] == 2

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4  # steps x logging.sample_groups x group_size
    for step in (1, 2):
        for uid in {r["uid"] for r in samples if r["step"] == step}:
            group = [r for r in samples if r["step"] == step and r["uid"] == uid]
            rewards = [r["reward"] for r in group]  # independent check of the GRPO advantage (3.12)
            mean = sum(rewards) / 4
            std = (sum((x - mean) ** 2 for x in rewards) / 3) ** 0.5
            want = [0.0 if std == 0 else (x - mean) / (std + 1e-6) for x in rewards]
            assert [r["advantage"] for r in group] == pytest.approx(want, abs=1e-4)
            assert all(r["completion"] is not None and set(r["reward_parts"]) == {"hash_answer", "length_reward",
                                                                                  "tiny-rm"} for r in group)
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loop"]["steps"] == 2

    from transformers import AutoModelForCausalLM

    final = run_dir / "final_policy"
    assert (final / "model.safetensors").is_file()
    assert not list(final.glob("*.bin"))  # no pickled weights
    model = AutoModelForCausalLM.from_pretrained(final)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_rollout_workers_serve_the_trainers_weights_after_every_step(ray_local, tiny_model, tmp_path):
    """After step k every rollout and scoring worker reports version k and the trainer's checksum."""
    from orchestrator.batching import kl_controller
    from orchestrator.collect import sampling_params
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.loop import Run, train_step
    from orchestrator.pools import Pools

    cfg = JobConfig.model_validate(base_config(
        tiny_model, rollout={"num_workers": 2}, trainer={"num_workers": 2}, algorithm={"kl_coef": 0.05}))
    toy = str(Path(__file__).parent / "data" / "toy_rewards.py")
    pools = Pools(cfg, tiny_model, [("length", f"{toy}:length_reward", 1.0)])
    try:
        run = Run(cfg, pools, load_data(cfg, tiny_model), kl_controller(cfg.algorithm), sampling_params(cfg))
        seen = set()
        for step in (1, 2):
            metrics, _ = train_step(run, version=step)
            trainer_sums = pools.trainer_checksums()
            assert len(set(trainer_sums)) == 1  # the two DP ranks agree
            served = pools.served_versions()
            assert served == [(step, trainer_sums[0])] * len(served)
            seen.add(trainer_sums[0])
            assert metrics["policy_version"] == step
        assert len(seen) == 2  # the weights really changed between steps
    finally:
        pools.shutdown()


def test_one_or_two_rollout_workers_draw_the_same_samples(ray_local, tiny_model):
    """Scaling the rollout pool changes throughput, not results: seeds follow prompts and policy version. The thread
    count stays 1 (`threads: auto` would give 1 worker both cores and 2 workers one each here, and a matmul's sums
    depend on its threads)."""
    from actors.records import SamplingParams
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.pools import Pools

    drawn = []
    for workers in (1, 2):
        cfg = JobConfig.model_validate(base_config(tiny_model, rollout={"num_workers": workers, "threads": 1}))
        requests = load_data(cfg, tiny_model).stream.next(12)
        pools = Pools(cfg, tiny_model, [("hash_answer", "rewards.final_answer:hash_answer", 1.0)])
        try:
            groups = pools.run_groups(requests, SamplingParams(n=4, temperature=1.0, max_new_tokens=8), 2, score=False)
        finally:
            pools.shutdown()
        drawn.append([[(s.response_ids, s.rollout_logp) for s in g.samples] for g in groups])
    assert drawn[0] == drawn[1]
    assert len({tuple(ids) for g in drawn[0] for ids, _ in g}) > 12  # real sampling, not one repeated answer
