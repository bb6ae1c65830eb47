"""Every actor of a job, built from its pool specs (`orchestrator.pool_specs`): groups stream through the rollout,
reward and scoring pools with dead workers replaced; training fans out to the trainer (and critic) ranks; weights
move with `orchestrator.weight_sync`."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.batch import compact
from actors.deepspeed_ops import OpLockTimeout
from actors.records import Group, PromptRequest, RewardSpec, SamplingParams, Shard
from actors.weights import WeightBoard
from orchestrator.config import JobConfig
from orchestrator.failures import WORKER_LOST
from orchestrator.placement import Placement, PlacementError, wait_constructed
from orchestrator.pool_specs import PoolSpec, placed_threads, pool_specs, reference_on_trainers
from orchestrator.weight_sync import WeightSync

__all__ = ["Pools", "PlacementError"]


REPLACEABLE = ("rollout", "env", "reward", "reward_model", "scoring")  # pools whose dead workers are replaced


def _dead(workers: list, busy_s: float = 5.0) -> list[int]:
    """Indices of the dead `workers`: all are pinged at once; a dead one fails at once, and a busy one (its ping
    queued behind work) counts as alive when `busy_s` passes without an answer."""
    pings = [w.__ray_ready__.remote() for w in workers]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=busy_s)
    dead = []
    for i, ping in enumerate(pings):
        if ping in ready:
            try:
                ray.get(ping)
            except ray.exceptions.RayActorError:
                dead.append(i)
    return dead


def _join(ranks: list) -> int:
    """Rank 0 picks the rendezvous; every rank joins the process group and builds its engine. Parameters.
    OpLockTimeout (a rank waited too long for another process building DeepSpeed's op) arrives as itself."""
    addr, port = ray.get(ranks[0].rendezvous.remote())
    try:
        return ray.get([r.setup.remote(addr, port) for r in ranks])[0]
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, OpLockTimeout):
            raise e.cause from None
        raise


