"""Data parallelism: 2 DeepSpeed ranks give the same update as 1 rank on the same global batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.batch import collate, compact
from actors.records import TrainBatch
from actors.trainer import PolicyTrainer
from actors.weights import unpack_state_dict
from orchestrator.batching import shard
from orchestrator.config import AlgorithmConfig, ModelConfig, TrainerConfig

pytestmark = pytest.mark.slow


def synthetic_batch(n: int, vocab: int, seed: int = 0) -> TrainBatch:
    """Prompts and responses of varying lengths, random advantages and old (= rollout) log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    batch = collate(prompts, responses, pad_id=0)
    mask = batch["response_mask"]
    old_logp = (-3.0 + 0.3 * torch.randn(mask.shape, generator=g)) * mask  # [B, T]
    advantages = torch.randn((n, 1), generator=g).expand_as(mask) * mask  # [B, T]
    return TrainBatch(**batch, rollout_logp=old_logp, old_logp=old_logp, advantages=advantages)


MICRO = 6  # 1 rank: micro-batches of 5, 5, 6 rows per mini-batch; 2 ranks: 4, 4 — different partitions


def assert_same_update(initial: dict, one: tuple[dict, list[dict]], two: tuple[dict, list[dict]], what: str) -> None:
    """Runs `one` and `two` (`run_ranks`' weights and stats) made the same update from `initial`: the same global
    gradient norm (not a scaled one) and the whole update within 1e-3 relative. Adam turns float-rounding noise on
    near-zero gradients into visible steps on a handful of elements, so the whole update is compared (measured:
    ~1e-5 when right)."""
    (w_one, stats_one), (w_two, stats_two) = one, two
    assert stats_two[0]["grad_norm"] == pytest.approx(stats_one[0]["grad_norm"], rel=1e-4)
    delta_one = torch.cat([(w_one[k] - initial[k]).flatten() for k in w_one])
    delta_two = torch.cat([(w_two[k] - initial[k]).flatten() for k in w_one])
    assert delta_one.abs().max() > 1e-3  # the update is real, so agreement below means something
    rel = float((delta_two - delta_one).norm() / delta_one.norm())
    print(f"relative update difference, {what}: {rel:.2e}")
    assert rel < 1e-3


