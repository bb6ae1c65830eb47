"""PPO with a critic: value alignment, GAE batches with KL-shaped rewards, critic and policy updates, dynamic sampling."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from actors.batch import collate, compact
from actors.modeling import load_value_model, position_ids, response_values
from actors.records import Group, Sample, Shard, TrainBatch
from orchestrator.batching import build_batch, loss_kl_coef, sequence_kl
from orchestrator.config import AlgorithmConfig, ModelConfig, TrainerConfig

from tests.conftest import as_batch

TOY = str(Path(__file__).parent / "data" / "toy_rewards.py")


@pytest.fixture(scope="module")
def value_model(tiny_model):
    torch.manual_seed(0)
    model = load_value_model(tiny_model).eval()
    with torch.no_grad():  # a head that starts at zero would value every state alike: give it something to say
        model.score.weight.normal_(0, 1.0)
    return model


def test_values_are_of_the_state_before_each_response_token(value_model):
    """Independent computation: V(s_t) is the model's output at the last token of prompt + response[:t],
    run alone. Reading one position later (V of the state after token t) fails this test."""
    prompts = [[1, 7, 8, 9], [1, 5]]
    responses = [[10, 11, 12], [13, 14, 15, 16]]
    batch = as_batch(collate(prompts, responses, pad_id=0))
    with torch.no_grad():
        values = response_values(value_model, batch)  # [2, 4]
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for t in range(len(r)):
                prefix = torch.tensor([p + r[:t]])
                alone = value_model(input_ids=prefix, position_ids=position_ids(torch.ones_like(prefix))).logits
                assert values[i, t].item() == pytest.approx(alone[0, -1, 0].item(), abs=1e-5), (i, t)
    assert len({round(v, 4) for v in values[1].tolist()}) == 4  # the values really differ per state


def test_changing_response_token_t_changes_values_after_t_only(value_model):
    batch = as_batch(collate([[1, 7, 8]], [[10, 11, 12, 13]], pad_id=0))
    other = dataclasses.replace(batch, input_ids=batch.input_ids.clone())
    other.input_ids[0, 3 + 1] = 20  # response token t = 1
    with torch.no_grad():
        a, b = response_values(value_model, batch), response_values(value_model, other)
    assert torch.equal(a[:, :2], b[:, :2])  # V(s_0), V(s_1) come before token 1 is chosen
    assert (a[:, 2:] - b[:, 2:]).abs().min() > 1e-6


def test_a_reward_model_checkpoint_starts_the_critic_at_its_score_minus_the_offset(tmp_path):
    """Initialised from a one-label reward model: V of the full text equals the RM's score, shifted by
    the stored `reward_offset` (scores normalised to mean 0, survey 3.2.1)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.conftest import save_tiny_reward_model

    path = save_tiny_reward_model(tmp_path / "rm")
    config = AutoConfig.from_pretrained(path)
    config.reward_offset = 0.75
    config.save_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
    critic = load_value_model(path).eval()
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        want = rm(input_ids=ids).logits[0, 0].item() - 0.75
        got = critic(input_ids=ids).logits[0, -1, 0].item()
    assert got == pytest.approx(want, abs=1e-5)


def _group(prompt_ids, responses, scores, old, ref, values) -> Group:
    samples = [Sample(r, "x", lp, "stop", reward=s, old_logp=lp, ref_logp=rf, values=v)
               for r, s, lp, rf, v in zip(responses, scores, old, ref, values)]
    return Group("u", "p", {}, prompt_ids, samples, 0)


def test_gae_batch_matches_a_hand_loop_with_kl_in_the_reward():
    """Token rewards -beta*KL_t plus the score on the last token (3.5.1), then GAE (2.14) by an explicit
    backward loop per sample; the loss gets no KL term (kl_coef 0) when the KL is in the reward."""
    g = torch.Generator().manual_seed(3)
    responses = [[5, 6, 7], [8], [9, 10]]
    old = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    ref = [(-torch.rand(len(r), generator=g)).tolist() for r in responses]
    values = [torch.randn(len(r), generator=g).tolist() for r in responses]
    scores = [1.0, -0.5, 2.0]
    group = _group([1, 2], responses, scores, old, ref, values)
    gamma, lam, beta = 0.9, 0.8, 0.3
    alg = AlgorithmConfig(estimator="gae", gamma=gamma, lam=lam, kl_placement="reward", kl_kind="k1",
                          whiten_advantages=False)
    batch = build_batch([group], alg, pad_id=0, beta=beta)
    assert loss_kl_coef(alg, beta) == 0.0  # the KL is in the reward, not the loss
    for i, r in enumerate(responses):
        n = len(r)
        rew = [-beta * (old[i][t] - ref[i][t]) for t in range(n)]
        rew[-1] += scores[i]
        adv, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = values[i][t + 1] if t + 1 < n else 0.0
            running = rew[t] + gamma * next_v - values[i][t] + gamma * lam * running
            adv[t] = running
        assert batch.advantages[i, :n].tolist() == pytest.approx(adv, abs=1e-5)
        assert batch.returns[i, :n].tolist() == pytest.approx([a + v for a, v in zip(adv, values[i])], abs=1e-5)
        assert batch.advantages[i, n:].abs().sum() == 0
    want_kl = sum(sum(o - f for o, f in zip(old[i], ref[i])) for i in range(3)) / 3
    assert sequence_kl(batch) == pytest.approx(want_kl, abs=1e-6)


