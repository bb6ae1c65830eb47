"""Held-out greedy accuracy of a policy in memory on the arithmetic task, by raylhf's one greedy evaluator."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from actors.evaluation import greedy_eval, greedy_sampling, in_process, requests_from_rows
from examples.arith.task import verify


def answer_reward(prompt: str, completion: str, answer: str, **_) -> float:
    """The task's reward: 1.0 iff the completion's last `#### N` is the answer."""
    return verify(completion, answer)


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Fraction of `rows` whose greedy completion `verify`s against the row's answer (reward 1.0)."""
    run_groups = in_process(model, tokenizer, [("answer", answer_reward, 1.0)], batch_size)
    return greedy_eval(run_groups, requests_from_rows(rows, tokenizer), greedy_sampling(max_new_tokens), 1.0)["accuracy"]
