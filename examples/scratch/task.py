"""The scratchpad addition task: the compute-bound benchmark job (issue 20). `a+b=` with operands of 2 to 7 digits;
the completion writes the column sums out, right to left, one line each ("7+5+0=12"), then `#### N`. Completions
vary in length with the operands (about 30 to 75 tokens, 50 on average with the character tokenizer), so generation
and the forward/backward dominate a step, unlike the 10-token `examples.arith` job."""

from __future__ import annotations

import hashlib
import random
import re

MIN_DIGITS, MAX_DIGITS = 2, 7
EVAL_EVERY = 10
ANSWER = re.compile(r"#### ([0-9]+)")


def _split_of(a: int, b: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"s{a}+{b}".encode()).digest()[:4], "big")
    return "eval" if h % EVAL_EVERY == 0 else "train"


def make_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems {"prompt": "4837+295=", "answer": "5132"} of `split` (disjoint), the same for a seed;
    each operand has a uniformly drawn number of digits."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    rng = random.Random(f"scratch-{split}-{seed}")
    seen: set[tuple[int, int]] = set()
    rows: list[dict] = []
    while len(rows) < n:
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.randint(MIN_DIGITS, MAX_DIGITS) for _ in "ab"))
        if (a, b) in seen or _split_of(a, b) != split:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def scratchpad(row: dict) -> str:
    """The supervised completion of a row: one line per column, right to left, with the carry in, then the answer."""
    a, b = row["prompt"].rstrip("=").split("+")
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    lines, carry = [], 0
    for da, db in zip(reversed(a), reversed(b)):
        total = int(da) + int(db) + carry
        lines.append(f"{da}+{db}+{carry}={total}")
        carry = total // 10
    return "\n".join(lines) + f"\n#### {row['answer']}"


def answer_digits(prompt: str, completion: str, answer: str, **_) -> float:
    """The share of the answer's digits the last `#### N` gets right, aligned from the right (1.0: exactly right; a
    number of another length loses the digits it lacks or adds): partial credit, so a weak policy's groups still
    differ in reward and train."""
    found = ANSWER.findall(completion)
    if not found:
        return 0.0
    got = found[-1]
    width = max(len(got), len(answer))
    return sum(x == y for x, y in zip(got.zfill(width), answer.zfill(width))) / width
