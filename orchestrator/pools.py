"""Pools of Ray actors sized from the config: rollout, reward, scoring and trainer ranks."""

from __future__ import annotations

import itertools

import ray

from actors.engines import SamplingParams
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker
from actors.scoring import ScoringWorker
from actors.trainer import PolicyTrainer
from actors.types import Group, GroupRequest
from orchestrator.config import JobConfig

_CPU_ENV = {"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}}


def logical_cpus_needed(cfg: JobConfig) -> float:
    """Logical CPUs all pools ask for (an embedded Ray is started with at least this many)."""
    return (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.reward.num_workers * cfg.reward.num_cpus
            + cfg.scoring.num_workers * cfg.scoring.num_cpus + cfg.trainer.num_workers * cfg.trainer.num_cpus)


class Pools:
    """Every actor of a job; methods fan work out round-robin and gather it back."""

    def __init__(self, cfg: JobConfig, model_path: str, reward_functions: list[tuple[str, str, float]]):
        m = cfg.model
        device = "cuda" if cfg.trainer.num_gpus > 0 else "cpu"
        common = dict(model_path=model_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        r, s, t = cfg.rollout, cfg.scoring, cfg.trainer
        self.rollout = [
            ray.remote(RolloutWorker).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, runtime_env=_CPU_ENV,
                                              name=None).remote(
                engine=r.engine, threads=r.threads, seed=cfg.loop.seed * 1000 + i,
                device="cuda" if r.num_gpus > 0 else "cpu", **common)
            for i in range(r.num_workers)
        ]
        self.reward = [
            ray.remote(RewardWorker).options(num_cpus=cfg.reward.num_cpus, runtime_env=_CPU_ENV).remote(
                reward_functions, cfg.reward.failure_score)
            for _ in range(cfg.reward.num_workers)
        ]
        self.scoring = [
            ray.remote(ScoringWorker).options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, runtime_env=_CPU_ENV).remote(
                with_reference=cfg.algorithm.kl_coef > 0, temperature=r.temperature,
                micro_batch_size=s.micro_batch_size, threads=s.threads,
                device="cuda" if s.num_gpus > 0 else "cpu", **common)
            for _ in range(s.num_workers)
        ]
        batch = cfg.loop.prompts_per_step * r.group_size
        per_rank = batch // (t.num_minibatches * t.num_workers)
        micro = min(t.micro_batch_size, per_rank)
        self.grad_accum = -(-per_rank // micro)
        trainer_cfg = t.model_dump() | {"micro_batch_size": micro}
        self.trainers = [
            ray.remote(PolicyTrainer).options(num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                                              runtime_env=None if device == "cuda" else _CPU_ENV).remote(
                rank, t.num_workers, m.model_dump() | {"path": model_path}, trainer_cfg,
                cfg.algorithm.model_dump(), r.temperature, r.max_new_tokens, self.grad_accum,
                cfg.loop.steps, cfg.loop.seed, device)
            for rank in range(t.num_workers)
        ]
        addr, port = ray.get(self.trainers[0].rendezvous.remote())
        self.num_params = ray.get([tr.setup.remote(addr, port) for tr in self.trainers])[0]
        self._cycle = {name: itertools.count() for name in ("rollout", "reward", "scoring")}

    def _next(self, name: str):
        workers = getattr(self, name)
        return workers[next(self._cycle[name]) % len(workers)]

    def submit_groups(self, requests: list[GroupRequest], sampling: SamplingParams, prompts_per_call: int,
                      score: bool = True) -> list[ray.ObjectRef]:
        """Chain generate → reward (→ score) per chunk of prompts; each chunk streams on its own."""
        refs = []
        for lo in range(0, len(requests), prompts_per_call):
            groups = self._next("rollout").generate.remote(requests[lo : lo + prompts_per_call], sampling)
            groups = self._next("reward").score.remote(groups)
            if score:
                groups = self._next("scoring").score.remote(groups)
            refs.append(groups)
        return refs

    def train(self, shards: list[list[dict]]) -> list[dict]:
        """One training step on every rank (each gets its own slices); per-rank stats."""
        return ray.get([tr.train_step.remote(sh) for tr, sh in zip(self.trainers, shards)])

    def sync_weights(self, version: int) -> list[int]:
        """Trainer rank 0's weights, put once into the object store, loaded by every rollout and scoring worker."""
        packed = self.trainers[0].state_dict.remote()
        return ray.get([w.load_weights.remote(packed, version) for w in self.rollout + self.scoring])

    def served_versions(self) -> list[tuple[int, str]]:
        """(version, checksum) of every rollout and scoring worker."""
        return ray.get([w.weights_version.remote() for w in self.rollout + self.scoring])

    def trainer_checksums(self) -> list[str]:
        return ray.get([tr.weights_checksum.remote() for tr in self.trainers])

    def save_policy(self, path: str) -> str:
        return ray.get(self.trainers[0].save_pretrained.remote(path))

    def shutdown(self) -> None:
        for a in self.rollout + self.reward + self.scoring + self.trainers:
            ray.kill(a)


def gather(refs: list[ray.ObjectRef]) -> list[Group]:
    """Results of chained calls, flattened to groups in request order (deterministic batches)."""
    return [g for chunk in ray.get(refs) for g in chunk]
