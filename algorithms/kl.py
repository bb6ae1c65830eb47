"""Per-token Monte-Carlo estimators of KL[π ‖ π_ref] (survey 2.1, 3.13, A.3.2; Schulman 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str, mask: Tensor | None = None) -> Tensor:
    """Per-token KL[π ‖ π_ref] estimate from tokens sampled from π, log r = ref_logp − logp (survey 2.1.2, 2.2, 3.13).

    k1 = −log r (unbiased), k2 = ½(log r)² (biased, low variance), k3 = (r − 1) − log r (unbiased, ≥ 0).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; allowed kinds: {', '.join(KL_KINDS)}")
    if mask is not None:
        valid = mask.bool()  # [B, T]
        logp = torch.where(valid, logp, 0)
        ref_logp = torch.where(valid, ref_logp, 0)
    log_r = ref_logp - logp  # [B, T]
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * log_r.square()
    else:
        kl = torch.expm1(log_r) - log_r  # (r − 1) − log r; expm1 keeps precision near r = 1
    return kl if mask is None else torch.where(valid, kl, 0)
