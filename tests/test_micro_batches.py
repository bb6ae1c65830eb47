"""No compute on padding (`trainer.micro_batch_split_tokens`): the planned micro-batches run fewer token positions,
keep every row once, give every rank as many backwards, keep prompt sharing, and change no update."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from actors.batch import collate, compact
from actors.records import TrainBatch
from orchestrator.batching import shard
from orchestrator.micro_batches import CutCost, equalize, plan, row_shapes
from tests.conftest import in_process_ranks


def grouped_batch(n_prompts: int, group: int, seed: int, vocab: int = 20, spread: int = 30,
                  same_within_group: bool = False) -> TrainBatch:
    """Groups of `group` samples of one prompt (prompts of 2-7 tokens), responses of 1 to `spread` tokens, random
    per-sequence advantages, rollout = old log-probs, PPO values and returns, and each row's id in `ref_logp[:, 0]`."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(n_prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        base = int(torch.randint(1, spread + 1, (1,), generator=g))
        for _ in range(group):
            length = base if same_within_group else int(torch.randint(1, spread + 1, (1,), generator=g))
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    b = collate(prompts, responses, pad_id=0)
    mask = b["response_mask"]  # [B, T]
    n = mask.shape[0]
    old_logp = (-3.0 + 0.3 * torch.randn(mask.shape, generator=g)) * mask
    row_id = torch.arange(n, dtype=torch.float32)[:, None].expand_as(mask).clone()  # [B, T]
    return TrainBatch(**b, rollout_logp=old_logp, old_logp=old_logp, ref_logp=row_id,
                      advantages=torch.randn((n, 1), generator=g).expand_as(mask) * mask,
                      old_values=0.1 * torch.randn(mask.shape, generator=g) * mask,
                      returns=torch.randn(mask.shape, generator=g) * mask)


def micro_batches(part) -> list[TrainBatch]:
    """A shard's micro-batches as the trainer cuts them (`actors.trainer.micro_parts`), trimmed; fillers as None."""
    from actors.trainer import micro_parts

    return [None if filler else part.rows.select(rows).trim() for rows, filler in micro_parts(part, 1)]


def positions(parts) -> int:
    return sum(m.input_ids.numel() for part in parts for m in micro_batches(part) if m is not None)


def by_hand(micro: TrainBatch, share: bool) -> int:
    """The positions a forward of `micro` runs, counted from its trimmed tensors and a set of its prompts."""
    t = micro.response_mask.shape[1]
    p = micro.input_ids.shape[1] - t
    prompts = {tuple(row[:p][m[:p].bool()].tolist()) for row, m in zip(micro.input_ids, micro.attention_mask)}
    b, u = micro.rows, len(prompts)
    return u * p + b * t if share and 2 * u <= b else b * (p + t)


@pytest.mark.parametrize("share", [True, False])
def test_the_cost_of_a_range_is_what_its_trimmed_micro_batch_runs_and_the_best_cut_is_the_brute_force_best(share):
    batch = grouped_batch(6, 4, seed=1, spread=12)
    rng = random.Random(0)
    for order in (torch.arange(batch.rows), torch.randperm(batch.rows, generator=torch.Generator().manual_seed(2))):
        rows = batch.select(order)
        cost = CutCost(*row_shapes(rows), share)
        for _ in range(40):
            a = rng.randrange(rows.rows - 1)
            b = rng.randrange(a + 2, rows.rows + 1)
            assert cost.of(a, b) == by_hand(rows.select(slice(a, b)).trim(), share)
            saved, k = cost.best_cut(a, b)
            brute = [cost.of(a, b) - cost.of(a, j) - cost.of(j, b) for j in range(a + 1, b)]
            assert saved == max(brute) and brute[k - a - 1] == saved


