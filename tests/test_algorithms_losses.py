"""Losses against hand-worked numbers, finite differences and independent loops (survey 2.4, 2.18, 3.1–3.14, A.10)."""

import math

import pytest
import torch

from algorithms import (
    aggregate,
    cispo_loss,
    dpo_loss,
    entropy,
    icepop_weights,
    policy_loss_with_kl,
    kwise_reward_model_loss,
    policy_loss,
    reward_model_loss,
    seq_mask_weights,
    sft_loss,
    tis_weights,
    token_entropy,
    top_entropy_mask,
    value_loss,
)

F64 = torch.float64
MASK_2x3 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- aggregation ---------------------------------------------------------------------------------


def test_aggregate_modes_hand_worked_2x3():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    assert aggregate(values, MASK_2x3, "token-mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(values, MASK_2x3, "seq-mean-token-mean").item() == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)
    assert aggregate(values, MASK_2x3, "seq-mean-token-sum-norm").item() == pytest.approx(((1 + 2) / 3 + 4 / 3) / 2)
    assert aggregate(values, MASK_2x3, "seq-mean-token-sum-norm", norm_length=4).item() == pytest.approx(
        ((1 + 2) / 4 + 4 / 4) / 2
    )


def test_aggregate_ignores_all_padding_rows_and_rejects_unknown_mode():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
    mask = torch.cat([MASK_2x3, torch.zeros(1, 3)])
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(((1 + 2) / 2 + 4) / 2)
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-mean.*seq-mean-token-sum-norm"):
        aggregate(values, mask, "sum")


# ---- policy loss ---------------------------------------------------------------------------------


def _ratios_to_logps(ratios: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, old_logp) with π/π_old = ratios exactly up to rounding."""
    r = torch.tensor(ratios, dtype=F64)  # [B, T]
    old = -torch.linspace(0.5, 3.0, r.numel(), dtype=F64).reshape(r.shape)  # [B, T]
    return old + r.log(), old


def test_policy_loss_aggregation_modes_hand_worked_2x3():
    logp, old = _ratios_to_logps([[1.1, 1.0, 7.0], [0.9, 7.0, 7.0]])
    adv = torch.tensor([[1.0, 2.0, 9.0], [-1.0, 9.0, 9.0]], dtype=F64)
    # Inside the clip range every token's loss is −A·r: row 0 → −1.1, −2.0; row 1 → +0.9.
    expected = {
        "token-mean": (-1.1 - 2.0 + 0.9) / 3,
        "seq-mean-token-mean": ((-1.1 - 2.0) / 2 + 0.9 / 1) / 2,
        "seq-mean-token-sum-norm": ((-1.1 - 2.0) / 3 + 0.9 / 3) / 2,
    }
    for agg, want in expected.items():
        loss, _ = policy_loss(logp, old, adv, MASK_2x3, 0.2, 0.2, agg)
        assert loss.item() == pytest.approx(want, rel=1e-12)


def test_asymmetric_clip_hand_worked():
    logp, old = _ratios_to_logps([[1.5, 1.25, 0.5, 0.75]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), 0.2, 0.28, "token-mean")
    # A=+1, r=1.5 → clipped at 1+0.28: −1.28.   A=+1, r=1.25 → inside [0.8, 1.28]: −1.25.
    # A=−1, r=0.5 → clipped at 1−0.2: −(−1)(0.8) = 0.8.   A=−1, r=0.75 → clipped too: 0.8.
    assert loss.item() == pytest.approx((-1.28 - 1.25 + 0.8 + 0.8) / 4, rel=1e-12)
    assert stats["clip_frac"].item() == pytest.approx(3 / 4)
    symmetric, _ = policy_loss(logp, old, adv, torch.ones(1, 4), 0.2, 0.2, "token-mean")
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 0.8) / 4, rel=1e-12)


def test_dual_clip_hand_worked():
    logp, old = _ratios_to_logps([[4.0, 2.0, 4.0, 0.5]])
    adv = torch.tensor([[-1.0, -1.0, 2.0, -2.0]], dtype=F64)
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), 0.2, 0.2, "token-mean", dual_clip=3.0)
    # A=−1, r=4: max(4, 1.2) = 4 > 3·1 → capped at 3.   A=−1, r=2: 2 (below the cap).
    # A=+2, r=4: −2·1.2 = −2.4 (dual-clip only touches A < 0).   A=−2, r=0.5: max(1, 1.6) = 1.6.
    assert loss.item() == pytest.approx((3.0 + 2.0 - 2.4 + 1.6) / 4, rel=1e-12)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 4)
    plain, plain_stats = policy_loss(logp, old, adv, torch.ones(1, 4), 0.2, 0.2, "token-mean")
    assert plain.item() == pytest.approx((4.0 + 2.0 - 2.4 + 1.6) / 4, rel=1e-12)
    assert "dual_clip_frac" not in plain_stats
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, torch.ones(1, 4), 0.2, 0.2, "token-mean", dual_clip=0.5)


def test_policy_loss_stats_hand_worked():
    logp, old = _ratios_to_logps([[1.5, 1.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    _, stats = policy_loss(logp, old, adv, torch.ones(1, 3), 0.2, 0.2, "token-mean")
    k3 = [(r - 1) - math.log(r) for r in (1.5, 1.0, 0.5)]  # KL[π_old ‖ π] with r = π/π_old
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(3.0 / 3)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)  # only r=1.5 with A>0; r=0.5 with A>0 is not clipped
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def _mixed_clip_case():
    # ratio, advantage → branch (clip_low 0.2, clip_high 0.28):
    ratios = [[1.5, 0.5, 1.05, 0.95, 4.0], [0.6, 1.4, 1.1, 0.7, 1.0]]
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -2.0, 0.5, 1.0]], dtype=F64)
    clipped = [[True, True, False, False, False], [False, False, False, False, False]]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=F64)
    logp, old = _ratios_to_logps(ratios)
    return logp, old, adv, mask, torch.tensor(clipped)


def test_policy_loss_finite_difference_gradient():
    logp, old, adv, mask, _ = _mixed_clip_case()
    logp.requires_grad_(True)
    for dual_clip in (None, 3.0):
        f = lambda x: policy_loss(x, old, adv, mask, 0.2, 0.28, "token-mean", dual_clip)[0]  # noqa: E731
        (grad,) = torch.autograd.grad(f(logp), logp)
        h = 1e-6
        numeric = torch.zeros_like(logp)
        with torch.no_grad():
            for idx in torch.cartesian_prod(torch.arange(2), torch.arange(5)).tolist():
                bump = torch.zeros_like(logp)
                bump[tuple(idx)] = h
                numeric[tuple(idx)] = (f(logp + bump) - f(logp - bump)) / (2 * h)
        torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-9)


def test_gradient_zero_exactly_for_tokens_clipped_toward_their_advantage():
    logp, old, adv, mask, clipped = _mixed_clip_case()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    valid = mask.bool()
    assert (grad[clipped] == 0).all()
    assert (grad[valid & ~clipped] != 0).all()
    assert (grad[~valid] == 0).all()
    # Unclipped tokens: ∂(−A·r)/∂logp = −A·r, divided by the 8 valid tokens.
    ratio = (logp - old).exp().detach()
    torch.testing.assert_close(grad[valid & ~clipped], (-adv * ratio / 8)[valid & ~clipped])
    assert stats["clip_frac"].item() == pytest.approx(2 / 8)
    # Dual-clip: the A=−1, r=4 token is capped at 3 and its gradient vanishes too.
    loss_dc, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean", dual_clip=3.0)
    (grad_dc,) = torch.autograd.grad(loss_dc, logp)
    assert grad[0, 4] != 0 and grad_dc[0, 4] == 0


def test_sequence_ratio_hand_worked():
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], dtype=F64)
    logp = (old + torch.tensor([[0.1, 0.3, 50.0], [0.2, -0.4, 0.5]], dtype=F64)).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.2, "seq-mean-token-mean", ratio_level="sequence")
    # s_0 = exp((0.1 + 0.3)/2) = e^0.2 = 1.2214 > 1.2 → clipped: tokens give −1·1.2.
    # s_1 = exp((0.2 − 0.4 + 0.5)/3) = e^0.1 = 1.10517 → inside: tokens give −A·e^0.1.
    s1 = math.exp(0.1)
    want = ((-1.2 - 1.2) / 2 + (-1 * s1 - 2 * s1 - 3 * s1) / 3) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.2))
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    # GSPO-token: gradient of token t is −A_t·s_i times its aggregation weight, per token (not averaged).
    torch.testing.assert_close(grad[1], torch.tensor([-1 * s1, -2 * s1, -3 * s1], dtype=F64) / 3 / 2)
    assert (grad[0] == 0).all()
    token_level, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, "seq-mean-token-mean")
    assert token_level.item() != pytest.approx(want)
    with pytest.raises(ValueError, match="token.*sequence"):
        policy_loss(logp, old, adv, mask, 0.2, 0.2, "token-mean", ratio_level="seq")


def test_gspo_with_sequence_advantages_is_the_papers_sequence_objective_and_its_gradient():
    """With one advantage per response and agg seq-mean-token-mean, the loss is −mean_i min(s_i·A_i, clip(s_i)·A_i),
    s_i = exp(mean_t log π/π_old) (GSPO, Zheng et al. 2025, eq. 5–7), computed here by a loop over sequences; and
    GSPO-token's per-token gradient equals the finite-difference gradient of that sequence objective."""
    gen = torch.Generator().manual_seed(19)
    B, T = 6, 5
    lengths = [5, 3, 1, 4, 2, 5]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)  # [B, T]
    old = -torch.rand(B, T, generator=gen, dtype=F64) * 2
    logp = old + 0.05 * torch.randn(B, T, generator=gen, dtype=F64)  # ratios near 1: some clipped, some not
    seq_adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.5], dtype=F64)  # [B]
    adv = seq_adv[:, None].expand(B, T) * mask  # [B, T]
    low, high = 0.01, 0.015

    def by_hand(x: torch.Tensor) -> torch.Tensor:
        terms = []
        for i, n in enumerate(lengths):
            s = torch.exp((x[i, :n] - old[i, :n]).mean())
            terms.append(torch.minimum(s * seq_adv[i], s.clamp(1 - low, 1 + high) * seq_adv[i]))
        return -torch.stack(terms).mean()

    leaf = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(leaf, old, adv, mask, low, high, "seq-mean-token-mean", ratio_level="sequence")
    assert loss.item() == pytest.approx(by_hand(logp).item(), rel=1e-12)
    s_all = [math.exp((logp[i, :n] - old[i, :n]).mean().item()) for i, n in enumerate(lengths)]
    assert 0 < stats["clip_frac"].item() < 1 and any(not 1 - low <= s <= 1 + high for s in s_all)
    (grad,) = torch.autograd.grad(loss, leaf)
    h = 1e-6
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(B):
            for t in range(T):
                bump = torch.zeros_like(logp)
                bump[i, t] = h
                numeric[i, t] = (by_hand(logp + bump) - by_hand(logp - bump)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-10)


