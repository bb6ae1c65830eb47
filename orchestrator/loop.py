"""The training loop, in the order a sample travels: prompts → rollout → reward → scoring (`collect`) →
advantages and the `TrainBatch` (`batching`) → trainer shards → train → weight sync → metrics."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.records import SamplingParams
from orchestrator import checkpoint
from orchestrator.batching import build_batch, kl_controller, loss_kl_coef, sequence_kl
from orchestrator.collect import collect_groups, evaluate, sampling_params
from orchestrator.config import JobConfig
from orchestrator.data import Data
from orchestrator.failures import WORKER_LOST, ActorDied, nonfinite_streak
from orchestrator.metrics import MetricsWriter, batch_metrics, sample_records, step_times, trainer_metrics
from orchestrator.pipeline import Pipeline, lag_metrics
from orchestrator.pool_specs import job_demands, train_shards
from orchestrator.pools import Pools
from orchestrator.progress import Progress
from orchestrator.summary import RunResult


@dataclass
class Run:
    """What every step of a run shares (`pipeline`: the asynchronous mode's rounds ahead, None on-policy)."""

    cfg: JobConfig
    pools: Pools
    data: Data
    kl: object  # orchestrator.batching.kl_controller
    sampling: SamplingParams
    pipeline: Pipeline | None = None
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)


def train(cfg: JobConfig, run_dir: Path, model_path: str, rewards: list, data: Data,
          resume: Path | None = None) -> RunResult:
    """Run `cfg.loop.steps` steps; write metrics, checkpoints and the final policy. `rewards`: resolved
    `RewardSpec`s (`orchestrator.references.reward_specs`); `resume`: a checkpoint directory to continue from."""
    start, loop, lg, threads = time.perf_counter(), cfg.loop, cfg.logging, torch.get_num_threads()
    state = checkpoint.start_state(cfg, model_path, resume)  # a resume the config cannot continue fails here
    writer = MetricsWriter(run_dir, lg.tensorboard, first_step=state.step + 1 if resume else 0, wandb=lg.wandb,
                           mlflow=lg.mlflow, name=lg.name, config=cfg.model_dump(mode="json"))
    progress = Progress(loop.steps, lg.progress, cfg.algorithm.estimator.upper(), lg.print_samples_every)
    progress.note(f"starting {sum(d.count for d in job_demands(cfg))} actors ...")
    pipeline = Pipeline(loop.max_staleness) if loop.max_staleness or state.pending else None  # pending: trained first
    run = Run(cfg, Pools(cfg, model_path, rewards), data, kl_controller(cfg.algorithm), sampling_params(cfg),
              pipeline, progress.note)
    pools, evals = run.pools, data.eval_prompts
    progress.note(f"policy: {pools.num_params / 1e6:.2f}M parameters; "
                  f"{cfg.trainer.num_workers} trainer rank(s), {cfg.rollout.num_workers} rollout worker(s)")
    try:
        if resume:
            checkpoint.restore(resume, state, pools, data.stream, run.kl)
            run.pipeline and run.pipeline.restore(pools, data.stream, state.pending, run.sampling,
                                                  cfg.rollout.prompts_per_call)
            progress.note(f"resumed from {resume} (step {state.step}, policy version {state.version})")
        else:
            m = dict(data.skipped) | (evaluate(pools, cfg, evals, progress.note) if evals else {})
            state.eval_before = m.get("eval/accuracy")
            if evals:
                progress.note(f"held-out greedy accuracy before RL: {state.eval_before:.1%} ({len(evals)} prompts)")
            writer.write(0, m)
        progress.skip_to(state.step)
        gc.freeze()  # the dataset and start-up objects live on: Python's collector stops re-walking them every step
        # The driver's tensors are small. With a thread per core its ops waited on OpenMP threads for cores the
        # actors held: indexing in `shard` took 0.74 instead of 0.07 ms, and the overhead had 10-40 ms spikes.
        torch.set_num_threads(1)
        for step in range(state.step + 1, loop.steps + 1):
            moves = step > cfg.critic.warmup_steps or not pools.critics  # critic warm-up: the policy waits
            state.version += moves
            metrics, samples = train_step(run, state.version, train_policy=moves, steps_left=loop.steps - step)
            if evals and ((loop.eval_every and step % loop.eval_every == 0) or step == loop.steps):
                pools.sync.settle()  # asynchronous mode: every deferred weight load done (it was submitted)
                metrics |= evaluate(pools, cfg, evals, progress.note)  # the newest weights, synced above
                state.eval_after = metrics["eval/accuracy"]
            writer.write_step(step, metrics, samples)
            progress.step(step, metrics, samples)
            state.nonfinite_run = nonfinite_streak(state.nonfinite_run, metrics, cfg.trainer.max_nonfinite_steps,
                                                   step, run_dir)
            # Asynchronous mode: the prompts drawn and not yet trained are saved, to be generated again on resume.
            state.step, state.kl = step, run.kl.state_dict()
            state.stream, state.pending = data.stream.state(), run.pipeline.pending() if run.pipeline else []
            if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == loop.steps):
                checkpoint.save(run_dir, state, pools.save_checkpoint, cfg.checkpoint.keep)
        final = Path(pools.save_policy(str(run_dir / "final_policy")))
    except WORKER_LOST as e:  # a trainer rank, or a worker that died again each time it was replaced
        raise ActorDied.at(state.step + 1, e, run_dir, pools.describe(e)) from e
    finally:
        torch.set_num_threads(threads)
        progress.close()
        writer.close()
        pools.shutdown()
    return RunResult(run_dir, state.eval_before, state.eval_after, final, time.perf_counter() - start)


