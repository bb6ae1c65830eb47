"""Scored groups → advantages (survey 3.12, A.3.1, GAE 2.14-2.17 with KL-shaped rewards 3.5.1) → the
trainer ranks' mini-batch slices."""

from __future__ import annotations

import torch

from actors.batch import collate_groups, pad_rows, select
from actors.types import Group
from algorithms.advantages import broadcast_to_tokens, gae, group_normalized, kl_shaped_token_rewards, reinforce_pp, rloo
from algorithms.kl import kl_estimate
from orchestrator.config import AlgorithmConfig


def sequence_advantages(scores: torch.Tensor, group_size: int, alg: AlgorithmConfig) -> torch.Tensor:
    """One advantage per sample from its score, by the configured estimator: `[N]`."""
    if alg.estimator == "grpo":
        return group_normalized(scores, group_size, std_normalize=alg.std_normalize)
    if alg.estimator == "dr_grpo":
        return group_normalized(scores, group_size, std_normalize=False)
    if alg.estimator == "rloo":
        return rloo(scores, group_size)
    if alg.estimator == "reinforce_pp":
        return reinforce_pp(scores)
    raise ValueError(f"unknown estimator {alg.estimator!r}")


def build_batch(groups: list[Group], alg: AlgorithmConfig, pad_id: int, beta: float = 0.0) -> dict[str, torch.Tensor]:
    """One padded batch of every sample with old/ref log-probs and per-token advantages.

    `beta` is the KL coefficient of this step: with `kl_placement: reward` it shapes the rewards (3.5.1),
    with `loss` it travels with the batch as `kl_coef` for the trainer's loss (3.14). `old_logp`, the pi_old
    of the PPO ratio (2.4.3), is the behaviour policy's: the rollout engine's log-probs of the sampled tokens
    (`algorithm.old_logprobs: rollout`) or the ScoringWorker's re-scoring at the version that generated each
    group (`recompute`); `rollout_logp` always travels too (mismatch metric, TIS).
    """
    group_size = len(groups[0].samples)
    samples = [s for g in groups for s in g.samples]
    batch = collate_groups(groups, pad_id)
    mask = batch["response_mask"]  # [B, T]
    width = mask.shape[1]
    if alg.old_logprobs == "rollout":
        batch["old_logp"] = batch["rollout_logp"].clone()  # [B, T]
    else:
        missing = sum(s.old_logp is None for s in samples)
        if missing:
            raise ValueError(f"algorithm.old_logprobs is recompute but {missing} samples were not scored by the "
                             "old policy")
        batch["old_logp"] = pad_rows([s.old_logp for s in samples], width)  # [B, T]
    if samples[0].ref_logp is not None:
        batch["ref_logp"] = pad_rows([s.ref_logp for s in samples], width)  # [B, T]
    scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)  # [B]
    batch["scores"] = scores
    in_reward = alg.kl_placement == "reward" and beta > 0 and "ref_logp" in batch
    batch["kl_coef"] = 0.0 if alg.kl_placement == "reward" else beta
    if alg.estimator == "gae":
        values = pad_rows([s.values for s in samples], width)  # [B, T]
        rewards = kl_shaped_token_rewards(scores, batch["old_logp"], batch.get("ref_logp", batch["old_logp"]), mask,
                                          beta if in_reward else 0.0, alg.kl_kind)  # [B, T]
        advantages, returns = gae(rewards, values, mask, alg.gamma, alg.lam)  # [B, T] each
        batch["advantages"] = whiten(advantages, mask) if alg.whiten_advantages else advantages
        batch["old_values"], batch["returns"] = values, returns
        return batch
    if in_reward:  # a sequence-level estimator sees the score minus beta times the sequence's summed KL
        kl = kl_estimate(batch["old_logp"], batch["ref_logp"], alg.kl_kind, mask)  # [B, T]
        scores = scores - beta * torch.where(mask.bool(), kl, 0).sum(-1)  # [B]
    batch["advantages"] = broadcast_to_tokens(sequence_advantages(scores, group_size, alg), mask)
    return batch


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid tokens, 0 on padding: PPO's advantage normalisation."""
    valid = mask.bool()  # [B, T]
    vals = x[valid]  # [n]
    if vals.numel() < 2:
        return torch.where(valid, x, 0)
    return torch.where(valid, (x - vals.mean()) / (vals.std() + eps), 0)


def sequence_kl(batch: dict[str, torch.Tensor]) -> float:
    """Mean over samples of sum_t log(pi_old / pi_ref) of the sampled tokens: the k1 estimate of
    KL[pi_old || pi_ref] per sequence (2.1), what the adaptive controller tracks; 0 without a reference."""
    if "ref_logp" not in batch:
        return 0.0
    mask = batch["response_mask"].bool()  # [B, T]
    per_token = kl_estimate(batch["old_logp"], batch["ref_logp"], "k1", mask)  # [B, T]
    return float(torch.where(mask, per_token, 0).sum(-1).mean())


def by_length(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows sorted by response length, then prompt length: consecutive micro-batches then hold sequences of
    similar length, and `actors.batch.trim` cuts away most of their padding (the losses are sums over rows,
    so the order changes no gradient)."""
    key = part["response_mask"].sum(1) * (part["attention_mask"].shape[1] + 1) + part["attention_mask"].sum(1)
    return select(part, torch.argsort(key, stable=True))


def shard(batch: dict[str, torch.Tensor], num_minibatches: int, world_size: int, agg: str) -> list[list[dict]]:
    """Per rank, its contiguous slice of each mini-batch (sorted `by_length`), tagged with the mini-batch's
    aggregation units."""
    n = batch["input_ids"].shape[0]
    mb_size = n // num_minibatches
    per_rank = mb_size // world_size
    out: list[list[dict]] = [[] for _ in range(world_size)]
    for m in range(num_minibatches):
        mb = select(batch, slice(m * mb_size, (m + 1) * mb_size))
        units = float(mb["response_mask"].sum()) if agg == "token-mean" else float(mb_size)
        for r in range(world_size):
            part = by_length(select(mb, slice(r * per_rank, (r + 1) * per_rank)))
            part["global_units"] = max(units, 1.0)
            out[r].append(part)
    return out
