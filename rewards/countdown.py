"""Countdown verifier: an arithmetic expression over the row's `numbers` (each at most once) must equal `target`.

The expression is the content of the last <answer>…</answer>, or, without answer tags, the last non-blank
line; anything from its first "=" on is dropped ("(25-5)*4 = 80" checks "(25-5)*4"). It is evaluated by a
small `ast` walker in exact Fraction arithmetic that knows integer literals, + - * /, unary minus and
parentheses, and nothing else: no names, calls, attributes or powers, never `eval`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

MAX_EXPRESSION_CHARS = 300  # longer text is refused before parsing

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class InvalidExpression(ValueError):
    """Text that is not an arithmetic expression of integer literals, + - * /, unary minus and parentheses."""


def extract_expression(completion: str) -> str:
    """The last <answer> content, else the last non-blank line; cut at the first "="."""
    answers = _ANSWER.findall(completion)
    if answers:
        text = answers[-1]
    else:
        lines = [line for line in completion.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    return text.split("=", 1)[0].strip()


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of `expression` and the integer literals it uses; InvalidExpression for anything else.

    Typeset × ÷ − are read as * / -. Division by zero raises ZeroDivisionError.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    expression = expression.replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise InvalidExpression(f"not an expression: {type(e).__name__}") from e
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise InvalidExpression(f"{type(node).__name__} is not allowed")

    return walk(tree.body), literals


def check_equation(expression: str, numbers: list[int], target: int | Fraction, use_all: bool = False) -> bool:
    """Whether `expression` equals `target` using each of `numbers` at most once (exactly once with `use_all`)."""
    try:
        value, used = evaluate(expression)
    except (InvalidExpression, ZeroDivisionError):
        return False
    available, wanted = Counter(int(n) for n in numbers), Counter(used)
    if use_all:
        fits = wanted == available
    else:
        fits = all(wanted[n] <= available[n] for n in wanted)
    return fits and value == Fraction(target)


def countdown(prompt: str, completion: str, numbers: list[int] | None = None, target: int | None = None,
              **fields: object) -> float:
    """1.0 when the completion's expression reaches `target` from `numbers` (the `nums` column also works)."""
    numbers = numbers if numbers is not None else fields.get("nums")
    if numbers is None or target is None:
        raise ValueError("countdown needs the row fields `numbers` (or `nums`) and `target`")
    return float(check_equation(extract_expression(completion), list(numbers), int(target)))
