"""Built-in tools for `rewards.tool_env.ToolEnv`: a tool is `fn(argument: str) -> str`, the text the model wrote
between its call tags in, the result shown to it out; raising is a failed call (the model sees the error)."""

from __future__ import annotations

import ast
import operator

from rewards.code_sandbox import Limits, run_program

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 64  # a calculator result longer than this is refused (no 10**10**10 by repeated multiplication)


def calculator(expression: str) -> str:
    """Integer arithmetic: + - * // % and parentheses, evaluated exactly without `eval`."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            out = _OPS[type(node.op)](value(node.left), value(node.right))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            out = _OPS[type(node.op)](value(node.operand))
        else:
            raise ValueError(f"not integer arithmetic: {ast.dump(node)[:80]}")
        if len(str(abs(out))) > MAX_DIGITS:
            raise ValueError(f"result longer than {MAX_DIGITS} digits")
        return out

    return str(value(ast.parse(expression.strip(), mode="eval").body))


def python(code: str, wall_s: float = 5.0, memory_mb: int = 512) -> str:
    """Run a Python program in the code sandbox (`rewards.code_sandbox`: no network, writes only in a fresh
    directory, CPU, memory and wall limits); its stdout, or its error."""
    result = run_program(code, "", Limits(wall_s=wall_s, memory_mb=memory_mb))
    if result.timed_out:
        raise TimeoutError(f"the program ran past {wall_s:g} s")
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1])
    return result.stdout
