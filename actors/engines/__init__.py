"""Generation engines behind one interface: `generate(prompts, sampling, seed)` and `load_weights`.

`hf` runs Hugging Face `generate` (CPU or GPU); `vllm` (GPU) is imported only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: `n` completions per prompt; temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """One generated completion: its tokens, text, per-token log-probs and why it ended."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def make_engine(kind: str, **kwargs):
    """Build the engine named `kind` ("hf" or "vllm"; `rollout.engine` in the config). Each engine module is
    imported only here, so the CPU install never imports vLLM."""
    if kind == "hf":
        from actors.engines.hf import HFEngine

        return HFEngine(**kwargs)
    if kind == "vllm":
        from actors.engines.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; allowed: 'hf', 'vllm'")
