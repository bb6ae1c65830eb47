"""A tiny Llama-style causal LM for the arithmetic example, small enough to sample fast on CPU."""

from __future__ import annotations

from transformers import LlamaConfig, PreTrainedTokenizerBase

# ~0.4M parameters: big enough to learn 3-digit addition, small enough that HF `generate`
# of 128 short completions takes a fraction of a second on 2 CPU cores.
DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


def tiny_config(tokenizer: PreTrainedTokenizerBase, **overrides) -> LlamaConfig:
    """The example's LlamaConfig with ids and vocab from `tokenizer`; `overrides` replace defaults."""
    kwargs = {**DEFAULTS, **overrides}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
