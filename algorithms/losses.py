"""Losses to minimise: one generalized clipped policy loss (PPO / GRPO / DAPO clip-higher / dual-clip /
GSPO sequence ratio), CISPO, value, entropy, SFT, DPO and reward-model losses (survey 2.4, 3.1–3.5, A.10);
train/inference-mismatch weights (TIS, ICEPOP, sequence masking) and high-entropy token selection.

Token tensors are [B, T], right-padded, with a 0/1 `mask` (float or bool); padded entries are replaced
by 0 before any arithmetic, so they never change a loss, a statistic or a gradient (which is 0 there).
Statistics are detached 0-dim tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .kl import kl_estimate

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
MAX_LOG_RATIO = 20.0  # |log π/π_old| is clamped here before exp (as verl) so exp never overflows


def aggregate(values: Tensor, mask: Tensor, agg: str, norm_length: int | None = None) -> Tensor:
    """Reduce per-token values [B, T] to a scalar: the 1/|o| and 1/G averages of (3.9), (A.10) and their variants.

    token-mean: Σ valid / #valid (DAPO); seq-mean-token-mean: mean of per-sequence means (A.10);
    seq-mean-token-sum-norm: mean of per-sequence sums / norm_length, default T (Dr.GRPO).
    Sequence means run over rows with at least one valid token (an all-padding row is padding too).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; allowed values: {', '.join(AGG_MODES)}")
    valid = mask.bool()  # [B, T]
    values = torch.where(valid, values, 0)  # [B, T]
    if agg == "token-mean":
        return values.sum() / valid.sum().clamp(min=1)
    seq_sum = values.sum(dim=-1)  # [B]
    n_tokens = valid.sum(dim=-1)  # [B]
    n_seqs = (n_tokens > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (seq_sum / n_tokens.clamp(min=1)).sum() / n_seqs
    length = values.shape[-1] if norm_length is None else norm_length
    return (seq_sum / length).sum() / n_seqs


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg: str,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss −min(r·A, clip(r, 1−clip_low, 1+clip_high)·A) (survey 2.4.3, 3.9, 3.11, A.10).

    clip_high > clip_low is DAPO clip-higher; dual_clip=c caps the loss of A < 0 tokens at −c·A (Ye et al. 2020).
    ratio_level="sequence" is GSPO-token (Zheng et al. 2025): every token of sequence i carries the value
    s_i = exp(mean_t log(π/π_old)) with gradient flowing through its own token. The raw product
    π(o_i)/π_old(o_i) of (3.10) is not used: its log is a sum of |o_i| noisy terms, so its variance grows
    with length and exp overflows/underflows on long responses; the length-normalized (geometric-mean)
    ratio keeps every length on the same scale, so one clip range fits all.
    Log-ratios are clamped to ±MAX_LOG_RATIO (20) before exp so float32 never overflows.
    token_weights [B, T] (e.g. `tis_weights`) multiply each token's loss before aggregation; they are
    treated as constants (detached).
    stats: clip_frac (valid tokens whose clipped branch was taken, gradient 0), approx_kl (token-mean k3
    estimate of KL[π_old ‖ π], samples from π_old), ratio_mean, ratio_max, dual_clip_frac (if dual_clip).
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; allowed values: {', '.join(RATIO_LEVELS)}")
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = mask.bool()  # [B, T]
    logp = torch.where(valid, logp, 0)  # [B, T]
    old_logp = torch.where(valid, old_logp, 0)  # [B, T]
    advantages = torch.where(valid, advantages, 0)  # [B, T]

    log_ratio = logp - old_logp  # [B, T]
    if ratio_level == "sequence":
        # The survey's (3.10) is the raw sequence ratio; we follow the GSPO paper's length-normalized s_i.
        seq_log_ratio = log_ratio.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)  # [B]
        log_ratio = seq_log_ratio.detach()[:, None] + (logp - logp.detach())  # [B, T] value s_i, grad per token
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]

    per_token, clipped, dual_capped = _clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)
    if token_weights is not None:
        per_token = per_token * torch.where(valid, token_weights.detach(), 0)  # [B, T]
    loss = aggregate(per_token, valid, agg, norm_length)

    with torch.no_grad():
        stats = _ratio_stats(ratio, logp, old_logp, valid, clipped)
        if dual_clip is not None:
            stats["dual_clip_frac"] = aggregate(dual_capped.to(ratio.dtype), valid, "token-mean")
    return loss, stats


