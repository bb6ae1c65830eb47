"""The policy objective of one micro-batch, as `algorithm.*` selects it: the loss (`policy_loss`: ppo, gspo or
cispo), the rollout-correction token weights (`rollout_correction`: tis, icepop, seq_mask; with `decoupled` and
no correction, the plain pi_prox / pi_behaviour), the high-entropy token
selection (`top_entropy_quantile`), the KL-in-loss term (3.14) and the entropy bonus (2.18). The math is in
`algorithms.losses`; this module only chooses and combines it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from actors.records import TrainBatch
from algorithms.losses import (
    add_kl_penalty,
    aggregate,
    cispo_loss,
    icepop_weights,
    policy_loss,
    seq_mask_weights,
    tis_weights,
    token_entropy,
    top_entropy_mask,
)


def correction_weights(correction: dict, old_logp: Tensor, rollout_logp: Tensor, mask: Tensor
                       ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Token weights `[b, t]` from r = π_old / π_rollout for `algorithm.rollout_correction` (None for kind none),
    and their stats (tis_clip_frac, icepop_mask_frac or seq_mask_frac, with the weights' token mean)."""
    kind, low, high = correction["kind"], correction["low"], correction["high"]
    if kind == "none":
        return None, {}
    if kind == "tis":
        return tis_weights(old_logp, rollout_logp, mask, high)
    if kind == "icepop":
        return icepop_weights(old_logp, rollout_logp, mask, low, high)
    if kind == "seq_mask":
        return seq_mask_weights(old_logp, rollout_logp, mask, low, high)
    raise ValueError(f"unknown rollout_correction kind {kind!r}")


def policy_objective(alg: dict, logp: Tensor, logits: Tensor, micro: TrainBatch, kl_coef: float,
                     temperature: float, norm_length: int) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss to minimise, detached stats) of one micro-batch. `logp [b, t]` and `logits [b, t, V]` are the
    policy's on `micro`; `kl_coef` is this step's β of the KL-in-loss term; `norm_length` the constant length of
    the `seq-mean-token-sum-norm` aggregation. Stats: the loss's (clip_frac, approx_kl, ratio_mean, ratio_max, kl),
    the correction's, `entropy` and, when tokens are selected by entropy, `entropy/selected_frac`."""
    mask = micro.response_mask  # [b, t]
    valid = mask.bool()
    agg = alg["agg"]
    weights, stats = correction_weights(alg["rollout_correction"], micro.old_logp, micro.rollout_logp, mask)
    if weights is None and alg.get("decoupled"):  # AReaL: pi_prox / pi_behaviour, untruncated
        weights, stats = tis_weights(micro.old_logp, micro.rollout_logp, mask, float("inf"))
    with torch.set_grad_enabled(torch.is_grad_enabled() and alg["entropy_coef"] > 0):
        token_ent = token_entropy(torch.where(valid[..., None], logits, 0) / temperature)  # [b, t]
        ent = aggregate(token_ent, mask, agg)
    if alg["top_entropy_quantile"] < 1:
        selected = top_entropy_mask(token_ent, mask, alg["top_entropy_quantile"])  # [b, t] 0/1, detached
        stats = {**stats, "entropy/selected_frac": aggregate(selected, mask, "token-mean")}
        weights = selected if weights is None else weights * selected  # [b, t]

    clip = (micro.old_logp, micro.advantages, mask, alg["clip_low"], alg["clip_high"], agg)
    if alg["policy_loss"] == "cispo":
        loss, loss_stats = cispo_loss(logp, *clip, norm_length=norm_length, token_weights=weights)
    else:  # ppo: a ratio per token; gspo: every token of a response carries its sequence ratio
        loss, loss_stats = policy_loss(logp, *clip, dual_clip=alg["dual_clip"], norm_length=norm_length,
                                       ratio_level="sequence" if alg["policy_loss"] == "gspo" else "token",
                                       token_weights=weights)
    loss, loss_stats = add_kl_penalty(loss, loss_stats, logp, micro.ref_logp, mask, kl_coef, alg["kl_kind"], agg,
                                      norm_length)
    if alg["entropy_coef"] > 0:
        loss = loss - alg["entropy_coef"] * ent
    return loss, {**stats, **loss_stats, "entropy": ent.detach(), "loss": loss.detach()}
