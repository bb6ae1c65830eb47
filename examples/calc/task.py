"""The calculator task: `a*b=` problems (a of 3 digits, b of 2), the warm start's two kinds of transcript (with the
tool, and a direct guess), and the tool the model calls."""

from __future__ import annotations

import hashlib
import random

from examples.arith.tokenizer import CHARS
from rewards.tools import calculator

TOOL_CHARS = CHARS + list("<>/acl")  # the call tags <calc>...</calc> need these
RESULT_TEMPLATE = "={}\n"  # what the tool's answer looks like in the transcript: "<calc>123*45</calc>=5535\n"
EVAL_EVERY = 10


def calc(expression: str) -> str:
    """The example's tool, called as <calc>123*45</calc>: `rewards.tools.calculator` under a short name."""
    return calculator(expression)


def _split_of(a: int, b: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"{a}*{b}".encode()).digest()[:4], "big")
    return "eval" if h % EVAL_EVERY == 0 else "train"


def make_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems {"prompt": "123*45=", "answer": "5535"} of `split`, the same for a seed."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    rng = random.Random(f"calc-{split}-{seed}")
    seen: set[tuple[int, int]] = set()
    rows: list[dict] = []
    while len(rows) < n:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        if (a, b) in seen or _split_of(a, b) != split:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"{a}*{b}=", "answer": str(a * b)})
    return rows


def transcript(row: dict, use_tool: bool) -> list[tuple[str, bool]]:
    """The warm start's target after the prompt, as (text, the model writes it) pieces: a call, the tool's
    result (written by the environment), the answer; or the answer alone (a guess, for a tiny model)."""
    answer = f"#### {row['answer']}"
    if not use_tool:
        return [(answer, True)]
    expression = row["prompt"].rstrip("=")
    return [(f"<calc>{expression}</calc>", True), (RESULT_TEMPLATE.format(calc(expression)), False), (answer, True)]
