"""Scored groups → a `TrainBatch` with advantages (survey 3.12, A.3.1, GAE 2.14-2.17 with KL-shaped rewards
3.5.1, β from a fixed or adaptive controller 2.4.2, plus on-policy distillation's per-token term) → each trainer
rank's `Shard` of every mini-batch."""

from __future__ import annotations

import torch

import dataclasses

from actors.batch import collate_groups, distinct_rows, pad_rows
from actors.records import Group, Shard, TrainBatch
from algorithms.advantages import (broadcast_to_tokens, distillation_advantages, gae, group_normalized,
                                   kl_shaped_token_rewards, reinforce_pp, rloo)
from algorithms.kl import kl_estimate
from algorithms.kl_control import AdaptiveKLController, FixedKLController
from orchestrator.config import AlgorithmConfig
from orchestrator.micro_batches import equalize, plan


def sequence_advantages(rewards: torch.Tensor, group_size: int, alg: AlgorithmConfig) -> torch.Tensor:
    """One advantage per sample from its total reward, by the configured estimator: `[N]`."""
    if alg.estimator == "grpo":
        return group_normalized(rewards, group_size, std_normalize=alg.std_normalize)
    if alg.estimator == "dr_grpo":
        return group_normalized(rewards, group_size, std_normalize=False)
    if alg.estimator == "rloo":
        return rloo(rewards, group_size)
    if alg.estimator == "reinforce_pp":
        return reinforce_pp(rewards)
    raise ValueError(f"unknown estimator {alg.estimator!r}")


def loss_kl_coef(alg: AlgorithmConfig, beta: float) -> float:
    """β of the trainer's KL-in-loss term (3.14) this step: `beta`, or 0 when the KL shapes the reward instead."""
    return 0.0 if alg.kl_placement == "reward" else beta


def build_batch(groups: list[Group], alg: AlgorithmConfig, pad_id: int, beta: float = 0.0,
                distill_coef: float = 0.0) -> TrainBatch:
    """One padded batch of every sample with old/ref log-probs and per-token advantages.

    `beta` is the KL coefficient of this step: with `kl_placement: reward` it shapes the rewards (3.5.1),
    with `loss` the trainer's loss takes it (`loss_kl_coef`, 3.14). `old_logp`, the pi_old
    of the PPO ratio (2.4.3), is the behaviour policy's: the rollout engine's log-probs of the sampled tokens
    (`algorithm.old_logprobs: rollout`) or the ScoringWorker's re-scoring at the version that generated each
    group (`recompute`); `rollout_logp` always travels too (mismatch metric, rollout corrections).
    `distill_coef` > 0 (on-policy distillation, `distill.coef`) adds coef * (log pi_teacher - log pi_old) per
    token to the estimator's advantages (after GAE's whitening), from each sample's `teacher_logp`.
    """
    group_size = len(groups[0].samples)
    samples = [s for g in groups for s in g.samples]
    batch = collate_groups(groups, pad_id)
    mask = batch.response_mask  # [B, T]
    width = mask.shape[1]
    if alg.old_logprobs == "rollout":
        old_logp = batch.rollout_logp.clone()  # [B, T]
    else:
        missing = sum(s.old_logp is None for s in samples)
        if missing:
            raise ValueError(f"algorithm.old_logprobs is recompute but {missing} samples were not scored by the "
                             "old policy")
        old_logp = pad_rows([s.old_logp for s in samples], width)  # [B, T]
    ref_logp = pad_rows([s.ref_logp for s in samples], width) if samples[0].ref_logp is not None else None  # [B, T]
    distill = _distillation(samples, old_logp, mask, distill_coef)  # [B, T] or None
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)  # [B] each sample's total reward
    batch = dataclasses.replace(batch, old_logp=old_logp, ref_logp=ref_logp)
    in_reward = alg.kl_placement == "reward" and beta > 0 and ref_logp is not None
    if alg.estimator == "gae":
        values = pad_rows([s.values for s in samples], width)  # [B, T]
        per_turn = turn_rewards(samples, width)  # [B, T] multi-turn: each turn's reward on its last token
        token_rewards = kl_shaped_token_rewards(rewards - per_turn.sum(-1), old_logp,
                                                ref_logp if ref_logp is not None else old_logp,
                                                mask, beta if in_reward else 0.0, alg.kl_kind) + per_turn  # [B, T]
        advantages, returns = gae(token_rewards, values, mask, alg.gamma, alg.lam)  # [B, T] each
        advantages = whiten(advantages, mask) if alg.whiten_advantages else advantages
        advantages = advantages if distill is None else advantages + distill  # [B, T]
        return dataclasses.replace(batch, advantages=advantages, old_values=values, returns=returns)
    if in_reward:  # a sequence-level estimator sees the reward minus beta times the sequence's summed KL
        kl = kl_estimate(old_logp, ref_logp, alg.kl_kind, mask)  # [B, T]
        rewards = rewards - beta * torch.where(mask.bool(), kl, 0).sum(-1)  # [B]
    advantages = broadcast_to_tokens(sequence_advantages(rewards, group_size, alg), mask)  # [B, T]
    advantages = advantages if distill is None else advantages + distill  # [B, T]
    return dataclasses.replace(batch, advantages=advantages)


def turn_rewards(samples: list, width: int) -> torch.Tensor:
    """`[B, T]`: each environment turn's reward on the last token it sampled, for GAE (process rewards, survey
    3.5.1 / A.3.3); zeros for single-turn samples and for a trajectory whose environment failed (its
    failure_score is an outcome, on the last token)."""
    out = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        if s.turns and not any("failed" in turn for turn in s.turns):
            for turn in s.turns:
                if turn["sampled_tokens"]:
                    out[i, turn["end"]] += turn["reward"]
    return out


