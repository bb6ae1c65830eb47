"""Countdown verifier: safe exact arithmetic over the given numbers, each used at most once."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from rewards.countdown import InvalidExpression, check_equation, countdown, evaluate, extract_expression

NUMBERS, TARGET = [25, 5, 4, 3], 80


@pytest.mark.parametrize("completion", [
    "<answer>(25 - 5) * 4</answer>",
    "<think>try 25-5=20, 20*4=80</think>\n<answer> (25-5)*4 = 80 </answer>",  # "= 80" dropped
    "Let me think.\n(25 - 5) * 4",                                              # no tags: last line
    "(25 - 5) * 4 = 80\n\n",
    "<answer>1</answer> oops <answer>4 * (25 - 5)</answer>",                    # the last answer counts
    "<answer>(25 − 5) × 4</answer>",                                             # typeset minus and times
    "<answer>25*3+5</answer>",                                                   # 4 left unused
])
def test_correct(completion):
    assert countdown("q", completion, numbers=NUMBERS, target=TARGET) == 1.0


@pytest.mark.parametrize("completion", [
    "<answer>25 * 4 - 5 * 4</answer>",          # 4 used twice, given once
    "<answer>(25 - 5) * 4 + 0</answer>",        # 0 not in the list
    "<answer>20 * 4</answer>",                  # 20 not in the list
    "<answer>(25 - 5) * 3</answer>",            # wrong value
    "<answer>(25 - 5) * 4.0</answer>",          # a float literal
    "<answer>80</answer>",
    "<answer></answer>",
    "",
    "<answer>25 / (5 - 5) * 4</answer>",        # division by zero
    "<answer>(25 - 5) ** 4</answer>",           # no powers
    "<answer>(25 - 5) // 4</answer>",
    "<answer>__import__('os').system('touch /tmp/pwned')</answer>",
    "<answer>x * 4</answer>",                   # names
    "<answer>(25).real * 4</answer>",           # attribute access
    "<answer>[25, 5][0] * 4</answer>",
    "<answer>(lambda: 80)()</answer>",
    "<answer>True * 80</answer>",
    "<answer>+(25 - 5) * 4 if 1 else 0</answer>",
    "<answer>" + "(" * 100 + "25" + ")" * 100 + "</answer>",
])
def test_rejected(completion):
    assert countdown("q", completion, numbers=NUMBERS, target=TARGET) == 0.0


def test_exact_fractions_and_unary_minus():
    assert evaluate("(3 - 1/3) * 3") == (Fraction(8), [3, 1, 3, 3])
    assert check_equation("8 / (3 - 8 / 3)", [8, 3, 8, 3], 24)   # 24 needs the exact 1/3, not a float
    assert check_equation("-5 + 25", [5, 25], 20)
    assert evaluate("(8 ÷ 2) × 3 − 1") == (Fraction(11), [8, 2, 3, 1])
    assert not check_equation("0.1 + 0.2", [1, 2], Fraction(3, 10))


def test_use_all():
    assert check_equation("25 * 4 - 20", [25, 4, 20, 7], 80)
    assert not check_equation("25 * 4 - 20", [25, 4, 20, 7], 80, use_all=True)
    assert check_equation("25 * 4 - 20 + 7 - 7", [25, 4, 20, 7, 7], 80, use_all=True)


def test_eval_is_never_called(monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval called"))
    assert countdown("q", "<answer>(25 - 5) * 4</answer>", numbers=NUMBERS, target=TARGET) == 1.0
    assert countdown("q", "<answer>__import__('os')</answer>", numbers=NUMBERS, target=TARGET) == 0.0


@pytest.mark.serial
@pytest.mark.parametrize("text", ["1" * 100_000, "(" * 5_000 + "1" + ")" * 5_000, "1+" * 50_000 + "1", " " * 10**6])
def test_long_inputs_are_refused_quickly(text):
    start = time.perf_counter()
    with pytest.raises(InvalidExpression):
        evaluate(text)
    assert countdown("q", f"<answer>{text}</answer>", numbers=NUMBERS, target=TARGET) == 0.0
    assert time.perf_counter() - start < 1


def test_extract_expression():
    assert extract_expression("blah\n  3 + 4 = 7  \n\n") == "3 + 4"
    assert extract_expression("<answer>a</answer> then <answer> 1+2 </answer> more") == "1+2"
    assert extract_expression("") == ""


def test_fields():
    assert countdown("q", "<answer>25 * 4 - 20</answer>", nums=[25, 4, 20], target="80", extra=1) == 1.0
    with pytest.raises(ValueError, match="numbers"):
        countdown("q", "<answer>1</answer>", target=1)