def test_sequence_ratio_is_length_normalized_and_finite_on_long_sequences():
    T = 4000
    old = torch.full((1, T), -2.0, dtype=F64)
    logp = old + 0.05  # every token ratio e^0.05: raw product e^200 would overflow float32
    ones = torch.ones(1, T)
    loss, stats = policy_loss(logp.float(), old.float(), ones, ones, 0.2, 0.2, "token-mean", ratio_level="sequence")
    assert stats["ratio_mean"].item() == pytest.approx(math.exp(0.05), rel=1e-5)
    assert torch.isfinite(loss)


# ---- GRPO ----------------------------------------------------------------------------------------


def test_grpo_loss_is_policy_loss_plus_beta_kl():
    logp, old = _ratios_to_logps([[1.1, 0.9, 1.0]])
    ref = logp + torch.tensor([[0.5, -0.2, 0.0]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 0.5]], dtype=F64)
    mask = torch.ones(1, 3)
    loss, stats = policy_loss_with_kl(logp.requires_grad_(True), old, ref, adv, mask, 0.2, 0.2, beta=0.04)
    assert loss.requires_grad and not any(v.requires_grad for v in stats.values())
    surrogate = (-1.1 + 0.9 - 0.5) / 3
    kl = sum(math.exp(d) - 1 - d for d in (0.5, -0.2, 0.0)) / 3  # k3 with log r = ref − logp
    assert loss.item() == pytest.approx(surrogate + 0.04 * kl, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-12)
    k1_loss, k1_stats = policy_loss_with_kl(logp, old, ref, adv, mask, 0.2, 0.2, beta=0.04, kl_kind="k1")
    assert k1_stats["kl"].item() == pytest.approx((-0.5 + 0.2 - 0.0) / 3, rel=1e-12)


