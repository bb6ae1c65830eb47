"""The reward of `benchmarks/async_modes.py --config toy`, the earlier job (the default is now issue 20's): learnable
from a random-init policy in tens of steps, and it asks for long completions (so generation, not the trainer's fixed
costs, dominates a step)."""

from __future__ import annotations


def sevens(prompt: str, completion: str, **fields) -> float:
    """The 7s in the completion / 48, at most 1: a random policy writes about one 7 in 22 characters (the example
    tokenizer's vocabulary) and ends after about 21 tokens; one that scores 1 writes long strings of 7s."""
    return min(completion.count("7") / 48.0, 1.0)
