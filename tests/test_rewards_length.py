"""DAPO soft overlong penalty, checked against hand-worked values at the boundaries."""

from __future__ import annotations

import pytest

from rewards.length import dapo_overlong_penalty, overlong_penalty, soft_overlong_penalty


# max_length 100, buffer 20: free up to 80, then (80 - L) / 20 down to -1 at 100, -1 beyond.
@pytest.mark.parametrize("length, want", [
    (0, 0.0), (79, 0.0), (80, 0.0),
    (81, -0.05), (85, -0.25), (90, -0.5), (99, -0.95), (100, -1.0),
    (101, -1.0), (10_000, -1.0),
])
def test_hand_worked_values(length, want):
    assert soft_overlong_penalty(length, max_length=100, buffer=20) == pytest.approx(want, abs=1e-12)


def test_zero_buffer_is_a_step():
    assert soft_overlong_penalty(100, 100, 0) == 0.0
    assert soft_overlong_penalty(101, 100, 0) == -1.0


@pytest.mark.parametrize("max_length, buffer", [(0, 0), (100, -1), (100, 101)])
def test_bad_bounds_say_what(max_length, buffer):
    with pytest.raises(ValueError, match="max_length"):
        overlong_penalty(max_length, buffer)


def test_tokens_from_the_row_else_characters():
    reward = overlong_penalty(max_length=10, buffer=4)   # free up to 6 characters or tokens
    assert reward("q", "x" * 6) == 0.0
    assert reward("q", "x" * 8) == -0.5                   # characters
    assert reward("q", "x" * 8, completion_tokens=3) == 0.0
    assert reward("q", "x", completion_tokens=9) == -0.75
    assert reward("q", "x", response_length=11) == -1.0
    assert reward("q", "x", completion_tokens=5, response_length=11) == 0.0  # completion_tokens first
    assert reward("q", "x" * 8, completion_tokens=None, answer="4") == -0.5


def test_dapo_bounds():
    assert dapo_overlong_penalty("q", "", completion_tokens=16_384) == 0.0
    assert dapo_overlong_penalty("q", "", completion_tokens=16_384 + 2_048) == -0.5
    assert dapo_overlong_penalty("q", "", completion_tokens=20_480) == -1.0
    assert dapo_overlong_penalty("q", "", completion_tokens=20_481) == -1.0