def test_grpo_loss_beta_zero_accepts_no_reference():
    logp, old = _ratios_to_logps([[1.1, 0.9, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 0.5]], dtype=F64)
    loss, stats = policy_loss_with_kl(logp, old, None, adv, torch.ones(1, 3), 0.2, 0.2, beta=0.0)
    assert loss.item() == pytest.approx((-1.1 + 0.9 - 0.5) / 3, rel=1e-12)
    assert "kl" not in stats
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss_with_kl(logp, old, None, adv, torch.ones(1, 3), 0.2, 0.2, beta=0.1)


# ---- value, entropy, SFT -------------------------------------------------------------------------


def test_value_loss_clipped_hand_worked():
    values = torch.tensor([[1.5, 0.5, 1.05]], dtype=F64)
    old = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    returns = torch.tensor([[2.0, 2.0, 2.0]], dtype=F64)
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    # V=1.5 → clip 1.2: max(0.25, 0.64) = 0.64.  V=0.5 → clip 0.8: max(2.25, 1.44) = 2.25.  V=1.05 in range: 0.9025.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25 + 0.9025) / 3, rel=1e-12)
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    unclipped, _ = value_loss(values, old, returns, torch.ones(1, 3), clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 2.25 + 0.9025) / 3, rel=1e-12)


