"""`raylhf eval`: held-out greedy accuracy and pass@k of a policy checkpoint, with the job's rewards.

The evaluation runs in this process, without Ray, but through the same workers a training run uses: a
`RolloutWorker` (the config's engine, stop strings and sampling) generates, and a `RewardWorker` (its
reward subprocesses, `reward.timeout_s`, `reward.failure_score`; each failure counted) plus one
`RewardModelWorker` per reward model score. A sample is correct when its total reward, or the
`reward.accuracy_label` reward alone, is at least `reward.accuracy_threshold`, as in training.

The problems are the config's `data.eval` rows, the first `loop.eval_size` of them, the same ones a run
evaluates. Greedy accuracy is one temperature-0 completion per problem. pass@k draws n completions per
problem at `rollout.temperature` / `rollout.top_p`, counts the c correct ones, and averages the unbiased
estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1):
pass@k = 1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold
at least one correct one.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from actors.evaluation import evaluate_greedy, greedy_sampling, is_correct
from actors.records import Group, PromptRequest, SamplingParams
from orchestrator.config import ConfigError, JobConfig, check_references, load_config
from orchestrator.data import DataError, load_rows_at, prepare_prompts
from orchestrator.export import CheckpointError, resolve_checkpoint


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k).

    Exact (integer binomials, one correctly rounded division); needs 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_counts: list[int], n: int, k: int) -> float:
    """pass@k averaged over problems, each with `n` samples and `correct_counts[i]` correct."""
    return statistics.fmean(pass_at_k(n, c, k) for c in correct_counts)


class Scorer:
    """Generates with one in-process RolloutWorker and scores with the job's reward workers, chunk by chunk."""

    def __init__(self, cfg: JobConfig, checkpoint: str):
        from actors.reward import RewardWorker
        from actors.reward_model import RewardModelWorker
        from actors.rollout import RolloutWorker
        from orchestrator.references import reward_specs

        r, rw = cfg.rollout, cfg.reward
        from actors.env_host import EnvHost
        from orchestrator.pool_specs import engine_options, env_limits
        from orchestrator.references import absolute_file_spec

        self.rollout = RolloutWorker(engine=r.engine, model_path=checkpoint, dtype=cfg.model.dtype,
                                     trust_remote_code=cfg.model.trust_remote_code, threads=None,
                                     seed=cfg.loop.seed, device="cuda" if r.num_gpus > 0 else "cpu",
                                     engine_options=engine_options(cfg), env=env_limits(cfg))
        e = cfg.env if cfg.env.enabled else None  # multi-turn: the environments run in this process
        self.envs = [EnvHost(absolute_file_spec(e.env_name), e.env_kwargs(cfg.data.prompt_key), e.timeout_s,
                             rw.max_abs_score, e.max_concurrency)] if e else None
        specs = reward_specs(cfg)
        functions = [s for s in specs if s.model is None]
        self.reward = RewardWorker(functions, rw.failure_score, rw.timeout_s, rw.num_processes, rw.max_abs_score,
                                   rw.memory_mb) if functions else None
        self.reward_models = [
            RewardModelWorker(s.label, s.model, s.weight, s.batch_size or 32, rw.failure_score,
                              device="cuda" if s.num_gpus > 0 else "cpu", threads=None,
                              trust_remote_code=cfg.model.trust_remote_code, max_abs_score=rw.max_abs_score)
            for s in specs if s.model is not None]
        self.sequences_per_call = r.prompts_per_call * r.group_size  # the batch size training generates with

    def groups(self, requests: list[PromptRequest], sampling: SamplingParams) -> list[Group]:
        """Every request's `sampling.n` completions, scored; in request order."""
        per_call = max(1, self.sequences_per_call // sampling.n)
        out: list[Group] = []
        for lo in range(0, len(requests), per_call):
            groups = self.rollout.generate(requests[lo : lo + per_call], sampling, self.envs)
            if self.reward is not None:
                groups = self.reward.reward(groups)
            for rm in self.reward_models:
                groups = rm.reward(groups)
            out += groups
        return out

    def close(self) -> None:
        if self.reward is not None:
            self.reward.close()


def evaluate_checkpoint(cfg: JobConfig, checkpoint: str, requests: list[PromptRequest], ks: list[int], samples: int,
                        log: Callable[[str], None] = print) -> dict:
    """Greedy accuracy and pass@k (for each k in `ks`, from `samples` completions per problem) on `requests`
    (`orchestrator.data.prepare_prompts`); the result as a JSON-ready dict."""
    r, rw = cfg.rollout, cfg.reward
    from orchestrator.collect import stop_strings

    stop = stop_strings(cfg)
    sampled = SamplingParams(n=samples, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                             stop=stop)
    start = time.perf_counter()
    scorer = Scorer(cfg, checkpoint)
    try:
        greedy = evaluate_greedy(scorer.groups, requests, greedy_sampling(r.max_new_tokens, stop),
                                 rw.accuracy_threshold, rw.accuracy_label)
        log(f"greedy: {len(greedy.groups)} problems in {time.perf_counter() - start:.1f} s")
        t = time.perf_counter()
        groups = scorer.groups(requests, sampled)
        log(f"sampled: {samples} completions x {len(groups)} problems in {time.perf_counter() - t:.1f} s")
    finally:
        scorer.close()
    counts = [sum(is_correct(s, rw.accuracy_threshold, rw.accuracy_label) for s in g.samples) for g in groups]
    failures: dict[str, int] = {}
    for g in greedy.groups + groups:
        for label, n in g.reward_failures.items():
            failures[label] = failures.get(label, 0) + n
    return {
        "checkpoint": checkpoint,
        "problems": len(requests),
        "greedy": {"accuracy": greedy.accuracy, "reward_mean": greedy.reward,
                   "response_length_mean": greedy.response_length},
        "sampling": {"n": samples, "temperature": r.temperature, "top_p": r.top_p,
                     "accuracy": sum(counts) / (samples * len(counts)),
                     "reward_mean": statistics.fmean(s.reward for g in groups for s in g.samples)},
        "pass_at_k": {str(k): mean_pass_at_k(counts, samples, k) for k in ks},
        "reward_failures": {x.label: failures.get(x.label, 0) for x in cfg.reward.functions},
        "seconds": time.perf_counter() - start,
        "per_problem": [{"prompt": g.prompt, "greedy_completion": g.samples[0].text, "greedy_correct": ok,
                         "correct_samples": c} for g, ok, c in zip(greedy.groups, greedy.correct, counts)],
    }


def format_table(result: dict) -> str:
    """The headline numbers as a two-column text table."""
    s = result["sampling"]
    rows = [("problems", str(result["problems"])),
            ("greedy accuracy", f"{result['greedy']['accuracy']:.1%}"),
            ("greedy mean reward", f"{result['greedy']['reward_mean']:.3f}")]
    rows += [(f"pass@{k} (n={s['n']}, T={s['temperature']:g})", f"{v:.1%}") for k, v in result["pass_at_k"].items()]
    rows.append(("sampled mean reward", f"{s['reward_mean']:.3f}"))
    failed = {k: n for k, n in result["reward_failures"].items() if n}
    rows.append(("reward failures", ", ".join(f"{k} {n}" for k, n in failed.items()) or "none"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _fail(message: str) -> int:
    print(f"raylhf: {message}", file=sys.stderr)
    return 2


def main(config: str, checkpoint: str, ks: list[int] | None = None, samples: int | None = None,
         overrides: list[str] | None = None, out: str = "eval.json") -> int:
    """The `raylhf eval` command: 0 when evaluated, 2 on a bad config, checkpoint, k or dataset."""
    ks = sorted(set(ks or [1]))
    try:
        path = str(resolve_checkpoint(checkpoint))
        cfg = load_config(config, overrides, check_paths=False)
        cfg.model.path, cfg.model.prepare = path, None  # evaluate the checkpoint, not the config's model
        check_references(cfg)
    except (CheckpointError, ConfigError) as e:
        return _fail(str(e))
    n = samples if samples is not None else max(max(ks), cfg.rollout.group_size)
    if min(ks) < 1 or n < max(ks):
        return _fail(f"--k {' '.join(map(str, ks))} with --samples {n}: every k must be >= 1 and <= the samples "
                     "per problem (pass@k draws k of the n samples)")
    if cfg.data.eval is None:
        return _fail("invalid config:\n  data.eval: required by `raylhf eval` (the held-out problems)")
    try:
        from actors.modeling import load_tokenizer

        tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
        rows, places = load_rows_at(cfg.data.eval)
        size = cfg.loop.eval_size
        requests = prepare_prompts(rows[:size], cfg.data.prompt_key, "data.eval", tokenizer,
                                   cfg.data.max_prompt_tokens, uid_prefix="eval:", places=places[:size])
    except DataError as e:
        return _fail(f"data error: {e}")
    log = lambda text: print(f"raylhf: {text}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"evaluating {path} on {len(requests)} held-out problems: greedy, then {n} samples each")
    result = evaluate_checkpoint(cfg, path, requests, ks, n, log) | {"config": str(config)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"results: {out}")
    return 0