def run_ranks(world: int, batch: TrainBatch, model_path: str, agg: str, zero_stage: int = 2, skip_inert: bool = False,
              split_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One train step on `world` ranks: rank 0's weights after it, and every rank's stats. `split_tokens`: micro-batches
    planned by `orchestrator.micro_batches` (None: `grad_accum` equal slices)."""
    import ray

    trainer = TrainerConfig(num_workers=world, lr=1e-2, micro_batch_size=MICRO, epochs=2, num_minibatches=2,
                            grad_clip=1e9, zero_stage=zero_stage).model_dump()
    alg = AlgorithmConfig(agg=agg, clip_low=0.2, clip_high=0.28).model_dump()
    model = ModelConfig(path=model_path).model_dump()
    per_rank = batch.rows // (2 * world)
    grad_accum = -(-per_rank // MICRO)
    ranks = [ray.remote(PolicyTrainer).options(num_cpus=1, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}).remote(
        r, world, model, trainer, alg, 1.0, 8, grad_accum, 1, 0) for r in range(world)]
    addr, port = ray.get(ranks[0].rendezvous.remote())
    ray.get([r.setup.remote(addr, port) for r in ranks])
    shards = shard(batch, 2, world, agg, skip_inert, grad_accum, MICRO, split_tokens)
    stats = ray.get([r.train_step.remote([compact(x) for x in s], 0.0) for r, s in zip(ranks, shards)])
    assert all(s["grad_norm"] > 0 for s in stats)
    # all ranks at once: under ZeRO-3 reading the weights gathers every rank's shard
    states = [unpack_state_dict(x) for x in ray.get([r.state_dict.remote() for r in ranks])]
    for other in states[1:]:  # every rank holds identical weights after the step
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=0, atol=0)
    for r in ranks:
        ray.kill(r)
    return states[0], stats


_ONE_RANK: dict[tuple[str, str], tuple[dict[str, torch.Tensor], list[dict]]] = {}


@pytest.mark.parametrize("agg, zero_stage", [("token-mean", 2), ("seq-mean-token-mean", 2), ("token-mean", 3)])
def test_two_ranks_match_one_rank(ray_local, tiny_model, agg, zero_stage):
    """ZeRO-3 (parameters sharded over the 2 ranks, gathered to read them) must give the same update too."""
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    batch = synthetic_batch(32, vocab=initial["model.embed_tokens.weight"].shape[0])
    if (agg, tiny_model) not in _ONE_RANK:  # the 1-rank reference is the same for every ZeRO stage of 2 ranks
        _ONE_RANK[agg, tiny_model] = run_ranks(1, batch, tiny_model, agg)
    assert_same_update(initial, _ONE_RANK[agg, tiny_model], run_ranks(2, batch, tiny_model, agg, zero_stage),
                       "2 ranks vs 1")


def test_leaving_out_zero_advantage_rows_gives_the_same_update(ray_local, tiny_model):
    """Half the rows have A = 0 (as in GRPO groups with all-equal rewards): 2 ranks that never run them (two
    mini-batches, two epochs, so the second pass is off-policy) must update the weights as 1 rank that runs all."""
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    batch = synthetic_batch(32, vocab=initial["model.embed_tokens.weight"].shape[0], seed=3)
    inert = torch.arange(32) % 4 < 2  # 16 rows, spread over both mini-batches
    batch = dataclasses.replace(batch, advantages=torch.where(inert[:, None], 0.0, batch.advantages))
    assert_same_update(initial, run_ranks(1, batch, tiny_model, "token-mean"),
                       run_ranks(2, batch, tiny_model, "token-mean", skip_inert=True),
                       "zero-advantage rows left out vs run")


@pytest.mark.parametrize("skip_inert, zero_stage", [(False, 2), (True, 2), (True, 3)])
def test_two_ranks_with_planned_micro_batches_match_one_rank_with_equal_slices(ray_local, tiny_model, skip_inert,
                                                                               zero_stage):
    """ZeRO-2 (and 3) on 2 ranks whose micro-batches are planned for padding (`trainer.micro_batch_split_tokens: 0`,
    cut wherever a cut saves a position): their count differs from grad_accum and, before `equalize`, between the
    ranks; with zero-advantage rows left out a rank also runs zero-weight filler passes. Same update as 1 rank's
    slices."""
    from transformers import AutoModelForCausalLM

    from orchestrator.micro_batches import plan

    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    batch = synthetic_batch(32, vocab=initial["model.embed_tokens.weight"].shape[0], seed=5)
    if skip_inert:
        inert = torch.arange(32) % 8 < 5  # 5 of every 8 rows have A = 0
        batch = dataclasses.replace(batch, advantages=torch.where(inert[:, None], 0.0, batch.advantages))
    planned = shard(batch, 2, 2, "token-mean", skip_inert, 2, MICRO, 0)
    counts = [[len(parts[m].micro) for m in range(2)] for parts in planned]
    assert counts[0] == counts[1] and counts[0] != [2, 2]  # equal over the ranks, not grad_accum
    own = [len(plan(parts[m].rows, MICRO, 0)[1]) for parts in planned for m in range(2)]
    assert own != [c for rank in counts for c in rank] or any(0 in parts[m].micro for parts in planned for m in range(2))
    two = run_ranks(2, batch, tiny_model, "token-mean", zero_stage, skip_inert, split_tokens=0)
    assert two[1][0]["train/micro_batches"] == 2 * sum(counts[0])  # 2 epochs
    assert_same_update(initial, run_ranks(1, batch, tiny_model, "token-mean"), two,
                       "2 ranks with planned micro-batches vs 1 with slices")
