"""KL estimators (survey 2.1, 3.13): closed forms on scalars and the survey's 2.1.3 experiment."""

import math

import pytest
import torch

from algorithms import kl_estimate


def _normal_logpdf(x: torch.Tensor, mu: float) -> torch.Tensor:
    return -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)


def test_estimators_match_scalar_formulas():
    logp = torch.tensor([-1.2, -0.3, -2.0], dtype=torch.float64)
    ref = torch.tensor([-0.7, -0.3, -3.5], dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        got = kl_estimate(logp, ref, kind)
        for i in range(3):
            log_r = ref[i].item() - logp[i].item()
            want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kind]
            assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_k3_is_nonnegative_and_zero_at_equal_logprobs():
    logp = torch.randn(50, dtype=torch.float64)
    ref = logp + torch.randn(50, dtype=torch.float64)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_estimate(logp, logp.clone(), "k3"), torch.zeros(50, dtype=torch.float64))


def test_unknown_kind_names_the_allowed_kinds():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_estimate(x, x, "k4")


def _survey_213_estimates() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randn(10**6, generator=gen, dtype=torch.float64)  # x ~ q = N(1, 1), the sampling policy
    logq, logp = _normal_logpdf(x, 1.0), _normal_logpdf(x, 0.0)  # p = N(0, 1) is the reference
    return {kind: kl_estimate(logq, logp, kind) for kind in ("k1", "k2", "k3")}


def test_survey_2_1_3_experiment():
    true_kl = 0.5  # KL[N(1,1) ‖ N(0,1)] = (μ_q − μ_p)² / 2
    est = _survey_213_estimates()
    rel_bias = {k: (v.mean().item() - true_kl) / true_kl for k, v in est.items()}
    rel_std = {k: v.std().item() / true_kl for k, v in est.items()}
    assert abs(rel_bias["k1"]) < 0.01
    assert abs(rel_bias["k3"]) < 0.01
    # E_q[½(log r)²] with log r ~ N(−½, 1) is ½(1 + ¼) = 0.625: relative bias exactly 0.25 (Schulman 2020).
    assert rel_bias["k2"] == pytest.approx(0.25, abs=0.02)
    # Analytic std/true: k1 = 1/0.5 = 2, k2 = sqrt(3/4)/0.5 = 1.732, k3 = sqrt(e − 2)/0.5 = 1.695.
    assert rel_std["k1"] == pytest.approx(2.0, rel=0.02)
    assert rel_std["k2"] == pytest.approx(math.sqrt(0.75) / 0.5, rel=0.02)
    assert rel_std["k3"] == pytest.approx(math.sqrt(math.e - 2) / 0.5, rel=0.03)
    assert rel_std["k3"] < rel_std["k1"] and rel_std["k2"] < rel_std["k1"]


def test_mask_zeroes_padding_and_ignores_its_values():
    logp = torch.tensor([[-1.0, -2.0, 1e9]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, 1e9]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    got = kl_estimate(logp, ref, "k3", mask)
    want = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]
    assert got[0].tolist() == pytest.approx(want, rel=1e-12)
    assert torch.isfinite(got).all()
