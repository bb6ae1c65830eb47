"""Format rewards: the completion matches a regex, or follows a tag structure such as <think>…</think><answer>…</answer>.

Config names functions as "module:function", so the factories here (`regex_format`, `tag_format`) are for a
user's own reward file (`my_rewards.py: my_format = regex_format(r"...")`); `think_answer_format` is ready-made.
"""

from __future__ import annotations

import re
from typing import Callable

RewardFn = Callable[..., float]


def regex_format(pattern: str, *, full_match: bool = True, flags: int = re.DOTALL) -> RewardFn:
    """A reward of 1.0 when `pattern` matches the whole completion (`full_match`) or anywhere in it, else 0.0."""
    compiled = re.compile(pattern, flags)
    match = compiled.fullmatch if full_match else compiled.search

    def reward(prompt: str, completion: str, **_: object) -> float:
        return float(match(completion) is not None)

    reward.__doc__ = f"1.0 when the completion {'is' if full_match else 'contains'} a match of {pattern!r}."
    return reward


def tag_pattern(*tags: str) -> re.Pattern:
    """Regex for the whole text being `<t1>…</t1><t2>…</t2>…` in order, each tag once, whitespace around.

    A section's content may hold anything but the opening or closing tags of the structure itself.
    """
    if not tags or any(not re.fullmatch(r"[A-Za-z][\w-]*", t) for t in tags):
        raise ValueError(f"tags must be non-empty names like 'think', got {tags!r}")
    any_tag = "|".join(re.escape(t) for t in tags)
    content = rf"(?:(?!</?(?:{any_tag})>).)*"
    sections = r"\s*".join(rf"<{re.escape(t)}>{content}</{re.escape(t)}>" for t in tags)
    return re.compile(rf"\s*{sections}\s*", re.DOTALL)


def tag_format(*tags: str) -> RewardFn:
    """A reward of 1.0 when the completion is exactly the sections `tags`, in order, each once (see `tag_pattern`)."""
    pattern = tag_pattern(*tags)

    def reward(prompt: str, completion: str, **_: object) -> float:
        return float(pattern.fullmatch(completion) is not None)

    reward.__doc__ = f"1.0 when the completion is {''.join(f'<{t}>…</{t}>' for t in tags)}, else 0.0."
    return reward


_THINK_ANSWER = tag_pattern("think", "answer")


def think_answer_format(prompt: str, completion: str, **_: object) -> float:
    """1.0 when the completion is `<think>…</think>` then `<answer>…</answer>` and nothing else (whitespace aside)."""
    return float(_THINK_ANSWER.fullmatch(completion) is not None)
