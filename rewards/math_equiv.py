"""Math answer verifier: the completion's final answer must be mathematically equal to the reference.

Parsing and comparison are math-verify's (\\boxed{}, fractions, LaTeX, sets, intervals, plain numbers),
run without its SIGALRM timeouts (`parsing_timeout=None`, `timeout_seconds=None`): those work only in
the main thread, and reward functions run in Ray actors and worker threads. Without them an answer like
9^{9^{9^9}} or (100!)! keeps sympy computing for ever, holding the GIL so that the actor's other threads
stall too; `too_costly` refuses such expressions before they are compared.
"""

from __future__ import annotations

from typing import Any

# Beyond these, exact evaluation can take minutes or forever.
MAX_DIGITS = 100_000  # digits of a number raised to a power
MAX_SYMBOLIC_EXPONENT = 100  # exponent of a non-trivial symbolic base, e.g. (x+1)^n
MAX_FACTORIAL_ARG = 10_000  # arguments of factorial, binomial, gamma and friends


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("rewards.math_equiv needs the math-verify package: pip install math-verify") from e
    # Its "Timeout is disabled" warning does not apply: the RewardWorker's pool bounds every call (reward.timeout_s).
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify


def too_costly(expr: Any) -> bool:
    """Whether sympy may take unbounded time to evaluate `expr` (huge powers, towers, huge factorials)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    try:
        return any(_costly_node(node, sympy) for node in sympy.preorder_traversal(expr))
    except (TypeError, ValueError, ArithmeticError):
        return True  # a value that cannot even be estimated (nan, zoo) is not worth the risk


def _costly_node(node: Any, sympy: Any) -> bool:
    factorials = (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial, sympy.gamma,
                  sympy.RisingFactorial, sympy.FallingFactorial)
    if isinstance(node, factorials):
        return any(not a.free_symbols and abs(a.evalf(5)) > MAX_FACTORIAL_ARG for a in node.args)
    if not isinstance(node, sympy.Pow) or node.exp.free_symbols:
        return False
    exponent, base = abs(node.exp.evalf(5)), node.base
    if base.free_symbols:
        return not base.is_Symbol and exponent > MAX_SYMBOLIC_EXPONENT  # expanding (x+1)^n
    scale = [sympy.Integer(2), abs(base.evalf(5))]
    if base.is_Rational:
        scale += [abs(base.p), abs(base.q)]  # exact (p/q)^n computes p^n and q^n
    largest = max(s if s >= 1 else 1 / s for s in scale if s != 0)
    return bool(exponent * sympy.log(largest, 10).evalf(5) > MAX_DIGITS)


def parse_answer(text: str) -> list:
    """math-verify's parse of `text` (LaTeX and plain expressions), without signal-based timeouts."""
    return _math_verify().parse(text, parsing_timeout=None)


def parse_reference(answer: str | int | float) -> list:
    """The reference answer, wrapped in \\boxed{} unless it has LaTeX delimiters, so that "(0,1]" parses as-is."""
    text = str(answer).strip()
    if not text:
        return []
    if "$" not in text and "\\boxed" not in text and "\\(" not in text and "\\[" not in text:
        boxed = parse_answer(f"\\boxed{{{text}}}")
        if boxed:
            return boxed
    return parse_answer(text)


def equivalent(reference: list, predicted: list) -> bool:
    """math-verify's verify of two parse results, refusing (False) expressions `too_costly` to evaluate."""
    if not reference or not predicted or any(too_costly(e) for e in [*reference, *predicted]):
        return False
    return bool(_math_verify().verify(reference, predicted, timeout_seconds=None))


def math_equiv(prompt: str, completion: str, answer: str | int | float = "", **_: object) -> float:
    """1.0 when the completion's answer equals `answer`: \\boxed{} first (several read as one set), else other math."""
    return float(equivalent(parse_reference(answer), parse_answer(completion)))
