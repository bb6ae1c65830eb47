"""HFEngine sampling: Hugging Face `model.generate` vs our KV-cache loop, on the same prompts.

Run: python benchmarks/hf_sampler.py [--model checkpoints/arith-sft] [--repeats 5] [--calls 8 64]
Samples 64 arith training prompts x G = 8 completions (temperature 1, up to 10 new tokens) on one torch
thread, in calls of 8 and of 64 prompts, alternating the two samplers run by run, and prints the median
seconds per pass over the 64 prompts, the tokens sampled, and generate / loop.
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
    ap.add_argument("--model", default="checkpoints/arith-sft")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per setting; the median is reported")
    ap.add_argument("--calls", type=int, nargs="+", default=[8, 64], help="prompts per generate call")
    args = ap.parse_args()

    import torch

    from actors.records import SamplingParams
    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts
    from examples.arith.task import make_rows

    torch.set_num_threads(1)
    prompts = [r["prompt"] for r in make_rows(split="train", n=64, seed=3)]
    sp = SamplingParams(n=8, temperature=1.0, max_new_tokens=10)
    engines = {s: HFEngine(args.model, sampler=s) for s in ("generate", "loop")}
    prompt_ids = encode_prompts(engines["loop"].tokenizer, prompts)  # tokenized once, as the driver does

    def one_pass(engine: HFEngine, per_call: int) -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), per_call):
            groups = engine.generate(prompt_ids[i : i + per_call], sp, seed=i)
            tokens += sum(len(c.token_ids) for g in groups for c in g)
        return time.perf_counter() - start, tokens

    print(f"{len(prompts)} prompts x n={sp.n}, T={sp.temperature}, max_new_tokens={sp.max_new_tokens}, 1 thread, "
          f"median of {args.repeats}")
    print(f"{'prompts/call':>12} {'generate s':>11} {'loop s':>8} {'tokens gen/loop':>16} {'generate/loop':>14}")
    for per_call in args.calls:
        for engine in engines.values():
            one_pass(engine, per_call)  # warm-up
        runs: dict[str, list[tuple[float, int]]] = {s: [] for s in engines}
        for _ in range(args.repeats):
            for s, engine in engines.items():
                runs[s].append(one_pass(engine, per_call))
        secs = {s: statistics.median(t for t, _ in r) for s, r in runs.items()}
        toks = {s: r[0][1] for s, r in runs.items()}
        print(f"{per_call:>12} {secs['generate']:>11.3f} {secs['loop']:>8.3f} "
              f"{toks['generate']:>7}/{toks['loop']:<8} {secs['generate'] / secs['loop']:>13.2f}x")


if __name__ == "__main__":
    main()
