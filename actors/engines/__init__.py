"""Generation engines behind one interface: `generate(prompt_ids, sampling, seed)` and `load_weights`
(`SamplingParams` and `Completion` are in `actors.records`).

`hf` runs Hugging Face `generate` (CPU or GPU); `vllm` (GPU) is imported only when asked for.
"""

from __future__ import annotations


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
