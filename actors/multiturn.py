"""Multi-turn rollouts: G trajectories per prompt, each alternating a sampled turn with a step of its own environment
instance (held by an `actors.env_host.EnvHost`) until the environment says done or a limit ends it.

Token in, token out: a trajectory's response is the ids the model sampled, turn after turn, with each observation's
ids (tokenized once when appended, `actors.turn_format`) between them; nothing is re-tokenized. Only sampled ids
carry loss (`Sample.loss_mask`). Every live trajectory's turn is generated in one engine call, and their steps go
to the hosts all at once and run concurrently there, so a slow step costs its own wall time, not the sum. The hf
engine prefills each turn's context anew (ids, not text); vLLM reuses the shared prefix's KV cache (automatic
prefix caching)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field

from actors.env_host import EnvHost, EnvResult
from actors.records import Completion, Group, PromptRequest, Sample, SamplingParams
from actors.turn_format import TurnFormat

ENV_LABEL = "env"  # the reward part (and failure count) of the environments' rewards: reward/env, reward/env/failures


@dataclass(frozen=True)
class EnvLimits:
    """When a trajectory ends besides `done`, and what a failed one scores. `prompt_key`: the field the row's prompt
    text is under when it reaches `reset`; `client_timeout_s`: how long the rollout waits for a host at all;
    `patience_s`: how long a batch of steps is waited for before the trajectories whose steps are done go on."""

    max_turns: int = 4
    max_total_tokens: int = 256
    failure_score: float = 0.0
    prompt_key: str = "prompt"
    client_timeout_s: float = 60.0
    patience_s: float = 0.5  # how long a turn's batch of steps is waited for before ready trajectories go on


class EnvClient:
    """The rollout side of the environment hosts: Ray actor handles, or `EnvHost` objects run in this process (on an
    event loop of the client's own, so steps left running between calls go on). Calls go out as one batch per host,
    all hosts at once; the results come back in call order."""

    def __init__(self, hosts: list):
        if not hosts:
            raise ValueError("multi-turn rollouts need at least one environment host")
        self.hosts = hosts
        self.local = isinstance(hosts[0], EnvHost)
        self._loop = None
        if self.local:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True, name="env-client").start()

    def call(self, method: str, calls: list[tuple[int, object]], timeout_s: float, *args) -> list[EnvResult | None]:
        """`method` of host h on the batch of its items, for every (host h, item) of `calls`, with `args` after the
        batch. A host that dies raises Ray's error (the rollout's caller replaces it and issues the chunk again); one
        that does not answer within `timeout_s` fails the items it holds."""
        by_host: dict[int, list[int]] = {}
        for i, (h, _) in enumerate(calls):
            by_host.setdefault(h, []).append(i)
        batches = {h: [calls[i][1] for i in idx] for h, idx in by_host.items()}
        if self.local:
            async def run_all():
                return await asyncio.gather(*[getattr(self.hosts[h], method)(b, *args) for h, b in batches.items()])
            answers = dict(zip(batches, asyncio.run_coroutine_threadsafe(run_all(), self._loop).result()))
        else:
            import ray

            refs = {h: getattr(self.hosts[h], method).remote(b, *args) for h, b in batches.items()}
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
            late = [EnvResult(error="timeout", trace=f"its environment host gave no answer within {timeout_s:g} s")]
            answers = {h: ray.get(r) if r in ready else late * len(batches[h]) for h, r in refs.items()}
        out: list[EnvResult | None] = [None] * len(calls)
        for h, idx in by_host.items():
            for i, res in zip(idx, answers[h]):
                out[i] = res
        return out

    def close(self, by_host: dict[int, list[str]]) -> None:
        """Drop finished trajectories' instances (fire and forget on Ray) and stop the local event loop."""
        if self.local:
            for h, tids in by_host.items():
                asyncio.run_coroutine_threadsafe(self.hosts[h].close(tids), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
        else:
            for h, tids in by_host.items():
                self.hosts[h].close.remote(tids)


@dataclass
class Trajectory:
    """One trajectory being rolled out: where its environment lives and what it has so far."""

    request: int
    index: int  # in its group
    tid: str
    host: int
    prompt: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # response: sampled and observation ids
    logp: list[float] = field(default_factory=list)  # rollout log-prob per response id, 0 on observation ids
    mask: list[int] = field(default_factory=list)  # 1 where the model sampled the id
    text: list[str] = field(default_factory=list)  # the transcript's pieces after the prompt
    turns: list[dict] = field(default_factory=list)
    env_reward: float = 0.0
    error: tuple[str, str] | None = None  # (kind, traceback) of a failed environment call
    done: bool = False
    finish: str = "stop"
    truncated: str | None = None  # "max_turns" | "max_total_tokens"
    metrics: dict[str, float] = field(default_factory=dict)  # the environment's own counters, last seen

    def fail(self, result: EnvResult) -> None:
        self.error, self.done, self.finish = (result.error, result.trace), True, "stop"

    def end(self, reason: str) -> None:
        self.done, self.finish, self.truncated = True, "length", reason


def rollout_trajectories(engine, envs: EnvClient, fmt: TurnFormat, requests: list[PromptRequest],
                         sampling: SamplingParams, seed: int, limits: EnvLimits, version: int,
                         reported: set[str]) -> list[Group]:
    """`sampling.n` trajectories per request, as groups whose samples carry the loss mask, the turns, and the
    environments' summed reward (reward part "env"; `failure_score` for a trajectory whose environment failed).
    `reported`: the caller's memory of failure kinds already shown (each is shown once).

    The trajectories ready for a turn are generated together, then their steps sent; steps that take longer than
    `limits.patience_s` are left running and their trajectories rejoin a later turn, so one slow step holds up
    only its own trajectory."""
    n, nonce = sampling.n, uuid.uuid4().hex[:8]
    trajs = [Trajectory(i, g, f"{nonce}:{r.uid}:{g}", (i * n + g) % len(envs.hosts))
             for i, r in enumerate(requests) for g in range(n)]
    clock = _Clock()
    with clock:
        resets = envs.call("reset", [(t.host, (t.tid, {limits.prompt_key: requests[t.request].prompt,
                                                        **requests[t.request].row})) for t in trajs],
                           limits.client_timeout_s)
    _start_prompts(trajs, resets, requests, fmt)
    ready, waiting, calls = [t for t in trajs if not t.done], [], 0
    while ready or waiting:
        if ready:
            comps = _generate_turn(engine, ready, trajs, sampling, seed + 7919 * calls, calls == 0)
            calls += 1
            steppers = [t for t, c in zip(ready, comps) if _take_turn(t, c, limits, engine.tokenizer)]
            with clock:
                answers = envs.call("step", [(t.host, (t.tid, t.turns[-1]["action"])) for t in steppers],
                                    limits.client_timeout_s, limits.patience_s)
            pending = steppers
        else:
            with clock:
                answers = envs.call("collect", [(t.host, t.tid) for t in waiting], limits.client_timeout_s,
                                    limits.client_timeout_s)
            pending, waiting = waiting, []
        ready = []
        for t, res in zip(pending, answers):
            if res is None:  # still running on its host
                waiting.append(t)
                continue
            _apply_step(t, res, len(t.turns) == limits.max_turns, limits, fmt)
            if not t.done:
                ready.append(t)
    by_host: dict[int, list[str]] = {}
    for t in trajs:
        by_host.setdefault(t.host, []).append(t.tid)
    envs.close(by_host)
    return _groups(trajs, requests, n, version, limits, clock.seconds, reported)


class _Clock:
    """Seconds spent inside its `with` blocks (the rollout's wait on the environments)."""

    seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start
        return False


def _start_prompts(trajs: list[Trajectory], resets: list[EnvResult], requests: list[PromptRequest],
                   fmt: TurnFormat) -> None:
    """Each trajectory's first prompt: its reset text, tokenized once per group (the request's own ids when the
    text is the request's prompt). The G instances of a prompt must agree on it: a group is G tries at one prompt."""
    first: dict[int, tuple[str, list[int]]] = {}
    for t, res in zip(trajs, resets):
        if res.error is not None:
            t.fail(res)
            continue
        if t.request not in first:
            req = requests[t.request]
            ids = req.prompt_ids if res.text == req.prompt and fmt.kind == "plain" else fmt.prompt_ids(res.text)
            first[t.request] = (res.text, ids)
        text, ids = first[t.request]
        if res.text != text:
            t.fail(EnvResult(error="bad_return", trace=f"reset returned {res.text!r:.200} for a row whose other "
                             f"instance returned {text!r:.200}: the G instances of a row must start alike"))
        t.prompt, t.prompt_ids = text, ids
    for t in trajs:
        if t.prompt is None:
            t.prompt, t.prompt_ids = first.get(t.request, (requests[t.request].prompt, requests[t.request].prompt_ids))


def _generate_turn(engine, live: list[Trajectory], trajs: list[Trajectory], sampling: SamplingParams, seed: int,
                   first: bool) -> list[Completion]:
    """One completion per live trajectory: on the first turn G per prompt (each prompt prefilled once), after it
    one per trajectory's whole context."""
    if not first:
        out = engine.generate([t.prompt_ids + t.ids for t in live], dataclasses.replace(sampling, n=1), seed)
        return [c[0] for c in out]
    asked = sorted({t.request for t in live})
    out = engine.generate([next(t.prompt_ids for t in trajs if t.request == i) for i in asked], sampling, seed)
    by_request = dict(zip(asked, out))
    return [by_request[t.request][t.index] for t in live]


def _take_turn(t: Trajectory, c: Completion, limits: EnvLimits, tokenizer) -> bool:
    """Append a sampled turn (cut to the token budget); whether the environment should now take a step."""
    room = limits.max_total_tokens - len(t.ids)
    ids, logp = c.token_ids[:room], c.logprobs[:room]
    t.ids += ids
    t.logp += logp
    t.mask += [1] * len(ids)
    action = c.text if len(ids) == len(c.token_ids) else tokenizer.decode(ids, skip_special_tokens=True)
    t.text.append(action)
    t.turns.append({"action": action, "sampled_tokens": len(ids), "end": len(t.ids) - 1,
                    "ended_turn": bool(ids) and ids[-1] == tokenizer.eos_token_id, "reward": 0.0, "observation": None,
                    "observation_tokens": 0})
    if len(ids) < len(c.token_ids) or (len(t.ids) >= limits.max_total_tokens and c.finish_reason == "length"):
        t.end("max_total_tokens")
        return False
    return True


def _apply_step(t: Trajectory, res: EnvResult, last_turn: bool, limits: EnvLimits, fmt: TurnFormat) -> None:
    """The environment's answer to the latest turn: reward, and either the end or the observation appended."""
    if res.error is not None:
        t.fail(res)
        return
    t.metrics = res.metrics or t.metrics
    t.env_reward += res.reward
    turn = t.turns[-1]
    turn["reward"] = res.reward
    if res.done:
        t.done, t.finish = True, "stop"
        return
    if last_turn:
        t.end("max_turns")
        return
    obs = fmt.observation_ids(res.text, turn["ended_turn"]) if res.text else []
    if len(t.ids) + len(obs) >= limits.max_total_tokens:  # no room left for a turn after it
        t.end("max_total_tokens")
        return
    t.ids += obs
    t.logp += [0.0] * len(obs)
    t.mask += [0] * len(obs)
    t.text.append(res.text or "")
    turn["observation"], turn["observation_tokens"] = res.text, len(obs)


def _groups(trajs: list[Trajectory], requests: list[PromptRequest], n: int, version: int, limits: EnvLimits,
            env_wait: float, reported: set[str]) -> list[Group]:
    groups = []
    for i, req in enumerate(requests):
        mine = trajs[i * n : (i + 1) * n]
        group = Group(req.uid, mine[0].prompt, req.row, mine[0].prompt_ids, [], version)
        for t in mine:
            s = Sample(t.ids, "".join(t.text), t.logp, t.finish, loss_mask=t.mask, turns=t.turns)
            score = t.env_reward
            if t.error is not None:
                score = limits.failure_score
                group.note_reward_failure(ENV_LABEL, t.error[0], t.error[1], reported)
                s.turns.append({"failed": t.error[0]})  # shown in samples.jsonl; its score is not per turn
            s.add_reward(ENV_LABEL, 1.0, score)
            group.samples.append(s)
            _count(group.env_stats, t)
        group.add_time("env", env_wait / len(requests))
        groups.append(group)
    return groups


def _count(stats: dict[str, float], t: Trajectory) -> None:
    """Add one trajectory's numbers to its group's `env_stats` (sums; `turns_max` a maximum)."""
    sampled = sum(t.mask)
    add = {"trajectories": 1, "turns": sum("action" in turn for turn in t.turns), "sampled_tokens": sampled,
           "observation_tokens": len(t.ids) - sampled, "failures": t.error is not None,
           "truncated_max_turns": t.truncated == "max_turns",
           "truncated_max_total_tokens": t.truncated == "max_total_tokens",
           "used_tool": t.metrics.get("tool_calls", 0) > 0}
    add |= {f"env_metric/{k}": v for k, v in t.metrics.items()}
    for k, v in add.items():
        stats[k] = stats.get(k, 0.0) + float(v)
    stats["turns_max"] = max(stats.get("turns_max", 0.0), float(sum("action" in turn for turn in t.turns)))
