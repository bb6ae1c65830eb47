"""Per-step metrics: computed from scored groups and trainer stats; written to JSONL and TensorBoard."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from actors.records import Group, TrainBatch

STAGES = ("generate", "reward", "score", "train", "sync")


def rollout_metrics(groups: list[Group], accuracy_threshold: float, accuracy_label: str | None = None
                    ) -> dict[str, float]:
    """Reward, accuracy, length and reward-failure numbers of one batch of groups. A sample is correct when
    its total reward (or the `accuracy_label` reward's own score) is at least `accuracy_threshold`."""
    samples = [s for g in groups for s in g.samples]
    rewards = [s.reward for s in samples]
    judged = [s.reward_parts[accuracy_label] for s in samples] if accuracy_label else rewards
    lengths = [len(s.response_ids) for s in samples]
    sampled = [sum(s.loss_mask) if s.loss_mask is not None else n for s, n in zip(samples, lengths)]
    out = {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "accuracy": statistics.fmean(float(r >= accuracy_threshold) for r in judged),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": float(max(lengths)),
        "response/truncated_frac": statistics.fmean(float(s.finish_reason == "length") for s in samples),
        "groups/all_equal_frac": statistics.fmean(
            float(len({s.reward for s in g.samples}) == 1) for g in groups),
        "tokens/generated": float(sum(sampled)),  # sampled by the model (multi-turn: observations left out)
    }
    out |= reward_part_metrics(groups)
    out |= env_metrics(groups)
    for stage in ("generate", "reward", "score"):
        out[f"busy/{stage}"] = sum(g.timings.get(stage, 0.0) for g in groups)
    return out


def env_metrics(groups: list[Group], prefix: str = "env/") -> dict[str, float]:
    """Multi-turn numbers of a batch (none for single-turn groups): turns per trajectory (mean, max), the share
    that used a tool, tool calls and failed ones, environment failures, observation vs sampled tokens, the share
    truncated by env.max_turns / env.max_total_tokens, and the rollout's wait on the environments (`busy/env`)."""
    stats: dict[str, float] = {}
    for g in groups:
        for k, v in g.env_stats.items():
            stats[k] = max(stats.get(k, 0.0), v) if k == "turns_max" else stats.get(k, 0.0) + v
    if not stats:
        return {}
    n = stats["trajectories"]
    out = {f"{prefix}turns_mean": stats["turns"] / n, f"{prefix}turns_max": stats["turns_max"],
           f"{prefix}tool_use_frac": stats.get("used_tool", 0.0) / n,
           f"{prefix}tool_calls": stats.get("env_metric/tool_calls", 0.0),
           f"{prefix}tool_failures": stats.get("env_metric/tool_failures", 0.0),
           f"{prefix}failures": stats["failures"],
           f"{prefix}observation_tokens": stats["observation_tokens"],
           f"{prefix}sampled_tokens": stats["sampled_tokens"],
           f"{prefix}truncated_max_turns_frac": stats["truncated_max_turns"] / n,
           f"{prefix}truncated_max_total_tokens_frac": stats["truncated_max_total_tokens"] / n}
    out |= {f"{prefix}{k.removeprefix('env_metric/')}": v for k, v in stats.items()
            if k.startswith("env_metric/") and f"{prefix}{k.removeprefix('env_metric/')}" not in out}
    if prefix == "env/":
        out["busy/env"] = sum(g.timings.get("env", 0.0) for g in groups)
    return out


def reward_part_metrics(groups: list[Group]) -> dict[str, float]:
    """Per reward label: `reward/<label>` (mean score), `reward/<label>/failures` (count, 0 included) and
    `reward/<label>/<key>` (mean of each extra number the reward returned, over the samples that have it)."""
    samples = [s for g in groups for s in g.samples]
    out: dict[str, float] = {}
    for label in samples[0].reward_parts:
        out[f"reward/{label}"] = statistics.fmean(s.reward_parts[label] for s in samples)
        out[f"reward/{label}/failures"] = float(sum(g.reward_failures.get(label, 0) for g in groups))
    extras: dict[str, list[float]] = {}
    for s in samples:
        for key, value in s.reward_extras.items():
            extras.setdefault(key, []).append(value)
    for key, values in sorted(extras.items()):
        out.setdefault(f"reward/{key}", statistics.fmean(values))  # a key named "failures" cannot hide the count
    return out


def reward_labels(record: dict) -> list[str]:
    """The reward labels of a metrics record (from its `reward/<label>/failures` keys)."""
    prefix, suffix = "reward/", "/failures"
    return [k[len(prefix) : -len(suffix)] for k in record if k.startswith(prefix) and k.endswith(suffix)]


def value_metrics(batch: TrainBatch) -> dict[str, float]:
    """PPO critic health at rollout time: mean value and return, and the explained variance
    1 - Var(R - V) / Var(R) over valid tokens (1: values predict the returns; <= 0: no better than a constant)."""
    valid = batch.response_mask.bool()
    v, r = batch.old_values[valid], batch.returns[valid]
    var = float(r.var()) if r.numel() > 1 else 0.0
    return {"critic/values_mean": float(v.mean()), "critic/returns_mean": float(r.mean()),
            "critic/explained_variance": 1.0 - float((r - v).var()) / var if var > 0 else 0.0}


def merge_rank_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Trainer stats averaged over ranks (ratio_max, mismatch/logprob_abs_max and memory/peak_rss_bytes are maxima,
    skipped NaN micro-batches and mismatch/tokens sums, mismatch/logprob_abs_mean a token-weighted mean); times are
    rank 0's (the ranks meet in every all-reduce, so rank 0's compute time is the pool's)."""
    out = {}
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        if key in ("ratio_max", "mismatch/logprob_abs_max", "memory/peak_rss_bytes"):
            out[key] = max(values)
        elif key in ("nonfinite_microbatches", "mismatch/tokens"):
            out[key] = sum(values)
        elif key == "mismatch/logprob_abs_mean":
            tokens = [r["mismatch/tokens"] for r in per_rank]
            out[key] = sum(v * n for v, n in zip(values, tokens)) / max(sum(tokens), 1.0)
        else:
            out[key] = values[0] if key.startswith("time/") else statistics.fmean(values)
    return out


def batch_metrics(groups: list[Group], generated: list[Group], batch: TrainBatch, rounds: int,
                  policy_shards: list | None, accuracy_threshold: float, accuracy_label: str | None,
                  dynamic_sampling: bool) -> dict[str, float]:
    """What needs only the step's groups and batch: rollout numbers of every group generated (`rollout_metrics`),
    the critic's at rollout time, dynamic sampling's, the rows the trainers skip and the mean |advantage|."""
    m = rollout_metrics(generated, accuracy_threshold, accuracy_label)
    m |= value_metrics(batch) if batch.returns is not None else {}
    if dynamic_sampling:
        m["sampling/dropped_frac"] = 1.0 - sum(len({s.reward for s in g.samples}) > 1 for g in generated) / len(generated)
        m["sampling/rounds"] = float(rounds)
    if policy_shards:
        trained = sum(part.rows.rows for parts in policy_shards for part in parts)
        m["train/skipped_rows_frac"] = 1.0 - trained / batch.rows
    m["advantage/abs_mean"] = float(batch.advantages.abs().sum() / batch.response_mask.sum())
    return m | distill_metrics(groups)


def distill_metrics(groups: list[Group]) -> dict[str, float]:
    """On-policy distillation (samples scored by a teacher): `distill/reverse_kl`, the token mean of
    log pi_old - log pi_teacher over the sampled tokens, the k1 estimate of KL[student || teacher] per token (2.1)
    that the distillation advantage drives down; {} without a teacher."""
    samples = [s for g in groups for s in g.samples]
    if not samples or samples[0].teacher_logp is None:
        return {}
    gaps = [a - b for s in samples for a, b in zip(s.old_logp or s.rollout_logp, s.teacher_logp)]
    return {"distill/reverse_kl": statistics.fmean(gaps) if gaps else 0.0}


def trainer_metrics(policy_stats: list[dict] | None, critic_stats: list[dict] | None) -> dict[str, float]:
    """The ranks' stats merged: the policy's as they are, the critic's under `critic/`."""
    m = merge_rank_stats(policy_stats) if policy_stats else {}
    m |= {k if k.startswith("critic/") else f"critic/{k}": v
          for k, v in (merge_rank_stats(critic_stats) if critic_stats else {}).items()}
    return m


def step_times(m: dict[str, float], pools, rollout: float, train: float, sync: float, step: float
               ) -> dict[str, float]:
    """The `time/*` breakdown of a step (see `orchestrator.loop.train_step`), `utilization/<pool>` (busy share of
    the step: which pool to grow) and throughput, from the step's walls and the busy seconds in `m` (`busy/*`
    are consumed). `pools`: anything with the worker lists of `orchestrator.pools.Pools`."""
    out = {"time/rollout": rollout, "time/train": train, "time/sync": sync, "time/step": step}
    if "busy/env" in m:  # the rollout workers' wait on their environments (part of time/generate's wall)
        out["time/env"] = m.pop("busy/env") / len(pools.rollout)
    scorers = len(pools.scoring) or (len(pools.trainers) if getattr(pools, "reference_on_trainers", False) else 0)
    for stage, workers in (("generate", len(pools.rollout)), ("reward", len(pools.reward) + len(pools.reward_models)),
                           ("score", scorers)):
        busy = m.pop(f"busy/{stage}")
        if workers:
            out[f"time/{stage}"] = busy / workers
    policy = m.get("time/train_forward_backward", 0.0) + m.get("time/optimizer", 0.0)
    critic = m.get("critic/time/train_forward_backward", 0.0) + m.get("critic/time/optimizer", 0.0)
    out["time/overhead"] = step - (rollout + max(policy, critic) + sync)  # PPO: the two train side by side
    out["time/overhead_frac"] = out["time/overhead"] / step
    for pool, stage in (("rollout", "generate"), ("reward", "reward"), ("scoring", "score"), ("trainer", "train")):
        if f"time/{stage}" in out:
            out[f"utilization/{pool}"] = out[f"time/{stage}"] / step
    out["tokens_per_s"] = m["tokens/generated"] / step
    out["generate_tokens_per_s"] = m["tokens/generated"] / max(out["time/generate"], 1e-9)
    return out


def sample_records(groups: list[Group], batch: TrainBatch, n_groups: int) -> list[dict]:
    """The first `n_groups` groups of a batch, one record per completion: prompt, completion, reward and
    its parts, and the mean advantage over the completion's tokens (what the update pushed it by)."""
    records, row = [], 0
    adv, mask = batch.advantages, batch.response_mask
    for g in groups[:n_groups]:
        for s in g.samples:
            n = float(mask[row].sum())
            records.append({"uid": g.uid, "prompt": g.prompt, "completion": s.text, "reward": s.reward,
                            "reward_parts": s.reward_parts, "advantage": float(adv[row].sum()) / max(n, 1.0),
                            "tokens": int(n), "finish_reason": s.finish_reason, "policy_version": g.policy_version}
                           | ({"turns": s.turns} if s.turns is not None else {}))
            row += 1
    return records


def sample_excerpt(step: int, records: list[dict], k: int = 3) -> str:
    """A few completions of one prompt, readable in a console."""
    first = [r for r in records if r["uid"] == records[0]["uid"]][:k]
    lines = [f"step {step} sample: {first[0]['prompt']!r}"]
    lines += [f"  -> {r['completion']!r}  reward {r['reward']:+.3f}  advantage {r['advantage']:+.3f}" for r in first]
    return "\n".join(lines)


class MetricsWriter:
    """Appends one JSON line per record to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, first_step: int = 0, wandb: bool = False,
                 mlflow: bool = False, name: str = "run", config: dict | None = None):
        """`first_step` > 0 (a resumed run): TensorBoard drops the dead run's events from that step on.
        `wandb` / `mlflow` mirror every record there too (an ImportError saying what to install if missing)."""
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.tb = self.wandb = self.mlflow = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step or None)
        if wandb:
            self.wandb = _optional("wandb", "logging.wandb").init(project="raylhf", name=name, config=config or {},
                                                                  dir=str(run_dir), resume="allow")
        if mlflow:
            self.mlflow = _optional("mlflow", "logging.mlflow")
            self.mlflow.set_experiment("raylhf")
            self.mlflow.start_run(run_name=name)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)

    def write_step(self, step: int, metrics: dict[str, float], samples: list[dict]) -> None:
        """A training step's record and its `sample_records`."""
        self.write(step, metrics)
        self.write_samples([{"step": step, **r} for r in samples])

    def write_samples(self, records: list[dict]) -> None:
        """Append completions with their rewards and advantages to `samples.jsonl`."""
        if records:
            with self.samples_path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _optional(module: str, field: str):
    """Import a logging backend the config asked for, or say how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{field} is true but {module} is not installed: pip install {module} "
                          f"(or set {field}: false)") from None


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's `metrics.jsonl`."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
