"""RewardWorker: runs the configured reward functions over every sample of a group, in a process pool.

A reward function is `fn(prompt, completion, **fields) -> float | {"score": float, other numbers}`;
`fields` are the dataset row's other columns plus `completion_tokens`, the number of response tokens.
Two other forms: a *batched* function (config `batched: true`, or the attribute `fn.batched = True`)
takes lists, `fn(prompts, completions, **columns) -> list`, each column a list with one value per
sample; an `async def` function is awaited, many samples at once. The calls run in the worker's
`RewardProcessPool` (actors/reward_pool.py), so that a call that hangs is killed, not waited for.

A call that raises (a MemoryError past `memory_mb` included), times out, kills its process, or returns NaN,
infinity, a number beyond +-`max_abs_score` or a non-number (the score or any other value of a dict) scores
`failure_score` for its sample (for its whole batch when a batched call fails as a whole), is counted
in `Group.reward_failures`, and the first traceback of each (reward, error type) is printed here and
handed back once in `Group.reward_errors`, for the driver to show. The run goes on.
"""

from __future__ import annotations

import os
import time

from actors.reward_pool import Job, RewardProcessPool
from actors.records import Group, RewardSpec


def sample_fields(group: Group, sample) -> dict:
    """What a reward function gets as `**fields`: the row's other columns and `completion_tokens`."""
    fields = dict(group.row)
    if sample.response_ids is not None:
        fields["completion_tokens"] = len(sample.response_ids)
    return fields


class RewardWorker:
    """Scores groups with reward functions run in `num_processes` subprocesses (ray.remote-ready)."""

    def __init__(self, functions: list[RewardSpec | tuple], failure_score: float = 0.0, timeout_s: float = 60.0,
                 num_processes: int = 2, max_abs_score: float = 1e6, memory_mb: int | None = None):
        """`functions`: RewardSpec of function entries (or `(label, spec, weight)` tuples); `timeout_s` per call;
        `max_abs_score` bounds every returned value; `memory_mb` the address space of each subprocess (None: a
        quarter of the machine's memory)."""
        self.specs = [f if isinstance(f, RewardSpec) else RewardSpec(*f) for f in functions]
        if not self.specs or any(s.name is None for s in self.specs):
            raise ValueError("RewardWorker runs reward functions: every entry needs a `name` "
                             "(reward models have their own worker)")
        self.failure_score = failure_score
        self.pool = RewardProcessPool({s.label: s.name for s in self.specs}, num_processes, timeout_s,
                                      max_abs_score=max_abs_score, memory_mb=memory_mb)
        self._reported: set[str] = set()

    def reward(self, groups: list[Group]) -> list[Group]:
        """Add every function's weighted score to each sample's `reward`; fill parts, extras and failures."""
        start = time.perf_counter()
        pairs = [(g, s) for g in groups for s in g.samples]
        items = [(g.prompt, s.text, sample_fields(g, s)) for g, s in pairs]
        jobs = [Job(spec.label, items, spec.batched or self.pool.kinds[spec.label]["batched"], spec.batch_size)
                for spec in self.specs]
        for spec, outcomes in zip(self.specs, self.pool.run(jobs)):
            for (g, s), out in zip(pairs, outcomes):
                if out[0] is None:
                    value = self._failed(spec.label, g, out[1], out[2])
                else:
                    value, extras = out
                    for key, x in (extras or {}).items():
                        s.reward_extras[f"{spec.label}/{key}"] = x
                s.add_reward(spec.label, spec.weight, value)
        elapsed = time.perf_counter() - start
        Group.spread_time(groups, "reward", elapsed)
        return groups

    def _failed(self, label: str, group: Group, kind: str, text: str) -> float:
        # A bad verifier must never take the run down, nor flood the log: each kind is printed once.
        if group.note_reward_failure(label, kind, text, self._reported):
            print(f"reward {label} failed ({kind}); such samples score {self.failure_score}. "
                  f"First traceback:\n{text}", flush=True)
        return self.failure_score

    def pid(self) -> int:
        """This actor's process id (for tests that kill it from outside)."""
        return os.getpid()

    def process_ids(self) -> list[int]:
        """Process ids of the reward subprocesses (for tests and debugging)."""
        return self.pool.pids()

    def restarts(self) -> int:
        """Reward subprocesses replaced so far (after a timeout or a crash)."""
        return self.pool.restarts

    def close(self) -> None:
        """Stop the reward subprocesses."""
        self.pool.close()