def test_planned_micro_batches_run_far_fewer_positions_and_hold_every_row_once():
    """A GRPO-like batch (8 prompts x G 8, responses of 1-60 tokens, one micro-batch of 64 before)."""
    batch = grouped_batch(8, 8, seed=3, spread=60)
    before = shard(batch, 1, 1, "token-mean")
    after = shard(batch, 1, 1, "token-mean", micro_batch_size=64, split_tokens=16)
    (old,), (new,) = before[0], after[0]
    assert len(micro_batches(old)) == 1 and len(new.micro) > 1
    print(f"positions {positions([old])} -> {positions([new])} in {len(new.micro)} micro-batches")
    assert positions([new]) < 0.8 * positions([old])  # measured ~0.63
    ids = torch.cat([m.ref_logp[:, 0] for m in micro_batches(new)]).long().sort().values
    assert torch.equal(ids, torch.arange(batch.rows))  # every row exactly once
    assert new.global_units == old.global_units
    capped = shard(batch, 1, 1, "token-mean", micro_batch_size=10, split_tokens=10**9)[0][0]
    assert max(capped.micro) <= 10 and sum(capped.micro) == batch.rows
    assert sum(m.rows for m in micro_batches(capped)) == batch.rows


@pytest.mark.parametrize("world, skip", [(2, False), (3, False), (2, True), (3, True)])
def test_every_rank_gets_as_many_micro_batches_and_fillers_only_when_it_lacks_rows(world, skip):
    for seed in range(6):
        batch = grouped_batch(6, 4, seed=seed, spread=40)
        if skip:  # most groups' rewards all equal: A = 0, left out; ranks get few rows
            inert = torch.arange(batch.rows) // 4 % 3 != 0
            batch = dataclasses.replace(batch, advantages=torch.where(inert[:, None], 0.0, batch.advantages))
        parts = shard(batch, 2, world, "token-mean", skip, 1, micro_batch_size=5, split_tokens=seed * 8)
        for m in range(2):
            counts = {len(parts[r][m].micro) for r in range(world)}
            assert len(counts) == 1, counts
            for r in range(world):
                sizes = parts[r][m].micro
                assert sum(sizes) == parts[r][m].rows.rows and max(sizes) <= 5
                assert (0 in sizes) == (parts[r][m].rows.rows < len(sizes))
                assert all(s == 0 for s in sizes[sizes.index(0):]) if 0 in sizes else True  # fillers come last


def test_equalize_splits_at_the_cheapest_cut_then_pads_with_fillers():
    batch = grouped_batch(1, 3, seed=0, spread=9)
    assert sum(equalize(batch, [3], 2)) == 3 and len(equalize(batch, [3], 2)) == 2
    assert equalize(batch, [3], 5) == [1, 1, 1, 0, 0]


def test_prompt_sharing_still_triggers_where_the_rows_of_a_prompt_stay_together():
    """Responses of one length per group (as a scratchpad's length follows its operands): cuts fall between groups,
    and every micro-batch still runs each of its prompts once (2U <= B, `actors.modeling.response_logits`)."""
    batch = grouped_batch(8, 8, seed=5, spread=60, same_within_group=True)
    new = shard(batch, 1, 1, "token-mean", micro_batch_size=64, split_tokens=16)[0][0]
    assert len(new.micro) > 1
    for m in micro_batches(new):
        t = m.response_mask.shape[1]
        p = m.input_ids.shape[1] - t
        distinct = {tuple(r.tolist()) for r in torch.cat([m.input_ids[:, :p], m.attention_mask[:, :p]], 1)}
        assert 2 * len(distinct) <= m.rows


def test_the_wire_carries_the_plan():
    from actors.batch import expand

    part = shard(grouped_batch(4, 4, seed=1), 1, 1, "token-mean", micro_batch_size=16, split_tokens=0)[0][0]
    assert expand(compact(part)).micro == part.micro and len(part.micro) > 1


# -- the update: planned micro-batches against the contiguous slices of before, on one in-process rank


@pytest.fixture()
def process_group():
    """One rank's process group in this process (or another module's, reused); cleaned up as test_trainer_optimizer
    does."""
    with in_process_ranks():
        yield


