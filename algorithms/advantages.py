"""Advantage estimators: GAE, group-relative (GRPO / Dr.GRPO / GPG), RLOO, REINFORCE baselines,
process-reward advantages, KL-shaped token rewards and on-policy distillation's per-token signal
(survey 2.1, 2.2.4, 2.3, 3.5, A.3).

Token tensors are [B, T], right-padded, with a 0/1 `mask` (float or bool); padded positions of every
output are 0 and never influence a valid one. Per-sample tensors are [N].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import kl_estimate


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Truncated GAE(γ, λ) per token and λ-returns A + V (survey 2.14–2.17, 2.4.4); no gradient flows.

    values[:, t] = V(s_t) before token t; the state after the last valid token is terminal (V = 0).
    """
    # Masked positions are skipped (the recursion carries across them), so right padding — and holes
    # such as tool-output tokens — never leak in. The survey and the PPO paper both print the
    # truncated sum's last reward as γ^{T−t+1} r_{T−1}; the GAE paper's (2.14) gives γ^{T−t−1}, used here.
    valid = mask.bool()  # [B, T]
    with torch.no_grad():
        r = torch.where(valid, rewards, 0)  # [B, T]
        v = torch.where(valid, values, 0)  # [B, T]
        n_batch, n_tokens = r.shape
        index = torch.where(valid, torch.arange(n_tokens, device=r.device), n_tokens)  # [B, T]
        after = torch.cat([index[:, 1:], index.new_full((n_batch, 1), n_tokens)], dim=1)  # [B, T]
        next_index = after.flip(-1).cummin(dim=-1).values.flip(-1)  # [B, T] next valid token, T = terminal
        next_value = torch.cat([v, v.new_zeros(n_batch, 1)], dim=1).gather(1, next_index)  # [B, T] V(s_{t+1})
        delta = torch.where(valid, r + gamma * next_value - v, 0).T.contiguous()  # [T, B]  TD residual (2.15)
        decay = torch.where(valid, torch.full_like(r, gamma * lam), 1).T.contiguous()  # [T, B]  1 = carry over holes
        adv = delta.clone()  # [T, B]
        for t in range(n_tokens - 2, -1, -1):  # Â_t = δ_t + γλ Â_{t+1}  (2.14), O(T)
            torch.addcmul(delta[t], decay[t], adv[t + 1], out=adv[t])
        adv = torch.where(valid, adv.T, 0)  # [B, T]
        returns = adv + v  # [B, T]  λ-return; 0 on padding, where both terms are
    return adv, returns


