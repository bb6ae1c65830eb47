"""The verifiable arithmetic task: generated problems, SFT targets and a `#### N` answer check."""

from __future__ import annotations

import hashlib
import random

from rewards.final_answer import hash_answer

# Operands are drawn uniformly from [LOW, HIGH]; one pair in EVAL_EVERY goes to "eval".
LOW, HIGH = 10, 999
EVAL_EVERY = 10
SPLITS = ("train", "eval")


def _split_of(a: int, b: int) -> str:
    """Which split owns the problem a+b: a stable hash of the operands, so splits never overlap."""
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:4], "big")
    return "eval" if h % EVAL_EVERY == 0 else "train"


def make_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct problems {"prompt": "37+485=", "answer": "522"} of `split`, same for a seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"arith-{split}-{seed}")
    seen: set[tuple[int, int]] = set()
    rows: list[dict] = []
    while len(rows) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if (a, b) in seen or _split_of(a, b) != split:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def sft_completion(row: dict) -> str:
    """The warm-start target for a row: just the final answer line (EOS is added by the caller)."""
    return f"#### {row['answer']}"


def verify(completion: str, answer: str) -> float:
    """1.0 iff the last `#### N` of the completion equals the reference answer (the run's reward)."""
    return hash_answer("", completion, answer)
