"""Pools of Ray actors sized from the config: rollout, reward, scoring, trainer and (PPO) critic ranks."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import ray

from actors.critic import CriticTrainer
from actors.engines import SamplingParams
from actors.reward import RewardWorker
from actors.reward_model import RewardModelWorker
from actors.rollout import RolloutWorker
from actors.scoring import ScoringWorker
from actors.trainer import PolicyTrainer
from actors.types import Group, GroupRequest, RewardSpec
from orchestrator.config import JobConfig

_CPU_ENV = {"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}}


def logical_cpus_needed(cfg: JobConfig) -> float:
    """Logical CPUs all pools ask for (an embedded Ray is started with at least this many)."""
    reward_actors = num_reward_actors(cfg)
    return (cfg.rollout.num_workers * cfg.rollout.num_cpus + reward_actors * cfg.reward.num_cpus
            + cfg.scoring.num_workers * cfg.scoring.num_cpus + cfg.trainer.num_workers * cfg.trainer.num_cpus
            + uses_critic(cfg) * cfg.critic.num_workers * cfg.critic.num_cpus)


def uses_critic(cfg: JobConfig) -> bool:
    """PPO with GAE trains a value model next to the policy."""
    return cfg.algorithm.estimator == "gae"


def num_reward_actors(cfg: JobConfig) -> int:
    """RewardWorkers (when any reward is a function) plus one RewardModelWorker per reward model."""
    models = sum(f.model is not None for f in cfg.reward.functions)
    has_functions = models < len(cfg.reward.functions)
    return cfg.reward.num_workers * has_functions + models


class PlacementError(RuntimeError):
    """The cluster cannot place (or start) the actors a pool asks for."""


def check_placement(pools: list[tuple[str, list, dict[str, float]]], timeout_s: float, fail_fast: bool = True) -> None:
    """Fail fast (`fail_fast`) when the pools ask for more of a resource than the whole cluster has, and wait
    at most `timeout_s` for every actor to be placed and constructed; the error names the pools still
    waiting, what each of their actors asks for, and what the cluster has free."""
    total = ray.cluster_resources()
    demand: dict[str, float] = {}
    for _, actors, need in pools:
        for key, amount in need.items():
            demand[key] = demand.get(key, 0.0) + amount * len(actors)
    short = {k: (v, total.get(k, 0.0)) for k, v in demand.items() if v > total.get(k, 0.0) + 1e-9}
    if short and fail_fast:
        asks = "; ".join(f"{name}: {len(actors)} x {need}" for name, actors, need in pools)
        raise PlacementError("the pools ask for more than the cluster has: " + ", ".join(
            f"{k} {v:g} of {have:g}" for k, (v, have) in short.items()) + f" ({asks}); shrink the pools' "
            "num_workers / num_cpus / num_gpus or add nodes")
    refs = {a.__ray_ready__.remote(): name for name, actors, _ in pools for a in actors}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)  # an actor whose constructor failed raises here, with its traceback
    if pending:
        waiting = sorted({refs[r] for r in pending})
        needs = {name: need for name, _, need in pools}
        raise PlacementError(
            f"after {timeout_s:g} s (ray.startup_timeout_s) these pools still wait to be placed or to load: "
            + "; ".join(f"{n} ({sum(refs[r] == n for r in pending)} actor(s), each {needs[n]})" for n in waiting)
            + f"; the cluster has free: {ray.available_resources()}")


def _alive(actor, timeout_s: float = 60.0) -> bool:
    """Whether an actor answers (a dead one raises at once; a busy one answers when its queue reaches it)."""
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
        return True
    except ray.exceptions.RayActorError:
        return False


def _join(ranks: list) -> int:
    """Rank 0 picks the rendezvous; every rank joins the process group and builds its engine. Parameters."""
    addr, port = ray.get(ranks[0].rendezvous.remote())
    return ray.get([r.setup.remote(addr, port) for r in ranks])[0]


def _rank_split(trainer_cfg: dict, batch: int, world: int) -> tuple[int, dict]:
    """(gradient-accumulation steps, the trainer config with the micro-batch each rank really uses)."""
    per_rank = batch // (trainer_cfg["num_minibatches"] * world)
    micro = min(trainer_cfg["micro_batch_size"], per_rank)
    return -(-per_rank // micro), trainer_cfg | {"micro_batch_size": micro}


class Pools:
    """Every actor of a job; methods fan work out round-robin and gather it back."""

    @staticmethod
    def critic_path(cfg: JobConfig, model_path: str) -> str | None:
        """Where the value model starts (PPO), or None without a critic."""
        if not uses_critic(cfg):
            return None
        return str(Path(cfg.critic.init).expanduser().resolve()) if cfg.critic.init else model_path

    def __init__(self, cfg: JobConfig, model_path: str, rewards: list[RewardSpec | tuple]):
        """`rewards`: resolved reward entries (paths absolute); `(label, "module:function", weight)` tuples work too."""
        m = cfg.model
        device = "cuda" if cfg.trainer.num_gpus > 0 else "cpu"
        common = dict(model_path=model_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        r, s, t = cfg.rollout, cfg.scoring, cfg.trainer
        self._make = {"rollout": lambda: ray.remote(RolloutWorker).options(
            num_cpus=r.num_cpus, num_gpus=r.num_gpus, runtime_env=_CPU_ENV).remote(
                engine=r.engine, threads=r.threads, seed=cfg.loop.seed,  # samples depend on prompts, not workers
                device="cuda" if r.num_gpus > 0 else "cpu", **common)}
        self.rollout = [self._make["rollout"]() for _ in range(r.num_workers)]
        rw = cfg.reward
        specs = [x if isinstance(x, RewardSpec) else RewardSpec(*x) for x in rewards]
        functions = [x for x in specs if x.model is None]
        self._make["reward"] = lambda: ray.remote(RewardWorker).options(num_cpus=rw.num_cpus, runtime_env=_CPU_ENV).remote(
            functions, rw.failure_score, rw.timeout_s, rw.num_processes)
        self.reward = [self._make["reward"]() for _ in range(rw.num_workers if functions else 0)]
        self.reward_models = [  # one worker per model; every chunk of groups passes through each
            ray.remote(RewardModelWorker).options(num_cpus=rw.num_cpus, num_gpus=x.num_gpus,
                                                  runtime_env=_CPU_ENV).remote(
                x.label, x.model, x.weight, x.batch_size or 32, rw.failure_score,
                device="cuda" if x.num_gpus > 0 else "cpu")
            for x in specs if x.model is not None
        ]
        self._make["scoring"] = lambda: ray.remote(ScoringWorker).options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, runtime_env=_CPU_ENV).remote(
                with_reference=cfg.algorithm.kl_coef > 0, temperature=r.temperature,
                micro_batch_size=s.micro_batch_size, threads=s.threads,
                device="cuda" if s.num_gpus > 0 else "cpu", value_model=self.critic_path(cfg, model_path), **common)
        self.scoring = [self._make["scoring"]() for _ in range(s.num_workers)]
        batch = cfg.loop.prompts_per_step * r.group_size
        self.grad_accum, trainer_cfg = _rank_split(t.model_dump(), batch, t.num_workers)
        self.trainers = [
            ray.remote(PolicyTrainer).options(num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                                              runtime_env=None if device == "cuda" else _CPU_ENV).remote(
                rank, t.num_workers, m.model_dump() | {"path": model_path}, trainer_cfg,
                cfg.algorithm.model_dump(), r.temperature, r.max_new_tokens, self.grad_accum,
                cfg.loop.steps, cfg.loop.seed, device)
            for rank in range(t.num_workers)
        ]
        self.critics = []
        if uses_critic(cfg):
            c = cfg.critic
            accum, critic_cfg = _rank_split(t.model_dump() | {"lr": c.lr}, batch, c.num_workers)
            self.critics = [
                ray.remote(CriticTrainer).options(num_cpus=c.num_cpus, num_gpus=c.num_gpus,
                                                  runtime_env=None if c.num_gpus > 0 else _CPU_ENV).remote(
                    rank, c.num_workers, m.model_dump() | {"path": self.critic_path(cfg, model_path)}, critic_cfg,
                    c.value_clip, cfg.algorithm.agg, accum, cfg.loop.steps, cfg.loop.seed,
                    "cuda" if c.num_gpus > 0 else "cpu")
                for rank in range(c.num_workers)
            ]
        # An embedded Ray has all it will ever have; a cluster may still be scaling up, so there we only wait.
        embedded = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        try:
            check_placement(self._pool_demands(cfg), cfg.ray.startup_timeout_s, fail_fast=embedded)
        except BaseException:
            self.shutdown()  # nothing placed so far keeps holding resources
            raise
        self.num_params = _join(self.trainers)
        if self.critics:
            _join(self.critics)
        self._cycle = {name: itertools.count() for name in ("rollout", "reward", "scoring")}
        self._errors_shown: set[str] = set()
        self.version = 0  # the policy version every rollout and scoring worker serves
        self.restarts = {name: 0 for name in self._make}  # workers replaced after they died

    def _pool_demands(self, cfg: JobConfig) -> list[tuple[str, list, dict[str, float]]]:
        """(pool name, its actors, resources each asks for) of every pool of this job."""
        r, s, t, c, rw = cfg.rollout, cfg.scoring, cfg.trainer, cfg.critic, cfg.reward
        return [(name, actors, {k: v for k, v in need.items() if v}) for name, actors, need in (
            ("rollout", self.rollout, {"CPU": r.num_cpus, "GPU": r.num_gpus}),
            ("reward", self.reward, {"CPU": rw.num_cpus}),
            ("reward_model", self.reward_models, {"CPU": rw.num_cpus}),
            ("scoring", self.scoring, {"CPU": s.num_cpus, "GPU": s.num_gpus}),
            ("trainer", self.trainers, {"CPU": t.num_cpus, "GPU": t.num_gpus}),
            ("critic", self.critics, {"CPU": c.num_cpus, "GPU": c.num_gpus})) if actors]

    def run_groups(self, requests: list[GroupRequest], sampling: SamplingParams, prompts_per_call: int,
                   score: bool = True, max_rounds: int = 3) -> list[Group]:
        """Every request's group, in request order, through `submit_groups`. When a rollout, reward or
        scoring worker dies (killed, OOM, node lost), it is replaced, gets the current weights, and the
        chunks that had not come back are issued again, up to `max_rounds` times: no group is lost and
        none is counted twice (a chunk's groups are taken whole, from the one attempt that finished)."""
        chunks = [requests[lo : lo + prompts_per_call] for lo in range(0, len(requests), prompts_per_call)]
        done: dict[int, list[Group]] = {}
        for attempt in range(max_rounds + 1):
            todo = [i for i in range(len(chunks)) if i not in done]
            refs = [self.submit_groups(chunks[i], sampling, prompts_per_call, score)[0] for i in todo]
            failed = None
            for i, ref in zip(todo, refs):
                try:
                    done[i] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    failed = e
            if failed is None:
                break
            if not self.replace_dead() or attempt == max_rounds:
                raise failed
        return [g for i in range(len(chunks)) for g in done[i]]

    def replace_dead(self) -> list[str]:
        """Start a fresh worker for every dead rollout, reward and scoring worker, serving the current
        weights; the pools that lost one (empty when all are alive)."""
        replaced = []
        policy = critic = None
        for name in ("rollout", "reward", "scoring"):
            workers = getattr(self, name)
            for i, w in enumerate(workers):
                if _alive(w):
                    continue
                workers[i] = self._make[name]()
                self.restarts[name] += 1
                replaced.append(name)
                if name in ("rollout", "scoring") and self.version:
                    policy = policy or self.trainers[0].state_dict.remote()
                    ray.get(workers[i].load_weights.remote(policy, self.version))
                if name == "scoring" and self.critics:
                    critic = critic or self.critics[0].state_dict.remote()
                    ray.get(workers[i].load_value_weights.remote(critic))
        return replaced

    def _next(self, name: str):
        workers = getattr(self, name)
        return workers[next(self._cycle[name]) % len(workers)]

    def submit_groups(self, requests: list[GroupRequest], sampling: SamplingParams, prompts_per_call: int,
                      score: bool = True) -> list[ray.ObjectRef]:
        """Chain generate → reward functions → reward models (→ score) per chunk of prompts; each chunk
        streams on its own, and consecutive chunks go to the next RewardWorker (round-robin)."""
        refs = []
        for lo in range(0, len(requests), prompts_per_call):
            groups = self._next("rollout").generate.remote(requests[lo : lo + prompts_per_call], sampling)
            if self.reward:
                groups = self._next("reward").score.remote(groups)
            for rm in self.reward_models:
                groups = rm.score.remote(groups)
            if score:
                groups = self._next("scoring").score.remote(groups)
            refs.append(groups)
        return refs

    def new_reward_errors(self, groups: list[Group]) -> list[str]:
        """Messages for reward failures of a kind not shown before in this job (each kind once, whichever worker)."""
        out = []
        for g in groups:
            for key, text in g.reward_errors.items():
                if key not in self._errors_shown:
                    self._errors_shown.add(key)
                    label, _, kind = key.partition(": ")
                    out.append(f"reward {label} failed ({kind}); such samples score reward.failure_score and are "
                               f"counted in reward/{label}/failures; the run goes on. First traceback:\n"
                               + text.rstrip())
        return out

    def train(self, shards: list[list[dict]] | None, critic_shards: list[list[dict]] | None = None
              ) -> tuple[list[dict], list[dict]]:
        """One training step on every policy rank and (PPO) every critic rank, side by side; their per-rank
        stats. `shards` None leaves the policy as it is (critic warm-up)."""
        policy = [tr.train_step.remote(sh) for tr, sh in zip(self.trainers, shards)] if shards is not None else []
        critic = [cr.train_step.remote(sh) for cr, sh in zip(self.critics, critic_shards or [])]
        return ray.get(policy), ray.get(critic)

    def sync_weights(self, version: int, policy: bool = True) -> list[int]:
        """Trainer rank 0's weights, put once into the object store, loaded by every rollout and scoring worker;
        the critic's rank 0 weights go to the scoring workers' critic copies. The versions now served."""
        critic = self.critics[0].state_dict.remote() if self.critics else None
        waits = [w.load_value_weights.remote(critic) for w in self.scoring] if critic is not None else []
        if policy:
            packed = self.trainers[0].state_dict.remote()
            versions = ray.get([w.load_weights.remote(packed, version) for w in self.rollout + self.scoring])
            self.version = version
        else:
            versions = [v for v, _ in self.served_versions()]
        ray.get(waits)
        return versions

    def save_checkpoint(self, path: Path) -> None:
        """Every policy rank's (and critic rank's) DeepSpeed state under `path`/policy (and `path`/critic)."""
        ray.get([tr.save_checkpoint.remote(str(path / "policy")) for tr in self.trainers]
                + [cr.save_checkpoint.remote(str(path / "critic")) for cr in self.critics])

    def load_checkpoint(self, path: Path, version: int) -> None:
        """Restore the ranks from a checkpoint and serve its weights as `version` everywhere."""
        ray.get([tr.load_checkpoint.remote(str(path / "policy")) for tr in self.trainers]
                + [cr.load_checkpoint.remote(str(path / "critic")) for cr in self.critics])
        served = self.sync_weights(version)
        assert set(served) == {version}, served

    def served_versions(self) -> list[tuple[int, str]]:
        """(version, checksum) of every rollout and scoring worker."""
        return ray.get([w.weights_version.remote() for w in self.rollout + self.scoring])

    def trainer_checksums(self) -> list[str]:
        return ray.get([tr.weights_checksum.remote() for tr in self.trainers])

    def save_policy(self, path: str) -> str:
        return ray.get(self.trainers[0].save_pretrained.remote(path))

    def shutdown(self) -> None:
        for a in self.rollout + self.reward + self.reward_models + self.scoring + self.trainers + self.critics:
            ray.kill(a)  # a RewardWorker's subprocesses die with it (PR_SET_PDEATHSIG)


def gather(refs: list[ray.ObjectRef]) -> list[Group]:
    """Results of chained calls, flattened to groups in request order (deterministic batches)."""
    return [g for chunk in ray.get(refs) for g in chunk]
