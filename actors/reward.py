"""RewardWorker: runs the configured reward functions over every sample of a group."""

from __future__ import annotations

import math
import time
import traceback

from actors.types import Group
from rewards.loader import load_function


class RewardWorker:
    """Scores groups; a function that raises or returns a non-finite or non-number gets `failure_score`."""

    def __init__(self, functions: list[tuple[str, str, float]], failure_score: float = 0.0):
        """`functions`: (label for metrics, "module:function" or "/abs/file.py:function", weight)."""
        self.functions = [(label, load_function(spec), weight) for label, spec, weight in functions]
        self.failure_score = failure_score
        self._reported: set[tuple[str, str]] = set()

    def score(self, groups: list[Group]) -> list[Group]:
        """Fill `reward` and `reward_parts` of every sample; count failures per function."""
        start = time.perf_counter()
        for g in groups:
            fields = {k: v for k, v in g.row.items()}
            for s in g.samples:
                total = 0.0
                for name, fn, weight in self.functions:
                    value = self._call(name, fn, g.prompt, s.text, fields, g)
                    s.reward_parts[name] = value
                    total += weight * value
                s.reward = total
        elapsed = time.perf_counter() - start
        for g in groups:
            g.add_time("reward", elapsed / len(groups))
        return groups

    def _call(self, name, fn, prompt: str, completion: str, fields: dict, group: Group) -> float:
        try:
            value = fn(prompt, completion, **fields)
            if isinstance(value, dict):
                value = value["score"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"reward returned {type(value).__name__}, expected a number")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"reward returned {value}")
            return value
        except Exception as e:  # a bad verifier must never take the run down
            group.reward_failures[name] = group.reward_failures.get(name, 0) + 1
            kind = (name, type(e).__name__)
            if kind not in self._reported:
                self._reported.add(kind)
                print(f"reward function {name} failed ({type(e).__name__}); scoring {self.failure_score} "
                      f"for such samples. First traceback:\n{traceback.format_exc()}", flush=True)
            return self.failure_score