def _ratio_stats(ratio: Tensor, logp: Tensor, old_logp: Tensor, valid: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """The ratio statistics both clipped losses report, over valid tokens: clip_frac, approx_kl (token-mean k3
    estimate of KL[π_old ‖ π], 2.1), ratio_mean, ratio_max."""
    return {
        "clip_frac": aggregate(clipped.to(ratio.dtype), valid, "token-mean"),
        "approx_kl": aggregate(kl_estimate(old_logp, logp, "k3"), valid, "token-mean"),
        "ratio_mean": aggregate(ratio, valid, "token-mean"),
        "ratio_max": torch.where(valid, ratio, 0).max(),
    }


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg: str,
    norm_length: int | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO loss −aggregate(sg(clip(r, 1−clip_low, 1+clip_high))·A·log π) (MiniMax-M1 report, MiniMax 2025, §3.1).

    The off-policy gradient of (survey 2.13), ratio·A·∇log π, with the ratio r = π/π_old clipped and detached:
    ∂loss/∂logp_t = −sg(clip(r_t))·A_t / normalizer, where the normalizer is the aggregation's (#valid tokens
    for "token-mean", the paper's 1/Σ|o_i|). Unlike PPO's min(r·A, clip(r)·A) (2.4.3, 3.9), which gives a
    token whose ratio left the range toward its advantage a zero gradient, clipping here only bounds the
    weight: every valid token keeps a gradient. clip_low ≥ 1 leaves no lower bound (the paper only tunes
    clip_high). The loss value itself is not a surrogate of the return; only its gradient is meaningful.
    Log-ratios are clamped to ±MAX_LOG_RATIO before exp; token_weights [B, T] (e.g. `icepop_weights`)
    multiply each token's loss as constants.
    stats: clip_frac (valid tokens whose ratio lies outside [1−clip_low, 1+clip_high], i.e. whose weight was
    clipped; their gradient is not zero), approx_kl (token-mean k3 estimate of KL[π_old ‖ π]), ratio_mean,
    ratio_max.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"need clip_low >= 0 and clip_high >= 0, got {clip_low}, {clip_high}")
    valid = mask.bool()  # [B, T]
    logp = torch.where(valid, logp, 0)  # [B, T]
    old_logp = torch.where(valid, old_logp, 0)  # [B, T]
    advantages = torch.where(valid, advantages, 0)  # [B, T]
    ratio = torch.exp((logp - old_logp).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T] constant
    weight = ratio.clamp(min=1 - clip_low, max=1 + clip_high)  # [B, T] sg(clip(r))
    per_token = -weight * advantages * logp  # [B, T]
    if token_weights is not None:
        per_token = per_token * torch.where(valid, token_weights.detach(), 0)  # [B, T]
    loss = aggregate(per_token, valid, agg, norm_length)

    with torch.no_grad():
        clipped = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)  # [B, T]
        stats = _ratio_stats(ratio, logp, old_logp, valid, clipped)
    return loss, stats


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling weights min(π_old / π_rollout, C) per token, detached: (weights [B, T], stats).

    The samples come from the rollout engine's π_rollout, while the PPO ratio's π_old is the trainer's
    numerics of the same weights; the per-token importance ratio of the off-policy gradient (survey 2.13),
    truncated at C to bound its variance (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"), corrects for the difference. Padding gets weight 0.
    stats: tis_weight_mean (token mean of the weights) and tis_clip_frac (tokens whose ratio exceeded C).
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    valid = mask.bool()  # [B, T]
    log_ratio = torch.where(valid, old_logp.detach() - rollout_logp.detach(), 0)  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    weights = torch.where(valid, ratio.clamp(max=cap), 0)  # [B, T]
    stats = {"tis_weight_mean": aggregate(weights, valid, "token-mean"),
             "tis_clip_frac": aggregate((ratio > cap).to(ratio.dtype), valid, "token-mean")}
    return weights, stats


def icepop_weights(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, low: float, high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """ICEPOP weights per token, detached: r = π_old / π_rollout where low ≤ r ≤ high, else 0 (weights [B, T], stats).

    The importance ratio of (survey 2.13) between the trainer's π_old and the rollout engine's π_rollout, as
    in `tis_weights`, but masked on both sides instead of truncated: a token whose two numerics disagree
    beyond [low, high] is dropped from the gradient rather than kept at the cap (IcePop, in the Ring-1T
    report, Ling Team 2025). Both bounds are inclusive, compared in log space (log low ≤ log r ≤ log high)
    so a ratio built at a bound is kept whatever exp rounds to. Padding gets weight 0.
    stats: icepop_weight_mean (token mean of the weights) and icepop_mask_frac (valid tokens dropped).
    """
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high for the ICEPOP bounds, got low={low}, high={high}")
    valid = mask.bool()  # [B, T]
    log_ratio = torch.where(valid, old_logp.detach() - rollout_logp.detach(), 0)  # [B, T]
    inside = (log_ratio >= _log(low)) & (log_ratio <= _log(high))  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    weights = torch.where(valid & inside, ratio, 0)  # [B, T]
    stats = {"icepop_weight_mean": aggregate(weights, valid, "token-mean"),
             "icepop_mask_frac": aggregate((~inside).to(ratio.dtype), valid, "token-mean")}
    return weights, stats


def seq_mask_weights(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, low: float, high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence masking of the train/inference mismatch: weight 0 for every token of sequence i when its
    geometric-mean ratio ρ_i = exp(mean_t log(π_old/π_rollout)) over its valid tokens leaves [low, high], else 1.

    The sequence-level importance ratio Π_t π_old/π_rollout of (survey 2.8–2.9) is a product of |o_i| noisy
    factors; its |o_i|-th root (as GSPO's s_i) keeps every length on one scale. Source: verl's rollout-correction
    helper (trainer/ppo/mismatch_helper.py, 2025) with rollout_is_level="geometric" and rollout_is_mode="mask",
    which rejects sequences whose ρ_i leaves [lower, upper] (inclusive; lower defaults to 1/upper there) and
    cites Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
    Training-Inference Mismatch". verl also keeps ρ_i as an importance weight on kept sequences; these weights
    are 0/1 only (combine with `tis_weights` to reweight). Bounds are inclusive, compared in log space.
    Padding, and all-padding rows, get weight 0.
    stats: seq_mask_frac (non-empty sequences dropped) and seq_mask_weight_mean (valid tokens kept).
    """
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high for the sequence mask bounds, got low={low}, high={high}")
    valid = mask.bool()  # [B, T]
    log_ratio = torch.where(valid, old_logp.detach() - rollout_logp.detach(), 0)  # [B, T]
    n_tokens = valid.sum(dim=-1)  # [B]
    seq_log_ratio = log_ratio.sum(dim=-1) / n_tokens.clamp(min=1)  # [B] log ρ_i
    keep = (seq_log_ratio >= _log(low)) & (seq_log_ratio <= _log(high))  # [B]
    weights = (valid & keep[:, None]).to(log_ratio.dtype)  # [B, T]
    non_empty = n_tokens > 0  # [B]
    dropped = (non_empty & ~keep).sum().to(log_ratio.dtype)
    stats = {"seq_mask_frac": dropped / non_empty.sum().clamp(min=1).to(log_ratio.dtype),
             "seq_mask_weight_mean": aggregate(weights, valid, "token-mean")}
    return weights, stats


def policy_loss_with_kl(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    beta: float,
    kl_kind: str = "k3",
    agg: str = "token-mean",
    norm_length: int | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """policy_loss + β·aggregate(KL[π ‖ π_ref]): the negated objective of GRPO with the KL in the loss (survey 3.14,
    A.10, 3.13), and of PPO with β = 0 (the KL then shapes the reward, 3.5.1).

    stats: policy_loss's plus "kl" (the aggregated per-token KL) when ref_logp is given; it may be None if beta == 0.
    `token_weights` (TIS) weigh the policy term only.
    """
    loss, stats = policy_loss(
        logp, old_logp, advantages, mask, clip_low, clip_high, agg, dual_clip, ratio_level, norm_length, token_weights
    )
    return add_kl_penalty(loss, stats, logp, ref_logp, mask, beta, kl_kind, agg, norm_length)


def add_kl_penalty(
    loss: Tensor,
    stats: dict[str, Tensor],
    logp: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    beta: float,
    kl_kind: str = "k3",
    agg: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss + β·aggregate(KL[π ‖ π_ref]) of any policy loss (survey 3.14, 3.13), and stats with "kl" added when
    ref_logp is given (it may be None if beta == 0; with beta == 0 the KL is measured without a gradient)."""
    if ref_logp is None:
        if beta != 0:
            raise ValueError("the KL penalty needs ref_logp when beta != 0")
        return loss, stats
    with torch.set_grad_enabled(torch.is_grad_enabled() and beta != 0):
        kl = aggregate(kl_estimate(logp, ref_logp, kl_kind, mask), mask, agg, norm_length)
    stats = {**stats, "kl": kl.detach()}
    return (loss + beta * kl if beta != 0 else loss), stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None, agg: str = "token-mean"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ½·max((V − R)², (clip(V, V_old ± c) − R)²), the L^VF term of (survey 2.18).

    clip=None is the plain ½(V − R)²; stats: value_clip_frac (valid tokens where the clipped term won, gradient 0).
    """
    valid = mask.bool()  # [B, T]
    values = torch.where(valid, values, 0)  # [B, T]
    old_values = torch.where(valid, old_values, 0)  # [B, T]
    returns = torch.where(valid, returns, 0)  # [B, T]
    unclipped = (values - returns).square()  # [B, T]
    if clip is None:
        per_token, clipped = unclipped, torch.zeros_like(valid)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)  # [B, T]
        clipped_sq = (v_clipped - returns).square()  # [B, T]
        clipped = clipped_sq > unclipped  # [B, T]
        per_token = torch.where(clipped, clipped_sq, unclipped)
    loss = aggregate(0.5 * per_token, valid, agg)
    clip_frac = aggregate(clipped.to(values.dtype), valid, "token-mean").detach()
    return loss, {"value_clip_frac": clip_frac}


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy −Σ_a π(a) log π(a) of each token's distribution, from logits [B, T, V] → [B, T] (survey 2.18, S[π])."""
    logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    p = logp.exp()  # [B, T, V]
    return -(p * torch.where(p > 0, logp, 0)).sum(dim=-1)  # 0·log 0 = 0 for −inf logits


def entropy(logits: Tensor, mask: Tensor, agg: str = "token-mean") -> Tensor:
    """Aggregated token entropy, the S[π_θ] bonus of (survey 2.18); logits [B, T, V]."""
    valid = mask.bool()  # [B, T]
    logits = torch.where(valid[..., None], logits, 0)  # [B, T, V]
    return aggregate(token_entropy(logits), valid, agg)


def top_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """0/1 mask [B, T] of the valid tokens among the top `quantile` fraction by entropy across the whole batch.

    Entropies are per-token S[π](s_t) of (survey 2.18), e.g. from `token_entropy`; training only on the
    highest-entropy "forking" tokens follows Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority
    Tokens Drive Effective Reinforcement Learning for LLM Reasoning" (top 20% per batch). Of n valid tokens,
    k = ⌈quantile·n⌉ are kept (quantile·n is rounded to 6 decimals first: 0.07·100 is 7.000000000000001 in
    floating point, and k is 7, not 8): every valid token whose entropy is ≥ the k-th largest. Ties at that
    threshold are all kept, so more than k tokens may be kept, never fewer, and the result does not depend on
    token order. quantile = 1.0 keeps every valid token; padding is always 0. Returns the entropies' dtype,
    detached.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {quantile}")
    valid = mask.bool()  # [B, T]
    entropies = entropies.detach()
    n_valid = int(valid.sum())
    if n_valid == 0:
        return torch.zeros_like(entropies)
    k = min(n_valid, max(1, math.ceil(round(quantile * n_valid, 6))))
    scores = torch.where(valid, entropies, -torch.inf)  # [B, T] padding never selected
    threshold = scores.flatten().topk(k).values[-1]  # k-th largest valid entropy
    return (valid & (scores >= threshold)).to(entropies.dtype)  # [B, T]


def sft_loss(logp: Tensor, mask: Tensor, agg: str = "token-mean") -> Tensor:
    """Negative log-likelihood −E[log π(x)], the pretraining-mix term of InstructGPT's objective (survey 3.3.2)."""
    return aggregate(-logp, mask, agg)


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss −log σ(β[(log π_c − log ref_c) − (log π_r − log ref_r)]) on sequence log-prob sums [B] (survey 3.8).

    stats: implicit rewards β·log(π/π_ref) — rewards_chosen, rewards_rejected (means), reward_accuracy, reward_margin.
    """
    chosen = beta * (policy_chosen_logp - ref_chosen_logp)  # [B] implicit reward r̂_θ (survey 3.4.2)
    rejected = beta * (policy_rejected_logp - ref_rejected_logp)  # [B]
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        stats = {
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
            "reward_accuracy": (chosen > rejected).to(chosen.dtype).mean(),
            "reward_margin": (chosen - rejected).mean(),
        }
    return loss, stats


def reward_model_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Pairwise Bradley–Terry reward-model loss −E[log σ(r_chosen − r_rejected)] (survey 3.1)."""
    return -F.logsigmoid(chosen - rejected).mean()


def kwise_reward_model_loss(scores: Tensor) -> Tensor:
    """InstructGPT K-wise loss: mean of −log σ(s_i − s_j) over pairs i < j, then over prompts (survey 3.3.1).

    scores [N, K] are the rewards of K responses of one prompt, ranked best first.
    """
    n_responses = scores.shape[-1]
    if n_responses < 2:
        raise ValueError(f"kwise_reward_model_loss needs K >= 2 responses per prompt, got {n_responses}")
    better, worse = torch.triu_indices(n_responses, n_responses, offset=1, device=scores.device)  # [K(K−1)/2]
    return -F.logsigmoid(scores[:, better] - scores[:, worse]).mean()  # pairs [N, K(K−1)/2]


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token −min(r·A, clip(r)·A), capped at −c·A for A < 0 (dual-clip); → (loss, clipped, dual_capped)."""
    # PPO paper: for A < 0 the ratio is kept from falling below 1 − ε (survey 2.4.3's text says "exceed").
    unclipped = -advantages * ratio  # [B, T]
    clipped_loss = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T] constant in r outside the range
    clipped = clipped_loss > unclipped  # [B, T] pessimistic branch is the clipped one
    loss = torch.where(clipped, clipped_loss, unclipped)  # [B, T]
    dual_capped = torch.zeros_like(clipped)  # [B, T]
    if dual_clip is not None:
        cap = -dual_clip * advantages  # [B, T]
        dual_capped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_capped, cap, loss)
    return loss, clipped, dual_capped


def _log(bound: float) -> float:
    """log of a ratio bound ≥ 0, with log 0 = −inf."""
    return math.log(bound) if bound > 0 else -math.inf
