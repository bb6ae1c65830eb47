"""Reward functions for tests: loaded by file path, like a user's verifier."""


def length_reward(prompt: str, completion: str, **fields) -> float:
    """Longer completions score higher: gives every group a spread of rewards, hence a gradient."""
    return len(completion) / 10.0


def char_hash_reward(prompt: str, completion: str, **fields) -> float:
    """A deterministic score that differs between completions even of equal length: groups always carry signal."""
    return (sum(map(ord, completion)) % 7) / 7.0


def slow_char_hash_reward(prompt: str, completion: str, **fields) -> float:
    """`char_hash_reward`, 20 ms per sample: steps long enough for a test to kill a run between two of them."""
    import time

    time.sleep(0.02)
    return char_hash_reward(prompt, completion)
