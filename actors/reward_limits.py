"""The bounds a reward call runs within: what it may return (`check_value`: numbers within
+-reward.max_abs_score) and how much address space its process may map (reward.memory_mb, RLIMIT_AS).

Only the standard library is imported: the reward subprocesses (actors/reward_pool.py) import this.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any


def check_value(value: Any, max_abs_score: float = math.inf) -> tuple[float, dict[str, float] | None]:
    """(score, extras) from what a reward returned: a real number, or a dict with `score` and other numbers.

    Every value, the score and each extra alike (they are summed and averaged into the metrics), must be a
    number within +-`max_abs_score` (reward.max_abs_score): TypeError for a non-number (bool included: a
    predicate should say `float(...)`), ValueError for NaN, infinity or a number beyond the bound; a dict's
    message names the key.
    """
    if not isinstance(value, dict):
        return _bounded(value, max_abs_score, ""), None
    if "score" not in value:
        raise TypeError(f"reward returned a dict without a 'score' key (keys: {sorted(map(str, value))[:8]})")
    score = _bounded(value["score"], max_abs_score, "")
    extras = {str(k): _bounded(v, max_abs_score, f" under key {k!r}") for k, v in value.items() if k != "score"}
    return score, extras or None


def _bounded(value: Any, max_abs_score: float, where: str) -> float:
    """`value` as a float within +-max_abs_score; `where` (" under key 'k'") goes into the error message."""
    if not _is_number(value):
        raise TypeError(f"reward returned {type(value).__name__} {str(value)[:80]!r}{where}, expected a number")
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        x = math.inf if value > 0 else -math.inf
    if not math.isfinite(x):
        raise ValueError(f"reward returned {x}{where}")
    if abs(x) > max_abs_score:
        raise ValueError(f"reward returned {x:g}{where}, beyond reward.max_abs_score = {max_abs_score:g}")
    return x


def default_memory_mb() -> int:
    """reward.memory_mb when it is null: a quarter of this machine's memory (of the container's, when a
    cgroup limits it), in MiB."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            total = min(total, int(f.read().strip()))  # "max" when unlimited: not an int
    except (OSError, ValueError):
        pass
    return max(1, total // 4 >> 20)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def limit_memory(memory_mb: int) -> None:
    """RLIMIT_AS of this process (never above a hard limit it already has): past it, allocations fail."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_mb << 20 if hard == resource.RLIM_INFINITY else min(memory_mb << 20, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