def _entropy_by_hand(logits: list[float]) -> float:
    z = [math.exp(x) for x in logits]
    p = [v / sum(z) for v in z]
    return -sum(pi * math.log(pi) for pi in p)


def test_entropy_matches_direct_formula():
    rows = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[-1.0, 5.0, 0.5], [9.0, 9.0, 9.0]]]
    logits = torch.tensor(rows, dtype=F64)
    per_token = token_entropy(logits)
    for b in range(2):
        for t in range(2):
            assert per_token[b, t].item() == pytest.approx(_entropy_by_hand(rows[b][t]), rel=1e-12)
    mask = torch.tensor([[1, 1], [1, 0]])
    want = (_entropy_by_hand(rows[0][0]) + math.log(3) + _entropy_by_hand(rows[1][0])) / 3
    assert entropy(logits, mask).item() == pytest.approx(want, rel=1e-12)


def test_entropy_is_stable_for_large_and_minus_inf_logits():
    logits = torch.tensor([[[1000.0, 1000.0, -float("inf")], [0.0, 3000.0, 0.0]]], dtype=F64, requires_grad=True)
    h = token_entropy(logits)
    assert h[0, 0].item() == pytest.approx(math.log(2))
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-300)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sft_loss_is_mean_negative_log_likelihood():
    logp = torch.tensor([[-0.5, -1.5, -9.0], [-2.0, -9.0, -9.0]], dtype=F64)
    assert sft_loss(logp, MASK_2x3).item() == pytest.approx((0.5 + 1.5 + 2.0) / 3)
    assert sft_loss(logp, MASK_2x3, "seq-mean-token-mean").item() == pytest.approx(((0.5 + 1.5) / 2 + 2.0) / 2)


# ---- preference losses ---------------------------------------------------------------------------


def test_reward_model_loss_matches_formula():
    chosen = torch.tensor([1.0, -0.5, 3.0], dtype=F64)
    rejected = torch.tensor([0.0, 0.5, 3.5], dtype=F64)
    want = -sum(_log_sigmoid(c - r) for c, r in [(1.0, 0.0), (-0.5, 0.5), (3.0, 3.5)]) / 3
    assert reward_model_loss(chosen, rejected).item() == pytest.approx(want, rel=1e-12)


def test_dpo_equals_reward_model_loss_on_implicit_rewards():
    gen = torch.Generator().manual_seed(11)
    pc, pr, rc, rr = (torch.randn(6, generator=gen, dtype=F64) * 5 for _ in range(4))
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(reward_model_loss(0.1 * (pc - rc), 0.1 * (pr - rr)).item(), rel=1e-12)
    assert stats["rewards_chosen"].item() == pytest.approx((0.1 * (pc - rc)).mean().item())


def test_dpo_stats_hand_worked():
    loss, stats = dpo_loss(
        torch.tensor([-1.0, -4.0], dtype=F64),
        torch.tensor([-3.0, -2.0], dtype=F64),
        torch.tensor([-2.0, -3.0], dtype=F64),
        torch.tensor([-2.0, -2.0], dtype=F64),
        beta=0.5,
    )
    # implicit rewards: chosen 0.5·(1, −1) = (0.5, −0.5); rejected 0.5·(−1, 0) = (−0.5, 0); margins (1, −0.5)
    assert loss.item() == pytest.approx(-(_log_sigmoid(1.0) + _log_sigmoid(-0.5)) / 2, rel=1e-12)
    assert stats["rewards_chosen"].item() == pytest.approx(0.0)
    assert stats["rewards_rejected"].item() == pytest.approx(-0.25)
    assert stats["reward_accuracy"].item() == pytest.approx(0.5)
    assert stats["reward_margin"].item() == pytest.approx(0.25)


