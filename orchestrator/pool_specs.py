"""What each pool of a job is: its actor class, and per worker the resources it asks for and the keyword
arguments it is built with. `Pools` builds actors from these specs; placement reserves their resources."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from actors.critic import CriticTrainer
from actors.env_host import EnvHost
from actors.records import RewardSpec, Shard, TrainBatch
from actors.reward import RewardWorker
from actors.reward_model import RewardModelWorker
from actors.rollout import RolloutWorker
from actors.scoring import ScoringWorker
from actors.trainer import PolicyTrainer
from orchestrator.batching import shard
from orchestrator.config import JobConfig
from orchestrator.placement import Placement, PoolDemand
from orchestrator.references import absolute_file_spec
from orchestrator.threads import PHASES, ray_node_cores, resolve_threads


def omp_wait(environ: dict[str, str]) -> dict[str, str]:
    """How the CPU actors' OpenMP threads wait: the driver's OMP_WAIT_POLICY / GOMP_SPINCOUNT when it sets either,
    else PASSIVE: waiting threads sleep at once, where libgomp's default spins ~3 ms first. A thread spinning at a
    barrier for a descheduled sibling burns the core that sibling needs: with other processes on the machine, 2
    threads per actor stalled (docs/performance.md, Threads)."""
    return {k: environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in environ} or {
        "OMP_WAIT_POLICY": "PASSIVE"}


CPU_ENV = {"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **omp_wait(dict(os.environ))}}


@dataclass
class PoolSpec:
    """One pool: worker i is `actor(**kwargs[i])`, asking for `needs[i]` (CPU, GPU, custom resources)."""

    name: str
    actor: type
    needs: list[dict[str, float]]
    kwargs: list[dict]
    runtime_env: dict | None = None

    @property
    def demand(self) -> PoolDemand:
        return PoolDemand(self.name, self.needs)


@dataclass(frozen=True)
class TrainPlan:
    """How a step's batch meets a pool of data-parallel ranks: the micro-batch each rank really uses and its
    gradient-accumulation steps (DeepSpeed's count of backwards per optimizer step). The trainer ranks are
    built with it, and `orchestrator.batching.shard` gives each rank at least `grad_accum` rows."""

    micro_batch_size: int
    grad_accum: int

    @staticmethod
    def of(cfg: JobConfig, world_size: int) -> TrainPlan:
        batch = cfg.loop.prompts_per_step * cfg.rollout.group_size
        per_rank = batch // (cfg.trainer.num_minibatches * world_size)
        micro = min(cfg.trainer.micro_batch_size, per_rank)
        return TrainPlan(micro, -(-per_rank // micro))


def train_shards(cfg: JobConfig, batch: TrainBatch, critics: int, train_policy: bool = True, skip: bool = False
                 ) -> tuple[list[list[Shard]] | None, list[list[Shard]] | None]:
    """A step's shards for the policy ranks (None when only the critic trains) and the critic ranks (None without):
    each pool's `TrainPlan`, micro-batches planned with `trainer.micro_batch_split_tokens`; `skip` leaves out the
    rows with no gradient (`orchestrator.batching.shard`). Value forwards share no prompts."""
    t, agg, split = cfg.trainer, cfg.algorithm.agg, cfg.trainer.micro_batch_split_tokens
    policy, value = TrainPlan.of(cfg, t.num_workers), TrainPlan.of(cfg, max(critics, 1))
    policy_shards = (shard(batch, t.num_minibatches, t.num_workers, agg, skip, policy.grad_accum,
                           policy.micro_batch_size, split, cfg.model.share_prompt_forward) if train_policy else None)
    critic_shards = (shard(batch, t.num_minibatches, critics, agg, micro_batch_size=value.micro_batch_size,
                           split_tokens=split, share_prompts=False) if critics else None)
    return policy_shards, critic_shards


def uses_critic(cfg: JobConfig) -> bool:
    """PPO with GAE trains a value model next to the policy."""
    return cfg.algorithm.estimator == "gae"


def reference_on_trainers(cfg: JobConfig) -> bool:
    """The KL reference is the trainer ranks' own base with the LoRA adapters disabled (`model.lora.reference:
    trainer`), not a ScoringWorker's copy."""
    return cfg.algorithm.kl_coef > 0 and cfg.model.lora is not None and cfg.model.lora.reference == "trainer"


def needs_scoring(cfg: JobConfig) -> bool:
    """Whether ScoringWorkers have work: old-policy log-probs (`algorithm.old_logprobs: recompute`), reference
    log-probs (kl_coef > 0, unless the trainers hold the reference), teacher log-probs (`distill.teacher`) or values
    (gae). Without any, the scoring pool is empty and groups skip it."""
    scoring_reference = cfg.algorithm.kl_coef > 0 and not reference_on_trainers(cfg)
    return (cfg.algorithm.old_logprobs == "recompute" or scoring_reference or cfg.distill.teacher is not None
            or uses_critic(cfg))


def teacher_path(cfg: JobConfig) -> str | None:
    """The distillation teacher's directory, absolute (actors do not share the driver's working directory)."""
    return str(Path(cfg.distill.teacher).expanduser().resolve()) if cfg.distill.teacher else None


def critic_path(cfg: JobConfig, model_path: str) -> str | None:
    """Where the value model starts (PPO), or None without a critic."""
    if not uses_critic(cfg):
        return None
    return str(Path(cfg.critic.init).expanduser().resolve()) if cfg.critic.init else model_path


def _ask(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """A worker's resource request, zeros left out."""
    return {k: v for k, v in {"CPU": cpus, "GPU": gpus, **resources}.items() if v}


def _device(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"


def engine_options(cfg: JobConfig) -> dict:
    """The rollout engine's own settings: `rollout.vllm` for vLLM; `rollout.autocast` and `rollout.dtype` (as
    `weights_dtype`) for hf. The same for the rollout pool and for `raylhf eval`'s in-process worker."""
    r = cfg.rollout
    return r.vllm.model_dump() if r.engine == "vllm" else {"autocast": r.autocast, "weights_dtype": r.dtype}


def pool_specs(cfg: JobConfig, model_path: str, rewards: list[RewardSpec]) -> list[PoolSpec]:
    """Every pool of the job, in start-up order (an empty pool has no workers). `rewards`: the resolved reward
    entries (`orchestrator.references.reward_specs`)."""
    m, r, s, t, c, rw = cfg.model, cfg.rollout, cfg.scoring, cfg.trainer, cfg.critic, cfg.reward
    common = dict(model_path=model_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    lora = m.lora.model_dump() if m.lora else None
    functions = [x for x in rewards if x.model is None]
    models = [x for x in rewards if x.model is not None]
    n_scoring = s.num_workers if needs_scoring(cfg) else 0
    n_critic = c.num_workers if uses_critic(cfg) else 0
    policy, value = TrainPlan.of(cfg, t.num_workers), TrainPlan.of(cfg, max(n_critic, 1))
    trainer_cfg = t.model_dump()
    rollout = dict(engine=r.engine, threads=r.threads, seed=cfg.loop.seed,  # samples depend on prompts, not workers
                   device=_device(r.num_gpus), engine_options=engine_options(cfg), env=env_limits(cfg), lora=lora,
                   **common)
    e = cfg.env if cfg.env.enabled else None
    n_env = e.num_workers if e else 0
    env = dict(name=absolute_file_spec(e.env_name), kwargs=e.env_kwargs(cfg.data.prompt_key), timeout_s=e.timeout_s,
               max_abs_reward=rw.max_abs_score, max_threads=e.max_concurrency) if e else {}
    reward = dict(functions=functions, failure_score=rw.failure_score, timeout_s=rw.timeout_s,
                  num_processes=rw.num_processes, max_abs_score=rw.max_abs_score, memory_mb=rw.memory_mb)
    scoring_reference = cfg.algorithm.kl_coef > 0 and not reference_on_trainers(cfg)
    scoring = dict(with_reference=scoring_reference, temperature=r.temperature,
                   micro_batch_size=s.micro_batch_size, threads=s.threads, device=_device(s.num_gpus),
                   value_model=critic_path(cfg, model_path), with_policy=cfg.algorithm.old_logprobs == "recompute",
                   share_prompts=m.share_prompt_forward, lora=lora, teacher_model=teacher_path(cfg),
                   autocast=s.autocast, **common)
    trainer = dict(world_size=t.num_workers, model=m.model_dump() | {"path": model_path},
                   trainer=trainer_cfg | {"micro_batch_size": policy.micro_batch_size},
                   algorithm=cfg.algorithm.model_dump(), temperature=r.temperature, max_new_tokens=r.max_new_tokens,
                   grad_accum=policy.grad_accum, total_steps=cfg.loop.steps, seed=cfg.loop.seed,
                   device=_device(t.num_gpus))
    critic = dict(world_size=n_critic, model=m.model_dump() | {"path": critic_path(cfg, model_path)},
                  trainer=trainer_cfg | {"lr": c.lr, "micro_batch_size": value.micro_batch_size},
                  value_clip=c.value_clip, agg=cfg.algorithm.agg, grad_accum=value.grad_accum,
                  total_steps=cfg.loop.steps, seed=cfg.loop.seed, device=_device(c.num_gpus))
    return [
        PoolSpec("rollout", RolloutWorker, [_ask(r.num_cpus, r.num_gpus, r.resources)] * r.num_workers,
                 [rollout] * r.num_workers, CPU_ENV),
        PoolSpec("env", EnvHost, [_ask(e.num_cpus, 0, e.resources)] * n_env if e else [], [env] * n_env, CPU_ENV),
        PoolSpec("reward", RewardWorker, [_ask(rw.num_cpus, 0, rw.resources)] * (rw.num_workers if functions else 0),
                 [reward] * (rw.num_workers if functions else 0), CPU_ENV),
        PoolSpec("reward_model", RewardModelWorker, [_ask(rw.num_cpus, x.num_gpus, rw.resources) for x in models],
                 [dict(label=x.label, model_path=x.model, weight=x.weight, batch_size=x.batch_size or 32,
                       failure_score=rw.failure_score, max_abs_score=rw.max_abs_score, device=_device(x.num_gpus))
                  for x in models], CPU_ENV),
        PoolSpec("scoring", ScoringWorker, [_ask(s.num_cpus, s.num_gpus, s.resources)] * n_scoring,
                 [scoring] * n_scoring, CPU_ENV),
        PoolSpec("trainer", PolicyTrainer, [_ask(t.num_cpus, t.num_gpus, t.resources)] * t.num_workers,
                 [trainer | {"rank": i} for i in range(t.num_workers)], None if t.num_gpus > 0 else CPU_ENV),
        PoolSpec("critic", CriticTrainer, [_ask(c.num_cpus, c.num_gpus, c.resources)] * n_critic,
                 [critic | {"rank": i} for i in range(n_critic)], None if c.num_gpus > 0 else CPU_ENV),
    ]


def thread_settings(cfg: JobConfig) -> dict[str, int | str]:
    """Each torch pool's `threads` setting (an int, or "auto"); critic ranks follow `trainer.threads`."""
    return {"rollout": cfg.rollout.threads, "scoring": cfg.scoring.threads, "trainer": cfg.trainer.threads,
            "critic": cfg.trainer.threads}


def with_threads(spec: PoolSpec, threads: list[int]) -> PoolSpec:
    """`spec` with worker i built with `threads[i]` torch threads (trainer and critic ranks read them from their
    `trainer` settings)."""
    ranks = spec.name in ("trainer", "critic")
    return replace(spec, kwargs=[kw | {"trainer": kw["trainer"] | {"threads": n}} if ranks else kw | {"threads": n}
                                 for kw, n in zip(spec.kwargs, threads)])


def placed_threads(cfg: JobConfig, specs: list[PoolSpec], placement: Placement) -> list[PoolSpec]:
    """`specs` with every "auto" `threads` resolved (`orchestrator.threads`) from where `placement` put each worker
    and the cores Ray's nodes offer; strict on-policy when `loop.max_staleness` is 0."""
    placed = [s for s in specs if s.needs and s.name in PHASES]
    threads = resolve_threads({k: v for k, v in thread_settings(cfg).items() if any(s.name == k for s in placed)},
                              {s.name: placement.nodes(s.name) for s in placed},
                              {s.name: [need.get("CPU", 0.0) for need in s.needs] for s in placed},
                              ray_node_cores(), on_policy=cfg.loop.max_staleness == 0)
    return [with_threads(s, threads[s.name]) if s.name in threads else s for s in specs]


def env_limits(cfg: JobConfig) -> dict | None:
    """A rollout worker's multi-turn settings (`actors.multiturn.EnvLimits` and the turn format), None without env."""
    e = cfg.env
    if not e.enabled:
        return None
    return dict(max_turns=e.max_turns, max_total_tokens=e.max_total_tokens or e.max_turns * cfg.rollout.max_new_tokens,
                failure_score=cfg.reward.failure_score, prompt_key=cfg.data.prompt_key,
                client_timeout_s=e.timeout_s + 30.0, patience_s=e.patience_s, format=e.format)


def config_rewards(cfg: JobConfig) -> list[RewardSpec]:
    """The config's reward entries as specs, unresolved: enough to count what the pools ask for."""
    return [RewardSpec(label=f.label, name=f.name, weight=f.weight, model=f.model, batched=f.batched,
                       batch_size=f.batch_size, num_gpus=f.num_gpus) for f in cfg.reward.functions]


def job_demands(cfg: JobConfig) -> list[PoolDemand]:
    """What each worker of every pool asks for: CPUs, GPUs and custom node resources."""
    return [spec.demand for spec in pool_specs(cfg, cfg.model.path, config_rewards(cfg))]


def logical_cpus_needed(cfg: JobConfig) -> float:
    """Logical CPUs all pools ask for (an embedded Ray is started with at least this many)."""
    return sum(need.get("CPU", 0.0) for d in job_demands(cfg) for need in d.needs)


def num_reward_actors(cfg: JobConfig) -> int:
    """RewardWorkers (when any reward is a function) plus one RewardModelWorker per reward model."""
    return sum(d.count for d in job_demands(cfg) if d.name in ("reward", "reward_model"))


def custom_resources_needed(cfg: JobConfig) -> dict[str, float]:
    """Custom resources all pools ask for together (an embedded Ray offers them: a cluster config runs on one box)."""
    total: dict[str, float] = {}
    for d in job_demands(cfg):
        for need in d.needs:
            for k, v in need.items():
                if k not in ("CPU", "GPU"):
                    total[k] = total.get(k, 0.0) + v
    return total
