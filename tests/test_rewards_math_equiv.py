"""Math answer equivalence through math-verify, with huge expressions refused instead of hanging."""

from __future__ import annotations

import sys
import threading
import time

import pytest

pytest.importorskip("math_verify")

from rewards.math_equiv import math_equiv, parse_answer, too_costly  # noqa: E402


@pytest.mark.parametrize("answer, completion", [
    ("1/2", "0.5"),
    ("0.5", "The answer is $\\boxed{\\dfrac{1}{2}}$."),
    ("\\frac{3}{4}", "so \\boxed{\\dfrac{3}{4}}"),
    ("3", "Solving, we get $x = 3$."),
    ("1000", "There are 1,000 of them."),
    ("1,234", "$\\boxed{1234}$"),
    ("\\{1,2,3\\}", "$\\boxed{\\{3, 2, 1\\}}$"),     # sets ignore order
    ("(0,1]", "$\\boxed{(0, 1]}$"),                   # intervals
    ("[0,1)", "so $x \\in [0,1)$"),
    ("\\frac{\\sqrt{2}}{2}", "$\\boxed{\\frac{1}{\\sqrt{2}}}$"),
    ("2\\pi", "\\boxed{2\\pi}"),
    ("-3", "\\boxed{-3}"),
    ("x^2+2x+1", "$\\boxed{(x+1)^2}$"),               # symbolic equality
    ("2^{2023}", "$\\boxed{2^{2023}}$"),             # large but cheap: not refused
    (7, "\\boxed{7}"),                               # a numeric reference
])
def test_equivalent(answer, completion):
    assert math_equiv("q", completion, answer=answer) == 1.0


@pytest.mark.parametrize("answer, completion", [
    ("0.5", "0.51"),
    ("2", "$\\boxed{2x}$"),
    ("(0,1)", "$\\boxed{[0,1]}$"),                    # open vs closed interval
    ("\\{1,2\\}", "$\\boxed{\\{1,2,3\\}}$"),
    ("-3", "\\boxed{3}"),
    ("1000", "\\boxed{100}"),
    ("\\sqrt{2}", "\\boxed{1.41}"),                  # not within rounding
    ("\\frac{3}{4}", "\\boxed{\\frac{4}{3}}"),
    ("x^2+2x+1", "$\\boxed{(x-1)^2}$"),
    ("\\pi", "\\boxed{3.14}"),
    ("1/3", "\\boxed{0.333}"),
    ("5", "\\boxed{6} no wait \\boxed{5}"),         # two boxed answers read as the set {6, 5}
    ("3", "I don't know"),
    ("5", ""),
    ("", "\\boxed{5}"),                              # no reference
])
def test_not_equivalent(answer, completion):
    assert math_equiv("q", completion, answer=answer) == 0.0


@pytest.mark.serial
@pytest.mark.parametrize("completion", ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{10}}}", "\\boxed{(100!)!}",
                                        "\\boxed{(x+1)^{100000}}", "\\boxed{(1+10^{-10})^{10^{12}}}",
                                        "the last digits are those of $2003^{2002^{2001}}$"])  # torchtitan#4442
def test_huge_expressions_are_refused_quickly(completion):
    start = time.perf_counter()
    assert too_costly(parse_answer(completion)[0])
    assert math_equiv("q", completion, answer="5") == 0.0
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("completion", ["\\boxed{2^{100}}", "\\boxed{x^{2023}}", "\\boxed{(x+1)^{3}}", "\\boxed{10!}",
                                        "\\boxed{\\sqrt{2}^{\\sqrt{2}}}"])
def test_ordinary_expressions_are_not_refused(completion):
    assert not too_costly(parse_answer(completion)[0])


def test_works_off_the_main_thread():
    """Reward functions run in Ray actor threads, where math-verify's SIGALRM timeout would raise."""
    results = []
    worker = threading.Thread(target=lambda: results.append(math_equiv("q", "\\boxed{\\frac12}", answer="0.5")))
    worker.start()
    worker.join()
    assert results == [1.0]


def test_unknown_fields_ignored():
    assert math_equiv("q", "\\boxed{4}", answer="4", solution="2+2", level="Level 1") == 1.0


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail
    with pytest.raises(ImportError, match="pip install math-verify"):
        math_equiv("q", "\\boxed{1}", answer="1")