def one_step(cls, model_path: str, parts, agg: str, grad_accum: int, epochs: int = 1):
    """Weights after one `train_step` of a fresh one-rank trainer on `parts`, and its stats."""
    from actors.weights import unpack_state_dict
    from orchestrator.config import AlgorithmConfig, ModelConfig, TrainerConfig

    trainer = TrainerConfig(lr=1e-2, micro_batch_size=8, grad_clip=1e9, epochs=epochs, num_minibatches=len(parts),
                            threads=1).model_dump()
    model = ModelConfig(path=model_path).model_dump()
    if cls.__name__ == "PolicyTrainer":
        rank = cls(0, 1, model, trainer, AlgorithmConfig(agg=agg).model_dump(), 1.0, 8, grad_accum, 1, 0)
    else:
        rank = cls(0, 1, model, trainer, 0.2, agg, grad_accum, 1, 0)
    rank.setup("127.0.0.1", 0) if torch.distributed.is_initialized() else rank.setup(*rank.rendezvous())
    wire = [compact(p) for p in parts]
    stats = rank.train_step(wire, 0.0) if cls.__name__ == "PolicyTrainer" else rank.train_step(wire)
    return unpack_state_dict(rank.state_dict()), stats


@pytest.mark.parametrize("critic, agg", [(False, "token-mean"), (False, "seq-mean-token-mean"), (True, "token-mean")])
def test_planned_micro_batches_give_the_same_update_as_the_contiguous_slices(process_group, tiny_model, critic, agg):
    """Two mini-batches and two epochs (so the second pass is off-policy and the clip acts); the plan cuts 4-9
    micro-batches per mini-batch where the old layout ran 3 slices of 8 rows (grad_accum 3)."""
    from transformers import AutoModelForCausalLM

    from actors.critic import CriticTrainer
    from actors.trainer import PolicyTrainer

    cls = CriticTrainer if critic else PolicyTrainer
    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    batch = grouped_batch(12, 4, seed=7, vocab=initial["model.embed_tokens.weight"].shape[0], spread=8)
    batch = dataclasses.replace(batch, ref_logp=None)
    old_parts = shard(batch, 2, 1, agg)[0]
    new_parts = shard(batch, 2, 1, agg, micro_batch_size=8, split_tokens=0, share_prompts=not critic)[0]
    assert all(len(p.micro) > 3 for p in new_parts)
    old, stats_old = one_step(cls, tiny_model, old_parts, agg, grad_accum=3, epochs=2)
    new, stats_new = one_step(cls, tiny_model, new_parts, agg, grad_accum=3, epochs=2)
    prefix = "critic/" if critic else ""
    assert stats_new["train/micro_batches"] == 2 * sum(len(p.micro) for p in new_parts)  # 2 epochs
    assert stats_old["train/micro_batches"] == 2 * 2 * 3
    assert stats_new["train/padding_frac"] < stats_old["train/padding_frac"]
    assert stats_new["grad_norm"] == pytest.approx(stats_old["grad_norm"], rel=1e-5)
    if agg == "token-mean":  # stats are means over micro-batches weighted by their units: exact for token shares
        stat = f"{prefix}value_loss" if critic else "clip_frac"
        assert stats_new[stat] == pytest.approx(stats_old[stat], rel=1e-5, abs=1e-7) and stats_old[stat] > 0
    keys = [k for k in new if k in initial or k.startswith("score")]
    delta_old = torch.cat([(old[k] - initial.get(k, torch.zeros_like(old[k]))).flatten() for k in keys])
    delta_new = torch.cat([(new[k] - initial.get(k, torch.zeros_like(new[k]))).flatten() for k in keys])
    assert delta_old.abs().max() > 1e-3  # the update is real, so agreement below means something
    rel = float((delta_new - delta_old).norm() / delta_old.norm())
    print(f"relative update difference, planned vs contiguous micro-batches: {rel:.2e}")
    assert rel < 1e-4
