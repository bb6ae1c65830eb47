"""The training loop: prompts → rollout → reward → scoring → advantages → train → weight sync."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from actors.engines import SamplingParams
from actors.modeling import load_tokenizer
from orchestrator.batching import build_batch, shard
from orchestrator.config import JobConfig
from orchestrator.data import PromptStream, check_rows, load_rows, to_request
from orchestrator.metrics import MetricsWriter, merge_rank_stats, rollout_metrics
from orchestrator.pools import Pools, gather
from orchestrator.progress import Progress


@dataclass
class RunResult:
    run_dir: Path
    eval_before: float | None
    eval_after: float | None
    final_policy: Path
    seconds: float


def evaluate(pools: Pools, cfg: JobConfig, rows: list[dict]) -> dict[str, float]:
    """Held-out greedy accuracy with the run's reward functions."""
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                              stop=tuple(cfg.rollout.stop))
    requests = [to_request(f"eval:{i}", row, cfg.data.prompt_key) for i, row in enumerate(rows)]
    per_call = max(1, -(-len(requests) // len(pools.rollout)))
    groups = gather(pools.submit_groups(requests, sampling, per_call, score=False))
    m = rollout_metrics(groups, cfg.reward.accuracy_threshold)
    return {"eval/accuracy": m["accuracy"], "eval/reward": m["reward/mean"],
            "eval/response_length": m["response_length/mean"]}


@dataclass
class Data:
    """Checked training stream and held-out rows, loaded before any actor starts."""

    pad_id: int
    stream: PromptStream
    eval_rows: list[dict]


def load_data(cfg: JobConfig, model_path: str) -> Data:
    """Load and check every row now: a bad dataset fails before Ray starts (DataError)."""
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    rows = load_rows(cfg.data.train)
    check_rows(rows, cfg.data.prompt_key, "data.train", tokenizer, cfg.data.max_prompt_tokens)
    eval_rows = load_rows(cfg.data.eval)[: cfg.loop.eval_size] if cfg.data.eval else []
    if eval_rows:
        check_rows(eval_rows, cfg.data.prompt_key, "data.eval", tokenizer, cfg.data.max_prompt_tokens)
    stream = PromptStream(rows, cfg.data.prompt_key, cfg.loop.seed, cfg.data.shuffle)
    return Data(tokenizer.pad_token_id, stream, eval_rows)


def train(cfg: JobConfig, run_dir: Path, model_path: str, reward_functions: list[tuple[str, str, float]],
          data: Data) -> RunResult:
    """Run `cfg.loop.steps` GRPO steps on the pools; write metrics and the final policy."""
    start = time.perf_counter()
    r, loop = cfg.rollout, cfg.loop
    eval_rows = data.eval_rows
    sampling = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p,
                              max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard)
    progress = Progress(loop.steps, enabled=cfg.logging.progress)
    progress.note(f"starting {len(pools_desc(cfg))} actors ...")
    pools = Pools(cfg, model_path, reward_functions)
    progress.note(f"policy: {pools.num_params / 1e6:.2f}M parameters; "
                  f"{cfg.trainer.num_workers} trainer rank(s), {r.num_workers} rollout worker(s)")
    try:
        before = after = None
        if eval_rows:
            m = evaluate(pools, cfg, eval_rows)
            before = m["eval/accuracy"]
            writer.write(0, m)
            progress.note(f"held-out greedy accuracy before RL: {before:.1%} ({len(eval_rows)} prompts)")
        for step in range(1, loop.steps + 1):
            metrics = train_step(pools, cfg, data.stream, sampling, data.pad_id, version=step)
            if eval_rows and ((loop.eval_every and step % loop.eval_every == 0) or step == loop.steps):
                metrics |= evaluate(pools, cfg, eval_rows)
                after = metrics["eval/accuracy"]
            writer.write(step, metrics)
            progress.step(step, metrics)
        final = Path(pools.save_policy(str(run_dir / "final_policy")))
    finally:
        progress.close()
        writer.close()
        pools.shutdown()
    return RunResult(run_dir, before, after, final, time.perf_counter() - start)


def train_step(pools: Pools, cfg: JobConfig, stream: PromptStream, sampling: SamplingParams, pad_id: int,
               version: int) -> dict[str, float]:
    """One strict on-policy step; returns its metrics."""
    t0 = time.perf_counter()
    groups = gather(pools.submit_groups(stream.next(cfg.loop.prompts_per_step), sampling,
                                        cfg.rollout.prompts_per_call))
    t1 = time.perf_counter()
    batch = build_batch(groups, cfg.algorithm, pad_id)
    shards = shard(batch, cfg.trainer.num_minibatches, cfg.trainer.num_workers, cfg.algorithm.agg)
    stats = merge_rank_stats(pools.train(shards))
    t2 = time.perf_counter()
    versions = pools.sync_weights(version)
    assert set(versions) == {version}, versions
    t3 = time.perf_counter()
    m = rollout_metrics(groups, cfg.reward.accuracy_threshold)
    m |= stats
    m["advantage/abs_mean"] = float(batch["advantages"].abs().sum() / batch["response_mask"].sum())
    m["policy_version"] = float(version)
    m["time/rollout"] = t1 - t0
    m["time/generate"] = m.pop("busy/generate") / len(pools.rollout)
    m["time/reward"] = m.pop("busy/reward") / len(pools.reward)
    m["time/score"] = m.pop("busy/score") / len(pools.scoring)
    m["time/train"] = t2 - t1
    m["time/sync"] = t3 - t2
    m["time/step"] = t3 - t0
    m["tokens_per_s"] = m["tokens/generated"] / m["time/step"]
    m["generate_tokens_per_s"] = m["tokens/generated"] / max(m["time/generate"], 1e-9)
    return m


def pools_desc(cfg: JobConfig) -> list[str]:
    """One entry per actor the job starts (for progress messages)."""
    return (["rollout"] * cfg.rollout.num_workers + ["reward"] * cfg.reward.num_workers
            + ["scoring"] * cfg.scoring.num_workers + ["trainer"] * cfg.trainer.num_workers)


def summarize(records: list[dict]) -> dict[str, float]:
    """Means over the run's training steps of the numbers a summary prints."""
    steps = [r for r in records if "reward/mean" in r]
    keys = ("reward/mean", "accuracy", "response_length/mean", "time/step", "tokens_per_s")
    return {k: statistics.fmean(r[k] for r in steps) for k in keys if steps and k in steps[0]}
