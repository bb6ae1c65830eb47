"""DAPO's soft overlong punishment: 0 up to L_max - buffer, linear down to -1 at L_max, -1 beyond.

From DAPO (Yu et al. 2025, eq. 13). Length is counted in tokens when the row carries a token count
(`completion_tokens`, else `response_length`), otherwise in characters of the completion: the reward
function is given text, and a tokenizer here would have to match the policy's. With characters, choose
`max_length` and `buffer` in characters too (about 4 per token for English text).
"""

from __future__ import annotations

from typing import Callable

# DAPO's setting: 16,384 expected tokens plus a 4,096-token soft punishment buffer.
DAPO_MAX_LENGTH = 20_480
DAPO_BUFFER = 4_096

TOKEN_FIELDS = ("completion_tokens", "response_length")


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """0 when length <= max_length - buffer; (max_length - buffer - length) / buffer up to max_length; -1 beyond."""
    if max_length <= 0 or not 0 <= buffer <= max_length:
        raise ValueError(f"need max_length > 0 and 0 <= buffer <= max_length, got max_length={max_length}, "
                         f"buffer={buffer}")
    free = max_length - buffer
    if length <= free:
        return 0.0
    if length > max_length:
        return -1.0
    return (free - length) / buffer


def completion_length(completion: str, fields: dict) -> int:
    """Token count from the row (`completion_tokens`, then `response_length`), else the number of characters."""
    for name in TOKEN_FIELDS:
        if fields.get(name) is not None:
            return int(fields[name])
    return len(completion)


def overlong_penalty(max_length: int, buffer: int) -> Callable[..., float]:
    """A reward function applying `soft_overlong_penalty` with these bounds (checked now, not at the first call)."""
    soft_overlong_penalty(0, max_length, buffer)

    def reward(prompt: str, completion: str, **fields: object) -> float:
        return soft_overlong_penalty(completion_length(completion, fields), max_length, buffer)

    reward.__doc__ = f"Soft overlong penalty with max_length={max_length}, buffer={buffer}."
    return reward


def dapo_overlong_penalty(prompt: str, completion: str, **fields: object) -> float:
    """The soft overlong penalty with DAPO's bounds (20,480 with a 4,096 buffer), meant for token counts."""
    return soft_overlong_penalty(completion_length(completion, fields), DAPO_MAX_LENGTH, DAPO_BUFFER)
