"""Held-out greedy accuracy of a policy on the arithmetic task, via batched HF `generate`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from examples.arith.task import verify


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), decoded without special tokens."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # [b, T_prompt + T_new]
            new = gen[:, enc["input_ids"].shape[1] :]  # [b, T_new]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Fraction of `rows` whose greedy completion `verify`s against the row's answer."""
    prompts = [r["prompt"] for r in rows]
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    return sum(verify(c, r["answer"]) for c, r in zip(completions, rows)) / max(len(rows), 1)
