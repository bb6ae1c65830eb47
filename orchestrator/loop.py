"""The training loop: prompts → rollout → reward → scoring → advantages → train → weight sync."""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from actors.engines import SamplingParams
from actors.modeling import load_tokenizer
from actors.types import Group
from algorithms.kl_control import AdaptiveKLController, FixedKLController
from orchestrator import checkpoint
from orchestrator.batching import build_batch, sequence_kl, shard
from orchestrator.config import JobConfig
from orchestrator.data import PromptStream, load_rows, prepare_rows, to_request
from orchestrator.metrics import MetricsWriter, merge_rank_stats, reward_labels, rollout_metrics, value_metrics
from orchestrator.pools import InFlight, Pools, needs_scoring, num_reward_actors, uses_critic
from orchestrator.progress import Progress


class NonFiniteLoss(RuntimeError):
    """Too many steps in a row had a NaN or inf loss."""


class ActorDied(RuntimeError):
    """A worker or trainer rank died in the middle of a step; the message says how to resume."""


@dataclass
class RunResult:
    run_dir: Path
    eval_before: float | None
    eval_after: float | None
    final_policy: Path
    seconds: float


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def evaluate(pools: Pools, cfg: JobConfig, rows: list[dict], log: Callable[[str], None] = _stderr) -> dict[str, float]:
    """Held-out greedy accuracy with the run's reward functions."""
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                              stop=tuple(cfg.rollout.stop))
    requests = [to_request(f"eval:{i}", row, cfg.data.prompt_key) for i, row in enumerate(rows)]
    per_call = max(1, -(-len(requests) // len(pools.rollout)))
    groups = pools.run_groups(requests, sampling, per_call, score=False)
    stale = {g.policy_version for g in groups} - {pools.version}
    assert not stale, f"evaluation ran on policy version(s) {stale}, not the newest ({pools.version})"
    for message in pools.new_reward_errors(groups):
        log(message)
    m = rollout_metrics(groups, cfg.reward.accuracy_threshold, cfg.reward.accuracy_label)
    return {"eval/accuracy": m["accuracy"], "eval/reward": m["reward/mean"],
            "eval/response_length": m["response_length/mean"]}


@dataclass
class Data:
    """Checked training stream and held-out rows, loaded before any actor starts."""

    pad_id: int
    stream: PromptStream
    eval_rows: list[dict]
    skipped: dict[str, float] = field(default_factory=dict)  # data/skipped_<split>_rows


def load_data(cfg: JobConfig, model_path: str) -> Data:
    """Load and check every row now: a bad dataset fails before Ray starts (DataError); with
    `data.bad_rows: skip` bad rows are left out and counted instead (`Data.skipped`)."""
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    d = cfg.data
    skipped: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    rows = prepare_rows(load_rows(d.train), d.prompt_key, "data.train", tokenizer, d.max_prompt_tokens,
                        skipped["train"] if d.bad_rows == "skip" else None)
    eval_rows = load_rows(d.eval)[: cfg.loop.eval_size] if d.eval else []
    if eval_rows:
        eval_rows = prepare_rows(eval_rows, d.prompt_key, "data.eval", tokenizer, d.max_prompt_tokens,
                                 skipped["eval"] if d.bad_rows == "skip" else None)
    for split, counts in skipped.items():
        if counts:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
            print(f"raylhf: data.{split}: skipped {sum(counts.values())} bad rows ({detail})", file=sys.stderr)
    stream = PromptStream(rows, d.prompt_key, cfg.loop.seed, d.shuffle)
    return Data(tokenizer.pad_token_id, stream, eval_rows,
                {f"data/skipped_{split}_rows": float(sum(c.values())) for split, c in skipped.items()})


def train(cfg: JobConfig, run_dir: Path, model_path: str, rewards: list, data: Data,
          resume: Path | None = None) -> RunResult:
    """Run `cfg.loop.steps` steps on the pools; write metrics, checkpoints and the final policy.

    `rewards`: the resolved `actors.types.RewardSpec`s (see `orchestrator.cli.reward_specs`); `resume`: a
    checkpoint directory (see `orchestrator.checkpoint`) to continue from."""
    start = time.perf_counter()
    r, loop = cfg.rollout, cfg.loop
    eval_rows = data.eval_rows
    sampling = SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p,
                              max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))
    state = checkpoint.load_state(resume) if resume else checkpoint.LoopState()
    lg = cfg.logging
    writer = MetricsWriter(run_dir, lg.tensorboard, first_step=state.step + 1 if resume else 0, wandb=lg.wandb,
                           mlflow=lg.mlflow, name=lg.name, config=cfg.model_dump(mode="json"))
    progress = Progress(loop.steps, enabled=cfg.logging.progress, desc=cfg.algorithm.estimator.upper())
    progress.note(f"starting {len(pools_desc(cfg))} actors ...")
    pools = Pools(cfg, model_path, rewards)
    progress.note(f"policy: {pools.num_params / 1e6:.2f}M parameters; "
                  f"{cfg.trainer.num_workers} trainer rank(s), {r.num_workers} rollout worker(s)")
    kl = kl_controller(cfg.algorithm)
    ahead = Ahead() if loop.max_staleness else None
    threads = torch.get_num_threads()
    try:
        if resume:
            pools.load_checkpoint(resume, state.version)
            data.stream.restore(state.stream)
            kl.load_state_dict(state.kl)
            progress.note(f"resumed from {resume} (step {state.step}, policy version {state.version})")
        else:
            m = dict(data.skipped)
            if eval_rows:
                m |= evaluate(pools, cfg, eval_rows, progress.note)
                state.eval_before = m["eval/accuracy"]
                progress.note(f"held-out greedy accuracy before RL: {state.eval_before:.1%} "
                              f"({len(eval_rows)} prompts)")
            writer.write(0, m)
        progress.skip_to(state.step)
        gc.freeze()  # the dataset and start-up objects live on: Python's collector stops re-walking them every step
        # The driver's tensors are small (one step's batch). With torch's default of a thread per core, its ops
        # handed work to OpenMP threads that then waited for cores the actors held: indexing in `shard` took
        # 0.74 instead of 0.07 ms a call, and the step's overhead had spikes of 10-40 ms.
        torch.set_num_threads(1)
        for step in range(state.step + 1, loop.steps + 1):
            moves = step > cfg.critic.warmup_steps or not pools.critics  # critic warm-up: the policy waits
            state.version += moves
            samples: list[dict] = []
            try:
                metrics = train_step(pools, cfg, data.stream, sampling, data.pad_id, version=state.version,
                                     log=progress.note, kl=kl, train_policy=moves, samples_out=samples,
                                     ahead=ahead, prefetch=step < loop.steps)
            except ray.exceptions.RayActorError as e:
                raise ActorDied(f"step {step}: an actor died ({type(e).__name__}: {str(e).splitlines()[0]}). "
                                + resume_hint(run_dir)) from e
            if eval_rows and ((loop.eval_every and step % loop.eval_every == 0) or step == loop.steps):
                t_eval = time.perf_counter()
                metrics |= evaluate(pools, cfg, eval_rows, progress.note)  # the newest weights, synced above
                state.eval_after = metrics["eval/accuracy"]
                metrics["time/eval"] = time.perf_counter() - t_eval
            writer.write(step, metrics)
            writer.write_samples([{"step": step, **r} for r in samples])
            if lg.print_samples_every and step % lg.print_samples_every == 0 and samples:
                progress.note(sample_excerpt(step, samples))
            progress.step(step, metrics)
            state.nonfinite_run = nonfinite_streak(state.nonfinite_run, metrics, cfg.trainer.max_nonfinite_steps,
                                                   step, run_dir)
            # A checkpoint's stream position is before the prefetched prompts (asynchronous mode): a resumed
            # run draws them again, so none is lost or trained twice.
            state.step, state.kl = step, kl.state_dict()
            state.stream = ahead.stream_state if ahead else data.stream.state()
            if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == loop.steps):
                checkpoint.save(run_dir, state, pools.save_checkpoint, cfg.checkpoint.keep)
        final = Path(pools.save_policy(str(run_dir / "final_policy")))
    finally:
        torch.set_num_threads(threads)
        progress.close()
        writer.close()
        pools.shutdown()
    return RunResult(run_dir, state.eval_before, state.eval_after, final, time.perf_counter() - start)


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run, naming its newest complete checkpoint (or saying there is none)."""
    newest = checkpoint.latest(run_dir)
    if newest is None:
        return "No checkpoint was written (set checkpoint.every to write them)."
    return (f"Its newest complete checkpoint is {newest}; continue with: raylhf train CONFIG --resume "
            f"--run-dir {run_dir}")


def nonfinite_streak(streak: int, metrics: dict[str, float], limit: int, step: int, run_dir: Path) -> int:
    """Steps in a row, this one included, whose trainer skipped NaN/inf micro-batches; raises at `limit`."""
    streak = streak + 1 if metrics.get("nonfinite_microbatches", 0) > 0 else 0
    if streak >= limit:
        raise NonFiniteLoss(
            f"step {step}: the loss was NaN or inf in {streak} steps in a row (those micro-batches were skipped); "
            f"stopping. Lower trainer.lr, check the rewards (reward/*) and advantages in "
            f"{run_dir / 'metrics.jsonl'}, or raise trainer.max_nonfinite_steps.")
    return streak


def kl_controller(alg) -> FixedKLController | AdaptiveKLController:
    """beta of the KL penalty: fixed, or adapted to keep the per-sequence KL near its target (survey 2.4.2)."""
    if alg.kl_controller == "adaptive":
        return AdaptiveKLController(alg.kl_coef, alg.kl_target, alg.kl_horizon)
    return FixedKLController(alg.kl_coef)


@dataclass
class Ahead:
    """Asynchronous mode (`loop.max_staleness: 1`): the next step's first generation round, submitted by
    `train_step` before it trains (so generated by the weights it trains from, one version behind the weights
    the next step trains), and the prompt stream's position before those prompts were drawn. A checkpoint
    saves that position, so a resumed run draws the prefetched prompts again: none is lost or trained twice
    (the resumed run generates them with the checkpoint's weights, i.e. one version newer)."""

    flight: InFlight | None = None
    stream_state: dict | None = None

    def take(self) -> InFlight | None:
        flight, self.flight = self.flight, None
        return flight


def collect_groups(pools: Pools, cfg: JobConfig, stream: PromptStream, sampling: SamplingParams,
                   first: InFlight | None = None) -> tuple[list[Group], list[Group], int]:
    """(groups to train on, every group generated, generation rounds) for one step.

    `first`: the first round, already submitted (asynchronous mode); else it is drawn and run here.
    With `algorithm.dynamic_sampling` (DAPO), groups whose rewards are all equal carry no advantage and
    are set aside; more prompts are sampled until `loop.prompts_per_step` groups have signal or
    `max_sampling_rounds` is reached, and then the batch is topped up with set-aside groups (which add
    nothing to a group-relative gradient), so every step trains on a batch of the same size. Rounds after
    a prefetched first one are generated by the current weights.
    """
    want, alg = cfg.loop.prompts_per_step, cfg.algorithm
    generated: list[Group] = []
    kept: list[Group] = []
    rounds = 0
    while len(kept) < want and rounds < (alg.max_sampling_rounds if alg.dynamic_sampling else 1):
        rounds += 1
        need = want - len(kept)
        if rounds > 1:  # ask for enough to fill the batch at the rate groups had signal so far
            need = min(want, math.ceil(need * len(generated) / max(len(kept), 1)))
        if rounds == 1 and first is not None:
            groups = pools.finish_groups(first)
        else:
            groups = pools.run_groups(stream.next(need), sampling, cfg.rollout.prompts_per_call)
        generated += groups
        kept += [g for g in groups if not alg.dynamic_sampling or len({s.reward for s in g.samples}) > 1]
    kept = kept[:want]
    if len(kept) < want:
        chosen = {id(g) for g in kept}
        kept += [g for g in generated if id(g) not in chosen][: want - len(kept)]
    return kept, generated, rounds


def sample_records(groups: list[Group], batch: dict, n_groups: int) -> list[dict]:
    """The first `n_groups` groups of a batch, one record per completion: prompt, completion, reward and
    its parts, and the mean advantage over the completion's tokens (what the update pushed it by)."""
    records, row = [], 0
    adv, mask = batch["advantages"], batch["response_mask"]
    for g in groups[:n_groups]:
        for s in g.samples:
            n = float(mask[row].sum())
            records.append({"uid": g.uid, "prompt": g.prompt, "completion": s.text, "reward": s.reward,
                            "reward_parts": s.reward_parts, "advantage": float(adv[row].sum()) / max(n, 1.0),
                            "tokens": int(n), "finish_reason": s.finish_reason, "policy_version": g.policy_version})
            row += 1
    return records


def sample_excerpt(step: int, records: list[dict], k: int = 3) -> str:
    """A few completions of one prompt, readable in a console."""
    first = [r for r in records if r["uid"] == records[0]["uid"]][:k]
    lines = [f"step {step} sample: {first[0]['prompt']!r}"]
    lines += [f"  -> {r['completion']!r}  reward {r['reward']:+.3f}  advantage {r['advantage']:+.3f}" for r in first]
    return "\n".join(lines)


def train_step(pools: Pools, cfg: JobConfig, stream: PromptStream, sampling: SamplingParams, pad_id: int,
               version: int, log: Callable[[str], None] = _stderr, kl: FixedKLController | None = None,
               train_policy: bool = True, samples_out: list | None = None, ahead: Ahead | None = None,
               prefetch: bool = True) -> dict[str, float]:
    """One step: collect groups, build the batch, train, sync; returns its metrics (`log` shows the first
    failure of each reward kind).

    `version` is what the rollout workers serve after the step; `train_policy` False trains only the
    critic (warm-up); `kl` holds beta and, when adaptive, is updated with the measured KL; `samples_out`
    receives `sample_records` of the step. `ahead` (asynchronous mode, `loop.max_staleness: 1`) holds the
    groups prefetched by the previous step; with `prefetch` the next step's are submitted before this one
    trains, so their generation overlaps training. `staleness` is the mean over trained groups of
    (version of the weights being trained − version that generated the group): 0 on-policy, at most 1.

    Step-time breakdown (seconds; `time/step` is this call's wall time, evaluation not included):
    * critical path: `time/rollout` (waiting for groups: the whole overlapped generate → reward → score
      phase in strict on-policy mode; in asynchronous mode only what training did not hide, including the
      wait before the sync for the prefetched chunks' generation, since a worker loads new weights after the
      chunks queued before), `time/train_forward_backward` + `time/optimizer` (measured inside the policy
      trainer, rank 0: ranks meet in every all-reduce; PPO: `critic/time/*` likewise, and the larger of the
      two sums counts, as policy and critic train side by side), and `time/sync` (weight sync; in asynchronous
      mode with `old_logprobs: recompute` it also waits for the scoring workers to score the prefetched
      chunks at the old version first).
    * `time/overhead` = `time/step` − (rollout + forward/backward + optimizer + sync), and `time/overhead_frac` its
      share of the step: batching, advantages, sharding, object transfers to and from the trainers, the
      trainers' data handling between micro-batches, stats and bookkeeping.
    * per-pool busy time, overlapping each other inside the rollout phase (mean over the pool's workers):
      `time/generate`, `time/reward`, `time/score`; `time/train` is the wall of the training call.
    """
    t0 = time.perf_counter()
    groups, generated, rounds = collect_groups(pools, cfg, stream, sampling, ahead.take() if ahead else None)
    for message in pools.new_reward_errors(generated):
        log(message)
    t1 = time.perf_counter()
    next_flight = None
    if ahead is not None:
        ahead.stream_state = stream.state()  # before the next step's prompts are drawn
        if prefetch:  # generated by the weights trained now, while they train
            next_flight = pools.start_groups(stream.next(cfg.loop.prompts_per_step), sampling,
                                             cfg.rollout.prompts_per_call)
    beta = kl.value if kl is not None else cfg.algorithm.kl_coef
    batch = build_batch(groups, cfg.algorithm, pad_id, beta)
    t, agg = cfg.trainer, cfg.algorithm.agg
    skip = cfg.algorithm.skip_zero_advantage and batch["kl_coef"] == 0 and cfg.algorithm.entropy_coef == 0
    policy_shards = shard(batch, t.num_minibatches, t.num_workers, agg, skip, pools.grad_accum) if train_policy else None
    critic_shards = shard(batch, t.num_minibatches, len(pools.critics), agg) if pools.critics else None
    trained_version = pools.version  # the weights the trainer holds before this update
    t_train = time.perf_counter()
    training = pools.start_train(policy_shards, critic_shards)
    # What needs only the batch is worked out while the trainers run.
    if samples_out is not None:
        samples_out += sample_records(groups, batch, cfg.logging.sample_groups)
    m = rollout_metrics(generated, cfg.reward.accuracy_threshold, cfg.reward.accuracy_label)
    m |= value_metrics(batch) if "returns" in batch else {}
    m["kl/sequence"], m["kl/beta"] = sequence_kl(batch), beta
    if kl is not None:
        kl.update(m["kl/sequence"], n_steps=batch["input_ids"].shape[0])
    if cfg.algorithm.dynamic_sampling:
        m["sampling/dropped_frac"] = 1.0 - sum(len({s.reward for s in g.samples}) > 1 for g in generated) / len(generated)
        m["sampling/rounds"] = float(rounds)
    if policy_shards:
        trained = sum(part["input_ids"].shape[0] for parts in policy_shards for part in parts)
        m["train/skipped_rows_frac"] = 1.0 - trained / batch["input_ids"].shape[0]
    m["advantage/abs_mean"] = float(batch["advantages"].abs().sum() / batch["response_mask"].sum())
    policy_stats, critic_stats = pools.finish_train(training)
    t2 = time.perf_counter()
    if next_flight is not None:
        next_flight.wait_generated()  # workers load the new weights only after these chunks
        ahead.flight = next_flight
    t_sync = time.perf_counter()
    versions = pools.sync_weights(version, policy=train_policy)
    assert set(versions) == {version}, versions
    t3 = time.perf_counter()
    m |= merge_rank_stats(policy_stats) if policy_stats else {}
    m |= {k if k.startswith("critic/") else f"critic/{k}": v
          for k, v in (merge_rank_stats(critic_stats) if critic_stats else {}).items()}
    m["policy_version"] = float(version)
    m["staleness"] = statistics.fmean(trained_version - g.policy_version for g in groups)
    m |= {f"restarts/{name}": float(n) for name, n in pools.restarts.items()}
    m |= step_times(m, pools, rollout=(t1 - t0) + (t_sync - t2), train=t2 - t_train, sync=t3 - t_sync,
                    step=time.perf_counter() - t0)
    return m


def step_times(m: dict[str, float], pools: Pools, rollout: float, train: float, sync: float, step: float
               ) -> dict[str, float]:
    """The `time/*` breakdown of `train_step` (see there), `utilization/<pool>` (busy share of the step: which
    pool to grow) and throughput, from the step's walls and the busy seconds in `m` (`busy/*` are consumed)."""
    out = {"time/rollout": rollout, "time/train": train, "time/sync": sync, "time/step": step}
    for stage, workers in (("generate", len(pools.rollout)), ("reward", len(pools.reward) + len(pools.reward_models)),
                           ("score", len(pools.scoring))):
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


def pools_desc(cfg: JobConfig) -> list[str]:
    """One entry per actor the job starts (for progress messages)."""
    return (["rollout"] * cfg.rollout.num_workers + ["reward"] * num_reward_actors(cfg)
            + ["scoring"] * (cfg.scoring.num_workers if needs_scoring(cfg) else 0)
            + ["trainer"] * cfg.trainer.num_workers
            + ["critic"] * (cfg.critic.num_workers if uses_critic(cfg) else 0))


def summarize(records: list[dict]) -> dict[str, float]:
    """Means over the run's training steps of the numbers a summary prints: the total reward, each
    reward's own mean (`reward/<label>`), accuracy, length and speed."""
    steps = [r for r in records if "reward/mean" in r]
    if not steps:
        return {}
    keys = ["reward/mean", *(f"reward/{x}" for x in reward_labels(steps[0])), "accuracy", "response_length/mean",
            "time/step", "tokens_per_s"]
    return {k: statistics.fmean(r[k] for r in steps) for k in keys if k in steps[0]}


def reward_failure_totals(records: list[dict]) -> dict[str, int]:
    """Failed reward calls per label over the run's training steps."""
    steps = [r for r in records if "reward/mean" in r]
    labels = reward_labels(steps[0]) if steps else []
    return {x: int(sum(r.get(f"reward/{x}/failures", 0) for r in steps)) for x in labels}
