"""Advantages against independent loops and hand-worked numbers (survey 2.14–2.17, 3.12, A.3)."""

import math
import statistics

import pytest
import torch

from algorithms import (
    broadcast_to_tokens,
    distillation_advantages,
    gae,
    group_normalized,
    kl_estimate,
    kl_shaped_token_rewards,
    process_reward_advantages,
    reinforce_baseline,
    reinforce_pp,
    rloo,
)

F64 = torch.float64


def _random_batch(seed: int, batch: int = 6, length: int = 9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length  # one full row
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)  # [B, T]
    rewards = torch.randn(batch, length, generator=gen, dtype=F64)
    values = torch.randn(batch, length, generator=gen, dtype=F64)
    return rewards, values, mask, lengths.tolist()


def _brute_gae(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """(2.14)–(2.15) summed directly, O(T²): Â_t = Σ_l (γλ)^l δ_{t+l}, V after the last token = 0."""
    n = len(r)
    value = lambda k: v[k] if k < n else 0.0  # noqa: E731
    delta = [r[k] + gamma * value(k + 1) - value(k) for k in range(n)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_brute_force_sum(gamma, lam):
    rewards, values, mask, lengths = _random_batch(seed=1)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        want = _brute_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(want, values[b, :n].tolist())], abs=1e-12)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_lambda_zero_is_td_residual():
    rewards, values, mask, lengths = _random_batch(seed=2)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            assert adv[b, t].item() == pytest.approx(rewards[b, t].item() + 0.9 * next_v - values[b, t].item())


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards, values, mask, lengths = _random_batch(seed=3)
    adv, ret = gae(rewards, values, mask, 0.8, 1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            g = sum(0.8**k * rewards[b, t + k].item() for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(g - values[b, t].item(), abs=1e-12)
            assert ret[b, t].item() == pytest.approx(g, abs=1e-12)


def test_gae_values_beyond_the_end_never_leak():
    rewards, values, mask, _ = _random_batch(seed=4)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    leaky_values = torch.where(mask.bool(), values, 1e9)
    leaky_rewards = torch.where(mask.bool(), rewards, 1e9)
    adv2, ret2 = gae(leaky_rewards, leaky_values, mask, 0.99, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_skips_masked_holes():
    # A masked-out hole (e.g. tool output) is transparent: same as the sequence with the hole removed.
    r = torch.tensor([[1.0, 7.0, -2.0, 0.5]], dtype=F64)
    v = torch.tensor([[0.3, 9.0, 0.1, -0.4]], dtype=F64)
    holed, _ = gae(r, v, torch.tensor([[1, 0, 1, 1]]), 0.9, 0.8)
    compact, _ = gae(r[:, [0, 2, 3]], v[:, [0, 2, 3]], torch.ones(1, 3), 0.9, 0.8)
    assert holed[0, [0, 2, 3]].tolist() == pytest.approx(compact[0].tolist(), abs=1e-12)
    assert holed[0, 1] == 0


def test_gae_hand_worked():
    # rewards [0, 1], V = [0.5, 0.2], γ = 0.9, λ = 0.5: δ1 = 1 − 0.2 = 0.8, δ0 = 0 + 0.9·0.2 − 0.5 = −0.32.
    rewards, values = torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[0.5, 0.2]], dtype=F64)
    adv, _ = gae(rewards, values, torch.ones(1, 2), 0.9, 0.5)
    assert adv[0].tolist() == pytest.approx([-0.32 + 0.9 * 0.5 * 0.8, 0.8])


def test_group_normalized_matches_python_loop():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4 * 5, generator=gen, dtype=F64)
    got = group_normalized(scores, group_size=5, eps=1e-6)
    flat = scores.tolist()
    for g in range(4):
        group = flat[5 * g : 5 * g + 5]
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: Bessel-corrected, as documented
        for i, s in enumerate(group):
            assert got[5 * g + i].item() == pytest.approx((s - mean) / (std + 1e-6), rel=1e-12)


def test_group_normalized_mean_only_and_all_equal_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    got = group_normalized(scores, 4, std_normalize=False)
    assert got.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    normed = group_normalized(scores, 4)
    # std of [1, 0, 0, 1] with Bessel: sqrt(4·0.25 / 3) = sqrt(1/3)
    z = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert normed[:4].tolist() == pytest.approx([z, -z, -z, z], rel=1e-12)
    assert torch.equal(normed[4:], torch.zeros(4, dtype=F64))  # exactly zero, never NaN
    assert torch.equal(group_normalized(torch.ones(3, dtype=F64), 1), torch.zeros(3, dtype=F64))
    # 0.7·3/3 rounds to 0.7 + 1e-16: the naive (r − mean) / (std + eps) would give ±1e-10, not 0.
    tie = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.5], dtype=F64)
    for std_normalize in (True, False):
        assert torch.equal(group_normalized(tie, 3, std_normalize)[:3], torch.zeros(3, dtype=F64))


def test_group_normalized_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_normalized(torch.zeros(7), 4)


def test_rloo_matches_leave_one_out_loop():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(3 * 4, generator=gen, dtype=F64)
    got = rloo(scores, 4)
    flat = scores.tolist()
    for g in range(3):
        group = flat[4 * g : 4 * g + 4]
        for i in range(4):
            others = [s for j, s in enumerate(group) if j != i]
            assert got[4 * g + i].item() == pytest.approx(group[i] - sum(others) / 3, abs=1e-12)