def test_kwise_reward_model_loss_is_mean_over_pairs():
    gen = torch.Generator().manual_seed(12)
    scores = torch.randn(3, 4, generator=gen, dtype=F64)
    per_prompt = []
    for row in scores.tolist():
        pairs = [-_log_sigmoid(row[i] - row[j]) for i in range(4) for j in range(i + 1, 4)]
        assert len(pairs) == 4 * 3 // 2
        per_prompt.append(sum(pairs) / len(pairs))
    assert kwise_reward_model_loss(scores).item() == pytest.approx(sum(per_prompt) / 3, rel=1e-12)
    # K = 2 is the pairwise loss
    two = scores[:, :2]
    assert kwise_reward_model_loss(two).item() == pytest.approx(reward_model_loss(two[:, 0], two[:, 1]).item())
    with pytest.raises(ValueError, match="K >= 2"):
        kwise_reward_model_loss(scores[:, :1])


# ---- truncated importance sampling -------------------------------------------------------------------


def test_tis_weights_hand_worked_and_capped():
    """w = min(π_old / π_rollout, C) per token, 0 on padding; stats over valid tokens only."""
    rollout = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]], dtype=F64)
    ratios = [[0.5, 3.0, 100.0], [1.5, 100.0, 100.0]]  # the 100s sit on padding
    old = rollout + torch.tensor(ratios, dtype=F64).log()
    w, stats = tis_weights(old, rollout, MASK_2x3, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 2.0, 0.0], [1.5, 0.0, 0.0]], dtype=F64))
    assert stats["tis_weight_mean"].item() == pytest.approx((0.5 + 2.0 + 1.5) / 3)
    assert stats["tis_clip_frac"].item() == pytest.approx(1 / 3)
    assert w.dtype == F64 and not w.requires_grad


def test_policy_loss_with_tis_weights_scales_each_token_and_carries_no_gradient_through_them():
    """Token-mean loss = Σ w_t·(−A_t·r_t) / #valid inside the clip range; the weights are constants."""
    logp, old = _ratios_to_logps([[1.1, 1.0, 1.0], [0.9, 1.0, 1.0]])
    logp.requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, 5.0], [-1.0, 5.0, 5.0]], dtype=F64)
    rollout = old - torch.tensor([[0.1, 0.7, 0.0], [0.2, 0.0, 0.0]], dtype=F64)  # π_old/π_rollout = e^0.1, ...
    w, _ = tis_weights(old.requires_grad_(False), rollout, MASK_2x3, cap=1.5)
    want_w = [math.exp(0.1), 1.5, math.exp(0.2)]  # e^0.7 ≈ 2.01 is capped at 1.5
    assert [w[0, 0].item(), w[0, 1].item(), w[1, 0].item()] == pytest.approx(want_w)
    loss, _ = policy_loss(logp, old, adv, MASK_2x3, 0.2, 0.2, "token-mean", token_weights=w.requires_grad_(True))
    want = (want_w[0] * -1.1 + want_w[1] * -2.0 + want_w[2] * 0.9) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    # d/dlogp of −w·A·exp(logp − old) at each valid token is −w·A·r / 3
    grad = [[-want_w[0] * 1.1 / 3, -want_w[1] * 2.0 / 3, 0.0], [want_w[2] * 0.9 / 3, 0.0, 0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(grad, dtype=F64), rtol=1e-9, atol=1e-12)
    unweighted, _ = policy_loss(logp, old, adv, MASK_2x3, 0.2, 0.2, "token-mean",
                                token_weights=torch.ones_like(adv))
    assert unweighted.item() == pytest.approx(policy_loss(logp, old, adv, MASK_2x3, 0.2, 0.2, "token-mean")[0].item())


# ---- CISPO -----------------------------------------------------------------------------------------


def test_cispo_loss_hand_worked_2x3():
    """loss = −Σ clip(r)·A·logp / normaliser; clip range [0.8, 1.28]; the 7s and 9s sit on padding."""
    logp, old = _ratios_to_logps([[1.5, 0.5, 7.0], [1.1, 7.0, 7.0]])
    adv = torch.tensor([[1.0, -1.0, 9.0], [2.0, 9.0, 9.0]], dtype=F64)
    # old = −0.5, −1.0 | −2.0 on the valid tokens (linspace), logp = old + log r.
    terms = [
        1.28 * 1.0 * (-0.5 + math.log(1.5)),  # r = 1.5 clipped to 1.28
        0.8 * -1.0 * (-1.0 + math.log(0.5)),  # r = 0.5 clipped to 0.8
        1.1 * 2.0 * (-2.0 + math.log(1.1)),  # r = 1.1 inside
    ]
    loss, stats = cispo_loss(logp, old, adv, MASK_2x3, 0.2, 0.28, "token-mean")
    assert loss.item() == pytest.approx(-sum(terms) / 3, rel=1e-12)
    seq, _ = cispo_loss(logp, old, adv, MASK_2x3, 0.2, 0.28, "seq-mean-token-mean")
    assert seq.item() == pytest.approx(-((terms[0] + terms[1]) / 2 + terms[2]) / 2, rel=1e-12)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)  # r = 1.5 and r = 0.5 leave [0.8, 1.28]
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-12)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_cispo_on_policy_is_reinforce():
    """At r = 1 (first step on fresh samples) the weight is 1: loss = −mean(A·logp), the vanilla PG loss (2.12)."""
    logp = torch.tensor([[-0.3, -1.2, -4.0], [-2.5, -0.1, 0.0]], dtype=F64)
    adv = torch.tensor([[0.5, -2.0, 3.0], [1.5, 0.0, 0.0]], dtype=F64)
    loss, stats = cispo_loss(logp, logp.clone(), adv, MASK_2x3, 0.2, 0.2, "token-mean")
    assert loss.item() == pytest.approx(-(0.5 * -0.3 + -2.0 * -1.2 + 1.5 * -2.5) / 3, rel=1e-12)
    assert stats["clip_frac"].item() == 0 and stats["approx_kl"].item() == 0


