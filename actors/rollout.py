"""RolloutWorker: a Ray actor that turns prompt requests into groups of G sampled completions."""

from __future__ import annotations

import os
import time
import zlib

from actors.engines import make_engine
from actors.modeling import set_threads
from actors.multiturn import EnvClient, EnvLimits, rollout_trajectories
from actors.records import Group, PromptRequest, Sample, SamplingParams
from actors.turn_format import TurnFormat


class RolloutWorker:
    """Serves one policy version at a time; `generate` tags every group with that version."""

    def __init__(self, engine: str, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 threads: int | None = None, seed: int = 0, device: str = "cpu", engine_options: dict | None = None,
                 env: dict | None = None, lora: dict | None = None):
        """`engine_options`: the engine's own settings (vllm: `rollout.vllm` of the config). `env`: multi-turn
        rollouts (`EnvLimits` fields and `format`: plain | chat), None for one completion per sample. `lora`
        (`model.lora`): the engine serves base + adapters, and weight syncs carry the adapters only."""
        set_threads(threads)
        self.engine = make_engine(engine, model_path=model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                  device=device, lora=lora, **(engine_options or {}))
        self.tp = (engine_options or {}).get("tensor_parallel_size", 1)
        self.seed = seed
        self.version, self.took_early = 0, False  # took_early: weights taken from a WeightBoard (partial rollouts)
        self._multiturn(env)

    def _multiturn(self, env: dict | None) -> None:
        env = dict(env or {})
        kind = env.pop("format", "plain")
        self.env_limits = EnvLimits(**env) if env else None
        self.turn_format = TurnFormat(self.engine.tokenizer, kind) if env else None
        self._reported: set[str] = set()

    @classmethod
    def serving(cls, engine, seed: int = 0, env: dict | None = None) -> RolloutWorker:
        """A worker around an engine already built (in-process evaluation of a model in memory)."""
        worker = cls.__new__(cls)
        worker.engine, worker.tp, worker.seed, worker.version, worker.took_early = engine, 1, seed, 0, False
        worker._multiturn(env)
        return worker

    def generate(self, requests: list[PromptRequest], sampling: SamplingParams, envs: list | None = None,
                 board=None) -> list[Group]:
        """Sample `sampling.n` completions per request; the seed depends on the requests and version. `envs`: the
        environment hosts (Ray handles or `EnvHost`s) when the worker was built for multi-turn rollouts. `board`
        (partial rollouts, a `WeightBoard` handle): newer weights posted there are loaded at the next token
        boundary and the sequences go on; each sample's `versions` say which version sampled each token, the
        group's `policy_version` is the version it started with."""
        start = time.perf_counter()
        key = f"{self.seed}:{self.version}:" + ",".join(r.uid for r in requests)
        seed = zlib.crc32(key.encode())
        if self.env_limits is not None:
            if not envs:
                raise ValueError("this rollout worker runs multi-turn rollouts: generate needs the environment hosts")
            groups = rollout_trajectories(self.engine, EnvClient(envs), self.turn_format, requests, sampling, seed,
                                          self.env_limits, self.version, self._reported)
            Group.spread_time(groups, "generate", time.perf_counter() - start - sum(g.timings["env"] for g in groups))
            return groups
        refresh = self._refresher(board) if board is not None else None
        started = self.version  # after `_refresher`'s first look at the board
        partial = {} if refresh is None else {"refresh": refresh, "version": started}
        completions = self.engine.generate([r.prompt_ids for r in requests], sampling, seed, **partial)
        groups = []
        for req, comps in zip(requests, completions):
            samples = [Sample(c.token_ids, c.text, c.logprobs, c.finish_reason, versions=c.versions) for c in comps]
            groups.append(Group(req.uid, req.prompt, req.row, req.prompt_ids, samples, started))
        elapsed = time.perf_counter() - start
        Group.spread_time(groups, "generate", elapsed)
        return groups

    def load_weights(self, packed: dict, version: int) -> int:
        """Serve `version` from now on; returns the version now served (a newer one, taken from the board during a
        partial rollout, stays)."""
        if version <= self.version and self.took_early:  # the board gave it (or a newer one) already
            return self.version
        self.engine.load_weights(packed, version)
        self.version = version
        return version

    def _refresher(self, board):
        """Partial rollouts: the engine's `refresh`, asked at every token boundary. It never waits: the board is asked
        in the background and its answer looked at when it has come (then asked again); weights newer than those
        served are loaded, and their version returned (else None). Before it is returned, it waits once, so a call
        starts on the newest weights posted."""
        import ray

        asked = [board.latest.remote()]

        def refresh(wait: bool = False) -> int | None:
            if not wait and not ray.wait(asked, timeout=0, fetch_local=True)[0]:
                return None
            version, refs = ray.get(asked[0])
            asked[0] = board.latest.remote()
            if version <= self.version:
                return None
            self.engine.load_weights(ray.get(refs[0]), version)
            self.version, self.took_early = version, True
            return version

        refresh(wait=True)
        return refresh

    # -- NCCL weight sync (vllm engine with weight_sync="nccl"); see Pools.sync_weights

    def tensor_parallel_size(self) -> int:
        """Ranks this worker's engine takes in the weight-update group."""
        return self.tp

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.engine.init_weight_group(master_address, master_port, rank_offset, world_size)

    def receive_weights(self, meta, version: int) -> int:
        """Take one broadcast from trainer rank 0; the version the engine reports serving after it."""
        self.version = self.engine.receive_weights(meta, version)
        return self.version

    def pid(self) -> int:
        """This actor's process id (for tests that kill it from outside)."""
        return os.getpid()

    def weights_version(self) -> tuple[int, str]:
        """(version, checksum of the weights) so callers can prove what is being served."""
        return self.version, self.engine.checksum()
