"""Greedy held-out evaluation, one rule for every caller: the training loop, `raylhf eval`, DPO, the example's
warm start and the TRL benchmark.

A caller passes `run_groups(requests, sampling) -> list[Group]` (generate, then reward): the Ray pools, in-process
workers, or `in_process` below for a model held in memory. The numbers are those `orchestrator.metrics.
rollout_metrics` reports as accuracy, reward/mean and response_length/mean, computed the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors.engines.hf import HFEngine
from actors.modeling import encode_prompts
from actors.records import Group, PromptRequest, Sample, SamplingParams
from actors.rollout import RolloutWorker

RunGroups = Callable[[list[PromptRequest], SamplingParams], list[Group]]
Reward = tuple[str, Callable[..., float], float]  # (label, fn(prompt, completion, **row fields), weight)


def greedy_sampling(max_new_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    """One temperature-0 completion per prompt."""
    return SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, stop=tuple(stop))


def is_correct(sample: Sample, threshold: float, label: str | None = None) -> bool:
    """Training's accuracy rule: the total reward (or the `label` reward alone) is at least `threshold`."""
    score = sample.reward_parts[label] if label else sample.reward
    return score >= threshold


@dataclass
class GreedyResult:
    """The scored greedy groups (request order), which were correct, and their means."""

    groups: list[Group]
    correct: list[bool]
    accuracy: float
    reward: float
    response_length: float


def evaluate_greedy(run_groups: RunGroups, requests: list[PromptRequest], sampling: SamplingParams,
                    accuracy_threshold: float, accuracy_label: str | None = None) -> GreedyResult:
    """Generate one greedy completion per request, reward it, and judge it by `is_correct`."""
    if sampling.n != 1 or sampling.temperature != 0:
        raise ValueError(f"greedy evaluation samples n=1 at temperature 0, got {sampling}")
    groups = run_groups(requests, sampling)
    samples = [s for g in groups for s in g.samples]
    correct = [is_correct(s, accuracy_threshold, accuracy_label) for s in samples]
    return GreedyResult(groups, correct, accuracy=statistics.fmean(float(c) for c in correct),
                        reward=statistics.fmean(s.reward for s in samples),
                        response_length=statistics.fmean(len(s.response_ids) for s in samples))


def greedy_eval(run_groups: RunGroups, requests: list[PromptRequest], sampling: SamplingParams,
                accuracy_threshold: float, accuracy_label: str | None = None) -> dict[str, float]:
    """{"accuracy", "reward", "response_length"} of `evaluate_greedy`."""
    r = evaluate_greedy(run_groups, requests, sampling, accuracy_threshold, accuracy_label)
    return {"accuracy": r.accuracy, "reward": r.reward, "response_length": r.response_length}


def requests_from_rows(rows: list[dict], tokenizer, prompt_key: str = "prompt") -> list[PromptRequest]:
    """One request per row, uid "eval:<index>", its prompt tokenized once (`encode_prompts`); the row's other
    fields go to the rewards. (A job's rows are checked first: `orchestrator.data.prepare_prompts`.)"""
    ids = encode_prompts(tokenizer, [row[prompt_key] for row in rows])
    return [PromptRequest(f"eval:{i}", row[prompt_key], x, {k: v for k, v in row.items() if k != prompt_key})
            for i, (row, x) in enumerate(zip(rows, ids))]


def in_process(model, tokenizer, rewards: list[Reward], batch_size: int = 256,
               sampler: str = "generate") -> RunGroups:
    """`run_groups` for a model in this process: a RolloutWorker around `HFEngine.from_model` generates
    `batch_size` prompts per call, then each reward function is called here with the row's fields.

    The model's train/eval mode, the tokenizer's padding side and the global torch RNG are as before after
    each call, so a training loop around it runs on unchanged. `sampler="generate"` is Hugging Face `generate`,
    what these callers used before this module existed."""

    def run_groups(requests: list[PromptRequest], sampling: SamplingParams) -> list[Group]:
        side, was_training = tokenizer.padding_side, model.training
        model.eval()
        try:
            with torch.random.fork_rng(), torch.no_grad():
                worker = RolloutWorker.serving(HFEngine.from_model(model, tokenizer, sampler))
                groups = [g for lo in range(0, len(requests), batch_size)
                          for g in worker.generate(requests[lo : lo + batch_size], sampling)]
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        for g in groups:
            for s in g.samples:
                for label, fn, weight in rewards:
                    s.add_reward(label, weight, float(fn(g.prompt, s.text, **g.row)))
        return groups

    return run_groups