def test_cispo_gradient_is_clipped_weight_times_advantage_even_where_ppo_gives_zero():
    """∂loss/∂logp_t = −clip(r_t)·A_t / normaliser for every valid token, the clipped ones included."""
    logp, old, adv, mask, ppo_clipped = _mixed_clip_case()
    logp.requires_grad_(True)
    valid = mask.bool()
    r = torch.tensor([[1.5, 0.5, 1.05, 0.95, 4.0], [0.6, 1.4, 1.1, 0.7, 1.0]], dtype=F64)
    weight = r.clamp(0.8, 1.28)  # clip_low 0.2, clip_high 0.28
    normaliser = {"token-mean": torch.full((2, 1), 8.0, dtype=F64),  # 8 valid tokens
                  "seq-mean-token-mean": torch.tensor([[5.0 * 2], [3.0 * 2]], dtype=F64)}  # n_i · 2 rows
    for agg, norm in normaliser.items():
        (grad,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask, 0.2, 0.28, agg)[0], logp)
        want = torch.where(valid, -weight * adv / norm, 0)
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean")[0], logp)
    assert (grad[valid] != 0).all() and (grad[~valid] == 0).all()
    # The contrast with PPO: the two tokens PPO clips toward their advantage get no PPO gradient, while CISPO
    # gives them −1.28·(+1)/8 (r = 1.5) and −0.8·(−1)/8 (r = 0.5).
    (ppo_grad,) = torch.autograd.grad(policy_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean")[0], logp)
    assert (ppo_grad[ppo_clipped] == 0).all()
    assert grad[0, 0].item() == pytest.approx(-1.28 / 8) and grad[0, 1].item() == pytest.approx(0.8 / 8)
    # r = 4 with A = −1 is not PPO-clipped (PPO's gradient is −A·r/8 = 4/8); CISPO bounds its weight at 1.28.
    assert ppo_grad[0, 4].item() == pytest.approx(4.0 / 8) and grad[0, 4].item() == pytest.approx(1.28 / 8)
    # Inside the range CISPO's gradient is the (2.13) importance-weighted gradient, the same as PPO's.
    inside = valid & (r >= 0.8) & (r <= 1.28)
    torch.testing.assert_close(grad[inside], ppo_grad[inside], rtol=1e-12, atol=0)


def test_cispo_gradient_matches_finite_differences_of_the_weighted_log_likelihood():
    """With the weights frozen at their values, loss(logp) = −Σ w·A·logp / N: central differences of that."""
    logp, old, adv, mask, _ = _mixed_clip_case()
    logp.requires_grad_(True)
    (grad,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask, 0.2, 0.28, "token-mean")[0], logp)
    w = torch.exp(logp.detach() - old).clamp(0.8, 1.28)  # [B, T] frozen
    frozen = lambda x: -(torch.where(mask.bool(), w * adv * x, 0)).sum() / 8  # noqa: E731
    h = 1e-6
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        for b in range(2):
            for t in range(5):
                bump = torch.zeros_like(logp)
                bump[b, t] = h
                numeric[b, t] = (frozen(logp + bump) - frozen(logp - bump)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-10)


