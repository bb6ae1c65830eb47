"""RewardModelWorker: a one-output classifier scores prompt + completion in batches; it sums with rule rewards."""

from __future__ import annotations

import json

import pytest
import torch

from actors.reward_model import RewardModelError, RewardModelWorker
from actors.records import Group, Sample
from tests.conftest import save_tiny_reward_model as _save

TEXTS = ["1+2=#### 3", "37+485=#### 522", "9=", "100+200+300=#### 600\n", "5*5=#### 25, 25", "0"]


def test_scores_equal_a_direct_forward_pass_of_each_text_alone(tiny_reward_model):
    """Independent computation: the checkpoint loaded again, each text run unpadded as a batch of one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    got = RewardModelWorker("rm", tiny_reward_model, batch_size=4).score_texts(TEXTS)
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    with torch.no_grad():
        want = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in TEXTS]
    assert got == pytest.approx(want, abs=1e-5)
    assert len({round(x, 4) for x in want}) == len(TEXTS)  # the texts really score differently


def test_batch_size_and_order_do_not_change_scores(tiny_reward_model):
    """Padding to the longest text of a batch, and which texts share a batch, leave every score unchanged."""
    one = RewardModelWorker("rm", tiny_reward_model, batch_size=1).score_texts(TEXTS)
    three = RewardModelWorker("rm", tiny_reward_model, batch_size=3).score_texts(TEXTS)
    all_ = RewardModelWorker("rm", tiny_reward_model, batch_size=64)
    backwards = all_.score_texts(TEXTS[::-1])[::-1]
    assert three == pytest.approx(one, abs=1e-5)
    assert all_.score_texts(TEXTS) == pytest.approx(one, abs=1e-5)
    assert backwards == pytest.approx(one, abs=1e-5)


def test_combines_with_rule_rewards_in_the_weighted_sum(tiny_reward_model):
    """RewardWorker then RewardModelWorker: reward = w_f * f + w_rm * rm; each part logged on its own."""
    from actors.reward import RewardWorker
    from actors.records import RewardSpec
    from orchestrator.metrics import reward_part_metrics

    completions = ["#### 3", "#### 4", "#### 30"]
    g = Group("u", "1+2=", {"answer": "3"}, [1], [Sample([5, 6], c, [0.0, 0.0], "stop") for c in completions], 0)
    worker = RewardWorker([RewardSpec("hash_answer", "rewards.final_answer:hash_answer", 2.0)], num_processes=1)
    try:
        worker.reward([g])
    finally:
        worker.close()
    RewardModelWorker("tiny-rm", tiny_reward_model, weight=0.5, batch_size=2).reward([g])
    rm = RewardModelWorker("check", tiny_reward_model, batch_size=2).score_texts(["1+2=" + c for c in completions])
    for s, r, correct in zip(g.samples, rm, [1.0, 0.0, 0.0]):
        assert s.reward_parts == pytest.approx({"hash_answer": correct, "tiny-rm": r}, abs=1e-6)
        assert s.reward == pytest.approx(2.0 * correct + 0.5 * r, abs=1e-6)
    m = reward_part_metrics([g])
    assert m["reward/tiny-rm"] == pytest.approx(sum(rm) / 3, abs=1e-6)
    assert m["reward/tiny-rm/failures"] == 0.0 and m["reward/hash_answer"] == pytest.approx(1 / 3)
    assert g.timings["reward"] > 0


def test_a_checkpoint_that_is_not_a_one_output_classifier_is_refused(tmp_path):
    two = _save(tmp_path / "two", num_labels=2)
    with pytest.raises(RewardModelError, match="num_labels=2"):
        RewardModelWorker("rm", two)
    causal = _save(tmp_path / "causal", causal=True)
    with pytest.raises(RewardModelError, match="lacks trained weights"):
        RewardModelWorker("rm", causal)


def test_config_model_entries_are_checked_before_ray_starts(tmp_path, tiny_reward_model):
    """A model entry: default label from the directory; wrong architecture, label count or path are config errors."""
    from orchestrator.config import ConfigError, load_config
    from tests.conftest import base_config

    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")

    def load(entry: dict):
        cfg = base_config(str(policy), reward={"functions": [{"name": "rewards.final_answer:hash_answer"}, entry]})
        cfg["data"].pop("eval")
        path = tmp_path / "job.yaml"
        path.write_text(json.dumps(cfg))
        return load_config(path)

    cfg = load({"model": tiny_reward_model, "weight": 0.5, "batch_size": 8})
    entry = cfg.reward.functions[1]
    assert (entry.label, entry.weight, entry.batch_size, entry.name) == ("tiny-rm", 0.5, 8, None)
    with pytest.raises(ConfigError, match=r"reward.functions.1.model: .* holds a LlamaForCausalLM"):
        load({"model": _save(tmp_path / "causal", causal=True)})
    with pytest.raises(ConfigError, match="has 2 labels"):
        load({"model": _save(tmp_path / "two", num_labels=2)})
    with pytest.raises(ConfigError, match="is not a model directory"):
        load({"model": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="batched: applies to reward functions"):
        load({"model": tiny_reward_model, "batched": True})