def _distillation(samples: list, old_logp: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor | None:
    """coef * `distillation_advantages` of the student's pi_old against each sample's teacher log-probs, `[B, T]`;
    None when coef is 0."""
    if not coef:
        return None
    missing = sum(s.teacher_logp is None for s in samples)
    if missing:
        raise ValueError(f"distill.teacher is set but {missing} samples were not scored by the teacher")
    teacher_logp = pad_rows([s.teacher_logp for s in samples], mask.shape[1])  # [B, T]
    return coef * distillation_advantages(old_logp, teacher_logp, mask)  # [B, T]


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid tokens, 0 on padding: PPO's advantage normalisation."""
    valid = mask.bool()  # [B, T]
    vals = x[valid]  # [n]
    if vals.numel() < 2:
        return torch.where(valid, x, 0)
    return torch.where(valid, (x - vals.mean()) / (vals.std() + eps), 0)


def sequence_kl(batch: TrainBatch) -> float:
    """Mean over samples of sum_t log(pi_old / pi_ref) of the sampled tokens: the k1 estimate of
    KL[pi_old || pi_ref] per sequence (2.1), what the adaptive controller tracks; 0 without a reference."""
    if batch.ref_logp is None:
        return 0.0
    mask = batch.response_mask.bool()  # [B, T]
    per_token = kl_estimate(batch.old_logp, batch.ref_logp, "k1", mask)  # [B, T]
    return float(torch.where(mask, per_token, 0).sum(-1).mean())


def training_order(part: TrainBatch) -> TrainBatch:
    """The rows reordered for micro-batching: rows of one prompt next to each other (a micro-batch runs each
    distinct prompt once, `actors.modeling.response_logits`), prompts by their longest response, then prompt
    length, so that `actors.batch.trim` cuts away most padding (the losses are sums over rows, so the order
    changes no gradient)."""
    am, rm = part.attention_mask, part.response_mask
    p = am.shape[1] - rm.shape[1]
    response = rm.sum(1)  # [B]
    _, prompt = distinct_rows(torch.cat([part.input_ids[:, :p], am[:, :p]], 1))  # [B]
    longest = torch.zeros(int(prompt.max()) + 1).scatter_reduce(0, prompt, response, "amax")  # [U]
    order = torch.argsort(response, stable=True)
    for key in (prompt, am[:, :p].sum(1), longest[prompt]):  # least significant first
        order = order[torch.argsort(key[order], stable=True)]
    return part.select(order)


def inert_rows(batch: TrainBatch) -> torch.Tensor:
    """Rows whose advantage is 0 at every response token, `[B]` bool: with no KL or entropy term in the loss
    their loss and gradient are exactly 0 (3.14 is a sum of A_t times a ratio term), e.g. every sample of a
    GRPO group whose rewards are all equal (3.12)."""
    return ((batch.advantages * batch.response_mask) == 0).all(1)  # [B]


def shard(batch: TrainBatch, num_minibatches: int, world_size: int, agg: str,
          skip_inert: bool = False, min_rows: int = 1, micro_batch_size: int | None = None,
          split_tokens: int | None = None, share_prompts: bool = True) -> list[list[Shard]]:
    """Per rank, its `Shard` of each mini-batch (rows in `training_order`, and the mini-batch's aggregation units).

    `skip_inert` leaves out `inert_rows` (no forward or backward is spent on a zero gradient); the units still
    count them, so the loss and gradient are the same as with them. The rows that carry signal are split evenly
    over the ranks, and a rank gets inert rows as filler up to `min_rows` (its micro-batches per optimizer step:
    DeepSpeed counts one backward per micro-batch).

    `split_tokens` (`trainer.micro_batch_split_tokens`) plans each shard's micro-batches here, with little padding
    (`orchestrator.micro_batches.plan`: rows reordered, at most `micro_batch_size` per micro-batch), the same number
    on every rank of a mini-batch (`equalize`); None leaves the trainer `grad_accum` equal slices."""
    mb_size = batch.rows // num_minibatches
    per_rank = mb_size // world_size
    out: list[list[Shard]] = [[] for _ in range(world_size)]
    for m in range(num_minibatches):
        mb = batch.select(slice(m * mb_size, (m + 1) * mb_size))
        units = float(mb.response_mask.sum()) if agg == "token-mean" else float(mb_size)
        if skip_inert:
            inert = inert_rows(mb)
            filler = inert.nonzero().squeeze(1).tolist()
            rows = [idx.tolist() for idx in (~inert).nonzero().squeeze(1).tensor_split(world_size)]
            rows = [r + [filler.pop() for _ in range(max(0, min_rows - len(r)))] for r in rows]
        else:
            rows = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world_size)]
        parts = [training_order(mb.select(torch.tensor(rows[r], dtype=torch.long))) for r in range(world_size)]
        if split_tokens is None:
            for r in range(world_size):
                out[r].append(Shard(parts[r], max(units, 1.0)))
            continue
        plans = [plan(part, micro_batch_size or part.rows, split_tokens, share_prompts) for part in parts]
        count = max(len(sizes) for _, sizes, _ in plans)
        for r, (part, sizes, _) in enumerate(plans):
            out[r].append(Shard(part, max(units, 1.0), tuple(equalize(part, sizes, count, share_prompts))))
    return out


def kl_controller(alg: AlgorithmConfig) -> FixedKLController | AdaptiveKLController:
    """β of the KL penalty: fixed, or adapted to keep the per-sequence KL near its target (survey 2.4.2)."""
    if alg.kl_controller == "adaptive":
        return AdaptiveKLController(alg.kl_coef, alg.kl_target, alg.kl_horizon)
    return FixedKLController(alg.kl_coef)
