"""Generation throughput with 1 and 2 rollout workers (one torch thread each) on the same requests.

Run: python benchmarks/rollout_scaling.py [--prompts 128] [--group 8] [--tokens 10] [--repeats 5] [--model DIR]
Starts an embedded Ray, builds the example's warm-started policy if no --model is given, generates the
same prompt groups through `Pools.run_groups` with 1 and then 2 rollout workers, and prints generated tokens
per second for each and their ratio. It also checks that both runs drew exactly the same samples (sampling
seeds depend on the prompts and the policy version, never on which worker ran a chunk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Run as a script, this folder is sys.path[0]; the project root must be importable instead.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per setting; the median is reported")
    args = ap.parse_args()

    import ray

    from actors.records import SamplingParams
    from examples.arith.warmstart import prepare
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.pools import Pools

    model = args.model or prepare("checkpoints/arith-sft")
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    base = {"model": {"path": model}, "data": {"train": {"source": "examples.arith.task:make_rows",
                                                           "kwargs": {"split": "train", "n": 5000}}},
            "reward": {"functions": [{"name": "rewards.final_answer:hash_answer"}]},
            "rollout": {"prompts_per_call": 8, "group_size": args.group, "threads": 1}}  # not auto: 1 each always
    requests = load_data(JobConfig.model_validate(base), model).stream.next(args.prompts)
    sampling = SamplingParams(n=args.group, temperature=1.0, max_new_tokens=args.tokens)
    results = {}
    for workers in (1, 2):
        cfg = JobConfig.model_validate(base | {"rollout": base["rollout"] | {"num_workers": workers}})
        pools = Pools(cfg, model, [("hash_answer", "rewards.final_answer:hash_answer", 1.0)])
        try:
            pools.run_groups(requests[:16], sampling, 8, score=False)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                groups = pools.run_groups(requests, sampling, 8, score=False)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
        finally:
            pools.shutdown()
        tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
        results[workers] = (tokens / seconds, [[s.response_ids for s in g.samples] for g in groups])
        print(f"{workers} rollout worker(s): {tokens} tokens in {seconds:.2f} s (median of {args.repeats}) = {tokens / seconds:,.0f} tokens/s",
              flush=True)
    print(f"2 workers / 1 worker throughput: {results[2][0] / results[1][0]:.2f}x; "
          f"same samples: {results[1][1] == results[2][1]}")
    ray.shutdown()


if __name__ == "__main__":
    main()