def test_kl_in_the_loss_goes_to_the_trainer_as_kl_coef_and_leaves_scores_alone():
    group = _group([1], [[5, 6], [7, 8]], [1.0, 0.0], [[-1.0, -1.0]] * 2, [[-2.0, -2.0]] * 2, [None, None])
    in_loss = AlgorithmConfig(estimator="rloo", kl_coef=0.2)
    batch = build_batch([group], in_loss, pad_id=0, beta=0.2)
    assert loss_kl_coef(in_loss, 0.2) == 0.2
    assert batch.advantages[:, 0].tolist() == pytest.approx([1.0, -1.0])
    in_reward = AlgorithmConfig(estimator="rloo", kl_placement="reward", kl_kind="k1")
    shaped = build_batch([group], in_reward, 0, beta=0.2)
    assert loss_kl_coef(in_reward, 0.2) == 0.0  # both sequences pay 0.2 * 2 nats: the leave-one-out advantage is unchanged
    assert shaped.advantages[:, 0].tolist() == pytest.approx([1.0, -1.0])


def test_whitened_gae_advantages_have_zero_mean_unit_std_over_valid_tokens():
    responses = [[5, 6, 7], [8], [9, 10]]
    group = _group([1], responses, [1.0, 0.0, 3.0], [[-1.0] * len(r) for r in responses],
                   [[-1.0] * len(r) for r in responses], [[0.1 * t for t in range(len(r))] for r in responses])
    batch = build_batch([group], AlgorithmConfig(estimator="gae"), pad_id=0)
    valid = batch.response_mask.bool()
    assert batch.advantages[valid].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert batch.advantages[valid].std().item() == pytest.approx(1.0, abs=1e-5)
    assert batch.advantages[~valid].abs().sum() == 0


# ----------------------------------------------------------------------------- DeepSpeed ranks (Ray)