def group_normalized(scores: Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO group-relative advantage (r − mean_group) / (std_group + eps) per sample (survey 3.12, A.3.1).

    std is Bessel-corrected (torch.std, as TRL / verl); std_normalize=False is the mean-only GPG / Dr.GRPO form.
    """
    groups = _grouped(scores, group_size)  # [n_groups, G]
    adv = groups - groups.mean(dim=-1, keepdim=True)  # [n_groups, G]
    if std_normalize and group_size > 1:  # a group of one is all-equal: zeroed below
        adv = adv / (groups.std(dim=-1, keepdim=True) + eps)
    all_equal = (groups == groups[:, :1]).all(dim=-1, keepdim=True)  # [n_groups, 1]
    return torch.where(all_equal, 0, adv).reshape(scores.shape)  # [N]


def rloo(scores: Tensor, group_size: int) -> Tensor:
    """RLOO advantage: r_i minus the mean of the other G − 1 scores of its group (survey 2.2.4; Ahmadian 2024)."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    groups = _grouped(scores, group_size)  # [n_groups, G]
    others_mean = (groups.sum(dim=-1, keepdim=True) - groups) / (group_size - 1)  # [n_groups, G]
    return (groups - others_mean).reshape(scores.shape)  # [N]


def reinforce_baseline(scores: Tensor) -> Tensor:
    """REINFORCE with the batch-mean baseline b = mean_i r_i (survey 2.2.4)."""
    return scores - scores.mean()  # [N]


def reinforce_pp(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ advantage (r − batch mean) / (Bessel-corrected batch std + eps) (survey 2.2.4; Hu 2025)."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    adv = (scores - scores.mean()) / (scores.std() + eps)  # [N]
    return torch.where((scores == scores.reshape(-1)[0]).all(), 0, adv)


def process_reward_advantages(
    step_rewards: Tensor,
    step_ends: Tensor,
    mask: Tensor,
    step_mask: Tensor,
    group_size: int,
    eps: float = 1e-6,
) -> Tensor:
    """Process-supervision advantage Â_t = Σ_{j: end_j ≥ t} r̃_j, r̃ = step rewards normalized per group (survey A.3.3).

    step_rewards [B, K]; step_ends [B, K] int index of each step's last token; step_mask [B, K]; → [B, T].
    """
    if group_size < 1 or step_rewards.shape[0] % group_size:
        raise ValueError(f"{step_rewards.shape[0]} rows cannot be split into groups of group_size={group_size}")
    # Survey A.3.3 prints Σ over index(j) > t; DeepSeekMath (Shao et al. 2024, §4.1.3) sums index(j) ≥ t,
    # so a step's own tokens (its last token included) are credited with its reward. We follow the paper.
    valid_step = step_mask.bool()  # [B, K]
    n_steps = step_rewards.shape[-1]
    r = torch.where(valid_step, step_rewards, 0).reshape(-1, group_size * n_steps)  # [n_groups, G*K]
    m = valid_step.reshape(r.shape)  # [n_groups, G*K]
    count = m.sum(dim=-1, keepdim=True)  # [n_groups, 1]
    mean = r.sum(dim=-1, keepdim=True) / count.clamp(min=1)  # [n_groups, 1]
    centered = torch.where(m, r - mean, 0)  # [n_groups, G*K]
    std = (centered.square().sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # Bessel, as (3.12)
    lo = torch.where(m, r, torch.inf).amin(dim=-1, keepdim=True)
    hi = torch.where(m, r, -torch.inf).amax(dim=-1, keepdim=True)
    normed = torch.where(lo == hi, 0, centered / (std + eps)).reshape(step_rewards.shape)  # [B, K]
    normed = torch.where(valid_step, normed, 0)
    ends = torch.where(valid_step, step_ends, 0).long()  # [B, K]
    at_end = torch.zeros(mask.shape, dtype=step_rewards.dtype, device=step_rewards.device)  # [B, T]
    at_end = at_end.scatter_add(1, ends, normed)  # r̃_j placed on step j's last token
    adv = at_end.flip(-1).cumsum(-1).flip(-1)  # [B, T]  suffix sum: Σ_{end_j ≥ t}
    return torch.where(mask.bool(), adv, 0)


def kl_shaped_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float, kind: str = "k1"
) -> Tensor:
    """PPO token rewards r_t = −β·KL_t, plus the outcome score on the last valid token (survey 3.5.1, 3.2).

    scores [B]; logp / ref_logp [B, T] under the sampling policy / reference; → [B, T].
    """
    valid = mask.bool()  # [B, T]
    rewards = torch.where(valid, -beta * kl_estimate(logp, ref_logp, kind, valid), 0)  # [B, T]
    positions = torch.arange(valid.shape[-1], device=valid.device)  # [T]
    last = torch.where(valid, positions, -1).amax(dim=-1)  # [B]  −1 for an empty row
    outcome = torch.where(last >= 0, scores, 0).to(rewards.dtype)  # [B]
    return rewards.scatter_add(1, last.clamp(min=0)[:, None], outcome[:, None])


def distillation_advantages(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor) -> Tensor:
    """On-policy distillation advantage A_t = log π_teacher(o_t) − log π_student(o_t) per sampled token → [B, T].

    On tokens sampled from the student, log π_student − log π_teacher is the k1 estimate of the reverse KL
    KL[π_student ‖ π_teacher] (survey 2.1); its negative is the per-token reward that minimises it, i.e.
    `kl_shaped_token_rewards` with β = 1, k1 and no outcome score (3.5.1), used as the advantage without
    discounting (Agarwal et al. 2024, GKD; Thinking Machines Lab 2025, "On-Policy Distillation").
    It is a constant for the policy loss (detached); 0 on padding.
    """
    valid = mask.bool()  # [B, T]
    return torch.where(valid, teacher_logp.detach() - student_logp.detach(), 0)  # [B, T]


def broadcast_to_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence advantage [B] → per-token [B, T], zero on padding (survey A.3.3, Â_{i,t} = A_i)."""
    return torch.where(mask.bool(), adv[:, None], 0)  # [B, T]


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of group_size={group_size}")
    return scores.reshape(-1, group_size)  # [n_groups, G]
