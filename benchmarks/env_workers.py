"""Multi-turn rollouts whose environment step sleeps 50 ms: trajectories per second with 1 and 4 environment hosts,
and with each host running its steps concurrently or one at a time, and the share of rollout time spent waiting on
the environments.

Run: python benchmarks/env_workers.py [--prompts 16] [--group 8] [--turns 3] [--sleep-ms 50] [--repeats 3]
Starts an embedded Ray, then for each setting builds the hosts as Ray actors and rolls the same prompts out through an
in-process RolloutWorker (a tiny untrained Llama, so the environment dominates): every turn's steps go to the hosts
in one batch per host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Run as a script, this folder is sys.path[0]; the project root must be importable instead.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


class SleepyEnv:
    """`turns` turns, each step sleeping `sleep_ms` (a tool call over the network, say), reward 0."""

    def __init__(self, sleep_ms: float = 50.0, turns: int = 3):
        self.sleep_s, self.turns, self.turn = sleep_ms / 1000, turns, 0

    def reset(self, row: dict) -> str:
        return row["prompt"]

    def step(self, action: str):
        time.sleep(self.sleep_s)
        self.turn += 1
        return "=1\n", 0.0, self.turn >= self.turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--sleep-ms", type=float, default=50.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is reported")
    args = ap.parse_args()

    import ray

    from actors.env_host import EnvHost
    from actors.evaluation import requests_from_rows
    from actors.records import SamplingParams
    from actors.rollout import RolloutWorker
    from examples.arith.task import make_rows
    from examples.arith.warmstart import build_random
    from orchestrator.ray_setup import start_embedded_ray

    start_embedded_ray(num_cpus=8, log_to_driver=False)
    model = build_random(tempfile.mkdtemp() + "/tiny")
    worker = RolloutWorker("hf", model, threads=1, env={"max_turns": args.turns, "max_total_tokens": 64})
    requests = requests_from_rows(make_rows("train", args.prompts), worker.engine.tokenizer)
    sampling = SamplingParams(n=args.group, temperature=1.0, max_new_tokens=4)
    trajectories = args.prompts * args.group
    env = f"{os.path.realpath(__file__)}:SleepyEnv"
    print(f"{trajectories} trajectories x {args.turns} turns, each step sleeping {args.sleep_ms:g} ms "
          f"(serial: {trajectories * args.turns * args.sleep_ms / 1000:.1f} s of sleep)", flush=True)
    rates = {}
    for hosts, concurrency in ((1, 1), (4, 1), (1, 64), (4, 64)):
        actors = [ray.remote(EnvHost).options(num_cpus=0.25).remote(
            env, {"sleep_ms": args.sleep_ms, "turns": args.turns}, 60.0, 1e6, concurrency) for _ in range(hosts)]
        ray.get([a.live.remote() for a in actors])
        worker.generate(requests[:2], sampling, actors)  # warm-up
        walls, waits = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            groups = worker.generate(requests, sampling, actors)
            walls.append(time.perf_counter() - start)
            waits.append(sum(g.timings["env"] for g in groups))
        wall, wait = statistics.median(walls), statistics.median(waits)
        rates[hosts, concurrency] = trajectories / wall
        print(f"{hosts} host(s), {concurrency:>2} step(s) at once per host: {trajectories / wall:7.1f} trajectories/s "
              f"({wall:.2f} s, median of {args.repeats}); waiting on the environment {wait / wall:.0%} of rollout time",
              flush=True)
        for a in actors:
            ray.kill(a)
    print(f"4 hosts / 1 host: {rates[4, 1] / rates[1, 1]:.2f}x one step at a time per host, "
          f"{rates[4, 64] / rates[1, 64]:.2f}x with concurrent steps; concurrent / one at a time on 1 host: "
          f"{rates[1, 64] / rates[1, 1]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
