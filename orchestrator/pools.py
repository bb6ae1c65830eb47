"""Pools of Ray actors sized from the config: rollout, reward, scoring, trainer and (PPO) critic ranks."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.batch import compact
from actors.critic import CriticTrainer
from actors.engines import SamplingParams
from actors.reward import RewardWorker
from actors.reward_model import RewardModelWorker
from actors.rollout import RolloutWorker
from actors.scoring import ScoringWorker
from actors.trainer import PolicyTrainer
from actors.types import Group, GroupRequest, RewardSpec
from orchestrator.config import JobConfig
from orchestrator.placement import Placement, PlacementError, PoolDemand, wait_constructed

__all__ = ["Pools", "PlacementError", "gather", "logical_cpus_needed", "pool_demands", "custom_resources_needed"]

_CPU_ENV = {"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}}


def logical_cpus_needed(cfg: JobConfig) -> float:
    """Logical CPUs all pools ask for (an embedded Ray is started with at least this many)."""
    return sum(need.get("CPU", 0.0) for d in job_demands(cfg) for need in d.needs)


def uses_critic(cfg: JobConfig) -> bool:
    """PPO with GAE trains a value model next to the policy."""
    return cfg.algorithm.estimator == "gae"


def needs_scoring(cfg: JobConfig) -> bool:
    """Whether ScoringWorkers have work: old-policy log-probs (`algorithm.old_logprobs: recompute`), reference
    log-probs (kl_coef > 0) or values (gae). Without any, the scoring pool is empty and groups skip it."""
    return cfg.algorithm.old_logprobs == "recompute" or cfg.algorithm.kl_coef > 0 or uses_critic(cfg)


def num_reward_actors(cfg: JobConfig) -> int:
    """RewardWorkers (when any reward is a function) plus one RewardModelWorker per reward model."""
    return sum(d.count for d in job_demands(cfg) if d.name in ("reward", "reward_model"))


def pool_demands(cfg: JobConfig, reward_functions: bool, reward_model_gpus: list[float]) -> list[PoolDemand]:
    """What each worker of every pool asks for: CPUs, GPUs and custom node resources, zeros left out.
    `reward_functions`: whether RewardWorkers run (some reward is a function); one reward-model worker per
    entry of `reward_model_gpus`."""
    r, s, t, c, rw = cfg.rollout, cfg.scoring, cfg.trainer, cfg.critic, cfg.reward

    def ask(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in {"CPU": cpus, "GPU": gpus, **resources}.items() if v}

    return [PoolDemand(name, needs) for name, needs in (
        ("rollout", [ask(r.num_cpus, r.num_gpus, r.resources)] * r.num_workers),
        ("reward", [ask(rw.num_cpus, 0, rw.resources)] * (rw.num_workers if reward_functions else 0)),
        ("reward_model", [ask(rw.num_cpus, g, rw.resources) for g in reward_model_gpus]),
        ("scoring", [ask(s.num_cpus, s.num_gpus, s.resources)] * (s.num_workers if needs_scoring(cfg) else 0)),
        ("trainer", [ask(t.num_cpus, t.num_gpus, t.resources)] * t.num_workers),
        ("critic", [ask(c.num_cpus, c.num_gpus, c.resources)] * (c.num_workers if uses_critic(cfg) else 0)))]


def job_demands(cfg: JobConfig) -> list[PoolDemand]:
    """`pool_demands` of a config, its reward entries read from `cfg.reward.functions`."""
    models = [f.num_gpus for f in cfg.reward.functions if f.model is not None]
    return pool_demands(cfg, len(models) < len(cfg.reward.functions), models)


def custom_resources_needed(cfg: JobConfig) -> dict[str, float]:
    """Custom resources all pools ask for together (an embedded Ray offers them: a cluster config runs on one box)."""
    total: dict[str, float] = {}
    for d in job_demands(cfg):
        for need in d.needs:
            for k, v in need.items():
                if k not in ("CPU", "GPU"):
                    total[k] = total.get(k, 0.0) + v
    return total


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


@dataclass
class InFlight:
    """Groups submitted and not yet collected: the requests per chunk and each chunk's result (an ObjectRef)."""

    chunks: list[list[GroupRequest]]
    refs: list[ray.ObjectRef]
    sampling: SamplingParams
    prompts_per_call: int
    score: bool
    generated: list[ray.ObjectRef]  # each chunk's generate result, the first link of its chain

    def wait_generated(self) -> None:
        """Block until every chunk has been generated (rewards and scoring may still run); a dead worker's
        error is left for `Pools.finish_groups` to handle."""
        ray.wait(self.generated, num_returns=len(self.generated), fetch_local=False)


