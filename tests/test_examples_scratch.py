"""The compute-bound benchmark job's task (`examples.scratch`): scratchpads that add up, a partial-credit reward,
disjoint splits, and a config that loads."""

from __future__ import annotations

import pytest

from examples.scratch.task import answer_digits, make_rows, scratchpad
from orchestrator.config import load_config


def test_the_scratchpad_adds_column_by_column_and_ends_in_the_answer():
    text = scratchpad({"prompt": "4837+295=", "answer": "5132"})
    assert text == "7+5+0=12\n3+9+1=13\n8+2+1=11\n4+0+1=5\n#### 5132"
    for row in make_rows("train", 200, seed=5):
        lines = scratchpad(row).splitlines()
        a, b = row["prompt"].rstrip("=").split("+")
        assert len(lines) == max(len(a), len(b)) + 1 and lines[-1] == f"#### {int(a) + int(b)}"
        assert all(eval(lhs) == int(rhs) for lhs, rhs in (line.split("=") for line in lines[:-1]))


def test_answer_digits_gives_partial_credit_from_the_right():
    assert answer_digits("", "1+2+0=3\n#### 5132", "5132") == 1.0
    assert answer_digits("", "#### 5133", "5132") == 0.75
    assert answer_digits("", "#### 132", "5132") == 0.75  # a missing leading digit costs one
    assert answer_digits("", "#### 1 #### 5132", "5132") == 1.0  # the last answer counts
    assert answer_digits("", "no answer", "5132") == 0.0


def test_splits_are_disjoint_and_lengths_vary():
    train = {r["prompt"] for r in make_rows("train", 2000)}
    evals = {r["prompt"] for r in make_rows("eval", 200)}
    assert not train & evals
    lengths = {len(scratchpad(r)) for r in make_rows("train", 300)}
    assert min(lengths) < 30 and max(lengths) > 60
    with pytest.raises(ValueError):
        make_rows("test", 1)


def test_the_config_loads():
    cfg = load_config("examples/arith_scratch_grpo.yaml", [])
    assert (cfg.rollout.max_new_tokens, cfg.loop.prompts_per_step, cfg.rollout.group_size) == (96, 8, 8)