def train_step(run: Run, version: int, train_policy: bool = True, steps_left: int = 0
               ) -> tuple[dict[str, float], list[dict]]:
    """One step: collect groups, build the batch, train, sync; (metrics, `sample_records`). After it the workers
    serve `version`; `train_policy` False trains only the critic (warm-up). Asynchronous mode (`run.pipeline`):
    the oldest round submitted ahead is trained, the next rounds (`steps_left` at most) are submitted before it
    trains, the sync is not waited for. `staleness`: mean (version trained − version that generated); `async/*`: the
    lag per token and stale groups (`orchestrator.pipeline`); `time/*`: docs/performance.md."""
    cfg, pools, stream, alg = run.cfg, run.pools, run.data.stream, run.cfg.algorithm
    pipe, r = run.pipeline, cfg.rollout
    t0 = time.perf_counter()
    trained_version = pools.version  # the weights the trainer holds before this update
    first, dropped = pipe.collect(pools, trained_version, cfg.loop.max_staleness, cfg.loop.stale_groups == "drop",
                                  run.sampling, r.prompts_per_call) if pipe else (None, 0)
    groups, generated, rounds = collect_groups(pools, cfg, stream, run.sampling, first)
    for message in pools.new_reward_errors(generated):
        run.log(message)
    t1 = time.perf_counter()
    if pipe is not None:  # generated while this step trains, by the weights the workers reach them with
        pipe.fill(pools, stream, cfg.loop.prompts_per_step, run.sampling, r.prompts_per_call, steps_left)
    beta = run.kl.value
    batch = build_batch(groups, alg, run.data.pad_id, beta, cfg.distill.coef if cfg.distill.teacher else 0)
    skip = alg.skip_zero_advantage and loss_kl_coef(alg, beta) == 0 and alg.entropy_coef == 0
    policy_shards, critic_shards = train_shards(cfg, batch, len(pools.critics), train_policy, skip)
    t_train = time.perf_counter()
    training = pools.start_train(policy_shards, critic_shards, loss_kl_coef(alg, beta))
    # What needs only the batch is worked out while the trainers run.
    samples = sample_records(groups, batch, cfg.logging.sample_groups)
    m = batch_metrics(groups, generated, batch, rounds, policy_shards, cfg.reward.accuracy_threshold,
                      cfg.reward.accuracy_label, alg.dynamic_sampling)
    m["kl/sequence"], m["kl/beta"] = sequence_kl(batch), beta
    run.kl.update(m["kl/sequence"], n_steps=batch.rows)
    policy_stats, critic_stats = pools.finish_train(training)
    t2 = time.perf_counter()
    pools.sync_weights(version, policy=train_policy, wait=pipe is None)  # loaded after the rounds queued before it
    t3 = time.perf_counter()
    m |= trainer_metrics(policy_stats, critic_stats)
    m["policy_version"] = float(version)
    m["staleness"] = statistics.fmean(trained_version - g.policy_version for g in groups)
    m |= (lag_metrics(groups, trained_version) | {"async/dropped_stale": float(dropped)}) if pipe else {}
    m |= {f"restarts/{name}": float(n) for name, n in pools.restarts.items()}
    m["sync/fallbacks"] = float(pools.sync.fallbacks)
    m |= pools.sync.bytes  # sync/bytes: the policy's payload (under LoRA the adapters'), sync/critic_bytes
    m |= step_times(m, pools, rollout=t1 - t0, train=t2 - t_train, sync=t3 - t2,
                    step=time.perf_counter() - t0)
    return m, samples