class Pools:
    """Every actor of a job; methods fan work out round-robin and gather it back."""

    @staticmethod
    def critic_path(cfg: JobConfig, model_path: str) -> str | None:
        """Where the value model starts (PPO), or None without a critic."""
        if not uses_critic(cfg):
            return None
        return str(Path(cfg.critic.init).expanduser().resolve()) if cfg.critic.init else model_path

    def __init__(self, cfg: JobConfig, model_path: str, rewards: list[RewardSpec | tuple]):
        """`rewards`: resolved reward entries (paths absolute); `(label, "module:function", weight)` tuples work too.

        Every pool's bundles are reserved first (`orchestrator.placement`), then its actors start inside them."""
        m = cfg.model
        device = "cuda" if cfg.trainer.num_gpus > 0 else "cpu"
        common = dict(model_path=model_path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        r, s, t, rw, c = cfg.rollout, cfg.scoring, cfg.trainer, cfg.reward, cfg.critic
        specs = [x if isinstance(x, RewardSpec) else RewardSpec(*x) for x in rewards]
        functions = [x for x in specs if x.model is None]
        models = [x for x in specs if x.model is not None]
        self.demands = pool_demands(cfg, len(functions) > 0, [x.num_gpus for x in models])
        # An embedded Ray has all it will ever have; a cluster may still be scaling up, so there we only wait.
        embedded = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        self.placement = Placement(self.demands, cfg.placement.colocate, cfg.placement.strategy,
                                   cfg.ray.startup_timeout_s, fail_fast=embedded)
        self.rollout, self.reward, self.reward_models, self.scoring = [], [], [], []
        self.trainers, self.critics = [], []
        self.weight_sync = r.vllm.weight_sync if r.engine == "vllm" else "object_store"
        self.scoring_holds_policy = cfg.algorithm.old_logprobs == "recompute"  # else pi_old is the rollout's
        engine_options = r.vllm.model_dump() if r.engine == "vllm" else {}
        try:
            self._make = {
                "rollout": lambda i: self._actor(RolloutWorker, "rollout", i, _CPU_ENV).remote(
                    engine=r.engine, threads=r.threads, seed=cfg.loop.seed,  # samples depend on prompts, not workers
                    device="cuda" if r.num_gpus > 0 else "cpu", engine_options=engine_options, **common),
                "reward": lambda i: self._actor(RewardWorker, "reward", i, _CPU_ENV).remote(
                    functions, rw.failure_score, rw.timeout_s, rw.num_processes),
                "scoring": lambda i: self._actor(ScoringWorker, "scoring", i, _CPU_ENV).remote(
                    with_reference=cfg.algorithm.kl_coef > 0, temperature=r.temperature,
                    micro_batch_size=s.micro_batch_size, threads=s.threads, device="cuda" if s.num_gpus > 0 else "cpu",
                    value_model=self.critic_path(cfg, model_path),
                    with_policy=self.scoring_holds_policy, share_prompts=m.share_prompt_forward, **common),
            }
            self.rollout = [self._make["rollout"](i) for i in range(r.num_workers)]
            self.reward = [self._make["reward"](i) for i in range(rw.num_workers if functions else 0)]
            self.reward_models = [  # one worker per model; every chunk of groups passes through each
                self._actor(RewardModelWorker, "reward_model", i, _CPU_ENV).remote(
                    x.label, x.model, x.weight, x.batch_size or 32, rw.failure_score,
                    device="cuda" if x.num_gpus > 0 else "cpu")
                for i, x in enumerate(models)
            ]
            self.scoring = [self._make["scoring"](i) for i in range(s.num_workers if needs_scoring(cfg) else 0)]
            batch = cfg.loop.prompts_per_step * r.group_size
            self.grad_accum, trainer_cfg = _rank_split(t.model_dump(), batch, t.num_workers)
            self.trainers = [
                self._actor(PolicyTrainer, "trainer", rank, None if device == "cuda" else _CPU_ENV).remote(
                    rank, t.num_workers, m.model_dump() | {"path": model_path}, trainer_cfg,
                    cfg.algorithm.model_dump(), r.temperature, r.max_new_tokens, self.grad_accum,
                    cfg.loop.steps, cfg.loop.seed, device)
                for rank in range(t.num_workers)
            ]
            if uses_critic(cfg):
                accum, critic_cfg = _rank_split(t.model_dump() | {"lr": c.lr}, batch, c.num_workers)
                self.critics = [
                    self._actor(CriticTrainer, "critic", rank, None if c.num_gpus > 0 else _CPU_ENV).remote(
                        rank, c.num_workers, m.model_dump() | {"path": self.critic_path(cfg, model_path)},
                        critic_cfg, c.value_clip, cfg.algorithm.agg, accum, cfg.loop.steps, cfg.loop.seed,
                        "cuda" if c.num_gpus > 0 else "cpu")
                    for rank in range(c.num_workers)
                ]
            wait_constructed([(d, self._workers(d.name)) for d in self.demands], self.placement.remaining_s())
            self.num_params = _join(self.trainers)
            if self.critics:
                _join(self.critics)
        except BaseException:
            self.shutdown()  # nothing started so far keeps holding resources
            raise
        self._cycle = {name: itertools.count() for name in ("rollout", "reward", "scoring")}
        self._errors_shown: set[str] = set()
        self.version = 0  # the policy version every rollout and scoring worker serves
        self.restarts = {name: 0 for name in self._make}  # workers replaced after they died
        self._nccl_ready = False  # rollout.vllm.weight_sync: nccl joins its group at the first sync
        self.zero3 = t.zero_stage == 3

    def _actor(self, cls: type, pool: str, index: int, runtime_env: dict | None):
        """`cls` as a Ray actor class for worker `index` of `pool`: its resources, inside its bundle."""
        need = dict(self.placement.pools[pool].needs[index])
        cpus, gpus = need.pop("CPU", 0.0), need.pop("GPU", 0.0)
        return ray.remote(cls).options(num_cpus=cpus, num_gpus=gpus, resources=need or None, runtime_env=runtime_env,
                                       **self.placement.options(pool, index))

    def _workers(self, pool: str) -> list:
        return {"rollout": self.rollout, "reward": self.reward, "reward_model": self.reward_models,
                "scoring": self.scoring, "trainer": self.trainers, "critic": self.critics}[pool]

    def run_groups(self, requests: list[GroupRequest], sampling: SamplingParams, prompts_per_call: int,
                   score: bool = True, max_rounds: int = 3) -> list[Group]:
        """Every request's group, in request order: `finish_groups(start_groups(...))`."""
        return self.finish_groups(self.start_groups(requests, sampling, prompts_per_call, score), max_rounds)

    def start_groups(self, requests: list[GroupRequest], sampling: SamplingParams, prompts_per_call: int,
                     score: bool = True) -> InFlight:
        """Submit every request's group through `submit_groups` and return at once (collect with `finish_groups`)."""
        chunks = [requests[lo : lo + prompts_per_call] for lo in range(0, len(requests), prompts_per_call)]
        generated: list[ray.ObjectRef] = []
        refs = [self.submit_groups(chunk, sampling, prompts_per_call, score, generated)[0] for chunk in chunks]
        return InFlight(chunks, refs, sampling, prompts_per_call, score, generated)

    def finish_groups(self, flight: InFlight, max_rounds: int = 3) -> list[Group]:
        """The groups of `flight`, in request order. When a rollout, reward or scoring worker dies (killed, OOM,
        node lost), it is replaced, gets the current weights, and the chunks that had not come back are issued
        again, up to `max_rounds` times: no group is lost and none is counted twice (a chunk's groups are taken
        whole, from the one attempt that finished)."""
        chunks = flight.chunks
        done: dict[int, list[Group]] = {}
        for attempt in range(max_rounds + 1):
            todo = [i for i in range(len(chunks)) if i not in done]
            refs = flight.refs if attempt == 0 else [
                self.submit_groups(chunks[i], flight.sampling, flight.prompts_per_call, flight.score)[0] for i in todo]
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
                workers[i] = self._make[name](i)
                self.restarts[name] += 1
                replaced.append(name)
                if name == "rollout" and self.weight_sync == "nccl":
                    self.weight_sync = "object_store"  # the broadcast group lost a member: reload from files from now on
                if (name == "rollout" or (name == "scoring" and self.scoring_holds_policy)) and self.version:
                    policy = policy or self._rank0(self.trainers, "state_dict")
                    ray.get(workers[i].load_weights.remote(policy, self.version))
                if name == "scoring" and self.critics:
                    critic = critic or self._rank0(self.critics, "state_dict")
                    ray.get(workers[i].load_value_weights.remote(critic))
        return replaced

    def _next(self, name: str):
        workers = getattr(self, name)
        return workers[next(self._cycle[name]) % len(workers)]

    def submit_groups(self, requests: list[GroupRequest], sampling: SamplingParams, prompts_per_call: int,
                      score: bool = True, generated: list | None = None) -> list[ray.ObjectRef]:
        """Chain generate → reward functions → reward models (→ score) per chunk of prompts; each chunk
        streams on its own, and consecutive chunks go to the next RewardWorker (round-robin). `generated`,
        when given, receives each chunk's generate result (to wait for generation alone)."""
        refs = []
        for lo in range(0, len(requests), prompts_per_call):
            groups = self._next("rollout").generate.remote(requests[lo : lo + prompts_per_call], sampling)
            if generated is not None:
                generated.append(groups)
            if self.reward:
                groups = self._next("reward").score.remote(groups)
            for rm in self.reward_models:
                groups = rm.score.remote(groups)
            if score and self.scoring:  # an empty pool: nothing to score (see `needs_scoring`)
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

    def start_train(self, shards: list[list[dict]] | None, critic_shards: list[list[dict]] | None = None
                    ) -> tuple[list, list]:
        """Start one training step on every policy rank and (PPO) every critic rank, side by side (`finish_train`
        waits for it). `shards` None leaves the policy as it is (critic warm-up)."""
        policy = [tr.train_step.remote([compact(mb) for mb in sh]) for tr, sh in zip(self.trainers, shards or [])]
        critic = [cr.train_step.remote([compact(mb) for mb in sh]) for cr, sh in zip(self.critics, critic_shards or [])]
        # `.remote()` returns before Ray's own threads have sent the task; when this thread went straight on to
        # Python work (the caller's metrics), the trainers started ~2 ms later than when it slept 1 ms first.
        # The caller waits for the trainers anyway, so the pause costs nothing.
        time.sleep(0.001)
        return policy, critic

    @staticmethod
    def finish_train(started: tuple[list, list]) -> tuple[list[dict], list[dict]]:
        """The per-rank stats of the policy and critic ranks of a `start_train`."""
        return ray.get(started[0]), ray.get(started[1])

    def sync_weights(self, version: int, policy: bool = True) -> list[int]:
        """Trainer rank 0's weights, put once into the object store (one ObjectRef passed to every receiver, which
        reads it zero-copy: `actors.weights.unpack_state_dict`), loaded by every rollout worker and every scoring
        worker holding a policy copy (with `rollout.vllm.weight_sync: nccl` the rollout workers receive an NCCL
        broadcast instead); the critic's rank 0 weights go to the scoring workers' critic copies. The versions
        now served."""
        critic = self._rank0(self.critics, "state_dict") if self.critics else None
        waits = [w.load_value_weights.remote(critic) for w in self.scoring] if critic is not None else []
        if policy:
            nccl = self.weight_sync == "nccl"
            receivers = self.policy_scorers if nccl else self.rollout + self.policy_scorers
            refs = []
            if receivers:
                packed = self._rank0(self.trainers, "state_dict")
                refs = [w.load_weights.remote(packed, version) for w in receivers]
            versions = (self._nccl_sync(version) if nccl else []) + ray.get(refs)  # the broadcast overlaps the loads
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
        """(version, checksum) of every rollout worker and every scoring worker that holds a policy copy."""
        return ray.get([w.weights_version.remote() for w in self.rollout + self.policy_scorers])

    @property
    def policy_scorers(self) -> list:
        """The scoring workers that hold a policy copy (`algorithm.old_logprobs: recompute`) and so take weights."""
        return self.scoring if self.scoring_holds_policy else []

    def trainer_checksums(self) -> list[str]:
        return ray.get([tr.weights_checksum.remote() for tr in self.trainers])

    def save_policy(self, path: str) -> str:
        """The policy as a Hugging Face checkpoint at `path`, written by rank 0."""
        return ray.get(self._rank0(self.trainers, "save_pretrained", path))

    def _rank0(self, ranks: list, method: str, *args) -> ray.ObjectRef:
        """Rank 0's answer to `method` as an object ref; under ZeRO-3 the other ranks are called too, since
        gathering the sharded parameters takes them all (their answers are not needed)."""
        if self.zero3:
            ray.get([getattr(r, method).remote(*args, **({"pack": False} if method == "state_dict" else {}))
                     for r in ranks[1:]] + [ref := getattr(ranks[0], method).remote(*args)])
            return ref
        return getattr(ranks[0], method).remote(*args)

    def _nccl_sync(self, version: int) -> list[int]:
        """Broadcast the policy from trainer rank 0 into every vLLM rollout worker over the NCCL weight group
        (formed at the first sync); the versions the workers report serving afterwards (the handshake)."""
        from actors.engines.vllm import weight_group_ranks

        if not self._nccl_ready:
            world, offsets = weight_group_ranks(ray.get([w.tensor_parallel_size.remote() for w in self.rollout]))
            addr, port = ray.get(self.trainers[0].init_weight_sender.remote(world))
            ray.get([w.init_weight_group.remote(addr, port, offset, world) for w, offset in zip(self.rollout, offsets)]
                    + [self.trainers[0].join_weight_group.remote()])
            self._nccl_ready = True
        meta = ray.get(self._rank0(self.trainers, "weight_meta"))
        receive = [w.receive_weights.remote(meta, version) for w in self.rollout]
        send = [tr.send_weights.remote() for tr in (self.trainers if self.zero3 else self.trainers[:1])]
        ray.get(send)
        return ray.get(receive)

    def shutdown(self) -> None:
        """Kill every actor and give back the reserved bundles."""
        for a in self.rollout + self.reward + self.reward_models + self.scoring + self.trainers + self.critics:
            ray.kill(a)  # a RewardWorker's subprocesses die with it (PR_SET_PDEATHSIG)
        self.placement.remove()


def gather(refs: list[ray.ObjectRef]) -> list[Group]:
    """Results of chained calls, flattened to groups in request order (deterministic batches)."""
    return [g for chunk in ray.get(refs) for g in chunk]
