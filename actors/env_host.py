"""EnvHost: holds the environment instances of many trajectories (one instance each) and runs their `reset` and
`step` calls concurrently, each under a time limit, so one slow or stuck step never holds up the others.

As a Ray actor its methods are coroutines, so Ray runs many calls at once on its event loop; a plain `def step`
runs on a daemon thread of its own. Nothing an environment does ends the host: a call that raises, passes `timeout_s`
or returns something other than `(str | None, finite number, bool)` gives back an `EnvResult` with `error`
set, and that trajectory's instance is dropped. A synchronous step that never returns cannot be stopped from
Python: its thread is abandoned (the call still fails at `timeout_s`); `stuck` counts them.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import threading
import traceback
from dataclasses import dataclass, field

from rewards.loader import load_function


@dataclass
class EnvResult:
    """What one `reset` or `step` gave back: the text (first prompt or observation), this turn's reward, done,
    and on failure `error` (its kind) with `trace` (a traceback or description). `metrics`: the numbers the
    environment's optional `metrics` attribute holds after the call (e.g. tool calls)."""

    text: str | None = None
    reward: float = 0.0
    done: bool = False
    error: str | None = None
    trace: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


class EnvHost:
    """Environment instances keyed by trajectory id (ray.remote-ready; also used in-process through `run`)."""

    def __init__(self, name: str, kwargs: dict | None = None, timeout_s: float = 30.0, max_abs_reward: float = 1e6,
                 max_threads: int = 64):
        """`name`: the environment class, "module:Class" or "path/file.py:Class", built with `kwargs`."""
        self.cls = load_function(name)
        self.kwargs = dict(kwargs or {})
        self.timeout_s, self.max_abs_reward = timeout_s, max_abs_reward
        self.envs: dict[str, object] = {}
        self.running: dict[str, asyncio.Future] = {}  # steps answered None by `step`, still going
        self.max_threads = max_threads
        self._slots: tuple | None = None  # (event loop, semaphore of threads running a synchronous call)
        self.stuck = 0

    async def reset(self, items: list[tuple[str, dict]]) -> list[EnvResult]:
        """For each (trajectory id, dataset row): a new instance, reset with the row; its first prompt text."""
        return list(await asyncio.gather(*[self._reset(tid, row) for tid, row in items]))

    async def step(self, items: list[tuple[str, str]], patience_s: float | None = None) -> list[EnvResult | None]:
        """For each (trajectory id, the model's text for this turn): (observation, reward, done), all at once. With
        `patience_s`, the answer comes when every step is done or `patience_s` has passed, whichever is first; a step
        still running then is None here, goes on, and is picked up with `collect`."""
        tasks = [asyncio.ensure_future(self._step(tid, action)) for tid, action in items]
        if patience_s is None:
            return list(await asyncio.gather(*tasks))
        await asyncio.wait(tasks, timeout=patience_s)
        return self._take([tid for tid, _ in items], tasks)

    async def collect(self, tids: list[str], wait_s: float) -> list[EnvResult | None]:
        """The answers of steps `step` left running: those done once the first of them is (or `wait_s` passes), None
        for the others."""
        tasks = [self.running[tid] for tid in tids]
        await asyncio.wait(tasks, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        return self._take(tids, tasks)

    def _take(self, tids: list[str], tasks: list[asyncio.Future]) -> list[EnvResult | None]:
        out: list[EnvResult | None] = []
        for tid, task in zip(tids, tasks):
            if task.done():
                self.running.pop(tid, None)
                out.append(task.result())
            else:
                self.running[tid] = task
                out.append(None)
        return out

    async def _reset(self, tid: str, row: dict) -> EnvResult:
        async def start():
            env = await self._call(self.cls, **self.kwargs)
            self.envs[tid] = env
            return await self._call(env.reset, row)

        out = await self._guard(tid, start())
        if out.error is None and not isinstance(out.text, str):
            out = self._fail(tid, "bad_return", f"reset returned {type(out.text).__name__}, not the prompt text")
        return out

    async def _step(self, tid: str, action: str) -> EnvResult:
        env = self.envs.get(tid)
        if env is None:
            return EnvResult(error="lost", trace=f"no environment instance for trajectory {tid} (its host restarted)")
        out = await self._guard(tid, self._call(env.step, action))
        if out.error is not None:
            return out
        returned = out.text
        problem = _check_step(returned, self.max_abs_reward)
        if problem:
            return self._fail(tid, "bad_return", problem)
        obs, reward, done = returned
        metrics = {k: float(v) for k, v in (getattr(env, "metrics", None) or {}).items()}
        if done:
            self.envs.pop(tid, None)
        return EnvResult(obs, float(reward), bool(done), metrics=metrics)

    async def close(self, tids: list[str]) -> None:
        """Drop the instances of finished trajectories (an environment's optional `close()` is called)."""
        for tid in tids:
            env = self.envs.pop(tid, None)
            if env is not None and callable(getattr(env, "close", None)):
                try:
                    await asyncio.wait_for(self._call(env.close), self.timeout_s)
                except BaseException:  # closing is best effort
                    pass

    async def _call(self, fn, *args, **kwargs):
        """`fn` awaited if it is a coroutine function, else run on a daemon thread of its own, at most `max_threads`
        at once (a thread given up on at the timeout frees its slot; a step that never returns must not keep the
        process from exiting either)."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:  # in-process use runs a new loop per batch
            self._slots = (loop, asyncio.Semaphore(self.max_threads))
        future = loop.create_future()

        def run():
            try:
                outcome = (fn(*args, **kwargs), None)
            except BaseException as e:  # handed to the awaiting coroutine, which records it
                outcome = (None, e)
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, future, *outcome)

        async with self._slots[1]:
            threading.Thread(target=run, daemon=True, name="env-call").start()
            return await future

    async def _guard(self, tid: str, call) -> EnvResult:
        try:
            return EnvResult(text=await asyncio.wait_for(call, self.timeout_s))
        except asyncio.TimeoutError:
            self.stuck += 1
            return self._fail(tid, "timeout", f"no answer within env.timeout_s = {self.timeout_s:g} s")
        except Exception:
            return self._fail(tid, "raised", traceback.format_exc())

    def _fail(self, tid: str, kind: str, trace: str) -> EnvResult:
        self.envs.pop(tid, None)
        return EnvResult(error=kind, trace=trace)

    def live(self) -> int:
        """Instances held now (trajectories not yet finished)."""
        return len(self.envs)

    def pid(self) -> int:
        """This actor's process id (for tests that kill it from outside)."""
        return os.getpid()


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # its caller gave up (timeout)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _check_step(returned, max_abs: float) -> str | None:
    """Why a step's return is unusable, or None: it must be (str | None, finite number within max_abs, bool)."""
    if not isinstance(returned, tuple) or len(returned) != 3:
        return f"step must return (observation, reward, done), got {type(returned).__name__} {returned!r:.200}"
    obs, reward, done = returned
    if obs is not None and not isinstance(obs, str):
        return f"step's observation must be a str or None, got {type(obs).__name__}"
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        return f"step's reward must be a finite number, got {reward!r:.200}"
    if abs(reward) > max_abs:
        return f"step's reward {reward:g} lies beyond reward.max_abs_score = {max_abs:g}"
    if not isinstance(done, bool):
        return f"step's done must be a bool, got {type(done).__name__}"
    return None