def test_reinforce_baseline_and_reinforce_pp_formulas():
    scores = torch.tensor([1.0, 2.0, 4.0, 5.0], dtype=F64)
    assert reinforce_baseline(scores).tolist() == pytest.approx([-2.0, -1.0, 1.0, 2.0])
    std = math.sqrt((4 + 1 + 1 + 4) / 3)  # Bessel-corrected batch std
    assert reinforce_pp(scores, eps=0.0).tolist() == pytest.approx([-2 / std, -1 / std, 1 / std, 2 / std])
    assert torch.equal(reinforce_pp(torch.full((5,), 0.3, dtype=F64)), torch.zeros(5, dtype=F64))


def _brute_process_advantages(step_rewards, step_ends, step_mask, token_len, group_size, eps):
    rows = len(step_rewards)
    out = []
    for g in range(rows // group_size):
        members = range(g * group_size, (g + 1) * group_size)
        pool = [step_rewards[i][j] for i in members for j in range(len(step_rewards[i])) if step_mask[i][j]]
        mean = statistics.fmean(pool)
        std = statistics.stdev(pool) if len(pool) > 1 else 0.0
        for i in members:
            row = []
            for t in range(token_len[i]):
                total = 0.0
                for j, end in enumerate(step_ends[i]):
                    if step_mask[i][j] and end >= t:  # DeepSeekMath: index(j) ≥ t
                        total += (step_rewards[i][j] - mean) / (std + eps)
                row.append(total)
            out.append(row)
    return out


def test_process_reward_advantages_match_loop_over_steps():
    gen = torch.Generator().manual_seed(7)
    B, K, T, G = 6, 3, 8, 3
    lengths = [8, 5, 3, 8, 6, 2]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    n_steps = [3, 2, 1, 3, 1, 2]
    step_mask = (torch.arange(K)[None, :] < torch.tensor(n_steps)[:, None]).to(F64)
    step_ends = torch.zeros(B, K, dtype=torch.long)
    for i in range(B):  # increasing step ends, the last one on the last valid token
        ends = sorted(torch.randperm(lengths[i] - 1, generator=gen)[: n_steps[i] - 1].tolist()) + [lengths[i] - 1]
        step_ends[i, : n_steps[i]] = torch.tensor(ends)
    step_rewards = torch.randn(B, K, generator=gen, dtype=F64)
    got = process_reward_advantages(step_rewards, step_ends, mask, step_mask, G, eps=1e-6)
    want = _brute_process_advantages(step_rewards.tolist(), step_ends.tolist(), step_mask.tolist(), lengths, G, 1e-6)
    for i in range(B):
        assert got[i, : lengths[i]].tolist() == pytest.approx(want[i], rel=1e-10, abs=1e-12)
        assert (got[i, lengths[i] :] == 0).all()


def test_process_reward_hand_worked():
    # One group of 2 responses; rewards R = {1, 3 | 2}: mean 2, Bessel std 1 → r̃ = {−1, 1 | 0}.
    adv = process_reward_advantages(
        torch.tensor([[1.0, 3.0], [2.0, 0.0]], dtype=F64),
        torch.tensor([[1, 3], [2, 0]]),
        torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        torch.tensor([[1, 1], [1, 0]]),
        group_size=2,
        eps=0.0,
    )
    assert adv.tolist() == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]


def test_kl_shaped_token_rewards_hand_worked():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = kl_shaped_token_rewards(torch.tensor([3.0, -1.0], dtype=F64), logp, ref, mask, beta=0.1)
    # k1 = logp − ref: row 0 → [0.5, −1.0]; rewards −0.1·k1, score 3 added on the last valid token.
    assert got[0].tolist() == pytest.approx([-0.05, 0.1 + 3.0, 0.0], rel=1e-12)
    assert got[1].tolist() == pytest.approx([0.0 - 1.0, 0.0, 0.0], rel=1e-12)
    k3 = kl_shaped_token_rewards(torch.tensor([0.0, 0.0], dtype=F64), logp, ref, mask, beta=1.0, kind="k3")
    assert k3[0, 0].item() == pytest.approx(-(math.exp(-0.5) - 1 + 0.5))


def test_broadcast_to_tokens():
    got = broadcast_to_tokens(torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert got.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    assert got.dtype == F64


def test_distillation_advantages_hand_worked():
    """A_t = log π_teacher − log π_student on valid tokens, 0 on padding (the 99s sit on padding)."""
    student = torch.tensor([[-1.0, -2.0, -0.25], [-0.5, 99.0, 99.0]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0, -0.25], [-2.0, -99.0, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = distillation_advantages(student, teacher, mask)
    assert adv.tolist() == [[0.5, -1.0, 0.0], [-1.5, 0.0, 0.0]]
    assert adv.dtype == F64 and not adv.requires_grad  # a constant for the policy loss
    # The teacher prefers token (0, 0) more than the student does: positive advantage pushes it up.
    assert adv[0, 0] > 0 and adv[0, 1] < 0


def test_distillation_advantages_are_minus_the_k1_reverse_kl_and_kl_shaped_rewards_without_a_score():
    gen = torch.Generator().manual_seed(8)
    student = -torch.rand(4, 6, generator=gen, dtype=F64) * 4
    teacher = -torch.rand(4, 6, generator=gen, dtype=F64) * 4
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 0, 5])[:, None]).to(F64)
    adv = distillation_advantages(student, teacher, mask)
    torch.testing.assert_close(adv, -kl_estimate(student, teacher, "k1", mask), rtol=0, atol=0)
    shaped = kl_shaped_token_rewards(torch.zeros(4, dtype=F64), student, teacher, mask, beta=1.0, kind="k1")
    torch.testing.assert_close(adv, shaped, rtol=0, atol=1e-15)
