"""Scored groups → advantages (survey 3.12, A.3.1) → the trainer ranks' mini-batch slices."""

from __future__ import annotations

import torch

from actors.batch import collate_groups, pad_rows, select
from actors.types import Group
from algorithms.advantages import broadcast_to_tokens, group_normalized, reinforce_pp, rloo
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


def build_batch(groups: list[Group], alg: AlgorithmConfig, pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of every sample with old/ref log-probs and per-token advantages."""
    group_size = len(groups[0].samples)
    samples = [s for g in groups for s in g.samples]
    batch = collate_groups(groups, pad_id)
    width = batch["response_mask"].shape[1]
    batch["old_logp"] = pad_rows([s.old_logp for s in samples], width)  # [B, T]
    if samples[0].ref_logp is not None:
        batch["ref_logp"] = pad_rows([s.ref_logp for s in samples], width)  # [B, T]
    scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)  # [B]
    batch["scores"] = scores
    batch["advantages"] = broadcast_to_tokens(sequence_advantages(scores, group_size, alg), batch["response_mask"])
    return batch


def shard(batch: dict[str, torch.Tensor], num_minibatches: int, world_size: int, agg: str) -> list[list[dict]]:
    """Per rank, its contiguous slice of each mini-batch, tagged with the mini-batch's aggregation units."""
    n = batch["input_ids"].shape[0]
    mb_size = n // num_minibatches
    per_rank = mb_size // world_size
    out: list[list[dict]] = [[] for _ in range(world_size)]
    for m in range(num_minibatches):
        mb = select(batch, slice(m * mb_size, (m + 1) * mb_size))
        units = float(mb["response_mask"].sum()) if agg == "token-mean" else float(mb_size)
        for r in range(world_size):
            part = select(mb, slice(r * per_rank, (r + 1) * per_rank))
            part["global_units"] = max(units, 1.0)
            out[r].append(part)
    return out