def test_cispo_no_lower_bound_token_weights_and_bad_clip():
    logp, old = _ratios_to_logps([[0.5, 2.0]])
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    ones = torch.ones(1, 2)
    leaf = logp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cispo_loss(leaf, old, adv, ones, 1.5, 0.2, "token-mean")[0], leaf)
    assert grad.tolist()[0] == pytest.approx([0.5 / 2, -1.2 / 2])  # clip_low ≥ 1: r = 0.5 keeps weight 0.5
    tw = torch.tensor([[3.0, 0.5]], dtype=F64, requires_grad=True)
    (grad_w,) = torch.autograd.grad(cispo_loss(leaf, old, adv, ones, 1.5, 0.2, "token-mean", token_weights=tw)[0], leaf)
    assert grad_w.tolist()[0] == pytest.approx([3.0 * 0.5 / 2, 0.5 * -1.2 / 2])
    with pytest.raises(ValueError, match="clip"):
        cispo_loss(logp, old, adv, ones, -0.1, 0.2, "token-mean")


# ---- ICEPOP and sequence masking ---------------------------------------------------------------------


def _rollout_and_old(log_ratios: list[list[float]], rollout: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(old_logp, rollout_logp) with old − rollout = the given log-ratios (exactly where rollout is 0)."""
    roll = torch.tensor(rollout, dtype=F64)
    return roll + torch.tensor(log_ratios, dtype=F64), roll


def test_icepop_weights_hand_worked_bounds_inclusive():
    """w = r where 0.5 ≤ r ≤ 2 (bounds kept), else 0; 0 on padding; rollout 0 makes the boundary log-ratios exact."""
    ratios = [[0.5, 2.0, 1.25, 100.0], [0.4999, 2.01, 1.0, 100.0]]  # the 100s sit on padding
    old, roll = _rollout_and_old([[math.log(r) for r in row] for row in ratios], [[0.0, 0.0, -1.0, -2.0]] * 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    w, stats = icepop_weights(old, roll, mask, low=0.5, high=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 2.0, 1.25, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=F64))
    assert w[0, 0] > 0 and w[0, 1] > 0  # exactly at low and at high: kept
    assert stats["icepop_mask_frac"].item() == pytest.approx(2 / 6)
    assert stats["icepop_weight_mean"].item() == pytest.approx((0.5 + 2.0 + 1.25 + 1.0) / 6)
    # TIS keeps the r = 2.01 token at its cap; ICEPOP drops it.
    tis, _ = tis_weights(old, roll, mask, cap=2.0)
    assert tis[1, 1].item() == pytest.approx(2.0) and w[1, 1] == 0
    assert w.dtype == F64 and not w.requires_grad
    assert not icepop_weights(old.requires_grad_(True), roll, mask, 0.5, 2.0)[0].requires_grad
    with pytest.raises(ValueError, match="low <= high"):
        icepop_weights(old, roll, mask, low=2.0, high=0.5)


def test_seq_mask_weights_hand_worked_bounds_inclusive():
    """Row i kept (weight 1) iff 0.5 ≤ exp(mean_t log r_t) ≤ 2 over its valid tokens; 0 on padding."""
    ln = math.log
    log_ratios = [
        [ln(2.0), ln(2.0), 0.0],  # geometric mean exactly 2 = high: kept
        [ln(0.5), ln(0.5), 0.0],  # exactly 0.5 = low: kept
        [ln(3.0), ln(1.0), 0.0],  # √3 ≈ 1.73: kept, though token r = 3 is out of range
        [ln(2.0), ln(2.5), 0.0],  # √5 ≈ 2.24: dropped, though token r = 2 is in range
        [ln(0.3), 50.0, 50.0],  # one valid token, 0.3 < 0.5: dropped; padding's e^50 never counts
        [ln(0.3), ln(1.0), 50.0],  # √0.3 ≈ 0.548: kept
        [50.0, 50.0, 50.0],  # all padding
    ]
    mask = torch.tensor([[1, 1, 0]] * 4 + [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    old, roll = _rollout_and_old(log_ratios, [[0.0, 0.0, -1.0]] * 7)
    w, stats = seq_mask_weights(old, roll, mask, low=0.5, high=2.0)
    kept = torch.tensor([1, 1, 1, 0, 0, 1, 0], dtype=F64)
    torch.testing.assert_close(w, kept[:, None] * mask.to(F64), rtol=0, atol=0)
    assert stats["seq_mask_frac"].item() == pytest.approx(2 / 6)  # 6 non-empty rows, 2 dropped
    assert stats["seq_mask_weight_mean"].item() == pytest.approx(8 / 11)  # 11 valid tokens, 8 kept
    # Nudge row 0's geometric mean just above 2 and it goes.
    nudge = torch.zeros_like(old)
    nudge[0, 0] = 1e-9
    nudged, _ = seq_mask_weights(old + nudge, roll, mask, 0.5, 2.0)
    assert (nudged[0] == 0).all() and torch.equal(nudged[1:], w[1:])
    assert w.dtype == F64 and not w.requires_grad
    with pytest.raises(ValueError, match="low <= high"):
        seq_mask_weights(old, roll, mask, low=3.0, high=2.0)


def test_seq_mask_weights_match_a_loop_over_sequences():
    gen = torch.Generator().manual_seed(21)
    B, T = 12, 7
    lengths = torch.randint(0, T + 1, (B,), generator=gen).tolist()
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    roll = -torch.rand(B, T, generator=gen, dtype=F64) * 3
    old = roll + 0.4 * torch.randn(B, T, generator=gen, dtype=F64)
    w, stats = seq_mask_weights(old, roll, mask, low=0.9, high=1.15)
    kept_rows = 0
    for b, n in enumerate(lengths):
        if n == 0:
            assert (w[b] == 0).all()
            continue
        diffs = [old[b, t].item() - roll[b, t].item() for t in range(n)]
        geo = math.exp(sum(diffs) / n)
        keep = 0.9 <= geo <= 1.15
        kept_rows += keep
        assert w[b].tolist() == [float(keep)] * n + [0.0] * (T - n)
    non_empty = sum(n > 0 for n in lengths)
    assert 0 < kept_rows < non_empty  # the bounds split this batch
    assert stats["seq_mask_frac"].item() == pytest.approx((non_empty - kept_rows) / non_empty)


# ---- high-entropy token selection --------------------------------------------------------------------


def test_top_entropy_mask_hand_worked():
    entropies = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.7, 0.3, 0.2, 9.0]], dtype=F64)  # the 9s sit on padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    cases = {
        1.0: [[1, 1, 1, 0], [1, 1, 1, 0]],  # every valid token
        0.5: [[0, 1, 1, 0], [1, 0, 0, 0]],  # k = 3: 0.9, 0.7, 0.5
        0.2: [[0, 1, 0, 0], [1, 0, 0, 0]],  # k = ⌈1.2⌉ = 2: 0.9, 0.7
        1 / 6: [[0, 1, 0, 0], [0, 0, 0, 0]],  # k = 1
    }
    for quantile, want in cases.items():
        got = top_entropy_mask(entropies, mask, quantile)
        assert got.tolist() == want, quantile
        assert got.dtype == F64 and not got.requires_grad
    assert torch.equal(top_entropy_mask(entropies, torch.zeros(2, 4), 0.5), torch.zeros(2, 4, dtype=F64))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="quantile"):
            top_entropy_mask(entropies, mask, bad)


def test_top_entropy_mask_keeps_all_ties_at_the_threshold_and_rounds_k():
    tied = torch.tensor([[0.5, 0.5, 0.1, 0.5]], dtype=F64)
    assert top_entropy_mask(tied, torch.ones(1, 4), 0.5).tolist() == [[1, 1, 0, 1]]  # k = 2, three tied at 0.5
    # 0.07·100 is 7.000000000000001 in floating point; k must be 7, not 8.
    distinct = torch.arange(100, dtype=F64).reshape(4, 25)
    got = top_entropy_mask(distinct, torch.ones(4, 25), 0.07)
    assert got.sum().item() == 7 and (got.flatten()[93:] == 1).all()


def test_top_entropy_mask_matches_sorting_by_hand():
    gen = torch.Generator().manual_seed(22)
    entropies = torch.rand(5, 9, generator=gen, dtype=F64) * 4
    lengths = [9, 4, 0, 7, 1]
    mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None])
    valid = [(entropies[b, t].item(), b, t) for b in range(5) for t in range(lengths[b])]
    for quantile in (0.05, 0.2, 0.5, 0.9, 1.0):
        k = math.ceil(round(quantile * len(valid), 6))
        chosen = {(b, t) for _, b, t in sorted(valid, reverse=True)[:k]}
        got = top_entropy_mask(entropies, mask, quantile)
        assert {(b, t) for b in range(5) for t in range(9) if got[b, t] == 1} == chosen
