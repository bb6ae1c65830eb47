"""Reward throughput: N `rewards.math_equiv:math_equiv` calls one after another vs in a RewardWorker's process pool.

Run: python benchmarks/rewards.py [--calls 1000] [--processes 2]
Prints seconds for the serial loop (in this process) and for `RewardWorker.reward` over the same samples
(pool of --processes subprocesses; its start-up, which imports math-verify in each child, is timed
apart), their ratio, and the pool's overhead per sample on a trivial reward (`hash_answer`).
Both sides are warmed up first (sympy and math-verify imported, caches filled by a few calls).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

# Run as a script, this folder is sys.path[0]; the project root must be importable instead.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from actors.reward import RewardWorker  # noqa: E402
from actors.records import Group, RewardSpec, Sample  # noqa: E402


def make_samples(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, completion, reference answer): fractions, decimals, sums and expressions; about 92% correct."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, q = rng.randint(1, 99), rng.randint(2, 99)
        kind = i % 4
        if kind == 0:
            answer, completion = f"{p}/{q}", f"so the ratio is \\boxed{{\\frac{{{p * 2}}}{{{q * 2}}}}}"
        elif kind == 1:
            answer, completion = f"{p / 4}", f"The answer is \\boxed{{{p}/4}}."
        elif kind == 2:
            answer, completion = str(p + q), f"Adding gives $${p} + {q} = {p + q + (i % 3 == 0)}$$"
        else:
            answer, completion = f"x^2 + {p}x", f"\\boxed{{x(x + {p})}}"
        out.append((f"Problem {i}", completion, answer))
    return out


def as_groups(samples: list[tuple[str, str, str]], group_size: int = 8) -> list[Group]:
    """Groups of `group_size` samples; each sample carries its own answer (one prompt per sample here)."""
    groups = []
    for lo in range(0, len(samples), group_size):
        chunk = samples[lo : lo + group_size]
        for prompt, completion, answer in chunk:
            groups.append(Group(prompt, prompt, {"answer": answer}, [], [Sample([0], completion, [0.0], "stop")], 0))
    return groups


def time_serial(fn, samples: list[tuple[str, str, str]]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = [fn(p, c, answer=a) for p, c, a in samples]
    return time.perf_counter() - start, scores


def time_pool(spec: RewardSpec, samples: list[tuple[str, str, str]],
              processes: int) -> tuple[float, float, list[float]]:
    """(start-up seconds, scoring seconds, scores) of a RewardWorker with `processes` subprocesses."""
    start = time.perf_counter()
    worker = RewardWorker([spec], num_processes=processes)
    worker.reward(as_groups(samples[: 4 * processes]))  # warm-up: every child imports its dependencies
    ready = time.perf_counter() - start
    try:
        groups = as_groups(samples)
        start = time.perf_counter()
        worker.reward(groups)
        elapsed = time.perf_counter() - start
    finally:
        worker.close()
    return ready, elapsed, [s.reward_parts[spec.label] for g in groups for s in g.samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="math_equiv calls per side")
    parser.add_argument("--processes", type=int, default=2, help="subprocesses of the RewardWorker")
    parser.add_argument("--trivial-calls", type=int, default=20000, help="hash_answer calls for the overhead line")
    args = parser.parse_args()

    from rewards.final_answer import hash_answer
    from rewards.math_equiv import math_equiv

    samples = make_samples(args.calls)
    time_serial(math_equiv, samples[:8])  # warm-up
    serial, want = time_serial(math_equiv, samples)
    ready, parallel, got = time_pool(RewardSpec("math_equiv", "rewards.math_equiv:math_equiv"), samples,
                                     args.processes)
    assert got == want, "the pool scored differently from the serial loop"
    print(f"cores available: {len(os.sched_getaffinity(0))}; {sum(want):.0f}/{len(want)} answers correct")
    print(f"math_equiv x {args.calls}: serial {serial:.2f} s, pool of {args.processes} processes {parallel:.2f} s "
          f"-> {serial / parallel:.2f}x (pool start-up and warm-up {ready:.2f} s, once per worker)")

    trivial = [(f"p{i}", f"#### {i}", str(i)) for i in range(args.trivial_calls)]
    serial_t, _ = time_serial(hash_answer, trivial)
    _, pool_t, _ = time_pool(RewardSpec("hash_answer", "rewards.final_answer:hash_answer"), trivial, args.processes)
    print(f"hash_answer x {args.trivial_calls}: serial {serial_t:.2f} s, pool {pool_t:.2f} s; pool cost "
          f"{(pool_t - serial_t / args.processes) / args.trivial_calls * 1e6:.1f} us per sample beyond the calls")


if __name__ == "__main__":
    main()
