"""Reward functions for tests: loaded by file path, like a user's verifier."""


def length_reward(prompt: str, completion: str, **fields) -> float:
    """Longer completions score higher: gives every group a spread of rewards, hence a gradient."""
    return len(completion) / 10.0
