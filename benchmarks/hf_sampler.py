"""HFEngine sampling: Hugging Face `model.generate` vs our KV-cache loop, on the same prompts.

Run: python benchmarks/hf_sampler.py [--model checkpoints/arith-sft] [--repeats 5] [--calls 8 64]
     python benchmarks/hf_sampler.py --task scratch [--threads 1 2]    # the compute-bound job (issue 20)
`--task arith` (default) samples 64 arith training prompts x G = 8 completions (temperature 1, up to 10 new tokens)
in calls of 8 and of 64 prompts; `--task scratch` samples 8 scratchpad prompts x G = 8 (up to 96 new tokens, about
50 on average) with the 20.5M-parameter policy of `examples/arith_scratch_grpo.yaml`, in one call, as one step of
that job does. The two samplers alternate run by run; this prints, per setting, the median seconds per pass, the
tokens sampled, generation-only tokens/s of each, and generate / loop.
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


TASKS = {  # model, prompt rows, sampling, default prompts per call
    "arith": ("checkpoints/arith-sft", "examples.arith.task", 64, 10, [8, 64]),
    "scratch": ("checkpoints/arith-scratch-20m", "examples.scratch.task", 8, 96, [8]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="arith")
    ap.add_argument("--model", default=None, help="checkpoint (default: the task's policy, built if missing)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per setting; the median is reported")
    ap.add_argument("--calls", type=int, nargs="+", default=None, help="prompts per generate call")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads (each a setting)")
    args = ap.parse_args()

    import importlib

    import torch

    from actors.records import SamplingParams
    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts

    default_model, rows_module, n_prompts, max_new, calls = TASKS[args.task]
    model = args.model or default_model
    if args.model is None:  # the task's own policy, built as its config's model.prepare would
        prepare = importlib.import_module("examples.scratch.warmstart" if args.task == "scratch"
                                          else "examples.arith.warmstart").prepare
        prepare(model)
    prompts = [r["prompt"] for r in importlib.import_module(rows_module).make_rows(split="train", n=n_prompts, seed=3)]
    sp = SamplingParams(n=8, temperature=1.0, max_new_tokens=max_new)
    engines = {s: HFEngine(model, sampler=s) for s in ("generate", "loop")}
    prompt_ids = encode_prompts(engines["loop"].tokenizer, prompts)  # tokenized once, as the driver does

    def one_pass(engine: HFEngine, per_call: int) -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(prompts), per_call):
            groups = engine.generate(prompt_ids[i : i + per_call], sp, seed=i)
            tokens += sum(len(c.token_ids) for g in groups for c in g)
        return time.perf_counter() - start, tokens

    print(f"{len(prompts)} prompts x n={sp.n}, T={sp.temperature}, max_new_tokens={sp.max_new_tokens}, "
          f"median of {args.repeats}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'threads':>7} {'prompts/call':>12} {'generate s':>11} {'loop s':>8} {'tokens gen/loop':>16} "
          f"{'gen tok/s':>10} {'loop tok/s':>11} {'generate/loop':>14}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for per_call in args.calls or calls:
            for engine in engines.values():
                one_pass(engine, per_call)  # warm-up
            runs: dict[str, list[tuple[float, int]]] = {s: [] for s in engines}
            for _ in range(args.repeats):
                for s, engine in engines.items():
                    runs[s].append(one_pass(engine, per_call))
            secs = {s: statistics.median(t for t, _ in r) for s, r in runs.items()}
            toks = {s: r[0][1] for s, r in runs.items()}
            print(f"{threads:>7} {per_call:>12} {secs['generate']:>11.3f} {secs['loop']:>8.3f} "
                  f"{toks['generate']:>7}/{toks['loop']:<8} {toks['generate'] / secs['generate']:>10.0f} "
                  f"{toks['loop'] / secs['loop']:>11.0f} {secs['generate'] / secs['loop']:>13.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