@dataclass
class InFlight:
    """Groups submitted and not yet collected: the requests per chunk and each chunk's result (an ObjectRef)."""

    chunks: list[list[PromptRequest]]
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

    def __init__(self, cfg: JobConfig, model_path: str, rewards: list[RewardSpec | tuple]):
        """`rewards`: resolved reward entries (paths absolute); `(label, "module:function", weight)` tuples work too.

        Every pool's bundles are reserved first (`orchestrator.placement`), then its actors start inside them."""
        specs = pool_specs(cfg, model_path, [x if isinstance(x, RewardSpec) else RewardSpec(*x) for x in rewards])
        self.demands = [spec.demand for spec in specs]
        # An embedded Ray has all it will ever have; a cluster may still be scaling up, so there we only wait.
        embedded = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        self.placement = Placement(self.demands, cfg.placement.colocate, cfg.placement.strategy,
                                   cfg.ray.startup_timeout_s, fail_fast=embedded)
        self.workers: dict[str, list] = {spec.name: [] for spec in specs}
        self._names: dict[str, str] = {}  # actor id (hex) -> "rollout worker 1", "trainer rank 0", ...
        self.scoring_holds_policy = cfg.algorithm.old_logprobs == "recompute"  # else pi_old is the rollout's
        self.reference_on_trainers = reference_on_trainers(cfg)  # LoRA: the trainers' base, adapters disabled
        try:
            specs = placed_threads(cfg, specs, self.placement)  # "auto" threads follow where each worker landed
            self.specs = {spec.name: spec for spec in specs}
            for spec in specs:
                self.workers[spec.name] = [self._start(spec, i) for i in range(len(spec.needs))]
            wait_constructed([(d, self.workers[d.name]) for d in self.demands], self.placement.remaining_s())
            self.num_params = _join(self.trainers)
            if self.critics:
                _join(self.critics)
        except BaseException:
            self.shutdown()  # nothing started so far keeps holding resources
            raise
        # Partial rollouts: where each new policy version is posted for the rollout workers to take mid-sequence.
        self.board = ray.remote(WeightBoard).options(num_cpus=0).remote() if cfg.rollout.partial else None
        self._cycle = {name: itertools.count() for name in ("rollout", "reward", "scoring")}
        self._errors_shown: set[str] = set()
        self.version = 0  # the policy version every rollout and scoring worker serves
        self.restarts = {name: 0 for name in REPLACEABLE}  # workers replaced after they died
        r = cfg.rollout
        self.sync = WeightSync(self, r.vllm.weight_sync if r.engine == "vllm" else "object_store",
                               zero3=cfg.trainer.zero_stage == 3)

    board = None  # the WeightBoard actor under rollout.partial (set in __init__ after the pools start)
    rollout = property(lambda self: self.workers["rollout"], doc="RolloutWorkers")
    envs = property(lambda self: self.workers.get("env", []), doc="EnvHosts (multi-turn rollouts; none without env)")
    reward = property(lambda self: self.workers["reward"], doc="RewardWorkers (none when every reward is a model)")
    reward_models = property(lambda self: self.workers["reward_model"], doc="one RewardModelWorker per reward model")
    scoring = property(lambda self: self.workers["scoring"], doc="ScoringWorkers (none when they have no work)")
    trainers = property(lambda self: self.workers["trainer"], doc="PolicyTrainer ranks")
    critics = property(lambda self: self.workers["critic"], doc="CriticTrainer ranks (PPO with GAE)")

    def _start(self, spec: PoolSpec, index: int):
        """Worker `index` of a pool as a Ray actor, with its resources, inside its bundle."""
        need = dict(spec.needs[index])
        cpus, gpus = need.pop("CPU", 0.0), need.pop("GPU", 0.0)
        actor = ray.remote(spec.actor).options(num_cpus=cpus, num_gpus=gpus, resources=need or None,
                                               runtime_env=spec.runtime_env,
                                               **self.placement.options(spec.name, index))
        handle = actor.remote(**spec.kwargs[index])
        role = "rank" if spec.name in ("trainer", "critic") else "worker"
        self._names[handle._actor_id.hex()] = f"{spec.name.replace('_', ' ')} {role} {index}"
        return handle

    def describe(self, error: BaseException) -> str:
        """Which actor of this job `error` (a dead actor's) came from: "rollout worker 1", "trainer rank 0", ...;
        "an actor" when Ray does not say."""
        return self._names.get(getattr(error, "actor_id", None) or "", "an actor")

    def replaceable(self, error: BaseException) -> bool:
        """Whether `error` is a worker lost from a pool whose workers are replaced (not a trainer or critic rank)."""
        return isinstance(error, WORKER_LOST) and not self.describe(error).startswith(("trainer ", "critic "))

    def run_groups(self, requests: list[PromptRequest], sampling: SamplingParams, prompts_per_call: int,
                   score: bool = True, max_rounds: int = 3) -> list[Group]:
        """Every request's group, in request order: `finish_groups(start_groups(...))`."""
        return self.finish_groups(self.start_groups(requests, sampling, prompts_per_call, score), max_rounds)

    def start_groups(self, requests: list[PromptRequest], sampling: SamplingParams, prompts_per_call: int,
                     score: bool = True) -> InFlight:
        """Submit every request's group through `submit_groups` and return at once (collect with `finish_groups`)."""
        chunks = [requests[lo : lo + prompts_per_call] for lo in range(0, len(requests), prompts_per_call)]
        generated: list[ray.ObjectRef] = []
        refs = [self.submit_groups(chunk, sampling, prompts_per_call, score, generated)[0] for chunk in chunks]
        return InFlight(chunks, refs, sampling, prompts_per_call, score, generated)

    def finish_groups(self, flight: InFlight, max_rounds: int = 3) -> list[Group]:
        """The groups of `flight`, in request order. When a rollout, environment, reward or scoring worker dies (killed,
        OOM, node lost), it is replaced, gets the current weights, and the chunks that had not come back are issued
        again, up to `max_rounds` times: no group is lost and none is counted twice (a chunk's groups are taken
        whole, from the one attempt that finished). The dead worker may already have been replaced by the time
        its chunks fail (a prefetched round outlives a weight sync): they are issued again all the same."""
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
                except WORKER_LOST as e:
                    failed = e
            if failed is None:
                break
            if attempt == max_rounds:
                raise failed
            self.replace_dead()
        return [g for i in range(len(chunks)) for g in done[i]]

    def replace_dead(self, tries: int = 3) -> list[str]:
        """Start a fresh worker for every dead rollout, environment, reward, reward-model and scoring worker and bring
        it to the current weights (a replacement that dies on the way is replaced again, `tries` times); the pools
        that lost one (empty when all are alive)."""
        replaced = []
        for name in REPLACEABLE:
            workers = self.workers[name]
            for i in _dead(workers) if workers else []:
                for attempt in range(tries):
                    workers[i] = self._start(self.specs[name], i)
                    self.restarts[name] += 1
                    try:
                        self.sync.bring_up(name, workers[i])
                        break
                    except WORKER_LOST:
                        if attempt == tries - 1:
                            raise
                replaced.append(name)
        return replaced

    def _next(self, name: str):
        workers = self.workers[name]
        return workers[next(self._cycle[name]) % len(workers)]

    def submit_groups(self, requests: list[PromptRequest], sampling: SamplingParams, prompts_per_call: int,
                      score: bool = True, generated: list | None = None) -> list[ray.ObjectRef]:
        """Chain generate → reward functions → reward models (→ score) per chunk of prompts; each chunk
        streams on its own, and consecutive chunks go to the next RewardWorker (round-robin). `generated`,
        when given, receives each chunk's generate result (to wait for generation alone)."""
        refs = []
        for lo in range(0, len(requests), prompts_per_call):
            groups = self._next("rollout").generate.remote(requests[lo : lo + prompts_per_call], sampling,
                                                           *([self.envs] if self.envs else []),
                                                           **({"board": self.board} if self.board else {}))
            if generated is not None:
                generated.append(groups)
            if self.reward:
                groups = self._next("reward").reward.remote(groups)
            for rm in self.reward_models:
                groups = rm.reward.remote(groups)
            if score and self.scoring:  # an empty pool: nothing to score (see `needs_scoring`)
                groups = self._next("scoring").score.remote(groups)
            refs.append(groups)
        return refs

    def score_reference(self, groups: list[Group]) -> list[Group]:
        """The reference log-probs of `groups` from the trainer ranks (`model.lora.reference: trainer`): each rank
        scores a contiguous share with its own base model, adapters disabled; the groups come back in order."""
        n = len(self.trainers)
        shares = [groups[i * len(groups) // n : (i + 1) * len(groups) // n] for i in range(n)]
        done = ray.get([tr.score_reference.remote(share) for tr, share in zip(self.trainers, shares) if share])
        return [g for share in done for g in share]

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

    def start_train(self, shards: list[list[Shard]] | None, critic_shards: list[list[Shard]] | None,
                    kl_coef: float) -> tuple[list, list]:
        """Start one training step on every policy rank (β of its KL-in-loss term: `kl_coef`) and (PPO) every
        critic rank, side by side (`finish_train` waits for it). `shards` None leaves the policy as it is (critic
        warm-up)."""
        policy = [tr.train_step.remote([compact(s) for s in sh], kl_coef) for tr, sh in zip(self.trainers, shards or [])]
        critic = [cr.train_step.remote([compact(s) for s in sh]) for cr, sh in zip(self.critics, critic_shards or [])]
        # `.remote()` returns before Ray's own threads have sent the task; when this thread went straight on to
        # Python work (the caller's metrics), the trainers started ~2 ms later than when it slept 1 ms first.
        # The caller waits for the trainers anyway, so the pause costs nothing.
        time.sleep(0.001)
        return policy, critic

    @staticmethod
    def finish_train(started: tuple[list, list]) -> tuple[list[dict], list[dict]]:
        """The per-rank stats of the policy and critic ranks of a `start_train`."""
        return ray.get(started[0]), ray.get(started[1])

    def sync_weights(self, version: int, policy: bool = True, wait: bool = True) -> list[int]:
        """The trainers' weights into every worker that serves them (`WeightSync.sync`); the versions now served
        (none when `wait` is False: the loads are left queued behind the work submitted before, see
        `WeightSync.settle`)."""
        return self.sync.sync(version, policy, wait=wait)

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
        return ray.get(self.sync.rank0(self.trainers, "save_pretrained", path))

    def shutdown(self) -> None:
        """Kill every actor and give back the reserved bundles."""
        for a in itertools.chain(*self.workers.values(), [self.board] if self.board else []):
            ray.kill(a)  # a RewardWorker's subprocesses die with it (PR_SET_PDEATHSIG)
        self.placement.remove()

