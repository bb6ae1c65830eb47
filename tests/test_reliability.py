"""Reliability: a NaN/inf loss is skipped on every rank and counted; too many in a row stop the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.loop import NonFiniteLoss, nonfinite_streak


def test_a_streak_of_nonfinite_steps_stops_the_run_with_advice():
    streak = 0
    for metrics in ({"nonfinite_microbatches": 1.0}, {"nonfinite_microbatches": 0.0}, {"nonfinite_microbatches": 2.0}):
        streak = nonfinite_streak(streak, metrics, 3, 1, Path("run"))
    assert streak == 1  # a clean step resets it
    streak = nonfinite_streak(streak, {"nonfinite_microbatches": 1.0}, 3, 2, Path("run"))
    with pytest.raises(NonFiniteLoss, match="3 steps in a row.*trainer.max_nonfinite_steps"):
        nonfinite_streak(streak, {"nonfinite_microbatches": 1.0}, 3, 3, Path("run"))


@pytest.mark.slow
def test_a_nan_micro_batch_is_skipped_and_moves_nothing(ray_local, tiny_model):
    """Two ranks, one NaN micro-batch on rank 1: it is skipped there, rank 0's data still count, and the
    update equals the one where that micro-batch's advantages are 0 (zero policy gradient); both ranks
    end with identical, finite weights (checked in run_ranks)."""
    from tests.test_trainer_dp import run_ranks, synthetic_batch

    from transformers import AutoModelForCausalLM

    vocab = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    batch = synthetic_batch(24, vocab=vocab, seed=5)
    poisoned, zeroed = dict(batch), dict(batch)
    rows = slice(18, 24)  # rank 1's first micro-batch of the second mini-batch
    poisoned["advantages"] = batch["advantages"].clone()
    poisoned["advantages"][rows] = float("nan")
    zeroed["advantages"] = batch["advantages"].clone()
    zeroed["advantages"][rows] = 0.0
    got, stats = run_ranks(2, poisoned, tiny_model, "seq-mean-token-mean")
    want, clean = run_ranks(2, zeroed, tiny_model, "seq-mean-token-mean")
    assert [s["nonfinite_microbatches"] for s in stats] == [0.0, 2.0]  # once per epoch, on the rank that had it
    assert [s["nonfinite_microbatches"] for s in clean] == [0.0, 0.0]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
        assert torch.isfinite(got[k]).all()