def _synthetic(n: int, vocab: int, seed: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (3,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    batch = as_batch(collate(prompts, responses, pad_id=0))
    mask = batch.response_mask
    return dataclasses.replace(batch, returns=torch.randn(mask.shape, generator=g) * mask,  # [B, T]
                               old_values=torch.zeros_like(mask),
                               advantages=torch.randn((n, 1), generator=g).expand_as(mask) * mask)


def _wire(batch: TrainBatch) -> dict:
    """One mini-batch as a trainer rank receives it."""
    return compact(Shard(batch, float(batch.response_mask.sum())))


def _ranks(cls, model_path: str, trainer: dict, *args):
    import ray

    rank = ray.remote(cls).options(num_cpus=1, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}).remote(
        0, 1, ModelConfig(path=model_path).model_dump(), TrainerConfig(**trainer).model_dump(), *args)
    addr, port = ray.get(rank.rendezvous.remote())
    ray.get(rank.setup.remote(addr, port))
    return rank


@pytest.mark.slow
def test_critic_loss_falls_on_a_fixed_batch(ray_local, tiny_model):
    from actors.critic import CriticTrainer

    batch = _synthetic(16, vocab=20, seed=0)
    critic = _ranks(CriticTrainer, tiny_model, {"lr": 3e-3, "micro_batch_size": 8, "grad_clip": 1e9},
                    None, "token-mean", 2, 20, 0)
    try:
        losses = [ray_local.get(critic.train_step.remote([_wire(batch)]))["critic/value_loss"] for _ in range(15)]
    finally:
        ray_local.kill(critic)
    assert losses[-1] < 0.5 * losses[0], losses
    assert losses[0] == pytest.approx(0.5 * float((batch.returns ** 2).sum() / batch.response_mask.sum()),
                                      rel=1e-4)  # the head starts at zero: V = 0, loss = ½ mean R²


@pytest.mark.slow
def test_four_epochs_clip_and_move_further_each_epoch(ray_local, tiny_model):
    """K = 4 passes over one batch: the policy leaves the trust region (clip fraction > 0) and the
    approximate KL to the old policy grows epoch after epoch."""
    from actors.modeling import load_causal_lm, response_logprobs
    from actors.trainer import PolicyTrainer

    batch = _synthetic(16, vocab=20, seed=1)
    with torch.no_grad():
        old_logp = response_logprobs(load_causal_lm(tiny_model), batch, 1.0)[0] * batch.response_mask
    batch = dataclasses.replace(batch, old_logp=old_logp, rollout_logp=old_logp)
    alg = AlgorithmConfig(clip_low=0.2, clip_high=0.2).model_dump()
    policy = _ranks(PolicyTrainer, tiny_model, {"lr": 2e-3, "micro_batch_size": 16, "epochs": 4, "grad_clip": 1e9},
                    alg, 1.0, 8, 1, 1, 0)
    try:
        stats = ray_local.get(policy.train_step.remote([_wire(batch)], 0.0))
    finally:
        ray_local.kill(policy)
    kls = [stats[f"epoch{e}/approx_kl"] for e in range(1, 5)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)  # epoch 1 starts on-policy
    assert all(a < b for a, b in zip(kls, kls[1:])), kls
    assert stats["epoch4/clip_frac"] > 0 and stats["clip_frac"] > 0


# ----------------------------------------------------------------------------- the loop


class _FakePools:
    """Rollouts whose rewards are chosen per prompt: prompts listed in `flat` give all-equal groups."""

    reference_on_trainers = False

    def __init__(self, flat: set[str]):
        self.flat, self.asked = flat, []

    def run_groups(self, requests, sampling, prompts_per_call):
        self.asked.append(len(requests))
        groups = []
        for r in requests:
            rewards = [1.0] * 4 if r.uid in self.flat else [0.0, 1.0, 0.0, 1.0]
            groups.append(Group(r.uid, "p", {}, [1], [Sample([2], "x", [0.0], "stop", reward=x) for x in rewards], 0))
        return groups


class _Stream:
    def __init__(self):
        self.n = 0

    def next(self, n):
        from actors.records import PromptRequest

        out = [PromptRequest(str(self.n + i), "p", [1], {}) for i in range(n)]
        self.n += n
        return out


def _collect(flat, **alg):
    from orchestrator.collect import collect_groups
    from orchestrator.config import JobConfig

    from tests.conftest import base_config

    cfg = JobConfig.model_validate(base_config("unused", algorithm=alg, loop={"prompts_per_step": 4}))
    pools = _FakePools(flat)
    kept, generated, rounds = collect_groups(pools, cfg, _Stream(), None)
    return kept, generated, rounds, pools.asked


def test_dynamic_sampling_drops_flat_groups_and_samples_until_the_batch_is_full():
    kept, generated, rounds, asked = _collect({"0", "1", "5"}, dynamic_sampling=True)
    assert [g.uid for g in kept] == ["2", "3", "4", "6"] and rounds == 2
    assert asked[0] == 4 and asked[1] == 4  # 2 of 4 had signal: ask for twice the 2 still missing
    assert len(generated) == 8


def test_dynamic_sampling_stops_at_the_round_bound_and_tops_up_with_flat_groups():
    kept, generated, rounds, asked = _collect({str(i) for i in range(100)}, dynamic_sampling=True,
                                              max_sampling_rounds=3)
    assert rounds == 3 and len(kept) == 4 and asked == [4, 4, 4]  # the bound holds; the batch keeps its size
    kept, _, rounds, _ = _collect({"0", "1"})  # off: the first 4 groups, flat or not
    assert [g.uid for g in kept] == ["0", "1", "2", "3"] and rounds == 1


@pytest.mark.slow
def test_each_sequence_estimator_trains_a_step_through_the_real_pools(ray_local, tiny_model):
    """grpo, dr_grpo, rloo and reinforce_pp, one real step each (rollout, reward, scoring, DeepSpeed train,
    weight sync) on one set of actors: finite, non-zero advantages, loss and gradient every time."""
    from orchestrator.batching import kl_controller
    from orchestrator.collect import sampling_params
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.loop import Run, train_step
    from orchestrator.pools import Pools

    from tests.conftest import base_config

    base = base_config(tiny_model, algorithm={"kl_coef": 0.05}, loop={"prompts_per_step": 4})
    pools = Pools(JobConfig.model_validate(base), tiny_model, [("length", f"{TOY}:length_reward", 1.0)])
    try:
        cfg0 = JobConfig.model_validate(base)
        data = load_data(cfg0, tiny_model)
        for version, estimator in enumerate(["grpo", "dr_grpo", "rloo", "reinforce_pp"], start=1):
            cfg = JobConfig.model_validate(base | {"algorithm": {"estimator": estimator, "kl_coef": 0.05}})
            run = Run(cfg, pools, data, kl_controller(cfg.algorithm), sampling_params(cfg))
            m, _ = train_step(run, version=version)
            assert math.isfinite(m["advantage/abs_mean"]) and m["advantage/abs_mean"] > 0, estimator
            assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["kl"] >= 0, estimator
    finally:
        pools.shutdown()


def test_dr_grpo_defaults_to_the_constant_length_norm():
    assert AlgorithmConfig(estimator="dr_grpo").agg == "seq-mean-token-sum-norm"
    assert AlgorithmConfig(estimator="dr_grpo", agg="token-mean").agg == "token-mean"  # unless set


@pytest.mark.slow
def test_ppo_with_a_critic_trains_end_to_end(ray_local, tiny_model, tmp_path, monkeypatch):
    """The real loop with estimator gae: one critic warm-up step, KL in the reward, an adaptive beta; and
    asynchronous (max_staleness 1), with old-policy log-probs recomputed by the scoring worker and TIS.
    The driver's steps run on one torch thread, and the caller's setting is given back."""
    import json

    from orchestrator import loop
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.loop import train
    from orchestrator.references import reward_specs

    threads, real_step = [], loop.train_step
    monkeypatch.setattr(loop, "train_step",
                        lambda *a, **k: threads.append(torch.get_num_threads()) or real_step(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    from tests.conftest import base_config

    alg = {"estimator": "gae", "kl_coef": 0.05, "kl_placement": "reward", "kl_controller": "adaptive",
           "kl_target": 0.01, "kl_horizon": 100, "tis_cap": 2.0}
    cfg = JobConfig.model_validate(base_config(
        tiny_model, algorithm=alg, reward={"functions": [{"name": f"{TOY}:length_reward"}]},
        loop={"steps": 3, "prompts_per_step": 4, "eval_size": 4, "eval_every": 2, "max_staleness": 1},
        critic={"warmup_steps": 1, "lr": 1e-3}))
    try:
        train(cfg, tmp_path, tiny_model, reward_specs(cfg), load_data(cfg, tiny_model))
        assert threads == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert all(math.isfinite(r["advantage/abs_mean"]) and r["advantage/abs_mean"] > 0 for r in steps)
    assert "loss" not in steps[0] and [r["policy_version"] for r in steps] == [0, 1, 2]  # the critic's warm-up
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps[1:])
    assert all(r["critic/value_loss"] > 0 and r["critic/grad_norm"] > 0 for r in steps)
    assert steps[-1]["kl/beta"] != steps[0]["kl/beta"] and "kl" in steps[-1]  # adaptive
    # step 3 trains version 1 on groups generated by version 0 while step 2 trained (the warm-up moved nothing);
    # the scoring worker scored them at version 0 (it refuses other versions), so TIS weights are ~1
    assert [r["staleness"] for r in steps] == [0, 0, 1]
    assert "eval/accuracy" in steps[1]  # evaluated with step 3's groups prefetched: on the newest weights (asserted)
    assert all(r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3) and r["tis_clip_frac"] == 0 for r in steps[1:])
    assert steps[1]["mismatch/logprob_abs_max"] < 1e-4 and steps[2]["mismatch/logprob_abs_max"] > 0


def test_accuracy_can_be_judged_by_one_reward_while_another_drives_training():
    """A reward model alone trains (weight 1) while a weight-0 rule verifier says what is correct."""
    from orchestrator.config import RewardConfig
    from orchestrator.metrics import rollout_metrics

    samples = [Sample([2], "x", [0.0], "stop", reward=r, reward_parts={"rm": r, "hash_answer": h})
               for r, h in ((2.5, 0.0), (-1.0, 1.0), (0.3, 1.0), (0.2, 1.0))]
    groups = [Group("u", "p", {}, [1], samples, 0)]
    assert rollout_metrics(groups, 1.0)["accuracy"] == 0.25  # by the total reward: only 2.5
    assert rollout_metrics(groups, 1.0, "hash_answer")["accuracy"] == 0.75  # by the verifier: the other three
    with pytest.raises(ValueError, match="accuracy_label"):
        RewardConfig(functions=[{"name": "rewards.final_answer:hash_answer"}], accuracy_label="rm")
